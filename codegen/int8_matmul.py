"""The int8 GEMM of the W8A8 linears with their dequantization epilogue fused, for prefill-sized inputs.

`flashc.linear_w8a8` multiplies per-token int8 codes of the input by the int8 weight and scales
the int32 sums back (flashc/quantized_ops.py, `_finish`). The library path does that in two
kernels: `torch._int_mm` (on an H100 with torch 2.11 it picked a CUTLASS sm80 int8 kernel: 31.5 ms
over the 128 GEMMs of a llama-3-8b prefill of 2048 tokens, 1.38x the bf16 GEMMs', reported with
issue #14), whose [M, N] int32 result goes to memory and is read again by
`quantize_rows.dequantize_int32`. The kernel here is one tiled GEMM (Triton's tl.dot on int8
operands with an int32 accumulator: Hopper's int8 wgmma, twice bf16's peak) that applies the
epilogue to its tile before the only store:

    out[m, n] = ((float(sum_k xq[m, k] * w[n, k]) * x_scale[m]) * w_scale[n] + bias[n]) -> out_dtype

in fp32, each step rounded as `_finish` rounds it (compiled without fused multiply-adds), cast once
(bf16 by `quantize_rows._bf16_bits`, round half to even also in Triton's interpreter). The int32
sums are exact, so the result equals `torch._int_mm` + `_finish` bit for bit.

Which one runs is measured per shape: the tuning candidates (`tuning.TUNING_SPACE["int8_matmul"]`)
are tiles of this kernel and the library path (``{"library": True}``); `tune_int8_matmul` first
checks that each tile reproduces the exact result on the inputs it is given, then times the
survivors and the library from a CUDA graph and caches the fastest per (row bucket, N, K, output
dtype, bias). Rows are bucketed to powers of two by `tuning.shape_bucket`: prefill lengths vary.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import tuning
from ._triton_common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_devices,
    check_tensor,
    device_guard,
    launch_opts,
    require_triton,
    triton,
    tl,
)
from .quantize_rows import dequantize_int32, reference_dequantize

__all__ = ["int8_matmul", "tune_int8_matmul", "reference_int8_matmul", "int_mm", "library_fits",
           "KERNEL", "LIBRARY", "MIN_ROWS", "MAX_K"]

KERNEL = "int8_matmul"
LIBRARY = {"library": True}  # tuning candidate: torch._int_mm, then the dequantize kernel
# Fewer rows are decode-sized: the smallest tile is 64 rows, and today's library path stays
# (codegen/quantized_matmul.py routes only larger inputs here).
MIN_ROWS = 64
# Deepest K whose int32 sums of int8 products cannot overflow: |code| <= 128, 128 * 128 * K < 2^31.
MAX_K = (2 ** 31 - 1) // (128 * 128)
# torch._int_mm (cuBLASLt) takes more than 16 rows, a multiple of 8, and inner and output sizes
# that are multiples of 8; flashc asks 16 of K and N, as quantized_matmul.fits does.
_LIBRARY_MIN_ROWS = 17
_LIBRARY_ALIGN = 16


def library_fits(k: int, n: int) -> bool:
    """Whether the library path (`torch._int_mm`) takes a [*, k] x [k, n] int8 product."""
    return k % _LIBRARY_ALIGN == 0 and n % _LIBRARY_ALIGN == 0


def int_mm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xq [M, K] @ w[N, K]^T in int32 through `torch._int_mm`, the rows padded with zero codes to
    the library's rules (their sums are zero and are dropped)."""
    m = xq.shape[0]
    padded = max(m, _LIBRARY_MIN_ROWS)
    padded += (-padded) % 8
    if padded != m:
        xq = F.pad(xq, (0, 0, 0, padded - m))
    return torch._int_mm(xq, w.t())[:m]


