"""RMSNorm and fused residual-add + RMSNorm as Triton kernels, with PyTorch references.

Semantics (flashc's ops, matching HF Llama-style RMSNorm):

* ``rms_norm(x, w, eps) = (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype) * w``
* ``add_rms_norm(x, r, w, eps) = (rms_norm(s, w, eps), s)`` with ``s = x + r`` in ``x.dtype``.

The output dtype is that of the PyTorch expression, ``promote_types(x.dtype,
w.dtype)`` -- i.e. ``x.dtype`` whenever the weight has the activation dtype
(the usual case).  The kernels compute in fp32 and round exactly where the
reference rounds (the normalised value to ``x.dtype`` before the weight
multiply, and ``s`` to ``x.dtype`` before it is normalised), so half-precision
results match PyTorch's eager output bit for bit up to reduction order.

Why a kernel: eager PyTorch reads ``x`` several times (square, mean, multiply,
cast, weight multiply) and the fused add adds another round trip; this kernel
reads each input once and writes each output once when a row fits in
registers (``MAX_BLOCK_N`` of the config), and reads the row twice otherwise.
"""

from __future__ import annotations

import torch

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_out,
    check_same_dtype,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    require_triton,
    triton,
    tl,
)

__all__ = ["rms_norm", "add_rms_norm", "tune_rms_norm", "reference_rms_norm", "reference_add_rms_norm"]


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------
def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch RMSNorm: fp32 statistics, result cast to ``x.dtype``, then times ``weight``.

    For float64 inputs the statistics are computed in float64 (used by the
    tests as the high-precision reference).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def reference_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """``s = x + residual`` (in ``x.dtype``), returns ``(reference_rms_norm(s), s)``."""
    s = x + residual
    return reference_rms_norm(s, weight, eps), s


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Y, S,
        M, N,
        stride_xm, stride_rm, stride_ym, stride_sm,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SINGLE_PASS: tl.constexpr,
    ):
        """One program normalises BLOCK_M rows of [M, N] (last dim contiguous).

        SINGLE_PASS (BLOCK_N >= N): the row tile stays in registers, every byte is
        read once.  Otherwise pass 1 accumulates the sum of squares chunk by chunk
        (writing s = x + r on the way) and pass 2 re-reads and normalises; pass 2
        recomputes s from x and r instead of reading back S, because a load of
        what other threads of the program just stored is not ordered without a
        barrier.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        x_row = X + rows64[:, None] * stride_xm
        r_row = R + rows64[:, None] * stride_rm
        y_row = Y + rows64[:, None] * stride_ym
        s_row = S + rows64[:, None] * stride_sm
        cols0 = tl.arange(0, BLOCK_N)

        if SINGLE_PASS:
            cmask = cols0 < N
            mask = row_ok[:, None] & cmask[None, :]
            x = tl.load(x_row + cols0[None, :], mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(r_row + cols0[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                tl.store(s_row + cols0[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
            normed = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
            w = tl.load(W + cols0, mask=cmask, other=0.0).to(tl.float32)
            y = normed * w[None, :]
            tl.store(y_row + cols0[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + cols0
                mask = row_ok[:, None] & (cols < N)[None, :]
                x = tl.load(x_row + cols[None, :], mask=mask, other=0.0)
                if HAS_RES:
                    r = tl.load(r_row + cols[None, :], mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                    tl.store(s_row + cols[None, :], x, mask=mask)
                xf = x.to(tl.float32)
                acc += xf * xf
            rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / N + eps)
            for off in range(0, N, BLOCK_N):
                cols = off + cols0
                cmask = cols < N
                mask = row_ok[:, None] & cmask[None, :]
                x = tl.load(x_row + cols[None, :], mask=mask, other=0.0)
                if HAS_RES:
                    r = tl.load(r_row + cols[None, :], mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                normed = (x.to(tl.float32) * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
                w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(y_row + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)

    tuning.register_kernel_source("rms_norm", _rms_norm_kernel)
    tuning.register_kernel_source("add_rms_norm", _rms_norm_kernel)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _prepare(fn: str, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    require_triton(fn)
    check_tensor(fn, "x", x, min_ndim=1)
    check_tensor(fn, "weight", weight, ndim=1)
    H = x.shape[-1]
    if weight.shape[0] != H:
        raise ValueError(f"{fn}: weight must have shape ({H},) to match x's last dim, got {tuple(weight.shape)}")
    tensors = [("x", x), ("weight", weight)]
    if residual is not None:
        check_tensor(fn, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same_dtype(fn, [("x", x), ("residual", residual)])
        tensors.append(("residual", residual))
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{fn}: eps must be a non-negative float, got {eps!r}")
    if H == 0:
        raise ValueError(f"{fn}: x's last dim must be non-empty, got shape {tuple(x.shape)}")
    dev = check_devices(fn, _rms_norm_kernel, tensors)
    return H, dev


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, H)


def _fits_norm(cfg: dict) -> bool:
    return cfg.get("BLOCK_M", 1) * min(cfg.get("MAX_BLOCK_N", 8192), 16384) <= 16384


def _launch(kernel_name, x, residual, weight, eps, config, y, s):
    H = x.shape[-1]
    x2 = _rows(x, H)
    M = x2.shape[0]
    y2 = y.view(-1, H)
    r2 = _rows(residual, H) if residual is not None else x2
    s2 = s.view(-1, H) if s is not None else y2
    w = weight.contiguous()
    if M == 0:
        return
    if config is None:
        # row-invariant launches (tuning.row_invariant): the one-row call's config (a row's arithmetic in a
        # program does not depend on the other rows it holds)
        rows = 1 if tuning.row_invariant_active() else M
        key = {"H": H, "M": rows, "dtype": str(x.dtype).replace("torch.", "")}
        config = tuning.get_config(kernel_name, key, tuning.detect_profile(x.device), _fits_norm)
    block_m = int(config.get("BLOCK_M", 1))
    block_n = min(next_pow2(H), next_pow2(int(config.get("MAX_BLOCK_N", 8192))))
    grid = (triton.cdiv(M, block_m),)
    with device_guard(x.device):
        _rms_norm_kernel[grid](
            x2, r2, w, y2, s2,
            M, H,
            x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
            float(eps),
            HAS_RES=residual is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SINGLE_PASS=block_n >= H,
            **launch_opts(config),
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x[..., H]`` with ``weight[H]``; see the module docstring.

    Returns a contiguous tensor of x's shape (``out`` if given: contiguous, of
    the output dtype, not sharing memory with the inputs).  ``config`` overrides
    the tuned/default launch config (keys ``BLOCK_M``, ``MAX_BLOCK_N``, ``num_warps``).
    """
    _, dev = _prepare("rms_norm", x, weight, eps, None)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=y_dtype, device=dev)
    else:
        check_out("rms_norm", "out", out, x.shape, y_dtype, dev, contiguous=True, inputs=(x, weight))
    _launch("rms_norm", x, None, weight, eps, config, out, None)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; y = rms_norm(s, weight, eps)``; returns ``(y, s)``.

    One kernel reads ``x`` and ``residual`` once and writes ``y`` and ``s``
    (the new residual stream), saving the separate add's round trip.
    ``out`` / ``residual_out`` optionally receive ``y`` / ``s`` (contiguous, not
    aliasing the inputs: long rows are read twice).
    """
    _, dev = _prepare("add_rms_norm", x, weight, eps, residual)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=y_dtype, device=dev)
    else:
        check_out("add_rms_norm", "out", out, x.shape, y_dtype, dev, contiguous=True, inputs=(x, residual, weight))
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=dev)
    else:
        check_out(
            "add_rms_norm", "residual_out", residual_out, x.shape, x.dtype, dev,
            contiguous=True, inputs=(x, residual, weight, out),
        )
    _launch("add_rms_norm", x, residual, weight, eps, config, out, residual_out)
    return out, residual_out


def tune_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None) -> dict:
    """Autotune (and cache) the norm kernel for these example inputs; returns the winning config."""
    name = "add_rms_norm" if residual is not None else "rms_norm"
    H, _ = _prepare(name, x, weight, eps, residual)
    key = {"H": H, "M": x.numel() // H, "dtype": str(x.dtype).replace("torch.", "")}
    profile = tuning.detect_profile(x.device)
    cands = [c for c in tuning.candidates(name, profile) if _fits_norm(c)]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    return tuning.autotune(name, key, cands, lambda cfg: _launch(name, x, residual, weight, eps, cfg, y, s), profile)
