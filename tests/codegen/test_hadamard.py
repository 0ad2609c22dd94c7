"""flashc.codegen.hadamard: the Triton fast Walsh-Hadamard kernel against the op's reference
(float64), for powers of two up to MAX_N, Kronecker sizes (H_12, H_20 through tl.dot), strided
inputs, with and without signs; refused sizes raise as the op does."""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import hadamard as hk  # noqa: E402
from flashc.errors import FlashcError  # noqa: E402
from flashc.hadamard_ops import hadamard_reference as op_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the kernel rounds once from fp32: its error against float64 is the dtype's rounding of the output
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def seed(*args) -> None:
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_max(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("with_signs", [True, False])
@pytest.mark.parametrize("n", [1, 2, 16, 128, 1024, 192, 320, 1536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, dtype, n, with_signs):
    seed(dtype, n, with_signs)
    x = torch.randn(2, 3, n).to(dtype).to(device)
    s = (torch.randint(0, 2, (n,)) * 2 - 1).to(dtype).to(device) if with_signs else None
    y = hk.hadamard(x, s)
    assert y.shape == x.shape and y.dtype == dtype
    ref = hk.reference_hadamard(x.double(), None if s is None else s.double())
    assert rel_max(y, ref) < TOL[dtype]


def test_largest_row(device):
    seed("max")
    n = hk.MAX_N
    x = torch.randn(2, n, device=device)
    s = (torch.randint(0, 2, (n,), device=device) * 2 - 1).float()
    assert rel_max(hk.hadamard(x, s), hk.reference_hadamard(x.double(), s.double())) < TOL[torch.float32]


def test_strided_input_and_inverse(device):
    """A transposed view in; the inverse (signs after the transform) brings x back."""
    seed("strided")
    x = torch.randn(64, 5, device=device).t()  # [5, 64], last-dim stride 5
    s = (torch.randint(0, 2, (64,), device=device) * 2 - 1).float()
    y = hk.hadamard(x, s)
    assert rel_max(y, hk.reference_hadamard(x.double(), s.double())) < TOL[torch.float32]
    assert rel_max(s * hk.hadamard(y, None), x.double()) < TOL[torch.float32]


def test_small_kronecker_and_long_rows_use_the_reference(device):
    """m > 1 with fewer than 16 rows of the tile (48 = 4 * 12) and rows over MAX_N: same numbers."""
    for n in (48, 2 * hk.MAX_N):
        x = torch.randn(2, n, device=device)
        assert torch.equal(hk.hadamard(x, None), hk.reference_hadamard(x, None))


def test_refused_sizes(device):
    with pytest.raises(FlashcError, match="size 576"):
        hk.hadamard(torch.randn(2, 576, device=device), None)
    with pytest.raises(TypeError, match="dtype"):
        hk.hadamard(torch.randn(2, 64, device=device).double(), None)



def test_kernel_runs_without_the_reference(device, monkeypatch):
    """Powers of two and Kronecker sizes from 16 rows up go through the kernel, not the fallback."""
    def no_reference(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(hk, "hadamard_reference", no_reference)
    for n in (128, 192, 320):
        x = torch.randn(3, n, device=device)
        assert rel_max(hk.hadamard(x, None), op_reference(x.double(), None)) < TOL[torch.float32]
