"""backends/onnx/_quantized.py: flashc.linear_wq -> com.microsoft MatMulNBits (int4/int8, the packed
weights as initializers), its standard-op form, quantized zoo models on onnx-cpu against the cpu
target, and the refusal of quantized MoE experts."""

from __future__ import annotations

import collections

import pytest
import torch
from flashc_testing import fresh_ids, rel_err
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import flashc  # noqa: E402
from flashc.decode import DecodeStep, decode_example_inputs  # noqa: E402
from flashc.errors import UnsupportedOpError  # noqa: E402
from flashc.passes.quantize.rtn import rtn_quantize  # noqa: E402

OP_TOL = 1e-5  # same dequantized weight, fp32 sums in another order
MODEL_TOL = 1e-4
CALLS = 3
MATMUL_NBITS = "com.microsoft.MatMulNBits"


def _op_counts(path) -> collections.Counter:
    proto = onnx.load(str(path), load_external_data=False)
    return collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in proto.graph.node)


class QuantizedLinear(nn.Module):
    """One flashc.linear_wq over a random [N, K] weight quantized by the project's RTN quantizer."""

    def __init__(self, n: int, k: int, bits: int, group: int, symmetric: bool, bias: bool, input_scale: bool):
        super().__init__()
        q = rtn_quantize(torch.randn(n, k), bits, group, symmetric)
        qweight, scales, zero_points = q.packed()
        self.bits = bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("bias", torch.randn(n) if bias else None)
        self.register_buffer("input_scale", torch.rand(k) + 0.5 if input_scale else None)

    def forward(self, x):
        return torch.ops.flashc.linear_wq(x, self.qweight, self.scales, self.zero_points, self.bias,
                                          self.input_scale, self.bits)


def _compile_and_compare(module: QuantizedLinear, shape: tuple[int, ...], **options) -> collections.Counter:
    """Compile module for onnx-cpu at -O0 and compare it with the reference op on fresh inputs;
    returns the exported model's op counts."""
    cm = flashc.compile(module, "onnx-cpu", (torch.randn(shape),), level=0, options=options or None)
    for _ in range(CALLS):
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(cm(x), module(x)) < OP_TOL
    return _op_counts(cm.executable.path)


