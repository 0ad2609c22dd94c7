"""The randomized Hadamard transform (`flashc.hadamard`, flashc/hadamard_ops.py) as a Triton kernel.

    out = H_n (x * signs) / sqrt(n)   along the last dimension, n = 2^k * m, m in 1, 12, 20

One program per row: the row is loaded as a [2^k, M_PAD] tile (element a * m + b at [a, b], the
columns past m masked), multiplied by the signs, by H_m along the columns when m > 1 (one small
`tl.dot` in full fp32 precision against the padded, symmetric H_m), then k butterfly stages
along the rows: at stride h the tile is viewed as [2^k / 2h, 2, h * M_PAD] and the pair (u, v)
on the middle axis becomes (u + v, u - v). Everything stays in registers, computed in fp32
and rounded once to x's dtype, as the reference does (`reference_hadamard`, the op's own).

Fallbacks to the reference (same numbers, no kernel): rows longer than MAX_N (the tile would
not fit in registers) and m > 1 with 2^k < 16 (`tl.dot` needs 16 rows; such tiny sizes are
not a model's). The kernel is checked in Triton's interpreter (tests/codegen/test_hadamard.py);
its speed on a GPU has not been measured yet.
"""

from __future__ import annotations

import functools
import math

import torch

from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_tensor,
    device_guard,
    next_pow2,
    require_triton,
    triton,
    tl,
)

from flashc.hadamard_ops import check_hadamard_args, hadamard_matrix, hadamard_reference

__all__ = ["hadamard", "reference_hadamard", "MAX_N"]

MAX_N = 16384  # elements of a row the kernel holds in registers (fp32 tile of 2^k * M_PAD)
_MIN_DOT_ROWS = 16  # tl.dot's smallest operand dimension


def reference_hadamard(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """The op's reference (butterflies in PyTorch): H_n (x * signs) / sqrt(n) along the last dim."""
    return hadamard_reference(x, signs)


if HAS_TRITON:

    @triton.jit
    def _hadamard_rows(x_ptr, s_ptr, hm_ptr, out_ptr, stride_x, stride_out, scale,
                       POW2: tl.constexpr, LOG2: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                       HAS_SIGNS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        a = tl.arange(0, POW2)
        b = tl.arange(0, M_PAD)
        cols = a[:, None] * M + b[None, :]
        mask = (a[:, None] < POW2) & (b[None, :] < M)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SIGNS:
            x = x * tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if M > 1:  # H_m along the columns: x H_m^T = x H_m (symmetric); padding rows/cols of H_m are 0
            hm = tl.load(hm_ptr + b[:, None] * M_PAD + b[None, :])
            x = tl.dot(x, hm, input_precision="ieee")
        pair = tl.arange(0, 2)[None, :, None]  # 0: u + v, 1: u - v
        sign = (1 - 2 * pair).to(tl.float32)
        for stage in tl.static_range(LOG2):
            h: tl.constexpr = 1 << stage
            y = tl.reshape(x, (POW2 // (2 * h), 2, h * M_PAD))
            total = tl.sum(y, axis=1)  # u + v
            diff = tl.sum(y * sign, axis=1)  # u - v
            y = tl.where(pair == 0, total[:, None, :], diff[:, None, :])
            x = tl.reshape(y, (POW2, M_PAD))
        tl.store(out_ptr + row * stride_out + cols, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _padded_hadamard(m: int, m_pad: int, device: str) -> torch.Tensor:
    h = torch.zeros(m_pad, m_pad, dtype=torch.float32)
    h[:m, :m] = hadamard_matrix(m).float()
    return h.to(device)


def _num_warps(tile: int) -> int:
    return 4 if tile <= 1024 else 8 if tile <= 4096 else 16


def hadamard(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """H_n (x * signs) / sqrt(n) along x's last dimension [..., n] (signs [n] or None), as flashc.hadamard."""
    require_triton("hadamard")
    check_tensor("hadamard", "x", x, min_ndim=1)
    pow2, m = check_hadamard_args(x, signs)
    n = x.shape[-1]
    m_pad = next_pow2(m)
    if pow2 * m_pad > MAX_N or (m > 1 and pow2 < _MIN_DOT_ROWS):
        return hadamard_reference(x, signs)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.reshape(x.shape)
    pairs = [("x", rows)] + ([("signs", signs)] if signs is not None else [])
    dev = check_devices("hadamard", _hadamard_rows, pairs)
    s = signs.contiguous() if signs is not None else rows  # not read without signs
    hm = _padded_hadamard(m, m_pad, str(dev)) if m > 1 else rows  # not read when m == 1
    with device_guard(dev):
        _hadamard_rows[(rows.shape[0],)](rows, s, hm, out, rows.stride(0), out.stride(0), 1.0 / math.sqrt(n),
                                         POW2=pow2, LOG2=pow2.bit_length() - 1, M=m, M_PAD=m_pad,
                                         HAS_SIGNS=signs is not None, num_warps=_num_warps(pow2 * m_pad))
    return out.reshape(x.shape)
