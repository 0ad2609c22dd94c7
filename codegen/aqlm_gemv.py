"""AQLM products that read codes and codebooks directly (layout: flashc/codebook_ops.py).

``flashc.linear_aqlm(x, codes, codebooks, scales, bias)`` is ``x @ W_hat^T + bias`` with
``W_hat[n, j*g:(j+1)*g] = scales[n] * sum_m codebooks[m, codes[n, j, m]]``; its reference
(``flashc.codebook_ops.decode_aqlm`` then ``F.linear``) is the numeric truth.

* ``aqlm_gemv`` (decode, at most ``MAX_ROWS`` rows): a program owns ``BLOCK_N`` output rows
  and one row of x; per step it reads a ``[BLOCK_N, BLOCK_J]`` tile of codes a codebook
  (1 byte a code: 2 bits a weight at M = 2, g = 8), gathers the codewords (a codebook is
  256 x g values, 4 KB in bf16 at g = 8: the gathers hit L1 after the first touches, which
  is what Triton offers for a small table read by index, it has no indexed shared-memory
  load) and multiplies them with the matching x values in fp32; the row scale is applied
  once at the end. Each row of x decodes the weight again, so this path is for few rows.
* ``dequantize_weight`` + cuBLAS for more rows (prefill): one kernel writes W_hat in x's
  dtype, rounding as the reference does (codewords summed in x's dtype, then scaled).

Both run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
how tests/codegen runs them here). No tuning space yet: the configs below are untimed
starting points (not measured on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashc.codebook_ops import decode_aqlm

from ._triton_common import FLOAT_DTYPES, HAS_TRITON, check_devices, device_guard, require_triton, triton, tl

__all__ = ["MAX_ROWS", "aqlm_gemv", "dequantize_weight", "linear_aqlm", "reference_linear_aqlm"]

MAX_ROWS = 8  # rows the GEMV decodes the weight for, each on its own; more rows dequantize once
GEMV_BLOCK = {"BLOCK_N": 32, "BLOCK_J": 16, "num_warps": 4}
DEQUANT_BLOCK = {"BLOCK_N": 32, "BLOCK_J": 32, "num_warps": 4}
CODEWORDS = 256  # uint8 codes


def reference_linear_aqlm(x, codes, codebooks, scales, bias=None):
    """The op's reference in PyTorch, in x's dtype (float64 inputs give a float64 truth)."""
    return F.linear(x, decode_aqlm(codes, codebooks, scales, x.dtype), None if bias is None else bias.to(x.dtype))


if HAS_TRITON:

    @triton.jit
    def _codewords(CODES, BOOKS, offs_n, offs_j, offs_d, ok, J, M_BOOKS: tl.constexpr, G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, ROUND: tl.constexpr, OUT: tl.constexpr):
        """sum_m codebooks[m, codes[n, j, m]] for a [BLOCK_N, BLOCK_J] tile, fp32 [BLOCK_N, BLOCK_J, G];
        ROUND: each codeword and partial sum rounded to OUT, as the reference does in x's dtype."""
        rows = offs_n.to(tl.int64)[:, None] * (J * M_BOOKS)
        w = tl.zeros([BLOCK_N, BLOCK_J, G], dtype=tl.float32)
        for m in tl.static_range(M_BOOKS):
            code = tl.load(CODES + rows + offs_j[None, :] * M_BOOKS + m, mask=ok, other=0).to(tl.int32)
            word = tl.load(BOOKS + (m * 256 + code)[:, :, None] * G + offs_d[None, None, :])
            if not ROUND:
                w += word.to(tl.float32)
            else:
                w = (w + word.to(OUT).to(tl.float32)).to(OUT).to(tl.float32)
        return w

    @triton.jit
    def _aqlm_gemv_kernel(X, CODES, BOOKS, S, BIAS, Y, N, J, stride_xm, stride_ym,
                          M_BOOKS: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (n, row): Y[row, n*BLOCK_N:(n+1)*BLOCK_N] = scales * (sum of codewords . x) + bias."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, G)
        n_ok = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_ok = offs_j < J
            x = tl.load(X + row * stride_xm + offs_j[:, None] * G + offs_d[None, :], mask=j_ok[:, None],
                        other=0.0).to(tl.float32)
            w = _codewords(CODES, BOOKS, offs_n, offs_j, offs_d, n_ok[:, None] & j_ok[None, :], J, M_BOOKS, G,
                           BLOCK_N, BLOCK_J, False, tl.float32)
            acc += tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
        y = acc * tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _aqlm_dequantize_kernel(CODES, BOOKS, S, W, N, J, M_BOOKS: tl.constexpr, G: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (n, j): W_hat's [BLOCK_N, BLOCK_J * G] tile in W's dtype, rounded as the reference."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, G)
        ok = (offs_n < N)[:, None] & (offs_j < J)[None, :]
        out: tl.constexpr = W.dtype.element_ty
        w = _codewords(CODES, BOOKS, offs_n, offs_j, offs_d, ok, J, M_BOOKS, G, BLOCK_N, BLOCK_J, True, out)
        s = tl.load(S + offs_n, mask=offs_n < N, other=0.0).to(out).to(tl.float32)
        w = (w * s[:, None, None]).to(out)
        ptrs = W + offs_n.to(tl.int64)[:, None, None] * (J * G) + offs_j[None, :, None] * G + offs_d[None, None, :]
        tl.store(ptrs, w, mask=ok[:, :, None])


def _check(fn: str, kernel, x_dtype, codes, codebooks, scales, bias=None) -> tuple[int, int, int, int]:
    """(N, J, M, G) of a valid AQLM weight, or an error naming what is wrong."""
    require_triton(fn)
    if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8 and codes.dim() == 3):
        raise ValueError(f"{fn}: codes must be uint8 [N, K / g, M], got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
    n, j, m = codes.shape
    if codebooks.dim() != 3 or codebooks.shape[0] != m or codebooks.shape[1] != CODEWORDS:
        raise ValueError(f"{fn}: codebooks must be [M={m}, {CODEWORDS}, g], got {tuple(codebooks.shape)}")
    g = codebooks.shape[2]
    if g & (g - 1) or not 1 <= g <= 64:
        raise ValueError(f"{fn}: the group size g (codebooks' last dim) must be a power of 2 up to 64, got {g}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"{fn}: scales must be [N={n}], got {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")
    for name, t in (("codebooks", codebooks), ("scales", scales)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must have a float dtype in {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")
    if x_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must have a float dtype in {[str(d) for d in FLOAT_DTYPES]}, got {x_dtype}")
    check_devices(fn, kernel, [("codes", codes), ("codebooks", codebooks), ("scales", scales)]
                  + ([("bias", bias)] if bias is not None else []))
    return n, j, m, g


def aqlm_gemv(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``flashc.linear_aqlm`` for a few rows of x [..., K] (any number works; each row decodes the
    weight again, so more than MAX_ROWS is better served by ``linear_aqlm``'s GEMM path)."""
    fn = "aqlm_gemv"
    n, j, m, g = _check(fn, _aqlm_gemv_kernel if HAS_TRITON else None, x.dtype, codes, codebooks, scales, bias)
    if x.shape[-1] != j * g:
        raise ValueError(f"{fn}: x has {x.shape[-1]} input features, the weight {j * g} (codes {tuple(codes.shape)}, "
                         f"groups of {g})")
    check_devices(fn, _aqlm_gemv_kernel, [("x", x), ("codes", codes)])
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if y.numel():
        codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
        block = GEMV_BLOCK
        with device_guard(x.device):
            _aqlm_gemv_kernel[(triton.cdiv(n, block["BLOCK_N"]), rows.shape[0])](
                rows, codes, codebooks, scales, bias if bias is not None else scales, y, n, j,
                rows.stride(0), y.stride(0), M_BOOKS=m, G=g, HAS_BIAS=bias is not None,
                BLOCK_N=block["BLOCK_N"], BLOCK_J=block["BLOCK_J"], num_warps=block["num_warps"])
    return y.reshape(*x.shape[:-1], n)


def dequantize_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, K] in ``dtype``, as ``decode_aqlm(codes, codebooks, scales, dtype)`` rounds it, in one kernel."""
    fn = "dequantize_weight"
    n, j, m, g = _check(fn, _aqlm_dequantize_kernel if HAS_TRITON else None, dtype, codes, codebooks, scales)
    w = torch.empty((n, j * g), dtype=dtype, device=codes.device)
    if w.numel():
        block = DEQUANT_BLOCK
        with device_guard(codes.device):
            _aqlm_dequantize_kernel[(triton.cdiv(n, block["BLOCK_N"]), triton.cdiv(j, block["BLOCK_J"]))](
                codes.contiguous(), codebooks.contiguous(), scales.contiguous(), w, n, j, M_BOOKS=m, G=g,
                BLOCK_N=block["BLOCK_N"], BLOCK_J=block["BLOCK_J"], num_warps=block["num_warps"])
    return w


def linear_aqlm(x, codes, codebooks, scales, bias) -> torch.Tensor:
    """The CUDA backend's ``flashc.linear_aqlm``: ``aqlm_gemv`` up to MAX_ROWS rows (decode), else
    ``dequantize_weight`` and a cuBLAS GEMM (prefill)."""
    k = x.shape[-1]
    if (x.numel() // k if k else 0) <= MAX_ROWS:
        return aqlm_gemv(x, codes, codebooks, scales, bias)
    w = dequantize_weight(codes, codebooks, scales, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
