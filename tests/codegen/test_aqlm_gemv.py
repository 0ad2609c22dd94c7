"""flashc.codegen.aqlm_gemv: the AQLM GEMV (codes and codebooks read directly) and the dequantize
kernel of the prefill path, against a float64 reference on fresh random codes, codebooks and scales;
the CUDA backend's table points flashc.linear_aqlm at it."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codebook_ops import decode_aqlm  # noqa: E402
from flashc.codegen import _triton_common  # noqa: E402
from flashc.codegen import aqlm_gemv as ag  # noqa: E402

if not torch.cuda.is_available() and not _triton_common.is_interpreted(ag._aqlm_gemv_kernel):
    ag = importlib.reload(ag)  # imported before tests/codegen/conftest.py chose the interpreter

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def weight(device, n, groups, books, g, dtype):
    codes = torch.randint(0, 256, (n, groups, books), dtype=torch.uint8)
    codebooks = torch.randn(books, 256, g) / g ** 0.5
    scales = (torch.rand(n) + 0.5) / (groups * g) ** 0.5
    return codes.to(device), codebooks.to(dtype).to(device), scales.to(dtype).to(device)


def truth(x, codes, codebooks, scales, bias):
    return ag.reference_linear_aqlm(x.double().cpu(), codes.cpu(), codebooks.double().cpu(), scales.double().cpu(),
                                    None if bias is None else bias.double().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,n,groups,books,g,bias", [
    ((1,), 37, 12, 2, 8, True),      # rows and groups that do not fill a block
    ((2, 3), 64, 32, 2, 8, False),   # 6 rows, two blocks of groups
    ((1,), 20, 5, 1, 16, True),      # one codebook, groups of 16
    ((4,), 33, 9, 3, 4, False),      # three codebooks, groups of 4
], ids=str)
def test_gemv_matches_float64(device, lead, n, groups, books, g, bias, dtype):
    codes, codebooks, scales = weight(device, n, groups, books, g, dtype)
    x = torch.randn(*lead, groups * g).to(dtype).to(device)
    b = torch.randn(n).to(dtype).to(device) if bias else None
    out = ag.aqlm_gemv(x, codes, codebooks, scales, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert rel_err(out, truth(x, codes, codebooks, scales, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_dequantizes_then_multiplies(device, dtype):
    codes, codebooks, scales = weight(device, 45, 40, 2, 8, dtype)
    w = ag.dequantize_weight(codes, codebooks, scales, dtype)
    want = decode_aqlm(codes.cpu(), codebooks.cpu(), scales.cpu(), dtype)
    if dtype == torch.float32:  # the reference's own roundings, in the same order: bit for bit
        assert torch.equal(w.cpu(), want)
    else:  # Triton's interpreter rounds fp32 -> bf16 unlike PyTorch: within a step each of its two roundings
        assert ((w.cpu().double() - want.double()).abs() <= want.double().abs() * 2 ** -6).all()
    x = torch.randn(3, ag.MAX_ROWS, 320).to(dtype).to(device)  # more rows than the GEMV takes
    b = torch.randn(45).to(dtype).to(device)
    assert rel_err(ag.linear_aqlm(x, codes, codebooks, scales, b), truth(x, codes, codebooks, scales, b)) < TOL[dtype]


def test_bad_inputs_are_named(device):
    codes, codebooks, scales = weight(device, 8, 4, 2, 8, torch.float32)
    x = torch.randn(1, 32, device=device)
    with pytest.raises(ValueError, match="codes must be uint8"):
        ag.aqlm_gemv(x, codes.long(), codebooks, scales)
    with pytest.raises(ValueError, match=r"codebooks must be \[M=2, 256, g\]"):
        ag.aqlm_gemv(x, codes, codebooks[:, :128], scales)
    with pytest.raises(ValueError, match="x has 24 input features, the weight 32"):
        ag.aqlm_gemv(x[:, :24], codes, codebooks, scales)


def test_cuda_backend_lowers_linear_aqlm():
    from flashc.backends.cuda import KERNELS, CudaBackend

    assert "flashc.linear_aqlm" in KERNELS and CudaBackend.lowering.lowers("flashc.linear_aqlm")
