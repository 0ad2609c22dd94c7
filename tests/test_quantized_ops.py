"""flashc.linear_wq / flashc.moe_wq and the packed (MatMulNBits) layout of their weights."""

import pytest
import torch
import torch.nn.functional as F

from flashc import quantized_ops as qops
from flashc_testing import rel_err


def random_codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)


def random_packed(n, k, bits, group, seed=0, lead=(), symmetric=False):
    g = torch.Generator().manual_seed(seed + 1)
    codes = random_codes((*lead, n, k), bits, seed)
    scales = torch.rand((*lead, n, k // group), generator=g) * 0.1 + 0.01
    zp = None if symmetric else random_codes((*lead, n, k // group), bits, seed + 2)
    qweight = qops.pack_codes(codes, bits, group)
    return codes, scales, zp, qweight, None if zp is None else qops.pack_zero_points(zp, bits)


def reference_weight(codes, scales, zp, bits, group):
    """(codes - zero point) * scale per group, in float64, written out element by element's group."""
    zpf = torch.full(scales.shape, float(1 << (bits - 1)), dtype=torch.float64) if zp is None else zp.double()
    per_k = lambda t: t.double().repeat_interleave(group, dim=-1)  # noqa: E731
    return (codes.double() - per_k(zpf)) * per_k(scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_pack_round_trip(bits, lead):
    codes, scales, zp, qweight, zp_packed = random_packed(6, 64, bits, 32, lead=lead)
    assert qweight.dtype == torch.uint8
    assert qweight.shape == (*lead, 6, 2, 32 * bits // 8)
    assert torch.equal(qops.unpack_codes(qweight, bits), codes)
    assert torch.equal(qops.unpack_zero_points(zp_packed, bits, 2), zp)
    # 3 blocks: the zero points' last byte is partly used
    zp3 = random_codes((5, 3), bits, 7)
    assert torch.equal(qops.unpack_zero_points(qops.pack_zero_points(zp3, bits), bits, 3), zp3)


def test_int4_layout_is_matmul_nbits():
    """The same bytes as backends/onnx/int4.py's MatMulNBits packing (so ONNX lowering repacks nothing)."""
    from flashc.backends.onnx.int4 import Int4Weight

    codes, scales, zp, qweight, zp_packed = random_packed(8, 128, 4, 32)
    ort = Int4Weight.from_quantized(codes, scales, zp, 32)
    assert torch.equal(ort.packed, qweight)
    assert torch.equal(ort.zero_points, zp_packed)
    assert torch.equal(ort.dequantize(), qops.dequantize(qweight, scales, zp_packed, 4))


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_dequantize_matches_float64_reference(bits, symmetric):
    codes, scales, zp, qweight, zp_packed = random_packed(5, 96, bits, 32, symmetric=symmetric)
    got = qops.dequantize(qweight, scales, zp_packed, bits)
    assert got.dtype == torch.float32
    assert rel_err(got, reference_weight(codes, scales, zp, bits, 32)) < 1e-7


def test_pack_refuses_bad_codes():
    with pytest.raises(ValueError, match="below 16"):
        qops.pack_codes(torch.full((2, 32), 16, dtype=torch.uint8), 4, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        qops.pack_codes(torch.zeros(2, 48, dtype=torch.uint8), 4, 32)
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        qops.pack_codes(torch.zeros(2, 32, dtype=torch.uint8), 5, 32)
    with pytest.raises(ValueError, match="a group of 12 3-bit codes is not a whole number of bytes"):
        qops.pack_codes(torch.zeros(2, 48, dtype=torch.uint8), 3, 12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("with_extras", [False, True])
def test_linear_wq_matches_float64(bits, with_extras):
    codes, scales, zp, qweight, zp_packed = random_packed(24, 64, bits, 32)
    x = torch.randn(2, 3, 64)
    bias = torch.randn(24) if with_extras else None
    input_scale = torch.rand(64) + 0.5 if with_extras else None
    got = torch.ops.flashc.linear_wq(x, qweight, scales, zp_packed, bias, input_scale, bits)
    w = reference_weight(codes, scales, zp, bits, 32)
    xd = x.double() * (input_scale.double() if with_extras else 1)
    want = F.linear(xd, w, None if bias is None else bias.double())
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_linear_wq_computes_in_the_activation_dtype():
    _, scales, _, qweight, zp = random_packed(16, 64, 4, 64)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    got = torch.ops.flashc.linear_wq(x, qweight, scales.bfloat16(), zp, None, None, 4)
    assert got.dtype == torch.bfloat16
    want = x.double() @ qops.dequantize(qweight, scales.bfloat16(), zp, 4).double().t()
    assert rel_err(got, want) < 2e-2


def test_ops_pass_opcheck():
    """Schema, fake kernel and real kernel agree (torch.library.opcheck)."""
    _, scales, _, qweight, zp = random_packed(8, 32, 4, 32)
    torch.library.opcheck(torch.ops.flashc.linear_wq.default,
                          (torch.randn(3, 32), qweight, scales, zp, torch.randn(8), torch.rand(32), 4),
                          test_utils=("test_schema", "test_faketensor"))
    e, h, f = 3, 32, 32
    _, gs, _, gq, gz = random_packed(2 * f, h, 4, 32, lead=(e,))
    _, ds, _, dq, dz = random_packed(h, f, 4, 32, lead=(e,), seed=5)
    torch.library.opcheck(torch.ops.flashc.moe_wq.default,
                          (torch.randn(5, h), torch.randn(5, e), gq, gs, gz, None, dq, ds, dz, None, 2, True, 4),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_moe_wq_is_moe_of_the_dequantized_experts(bits):
    e, h, f, t = 4, 64, 32, 9
    gc, gs, gzp, gq, gz = random_packed(2 * f, h, bits, 32, lead=(e,))
    dc, ds, dzp, dq, dz = random_packed(h, f, bits, 32, lead=(e,), seed=3)
    gate_in, down_in = torch.rand(e, h) + 0.5, torch.rand(e, f) + 0.5
    x, logits = torch.randn(t, h), torch.randn(t, e)
    got = torch.ops.flashc.moe_wq(x, logits, gq, gs, gz, gate_in, dq, ds, dz, down_in, 2, True, bits)
    # an input scale multiplies the activation: the same as scaling the weight's columns
    gate_up = reference_weight(gc, gs, gzp, bits, 32) * gate_in.double().unsqueeze(1)
    down = reference_weight(dc, ds, dzp, bits, 32) * down_in.double().unsqueeze(1)
    want = torch.ops.flashc.moe(x.double(), logits.double(), gate_up, down, 2, True)
    assert rel_err(got, want) < 1e-5
