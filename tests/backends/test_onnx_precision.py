"""onnx-cpu against eager PyTorch in fp16/bf16 (`backends/onnx/_precision.py`): casts are
respected and every op rounds its result as PyTorch does; bf16 tensors pass the runtime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import flashc  # noqa: E402
from test_onnx_in_place import check_against_eager  # noqa: E402


class Casts(nn.Module):
    """Arithmetic in fp16/bf16 between casts: each result rounded as PyTorch rounds it."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        low = x.to(self.dtype)
        return ((low * 3).float(), (low * 0.1 + 0.3).float(), (low / 7 - low).float(),
                torch.add(low, low, alpha=0.3).float(), low.exp().to(torch.float64), (low > 0.5).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", [0, 3])
def test_low_precision_arithmetic_is_rounded_like_eager(dtype, level):
    check_against_eager(Casts(dtype), lambda: (torch.randn(64, 32) * 4,), level, atol=0, rtol=0)
    x = torch.randn(64, 32) * 4
    cm = flashc.compile(Casts(dtype), target="onnx-cpu", example_inputs=(x,), level=level)
    assert not torch.equal(cm(x)[0], x * 3), "the cast to fp16/bf16 was skipped"


class LowPrecisionModel(nn.Module):
    """A model whose weights and inputs are fp16/bf16: reductions and matmuls accumulate in fp32."""

    def __init__(self, dtype):
        super().__init__()
        self.proj = nn.Linear(32, 16).to(dtype)
        self.norm = nn.LayerNorm(16).to(dtype)

    def forward(self, x):
        h = self.norm(self.proj(x))
        return F.softmax(h, -1), (h * h).mean(-1), F.gelu(h)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_model_inputs_and_outputs(dtype, tol):
    """bf16 passes through the runtime (bound by address, numpy has no bf16) and runs on the CPU."""
    check_against_eager(LowPrecisionModel(dtype), lambda: (torch.randn(4, 32).to(dtype),), 2, atol=tol, rtol=tol)