@pytest.mark.parametrize("bias,input_scale", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_wq_is_one_matmul_nbits(bits, symmetric, group, bias, input_scale):
    module = QuantizedLinear(48, 256, bits, group, symmetric, bias, input_scale)
    ops = _compile_and_compare(module, (2, 5, 256))
    assert ops[MATMUL_NBITS] == 1
    assert ops["Mul"] == int(input_scale)  # x * input_scale, nothing else around the node
    assert "MatMul" not in ops and "Add" not in ops  # the bias is MatMulNBits' own input


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_tensors_are_initializers_unchanged(bits):
    """B is the qweight's bytes; scales and zero points are the same bytes viewed flat."""
    module = QuantizedLinear(16, 64, bits, 32, False, False, False)
    cm = flashc.compile(module, "onnx-cpu", (torch.randn(3, 64),), level=0)
    proto = onnx.load(str(cm.executable.path))
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == 32 and attrs["K"] == 64 and attrs["N"] == 16
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    b, scales, zp = (inits[name] for name in node.input[1:4])
    assert b.dtype.name == "uint8" and b.shape == (16, 2, 32 * bits // 8)
    assert (b == module.qweight.numpy()).all()
    assert scales.shape == (32,) and (scales == module.scales.reshape(-1).numpy()).all()
    assert zp.dtype.name == "uint8" and (zp == module.zero_points.reshape(-1).numpy()).all()
    assert zp.shape == ((16,) if bits == 4 else (32,))  # two blocks: one byte a row at 4 bits


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_standard_op_form_without_contrib_ops(bits, symmetric):
    module = QuantizedLinear(24, 128, bits, 32, symmetric, True, True)
    ops = _compile_and_compare(module, (4, 128), contrib_ops=False)
    assert ops[MATMUL_NBITS] == 0 and ops["MatMul"] == 1
    assert not any(op.startswith("com.microsoft") for op in ops)


def test_block_size_matmul_nbits_refuses_takes_the_standard_form():
    """Per-channel int8 of K = 96: one block of 96, not a power of two (ORT's kernels refuse it)."""
    module = QuantizedLinear(8, 96, 8, 96, True, False, False)
    ops = _compile_and_compare(module, (2, 96))
    assert ops[MATMUL_NBITS] == 0 and ops["MatMul"] == 1


# --- quantized models -------------------------------------------------------------------------

CALIBRATED = {"int4-awq", "int4-gptq"}


@pytest.mark.parametrize("scheme", ["int4-rtn", "int8-weight", "int4-awq", "int4-gptq"])
def test_quantized_llama_matches_cpu_target(tiny_models, scheme):
    """Every linear_wq is a MatMulNBits node, none falls back, and the logits equal the same
    quantized program run eagerly (the cpu target). AWQ's input scales are a Mul before it."""
    model = tiny_models["llama-tiny"]
    example = fresh_ids("llama-tiny", seq_len=8, seed=0)
    calibration = fresh_ids("llama-tiny", batch=4, seq_len=256, seed=1) if scheme in CALIBRATED else None
    cm = flashc.compile(model, "onnx-cpu", (example,), quantize=scheme, calibration=calibration)
    ref = flashc.compile(model, "cpu", (example,), quantize=scheme, calibration=calibration)
    scaled = sum(1 for n in cm.program.op_nodes()
                 if n.target == torch.ops.flashc.linear_wq.default and n.args[5] is not None)
    assert (scaled > 0) == (scheme == "int4-awq")
    assert not any(f.op.startswith("flashc.linear_wq") for f in cm.fallbacks)
    quantized = sum(1 for n in cm.program.op_nodes() if n.target == torch.ops.flashc.linear_wq.default)
    assert quantized >= 8  # q/k/v (or merged qkv), o, gate/up, down of two layers
    assert _op_counts(cm.executable.path)[MATMUL_NBITS] == quantized
    for _ in range(CALLS):
        ids = fresh_ids("llama-tiny", seq_len=8)
        with torch.no_grad():
            assert rel_err(cm(ids).logits, ref(ids).logits) < MODEL_TOL


def test_quantized_decode_step_matches_cpu_target(tiny_models):
    model = tiny_models["llama-tiny"]
    cache_len, steps = 16, 4
    inputs = decode_example_inputs(model, 1, cache_len)
    cm = flashc.compile(DecodeStep(model, cache_len), "onnx-cpu", inputs, level=3, quantize="int4-rtn")
    ref = flashc.compile(DecodeStep(model, cache_len), "cpu", inputs, level=3, quantize="int4-rtn")
    assert _op_counts(cm.executable.path)[MATMUL_NBITS] > 0
    kv = [torch.randn(s.shape) for s in cm.inputs[2:]]
    ref_kv = [t.clone() for t in kv]
    tokens = fresh_ids("llama-tiny", seq_len=steps)
    with torch.no_grad():
        for t in range(steps):
            ids, pos = tokens[:, t:t + 1], torch.tensor([t])
            assert rel_err(cm(ids, pos, *kv), ref(ids, pos, *ref_kv)) < MODEL_TOL
    for got, want in zip(kv, ref_kv, strict=True):
        assert rel_err(got, want) < MODEL_TOL


def test_quantized_moe_experts_are_refused_with_what_to_do(tiny_models):
    with pytest.raises(UnsupportedOpError) as e:
        flashc.compile(tiny_models["mixtral-tiny"], "onnx-cpu", (fresh_ids("mixtral-tiny", seq_len=8),),
                       quantize="int4-rtn")
    text = str(e.value)
    assert "flashc.moe_wq" in text and "not lowered to ONNX yet" in text and "quantize_experts=False" in text
