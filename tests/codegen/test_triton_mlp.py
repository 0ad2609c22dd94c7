"""flashc.codegen.triton_mlp: SwiGLU / GeGLU (separate and packed gate|up) against a float64 reference."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_mlp as tm  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(5,), (3, 7, 100), (4, 77), (2, 1, 1030)]
CONFIGS = [None, {"BLOCK_M": 2, "BLOCK_F": 32, "num_warps": 2}]
ACTS = {
    "swiglu": (tm.swiglu, tm.reference_swiglu, tm.swiglu_packed, tm.reference_swiglu_packed),
    "geglu": (tm.geglu, tm.reference_geglu, tm.geglu_packed, tm.reference_geglu_packed),
}


def seed(*args) -> None:
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small_tiles"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_glu_matches_reference(device, act, dtype, shape, config):
    seed(act, dtype, shape)
    fn, ref_fn, _, _ = ACTS[act]
    gate = (torch.randn(shape) * 3).to(dtype).to(device)
    up = torch.randn(shape).to(dtype).to(device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    y = fn(gate, up, out=out, config=config)
    assert y is out and y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref_fn(gate.double(), up.double())) < TOL[dtype]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small_tiles"])
@pytest.mark.parametrize("shape", [(5, 2 * 3), (3, 7, 2 * 100), (2, 2 * 1030)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_packed_glu_matches_reference(device, act, dtype, shape, config):
    seed("packed", act, dtype, shape)
    _, _, fn, ref_fn = ACTS[act]
    gu = (torch.randn(shape) * 3).to(dtype).to(device)
    out_shape = (*shape[:-1], shape[-1] // 2)
    out = torch.full(out_shape, float("nan"), dtype=dtype, device=device)
    y = fn(gu, out=out, config=config)
    assert y is out and not torch.isnan(y).any()
    assert rel_err(y, ref_fn(gu.double())) < TOL[dtype]
    # the packed variant is the separate one applied to the two halves
    sep = ACTS[act][0]
    f = shape[-1] // 2
    assert torch.equal(y, sep(gu[..., :f], gu[..., f:], config=config))


def test_references_match_torch_functional():
    """The references are the textbook formulas (guards the tests' own ground truth)."""
    seed("ref")
    g, u = torch.randn(50, dtype=torch.float64) * 4, torch.randn(50, dtype=torch.float64)
    assert torch.allclose(tm.reference_swiglu(g, u), g * torch.sigmoid(g) * u)
    tanh_form = 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3))) * u
    assert torch.allclose(tm.reference_geglu(g, u), tanh_form)
    assert not torch.allclose(tm.reference_geglu(g, u), F.gelu(g) * u, atol=1e-6)  # the tanh form, not erf


def test_glu_saturates_without_nan(device):
    g = torch.tensor([-1e4, -200.0, -90.0, -1e-8, 0.0, 1e-8, 90.0, 200.0, 1e4], device=device)
    u = torch.ones_like(g)
    for fn, ref in ((tm.swiglu, tm.reference_swiglu), (tm.geglu, tm.reference_geglu)):
        y = fn(g, u)
        assert torch.isfinite(y).all()
        assert torch.allclose(y, ref(g.double(), u.double()).float(), rtol=1e-6, atol=1e-30)


def test_glu_noncontiguous_inputs(device):
    seed("strided")
    gu = torch.randn(6, 64, device=device)
    gate, up = gu[:, :32], gu[:, 32:]  # row-strided views
    assert rel_err(tm.swiglu(gate, up), tm.reference_swiglu(gate.double(), up.double())) < 1e-5
    gt = torch.randn(32, 6, device=device).t()  # last dim strided
    assert rel_err(tm.geglu(gt, up), tm.reference_geglu(gt.double(), up.double())) < 1e-5


def test_glu_errors(device):
    a = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(4, 7\)"):
        tm.swiglu(a, torch.randn(4, 7, device=device))
    with pytest.raises(TypeError, match="up must have the dtype of gate"):
        tm.swiglu(a, a.half())
    with pytest.raises(ValueError, match="must be even"):
        tm.swiglu_packed(torch.randn(4, 7, device=device))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 4\)"):
        tm.geglu_packed(a, out=torch.empty(4, 8, device=device))
