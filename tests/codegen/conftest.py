"""Test setup for flashc.codegen's Triton kernels.

Without CUDA the kernels run on CPU tensors through Triton's interpreter.  The
interpreter is chosen when ``@triton.jit`` runs, i.e. when a kernel module is
imported, so ``TRITON_INTERPRET=1`` is set here, at conftest import, before any
test module imports ``flashc.codegen.triton_*``; kernel modules some earlier
test already imported are reloaded so they pick the interpreter up too.
With CUDA the same tests run compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in (
        "flashc.codegen._triton_common",
        "flashc.codegen.triton_norm",
        "flashc.codegen.triton_rotary",
        "flashc.codegen.triton_mlp",
        "flashc.codegen.triton_attention",
        "flashc.codegen.triton_moe",
        "flashc.codegen.triton_gemv",
        "flashc.codegen.triton_ssm",
        "flashc.codegen.triton_gla",
        "flashc.codegen.triton_sparse_gemv",
    ):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]
INTERPRETED = not HAS_CUDA


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _isolated_tuning_cache(tmp_path, monkeypatch):
    """Each test gets its own $FLASHC_CACHE, so no test reads or writes ~/.cache/flashc."""
    monkeypatch.setenv("FLASHC_CACHE", str(tmp_path / "flashc_cache"))
    from flashc.codegen import tuning

    tuning.clear_memory_cache()
    yield
    tuning.clear_memory_cache()
