"""flashc.codegen.triton_norm: RMSNorm / add+RMSNorm kernels against a float64 reference."""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_norm as tn  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# None = the profile's default config; the second forces multi-row programs and the
# chunked two-pass path (rows longer than MAX_BLOCK_N).
CONFIGS = [None, {"BLOCK_M": 2, "MAX_BLOCK_N": 64, "num_warps": 4}]
SHAPES = [(1, 64), (3, 5, 96), (7, 1000), (2, 3, 300)]


def seed(*args) -> None:
    """Deterministic per-test seed (str hashes are randomised per process, crc32 is not)."""
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def poison(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "chunked"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(device, dtype, shape, config):
    seed("rms", shape, dtype)
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).to(device)
    w = torch.randn(shape[-1]).to(dtype).to(device)
    out = poison(shape, dtype, device)
    y = tn.rms_norm(x, w, 1e-6, out=out, config=config)
    assert y is out and y.dtype == dtype and y.shape == x.shape
    assert not torch.isnan(y).any()
    ref = tn.reference_rms_norm(x.double(), w.double(), 1e-6)
    assert rel_err(y, ref) < TOL[dtype]
    # Allocating path agrees with the out= path.
    assert torch.equal(tn.rms_norm(x, w, 1e-6, config=config), y)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "chunked"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_reference(device, dtype, shape, config):
    seed("add", shape, dtype)
    x = torch.randn(shape).to(dtype).to(device)
    r = torch.randn(shape).to(dtype).to(device)
    w = torch.randn(shape[-1]).to(dtype).to(device)
    y_out, s_out = poison(shape, dtype, device), poison(shape, dtype, device)
    y, s = tn.add_rms_norm(x, r, w, 1e-5, out=y_out, residual_out=s_out, config=config)
    assert y is y_out and s is s_out
    assert not torch.isnan(y).any() and not torch.isnan(s).any()
    ref_y, ref_s = tn.reference_add_rms_norm(x.double(), r.double(), w.double(), 1e-5)
    assert rel_err(s, ref_s) < TOL[dtype]
    assert rel_err(y, ref_y) < TOL[dtype]
    if dtype != torch.bfloat16:
        # s is x + residual rounded once to x.dtype, exactly as eager PyTorch computes it.
        # (bf16 is left out: the CPU interpreter rounds fp32->bf16 by truncation.)
        assert torch.equal(s, x + r)


def test_rms_norm_strided_rows_and_noncontiguous_last_dim(device):
    torch.manual_seed(3)
    base = torch.randn(6, 200, device=device)
    x = base[:, 10:110]  # row stride 200, last dim contiguous: used as a view
    w = torch.randn(100, device=device)
    ref = tn.reference_rms_norm(x.double(), w.double())
    assert rel_err(tn.rms_norm(x, w), ref) < 1e-5
    xt = torch.randn(100, 6, device=device).t()  # last dim strided: copied to contiguous first
    assert rel_err(tn.rms_norm(xt, w), tn.reference_rms_norm(xt.double(), w.double())) < 1e-5


def test_rms_norm_output_dtype_follows_pytorch_promotion(device):
    torch.manual_seed(4)
    x = torch.randn(4, 48, device=device).to(torch.float16)
    w = torch.randn(48, device=device)  # fp32 weight: eager `.to(x.dtype) * weight` gives fp32
    y = tn.rms_norm(x, w)
    assert y.dtype == torch.float32
    assert rel_err(y, tn.reference_rms_norm(x, w).double()) < 1e-6


def test_rms_norm_zero_rows_give_zero_not_nan(device):
    x = torch.zeros(3, 40, device=device)
    x[1] = 1.0
    w = torch.ones(40, device=device)
    y = tn.rms_norm(x, w, 1e-6)
    assert torch.equal(y[0], torch.zeros(40, device=device))
    assert torch.allclose(y[1], torch.ones(40, device=device), rtol=1e-5)


def test_rms_norm_empty_batch(device):
    x = torch.randn(0, 32, device=device)
    assert tn.rms_norm(x, torch.ones(32, device=device)).shape == (0, 32)


def test_norm_errors_name_what_was_expected(device):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(32,\).*got \(16,\)"):
        tn.rms_norm(x, torch.ones(16, device=device))
    with pytest.raises(TypeError, match="x must have dtype"):
        tn.rms_norm(x.to(torch.int32), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        tn.add_rms_norm(x, torch.randn(4, 31, device=device), torch.ones(32, device=device))
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        tn.add_rms_norm(x, x.half(), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        tn.rms_norm(x, torch.ones(32, device=device), out=torch.empty(4, 33, device=device))
    with pytest.raises(ValueError, match="must not share memory"):
        tn.add_rms_norm(x, x.clone(), torch.ones(32, device=device), residual_out=x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled kernels must reject CPU tensors")
def test_compiled_kernel_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tn.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_row_invariant_rows_equal_one_row_calls(device, monkeypatch):
    """Under codegen.tuning.row_invariant the rows take the one-row call's config (a multi-row tile here,
    told apart by its key): each row equals the one-row call bit for bit."""
    configs = {1: {"BLOCK_M": 1, "MAX_BLOCK_N": 64, "num_warps": 2}, 8: {"BLOCK_M": 4, "MAX_BLOCK_N": 256, "num_warps": 4}}
    keys = []
    monkeypatch.setattr(tn.tuning, "get_config",
                        lambda name, key, *a: keys.append(key["M"]) or configs[1 if key["M"] == 1 else 8])
    x = torch.randn(6, 200, device=device)
    r = torch.randn(6, 200, device=device)
    w = torch.randn(200, device=device)
    with tn.tuning.row_invariant():
        y = tn.rms_norm(x, w, 1e-6)
        total, z = tn.add_rms_norm(x, r, w, 1e-6)
    assert keys == [1, 1]
    for i in range(6):
        assert torch.equal(y[i:i + 1], tn.rms_norm(x[i:i + 1], w, 1e-6))
        t_i, z_i = tn.add_rms_norm(x[i:i + 1], r[i:i + 1], w, 1e-6)
        assert torch.equal(total[i:i + 1], t_i) and torch.equal(z[i:i + 1], z_i)
    tn.rms_norm(x, w, 1e-6)
    assert keys[-1] == 6  # outside the context: the rows' own key
