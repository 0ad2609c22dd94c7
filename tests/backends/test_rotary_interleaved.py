"""flashc.rotary_interleaved through every backend that lowers it, against eager: ONNX (ORT's
RotaryEmbedding with interleaved=1, and the standard-op form), TVM (llvm), and the CUDA
backend's late pass, which folds flashc.rotary into the KV-cache write but must leave the
interleaved op alone (its kernel rotates halves). The Triton kernel itself:
tests/codegen/test_triton_rotary.py."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flashc_testing import rel_err

import flashc
from flashc.backends.cuda_rewrites import FuseKvWrites
from flashc.capture import capture
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES

B, H, S, D = 2, 3, 5, 8


def rope_pairs(x, cos, sin):
    """A hand-written Llama's rope on pairs (2i, 2i + 1), cos/sin [S, D/2]."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rope_halves(x, cos, sin):
    """Hugging Face's rotate-half rope with the same angles (cos/sin [S, D/2], halves repeated)."""
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin


class RopedProjection(nn.Module):
    """x [B, S, 16] -> heads [B, H, S, D] rotated by position (tables in buffers, positions 0..S-1)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, H * D)
        angles = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(D // 2) * 2 / D))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], x.shape[1], H, D).transpose(1, 2)
        n = x.shape[1]
        return rope_pairs(q, self.cos[:n], self.sin[:n])


class TablesAsInputs(nn.Module):
    """Tables given at run time: no constant tables for ORT's RotaryEmbedding, the standard-op form."""

    def forward(self, x, cos, sin):
        return rope_pairs(x, cos, sin) * 2


def _program(model, inputs):
    program = capture(model, inputs)
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["cpu"]))
    assert [op_name(n) for n in program.op_nodes()].count("flashc.rotary_interleaved") == 1
    return program


def _onnx_ops(path) -> collections.Counter:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node)


@pytest.mark.parametrize("contrib_ops", [True, False], ids=["RotaryEmbedding", "standard-ops"])
def test_onnx_runs_the_interleaved_form_as_eager(tmp_path, contrib_ops):
    pytest.importorskip("onnxruntime")
    from flashc.backends.onnx import OnnxRuntimeModel, export_onnx

    model = RopedProjection().eval()
    program = _program(model, (torch.randn(B, S, 16),))
    path = export_onnx(program, tmp_path / "model.onnx", contrib_ops=contrib_ops)
    ort_model = OnnxRuntimeModel.load(path)
    for _ in range(2):
        x = torch.randn(B, S, 16)
        with torch.no_grad():
            want = model(x)
        assert rel_err(ort_model(x)[0], want) < 1e-5
    ops = _onnx_ops(path)
    assert ops["com.microsoft.RotaryEmbedding"] == int(contrib_ops)
    if contrib_ops:
        import onnx

        (node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "RotaryEmbedding"]
        assert {a.name: a.i for a in node.attribute}["interleaved"] == 1


def test_onnx_tables_at_run_time_take_the_standard_ops(tmp_path):
    pytest.importorskip("onnxruntime")
    from flashc.backends.onnx import OnnxRuntimeModel, export_onnx

    make = lambda: (torch.randn(B, H, S, D), torch.randn(S, D // 2), torch.randn(S, D // 2))  # noqa: E731
    program = _program(TablesAsInputs(), make())
    path = export_onnx(program, tmp_path / "model.onnx")
    ort_model = OnnxRuntimeModel.load(path)
    args = make()
    assert rel_err(ort_model(*args)[0], TablesAsInputs()(*args)) < 1e-5
    assert _onnx_ops(path)["com.microsoft.RotaryEmbedding"] == 0


def test_tvm_runs_the_interleaved_form_as_eager():
    pytest.importorskip("tvm")
    model = RopedProjection().eval()
    cm = flashc.compile(model, "tvm-cpu", (torch.randn(B, S, 16),), level=3)
    assert [op_name(n) for n in cm.program.op_nodes()].count("flashc.rotary_interleaved") == 1
    for _ in range(2):
        x = torch.randn(B, S, 16)
        with torch.no_grad():
            want = model(x)
        assert rel_err(cm(x), want) < 1e-5


class CacheWrite(nn.Module):
    """A decode step's rope and cache writes at the positions, then attention: index_copy_ (HF's
    static cache) or slice assignment (index_put_, a hand-written cache)."""

    def __init__(self, rope, slices=False):
        super().__init__()
        self.rope, self.slices = rope, slices

    def forward(self, q, k, v, cos, sin, pos, k_cache, v_cache):
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if self.slices:
            k_cache[:, :, pos] = k
            v_cache[:, :, pos] = v
        else:
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, k_cache, v_cache)


@pytest.mark.parametrize("slices", [False, True], ids=["index_copy", "slice-assignment"])
@pytest.mark.parametrize("rope,interleaved", [(rope_halves, False), (rope_pairs, True)],
                         ids=["rotate-half", "interleaved"])
def test_cuda_kv_write_folding_keeps_each_rotary_kind(rope, interleaved, slices):
    """Both kinds of rope fold into one rotary_qkv_write that carries the kind, and the fold gives
    the graph's own numbers, caches included, for positions counted from either end."""
    L = 7

    def make(position):
        return (torch.randn(1, H, 1, D), torch.randn(1, H, 1, D), torch.randn(1, H, 1, D),
                torch.randn(1, D // 2), torch.randn(1, D // 2), torch.tensor([position]),
                torch.randn(1, H, L, D), torch.randn(1, H, L, D))

    program = capture(CacheWrite(rope, slices), make(3))
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["cpu"]))
    op = "flashc.rotary_interleaved" if interleaved else "flashc.rotary"
    assert [op_name(n) for n in program.op_nodes()].count(op) == 2
    lowered = program.clone()
    # numeric_check: the rewritten graph is run against the one before on the example inputs
    (record,) = PassManager([FuseKvWrites()], numeric_check=True).run(lowered, PassContext(PROFILES["h100"]))
    assert record.stats["kv_writes_fused"] == 1
    ops = collections.Counter(op_name(n) for n in lowered.op_nodes())
    assert ops["flashc.rotary_qkv_write"] == 1 and ops[op] == 0
    assert ops["aten.index_put_"] == ops["aten.index_copy_"] == 0
    (call,) = [n for n in lowered.op_nodes() if op_name(n) == "flashc.rotary_qkv_write"]
    assert call.args[-1] is interleaved
    # a negative position counts from the end for a slice assignment (the fold wraps it)
    for position in (3, 0, L - 1) + ((-2,) if slices else ()):
        args = make(position)
        caches = [t.clone() for t in args[-2:]]
        want = CacheWrite(rope, slices)(*args[:-2], *caches)
        mine = [t.clone() for t in args[-2:]]
        got = lowered.run_flat(*args[:-2], *mine)
        assert rel_err(got[0], want) < 1e-6
        assert all(torch.equal(a, b) for a, b in zip(mine, caches))