def reference_int8_matmul(xq: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                          bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """The op's own arithmetic: the exact integer product (in float64, integers far below 2^53),
    rounded to fp32, then `_finish`'s epilogue (`quantize_rows.reference_dequantize`)."""
    acc = (xq.double() @ w.double().t()).float()
    return reference_dequantize(acc, x_scale, w_scale, bias, out_dtype)


if HAS_TRITON:
    from .quantize_rows import _bf16_bits, _dequantize_kernel

    @triton.jit
    def _int8_matmul_kernel(
        A, B, XS, WS, BIAS, C,
        M, N, K,
        stride_am, stride_bn, stride_cm, stride_xs, stride_ws,
        HAS_BIAS: tl.constexpr, BF16_OUT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] tile of C = epilogue(A [M, K] @ B[N, K]^T), A and B int8 with K contiguous."""
        # GROUP_M row tiles walk the column tiles together, so the weight tiles they share are
        # read from L2 rather than memory (the grouped ordering of Triton's matmul tutorial)
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # rows and columns past the edge read the first ones again (no masks in the loop); the
        # store drops them
        a_ptrs = A + (rows % M).to(tl.int64)[:, None] * stride_am + ks[None, :]
        b_ptrs = B + ks[:, None] + (cols % N).to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = ks < K - k0
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton 3.6 asserts acc is of out_dtype (default fp32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        # _finish's epilogue, step by step in fp32 (the launch turns fused multiply-adds off)
        row_ok, col_ok = rows < M, cols < N
        xs = tl.load(XS + rows * stride_xs, mask=row_ok, other=0.0)
        ws = tl.load(WS + cols * stride_ws, mask=col_ok, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * xs[:, None]
        y = y * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if BF16_OUT:  # C is the uint16 view of the bf16 result
            tl.store(out, _bf16_bits(y).to(tl.uint16), mask=mask)
        else:
            tl.store(out, y.to(C.dtype.element_ty), mask=mask)

    # the library candidate's speed is torch's: its version is part of what was measured
    tuning.register_kernel_source(KERNEL, _int8_matmul_kernel, _bf16_bits, _dequantize_kernel,
                                  inspect.getsource(int_mm), f"torch {torch.__version__}")


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _check(xq, w, x_scale, w_scale, bias, out_dtype) -> tuple[int, int, int]:
    fn = "int8_matmul"
    require_triton(fn)
    check_tensor(fn, "xq", xq, ndim=2, dtypes=(torch.int8,))
    check_tensor(fn, "w", w, ndim=2, dtypes=(torch.int8,))
    m, k = xq.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"{fn}: w must be [N, {k}] (row-major, K as xq's columns), got {tuple(w.shape)}")
    if k > MAX_K:
        raise ValueError(f"{fn}: K = {k} is deeper than {MAX_K}, where int32 sums of int8 products may "
                         "overflow; split the product along K")
    check_tensor(fn, "x_scale", x_scale, dtypes=(torch.float32,))
    if x_scale.numel() not in (1, m):
        raise ValueError(f"{fn}: x_scale must hold one fp32 scale per row of xq ({m}) or one in all, "
                         f"got shape {tuple(x_scale.shape)}")
    check_tensor(fn, "w_scale", w_scale)
    if w_scale.numel() not in (1, n):
        raise ValueError(f"{fn}: w_scale must hold one scale per row of w ({n}) or one in all, "
                         f"got shape {tuple(w_scale.shape)}")
    tensors = [("xq", xq), ("w", w), ("x_scale", x_scale), ("w_scale", w_scale)]
    if bias is not None:
        check_tensor(fn, "bias", bias)
        if bias.numel() != n:
            raise ValueError(f"{fn}: bias must have {n} elements (w's rows), got shape {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")
    check_devices(fn, _int8_matmul_kernel, tensors)
    return m, n, k


def _tuning_key(m: int, n: int, k: int, bias, out_dtype) -> dict:
    return {"M": m, "N": n, "K": k, "dtype": str(out_dtype).replace("torch.", ""), "bias": bias is not None}


def _fits(n: int, k: int, profile: str):
    """Candidates that can run: the library where it takes the shape, tiles whose pipeline stages
    (int8 operands: a byte an element) fit the profile's shared memory."""
    smem = tuning.hardware(profile)["smem_per_block"]

    def fits(cfg: dict) -> bool:
        if cfg.get("library"):
            return library_fits(k, n)
        stage = (int(cfg["BLOCK_M"]) + int(cfg["BLOCK_N"])) * int(cfg["BLOCK_K"])
        return stage * int(cfg.get("num_stages", 2)) <= smem

    return fits


def _library(xq, w, x_scale, w_scale, bias, out_dtype) -> torch.Tensor:
    return dequantize_int32(int_mm(xq, w), x_scale, w_scale, bias, out_dtype)


def _launch(xq, w, x_scale, w_scale, bias, out_dtype, m, n, k, config: dict) -> torch.Tensor:
    if config.get("library"):
        if not library_fits(k, n):
            raise ValueError(f"int8_matmul: the library path (torch._int_mm) needs K and N multiples of "
                             f"{_LIBRARY_ALIGN}, got K = {k}, N = {n}; use a tile config")
        return _library(xq, w, x_scale, w_scale, bias, out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if out.numel() == 0:
        return out
    if k == 0:  # no products: the epilogue of zero sums
        return reference_dequantize(torch.zeros((m, n), device=xq.device), x_scale, w_scale, bias, out_dtype)
    a = xq if xq.stride(1) == 1 else xq.contiguous()
    b = w if w.stride(1) == 1 else w.contiguous()
    xs, ws = x_scale.reshape(-1), w_scale.reshape(-1)
    xs, ws = (xs if xs.numel() == 1 else xs.contiguous()), (ws if ws.numel() == 1 else ws.contiguous())
    bias_arg = bias.reshape(-1).contiguous() if bias is not None else ws  # not read without bias
    block_m, block_n, block_k = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
    bf16 = out_dtype == torch.bfloat16
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with device_guard(xq.device):
        _int8_matmul_kernel[grid](
            a, b, xs, ws, bias_arg, out.view(torch.uint16) if bf16 else out,
            m, n, k,
            a.stride(0), b.stride(0), out.stride(0), int(xs.numel() > 1), int(ws.numel() > 1),
            HAS_BIAS=bias is not None, BF16_OUT=bf16, EVEN_K=k % block_k == 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=int(config.get("GROUP_M", 8)),
            enable_fp_fusion=False, **launch_opts(config),
        )
    return out


def int8_matmul(xq: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16, *,
                config: Optional[dict] = None) -> torch.Tensor:
    """W8A8's product and epilogue: ((xq @ w^T) * x_scale * w_scale + bias) as out_dtype [M, N].

    xq int8 [M, K] (per-token codes), w int8 [N, K] row-major (the op's qweight), x_scale fp32
    [M] or [M, 1], w_scale [N] (any float dtype, read as fp32), bias [N] or None. Equal bit for
    bit to `torch._int_mm` followed by the ops' `_finish` (`reference_int8_matmul`). Runs the
    tuned choice for this shape (the fused kernel's tile, or the library path), else the first
    candidate that fits; ``config`` overrides it (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
    ``GROUP_M``, ``num_warps``, ``num_stages``, or ``{"library": True}``).
    """
    m, n, k = _check(xq, w, x_scale, w_scale, bias, out_dtype)
    if config is None:
        profile = tuning.detect_profile(xq.device)
        config = tuning.get_config(KERNEL, _tuning_key(m, n, k, bias, out_dtype), profile, _fits(n, k, profile))
    return _launch(xq, w, x_scale, w_scale, bias, out_dtype, m, n, k, config)


def tune_int8_matmul(xq: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Measure the kernel's tiles and the library path on these inputs; cache and return the fastest.

    A tile that does not reproduce the exact result here (the library's, else the float64
    reference's) is dropped with a warning, as is one that fails to compile or launch. Timed as
    the executable runs a prefill: replayed from a CUDA graph, a few calls (the outputs are large).
    Without a GPU nothing is timed and the first candidate that fits is returned.
    """
    m, n, k = _check(xq, w, x_scale, w_scale, bias, out_dtype)
    key = _tuning_key(m, n, k, bias, out_dtype)
    profile = tuning.detect_profile(xq.device)
    hit = tuning.cached_config(KERNEL, key, profile)
    if hit is not None:
        return hit
    fits = _fits(n, k, profile)
    cands = [c for c in tuning.candidates(KERNEL, profile) if fits(c)]
    if not cands:
        raise ValueError(f"int8_matmul: no candidate of profile {profile!r} takes {key}")
    graph_bench = tuning.graph_bench_for(xq)
    if graph_bench is None:  # nothing to time on (no GPU, or the interpreter): the untuned choice
        return dict(cands[0])
    if m * n and k:  # an empty product cannot tell a tile from another
        want = (_library(xq, w, x_scale, w_scale, bias, out_dtype) if library_fits(k, n)
                else reference_int8_matmul(xq, w, x_scale, w_scale, bias, out_dtype))
        exact = []
        for cfg in cands:
            if cfg.get("library"):
                exact.append(cfg)
                continue
            try:
                same = torch.equal(_launch(xq, w, x_scale, w_scale, bias, out_dtype, m, n, k, cfg), want)
                why = "differs from the exact result"
            except Exception as e:  # e.g. out of shared memory or registers on this GPU
                same, why = False, f"{type(e).__name__}: {str(e)[:300]}"
            if same:
                exact.append(cfg)
            else:
                warnings.warn(f"flashc.int8_matmul: tile {cfg} is not used for {key}: {why}", stacklevel=2)
        del want
        cands = exact
        if not cands:
            raise RuntimeError(f"int8_matmul: no candidate runs exactly for {key} (the warnings above say why)")

    def run(cfg):
        return _launch(xq, w, x_scale, w_scale, bias, out_dtype, m, n, k, cfg)

    return tuning.autotune(KERNEL, key, cands, run, profile, bench_fn=lambda fn: graph_bench(fn, calls=4))
