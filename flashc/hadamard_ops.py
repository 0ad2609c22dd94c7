"""Hadamard ops: `flashc.hadamard`, the randomized Hadamard transform of QuIP's incoherence processing.

QuIP (Chee et al. 2023, arXiv:2307.13304) and QuIP# (Tseng et al. 2024, arXiv:2402.04396) multiply a
weight on both sides by random orthogonal matrices before rounding it, so that no entry stands out
(the weight becomes "incoherent"), and undo the rotations at run time. The rotation used here is the
randomized Hadamard transform U = H_n diag(s) / sqrt(n), s random signs: orthogonal, O(n log n).

What the op computes, exactly (x [..., n], s [n] or None meaning all ones):

    hadamard(x, s) = H_n (x * s) / sqrt(n)          along x's last dimension, i.e. U x

H_n is symmetric with H_n H_n = n I, so U^-1 = U^T = diag(s) H_n / sqrt(n), and

    x = s * hadamard(hadamard(x, s), None)          (what undoes it: the transform, then the signs)

H_n = H_{2^k} (x) H_m for n = 2^k * m (Kronecker product; element j = a * m + b, a < 2^k, b < m):

* H_{2^k}: Sylvester's matrix, H[i, j] = (-1)^popcount(i & j), applied by k butterfly stages;
* H_m for m in HADAMARD_ORDERS (1, 12, 20): symmetric Hadamard matrices built by Paley's second
  construction (q = 5 gives 12, q = 9, in GF(9), gives 20); applied as a small matrix product.

Any other n (e.g. 11008 = 256 * 43) is refused: the quantization pass leaves such a layer in float
and says why (QuIP# pads or uses other Hadamard orders; not done here). The reference computes in
float32 (float64 for float64 inputs) and rounds once to x's dtype: it is the numeric truth for the
CUDA backend's Triton kernel (codegen/hadamard.py).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from flashc.errors import FlashcError

HADAMARD_ORDERS = (1, 12, 20)  # the odd parts m of n = 2^k * m that a Hadamard matrix is built for
_PALEY_FIELDS = {12: 5, 20: 9}  # m = 2 (q + 1), q = 1 mod 4: Paley II gives a symmetric H_m


def split_size(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k * m and m in HADAMARD_ORDERS, or None when no Hadamard transform of
    size n is built here."""
    if n < 1:
        return None
    pow2 = n & -n  # the largest power of two dividing n
    m = n // pow2
    for order in HADAMARD_ORDERS[1:]:  # 12 = 4 * 3 and 20 = 4 * 5: take the 4 back from the power of two
        if m == order // 4 and pow2 >= 4:
            return pow2 // 4, order
    return (pow2, 1) if m == 1 else None


def unsupported_size_reason(n: int) -> str | None:
    """Why a size-n Hadamard transform cannot be applied (None: it can)."""
    if split_size(n) is not None:
        return None
    return (f"size {n} is not 2^k * m with m in {', '.join(map(str, HADAMARD_ORDERS))} "
            "(no Hadamard matrix of that order is built)")


def _field(q: int) -> tuple[list, callable]:
    """GF(q) for q = p (prime) or q = 9 (GF(3)[i], i^2 = -1): its elements and their difference."""
    if q == 9:
        elements = [(a, b) for a in range(3) for b in range(3)]
        return elements, lambda x, y: ((x[0] - y[0]) % 3, (x[1] - y[1]) % 3)
    return list(range(q)), lambda x, y: (x - y) % q


def _square(q: int, x):
    if q == 9:
        a, b = x
        return ((a * a - b * b) % 3, (2 * a * b) % 3)
    return (x * x) % q


@functools.lru_cache(maxsize=None)
def hadamard_matrix(m: int) -> torch.Tensor:
    """The symmetric Hadamard matrix H_m (float64, entries +-1, H_m H_m = m I) for m in HADAMARD_ORDERS.

    Paley's construction II: for q = 1 (mod 4) the Jacobsthal matrix Q[a, b] = chi(a - b) (chi: the
    quadratic character of GF(q)) is symmetric, the conference matrix C = [[0, 1^T], [1, Q]] too, and
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] is a symmetric Hadamard matrix of order 2(q + 1).
    """
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m not in _PALEY_FIELDS:
        raise FlashcError(f"no Hadamard matrix of order {m} is built; orders: {', '.join(map(str, HADAMARD_ORDERS))}")
    q = _PALEY_FIELDS[m]
    elements, sub = _field(q)
    zero = elements[0]
    squares = {_square(q, x) for x in elements if x != zero}
    chi = [[0 if sub(a, b) == zero else (1 if sub(a, b) in squares else -1) for b in elements] for a in elements]
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = torch.tensor(chi, dtype=torch.float64)
    eye = torch.eye(q + 1, dtype=torch.float64)
    h = torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)) + \
        torch.kron(eye, torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64))
    return h


def check_hadamard_args(x: torch.Tensor, signs: Optional[torch.Tensor]) -> tuple[int, int]:
    """(2^k, m) of x's last dimension; a clear error when the transform or the signs do not fit x."""
    n = x.shape[-1] if x.dim() else 0
    split = split_size(n)
    if split is None:
        raise FlashcError(f"flashc.hadamard: input {tuple(x.shape)}: {unsupported_size_reason(n)}")
    if not x.is_floating_point():
        raise FlashcError(f"flashc.hadamard: input must be floating point, got {x.dtype}")
    if signs is not None and tuple(signs.shape) != (n,):
        raise FlashcError(f"flashc.hadamard: signs must be [{n}] (one per element of the last dimension), "
                          f"got {tuple(signs.shape)}")
    return split


def hadamard_reference(x: torch.Tensor, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H_n (x * signs) / sqrt(n) along the last dimension, by butterflies (see the module docstring)."""
    pow2, m = check_hadamard_args(x, signs)
    n = pow2 * m
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    y = x.to(compute)
    if signs is not None:
        y = y * signs.to(compute)
    y = y.reshape(*lead, pow2, m)
    if m > 1:
        y = y @ hadamard_matrix(m).to(device=x.device, dtype=compute)  # H_m symmetric: y H_m^T = y H_m
    h = 1
    while h < pow2:  # stage with stride h: (a, b) -> (a + b, a - b) for a pair h apart
        pairs = y.reshape(*lead, pow2 // (2 * h), 2, h, m)
        a, b = pairs.select(-3, 0), pairs.select(-3, 1)
        y = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


@torch.library.custom_op("flashc::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """H_n (x * signs) / sqrt(n) along x's last dimension [..., n] (signs [n] or None: all ones).

    Orthonormal; undone by `signs * hadamard(y, None)`. n = 2^k * m with m in 1, 12, 20.
    """
    return hadamard_reference(x, signs)


@hadamard.register_fake
def _(x, signs):
    check_hadamard_args(x, signs)
    return torch.empty_like(x)


def hadamard_inverse(y: torch.Tensor, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """x such that hadamard(x, signs) = y: signs * hadamard(y, None) (as graph ops: the transform, then a mul)."""
    out = torch.ops.flashc.hadamard.default(y, None)
    return out if signs is None else out * signs


HADAMARD_OPS = {"hadamard": torch.ops.flashc.hadamard.default}
