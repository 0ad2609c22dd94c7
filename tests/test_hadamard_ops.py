"""flashc.hadamard (flashc/hadamard_ops.py): orthonormal, undone by its transpose with the signs,
Sylvester's matrix for powers of two (scipy's when installed), Kronecker sizes with the built
H_12 and H_20, sizes without a Hadamard matrix refused."""

import os

import pytest
import torch

from flashc.errors import FlashcError
from flashc.hadamard_ops import HADAMARD_ORDERS, hadamard_matrix, hadamard_reference, split_size

HADAMARD = torch.ops.flashc.hadamard.default
SIZES = [1, 2, 4, 64, 256, 12, 20, 24, 40, 48, 192, 320, 1536]


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def signs(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's H_n (H_2 = [[1, 1], [1, -1]], H_2n = H_2 (x) H_n): scipy.linalg.hadamard if installed."""
    try:
        from scipy.linalg import hadamard

        return torch.tensor(hadamard(n), dtype=torch.float64)
    except ImportError:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
        return h


def matrix_of(n: int, s: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix U with hadamard(x, s) = U x (columns: the op applied to the unit vectors)."""
    return HADAMARD(torch.eye(n, dtype=torch.float64), s).T


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal(n):
    u = matrix_of(n, signs(n, seeded()))
    assert torch.allclose(u @ u.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_the_kronecker_product(n):
    pow2, m = split_size(n)
    want = torch.kron(sylvester(pow2), hadamard_matrix(m)) / n ** 0.5
    assert torch.allclose(matrix_of(n), want, atol=1e-12)


@pytest.mark.parametrize("m", HADAMARD_ORDERS)
def test_built_hadamard_matrices(m):
    h = hadamard_matrix(m)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h, h.T)  # symmetric: the transform's inverse is itself, then the signs
    assert torch.equal(h @ h, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("n", [128, 1536, 320])
def test_inverse_is_transform_then_signs(n, dtype, tol):
    g = seeded()
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64).to(dtype)
    s = signs(n, g, dtype)
    y = HADAMARD(x, s)
    assert torch.allclose(HADAMARD(x * s, None), y, atol=tol)
    back = s * HADAMARD(y, None)
    assert (back - x).abs().max() / x.abs().max() < tol
    assert torch.allclose(y.double().norm(dim=-1), x.double().norm(dim=-1), rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
def test_low_precision_rounds_once(dtype, tol):
    g = seeded()
    x = torch.randn(4, 1024, generator=g).to(dtype)
    s = signs(1024, g, dtype)
    y = HADAMARD(x, s)
    assert y.dtype == dtype and y.shape == x.shape
    want = hadamard_reference(x.double(), s.double())
    assert (y.double() - want).abs().max() / want.abs().max() < tol


@pytest.mark.parametrize("n,why", [(576, "size 576 is not 2"), (11008, "size 11008"), (6, "size 6"),
                                   (3, "size 3")])
def test_sizes_without_a_hadamard_matrix_are_refused(n, why):
    assert split_size(n) is None
    with pytest.raises(FlashcError, match=why):
        HADAMARD(torch.randn(2, n), None)


def test_bad_signs_and_fake_kernel():
    with pytest.raises(FlashcError, match=r"signs must be \[64\]"):
        HADAMARD(torch.randn(2, 64), torch.ones(32))
    x, s = torch.randn(2, 3, 64), signs(64, seeded(), torch.float32)
    torch.library.opcheck(HADAMARD, (x, s))
    torch.library.opcheck(HADAMARD, (x, None))
    with torch._subclasses.FakeTensorMode():
        assert HADAMARD(torch.empty(2, 48), None).shape == (2, 48)
