"""Matrix-vector products for decode steps, with the neighbouring ops folded in.

A decode step multiplies a handful of activation rows (``M`` = batch, at most
``MAX_ROWS``) by every weight matrix of the model: the time is the time to read the
weights once. One kernel streams the rows of ``W[N, K]`` and folds in what sits
around the product in a transformer layer, so those ops cost no launch and no
extra pass over memory:

* **RMSNorm prologue** (``norm_weight``): ``y = rstd(x) * ((x * g) @ W^T)``. The
  row statistics are summed in the same loop that streams ``x`` for the product,
  and the scalar ``rstd`` is applied to the accumulator at the end;
* **bias**, then a **gated activation** over the two halves of a merged
  gate|up weight (``glu="silu"``: SwiGLU, ``"gelu_tanh"``: Gemma's GeGLU): the
  program that computes gate columns ``n`` also computes up columns ``F + n``;
* **residual add** (``residual``): ``y += r``, the transformer's skip connection.

Semantics (``reference_gemv``, what the graph computed before fusion)::

    h = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    y = h @ w.T + bias
    y = act(y[..., :F]) * y[..., F:]          if glu
    y = y + residual                          if residual is not None

computed here in fp32 from ``x`` and ``w`` of one dtype (bf16, fp16, fp32), the
result in that dtype. The kernel differs from the unfused graph only in rounding:
the normalised activation is not rounded to the input dtype before the product.

Up to ``ELEMENTWISE_ROWS`` rows multiply and accumulate elementwise (``[rows,
BLOCK_N, BLOCK_K]`` products in registers, reduced over K once at the end); ``DOT``
configs pad the rows to 16 and use ``tl.dot`` instead (tensor cores). Tuning times
every candidate as the step runs it, from a CUDA graph, with the weights cycled
through enough copies to miss in L2.
A ``ROWLOOP`` config holds a [BLOCK_N, BLOCK_K] weight tile as a one-row product does and multiplies
it by the rows one after another, each reduced over the tile at once: the weights are read once for all
rows, with a one-row program's registers (a candidate for a verify step's few rows of a small model,
where the DOT tiles leave most of the machine idle).
A ``ROWWISE`` config runs each row as the one-row product of the same shape runs (its tuned config, one
program column a row, one launch): a verify step's few rows then equal, bit for bit, what the decode
step computes for each, and a tile spreads over rows x N / BLOCK_N programs instead of N / BLOCK_N
(the weights are read once a row, the repeats mostly from L2).
A ``SPLIT_K`` config divides K into ranges of whole ``BLOCK_K`` blocks, one program column each: with few
programs over N (a 2048-wide output in 64-column DOT tiles is 32 programs) the weight stream lacks the loads in
flight to fill HBM. Each range stores fp32 partial products (and its rows' partial sums of squares for the
norm); ``sum_splits_kernel`` adds them in range order and applies the folds (the sparse GEMV's split sum too).
Autotuning includes the unfused library path (the norm kernel, cuBLAS, the
activation kernel) as a candidate, so the fused kernel runs only where it measured
faster.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    pdl_enabled,
    require_triton,
    triton,
    tl,
)

__all__ = ["MAX_ROWS", "gemv", "tune_gemv", "reference_gemv"]

MAX_ROWS = 16  # rows the kernel pads to for tl.dot; more rows is a GEMM, cuBLAS's job
ELEMENTWISE_ROWS = 8  # the elementwise path keeps [rows, BLOCK_N, BLOCK_K] products in registers
_ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}
LIBRARY = {"library": True}  # tuning candidate: the unfused ops (norm kernel, cuBLAS, activation)


def reference_gemv(x, w, bias=None, norm_weight=None, eps=1e-6, residual=None, glu=None):
    """The unfused ops, in PyTorch, in the input dtype (float64 inputs give a float64 truth)."""
    h = x
    if norm_weight is not None:
        xf = x.double() if x.dtype == torch.float64 else x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * norm_weight.to(x.dtype)
    y = F.linear(h, w, None if bias is None else bias.to(x.dtype))
    if glu is not None:
        g, u = y.chunk(2, dim=-1)
        y = (F.silu(g) if glu == "silu" else F.gelu(g, approximate="tanh")) * u
    if residual is not None:
        y = y + residual
    return y


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(
        X, W, BIAS, G, R, Y, P, S,
        M, N, K, up_offset, per_split,
        stride_xm, stride_wn, stride_rm, stride_ym,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        ACT: tl.constexpr,
        DOT: tl.constexpr,
        ROWLOOP: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (n, r, s): Y[r:r + M, n*BLOCK_N:(n+1)*BLOCK_N] for rows r.. of X (last dims contiguous):
        all rows with a grid of one column, or one row a column (M = 1) for ROWWISE launches.

        ACT != 0: W rows ``up_offset // stride_wn`` further down are the up projection;
        the program accumulates both and writes act(gate) * up.
        SPLIT: program s takes K from s * per_split (a multiple of BLOCK_K) on and stores its fp32 partial
        products in P[s, M, N or 2N] (up columns after the gate ones) and, HAS_NORM and n == 0, its rows'
        partial sums of squares in S[s, M]; sum_splits_kernel then adds the splits and applies the epilogue.
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        row = tl.program_id(1)  # row-wise launches (one program column a row, M = 1): the row's offsets
        pid_k = tl.program_id(2)
        k_lo = pid_k * per_split
        k_hi = tl.minimum(K, k_lo + per_split)
        X += row * stride_xm
        R += row * stride_rm
        Y += row * stride_ym
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = X + offs_m[:, None] * stride_xm + k_lo + offs_k[None, :]
        w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + k_lo + offs_k[None, :]
        g_ptrs = G + k_lo + offs_k
        if DOT:  # y^T = W x^T: the weight tile is the MMA's wide operand, the few rows its narrow one
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        elif ROWLOOP:  # each row's [BLOCK_N, BLOCK_K] products reduced over the tile at once, rows one by one
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:  # elementwise products for every row, reduced over K once after the loop
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs)
                if ACT != 0:
                    w_up = tl.load(w_ptrs + up_offset)
            else:
                k_ok = offs_k < k_hi - k0
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
                if ACT != 0:
                    w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
            if HAS_NORM:
                xf = x.to(tl.float32)
                sq += xf * xf
                if EVEN:
                    g = tl.load(g_ptrs).to(tl.float32)
                else:
                    g = tl.load(g_ptrs, mask=offs_k < k_hi - k0, other=0.0).to(tl.float32)
                x = (xf * g[None, :]).to(W.dtype.element_ty)
            if DOT:
                xt = tl.trans(x)
                if IEEE:
                    acc = tl.dot(w, xt, acc, input_precision="ieee")
                    if ACT != 0:
                        acc_up = tl.dot(w_up, xt, acc_up, input_precision="ieee")
                else:
                    acc = tl.dot(w, xt, acc)
                    if ACT != 0:
                        acc_up = tl.dot(w_up, xt, acc_up)
            elif ROWLOOP:  # the weight tile loaded once for all rows, as a one-row product holds it
                wf = w.to(tl.float32)
                if ACT != 0:
                    wf_up = w_up.to(tl.float32)
                for m in tl.static_range(BLOCK_M):  # row m read again (from L1), normalised as x was
                    row_ok = tl.full([BLOCK_K], m, tl.int32) < M
                    xm = tl.load(X + m * stride_xm + k0 + offs_k, mask=(offs_k < k_hi - k0) & row_ok, other=0.0)
                    if HAS_NORM:
                        xm = (xm.to(tl.float32) * g).to(W.dtype.element_ty)
                    xm = xm.to(tl.float32)
                    pick = (offs_m == m)[:, None]
                    acc += tl.where(pick, tl.sum(wf * xm[None, :], axis=1)[None, :], 0.0)
                    if ACT != 0:
                        acc_up += tl.where(pick, tl.sum(wf_up * xm[None, :], axis=1)[None, :], 0.0)
            else:
                xf = x.to(tl.float32)[:, None, :]
                acc += w.to(tl.float32)[None, :, :] * xf
                if ACT != 0:
                    acc_up += w_up.to(tl.float32)[None, :, :] * xf
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            g_ptrs += BLOCK_K

        if PDL:  # the weights are streamed: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()
        if DOT:
            out = tl.trans(acc)
            up = tl.trans(acc_up)
        elif ROWLOOP:
            out = acc
            up = acc_up
        else:
            out = tl.sum(acc, axis=2)
            up = tl.sum(acc_up, axis=2)
        if SPLIT:  # fp32 partials; the epilogue waits for the sum over splits
            store_partials(out, up, tl.sum(sq, axis=1), P, S, pid, pid_k, M, N, offs_m, offs_n, m_ok, n_ok,
                           HAS_NORM, ACT)
        else:
            gemv_epilogue(out, up, tl.sum(sq, axis=1), K, eps, BIAS, N, R, Y, offs_m, offs_n, m_ok, n_ok,
                          stride_rm, stride_ym, HAS_NORM, HAS_BIAS, HAS_RES, ACT)

    @triton.jit
    def store_partials(out, up, sq_rows, P, S, pid, pid_k, M, N, offs_m, offs_n, m_ok, n_ok,
                       HAS_NORM: tl.constexpr, ACT: tl.constexpr):
        """A split-K program's share (this module's and triton_gemv_wq's): its [BLOCK_M, BLOCK_N] fp32
        products at P[pid_k, m, n] (ACT != 0: the up products at column N + n of rows 2N wide) and, HAS_NORM,
        its rows' partial sums of squares at S[pid_k, m] (from the programs of column 0: all sum the same)."""
        width = N * 2 if ACT != 0 else N
        part = P + pid_k.to(tl.int64) * M * width + offs_m[:, None] * width + offs_n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        tl.store(part, out, mask=mask)
        if ACT != 0:
            tl.store(part + N, up, mask=mask)
        if HAS_NORM:
            if pid == 0:
                tl.store(S + pid_k * M + offs_m, sq_rows, mask=m_ok)

    @triton.jit
    def sum_splits_kernel(P, S, BIAS, R, Y, M, N, F, K, splits, stride_rm, eps,
                          HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Y[m, j] for the M x F outputs of a split-K product (this module's and triton_sparse_gemv's): the
        sum over s of P[s, m, j] (in split order), times HAS_NORM's rstd of row m (from the sum over s of
        S[s, m], the rows' partial sums of squares over K), + bias[j]; ACT != 0 (F = N / 2): act(that) *
        (the same for column F + j), 1 silu, 2 gelu_tanh; then HAS_RES: + R[m, j]; in Y's dtype."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * F
        m = offs // F
        j = offs % F
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        up = tl.zeros([BLOCK], dtype=tl.float32)
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(P + s * M * N + m * N + j, mask=ok, other=0.0)
            if ACT != 0:
                up += tl.load(P + s * M * N + m * N + F + j, mask=ok, other=0.0)
            if HAS_NORM:
                sq += tl.load(S + s * M + m, mask=ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_NORM:
            rstd = tl.math.rsqrt(sq / K + eps)
            acc = acc * rstd
            up = up * rstd
        if HAS_BIAS:
            acc += tl.load(BIAS + j, mask=ok, other=0.0).to(tl.float32)
            if ACT != 0:
                up += tl.load(BIAS + F + j, mask=ok, other=0.0).to(tl.float32)
        acc = gated(acc, up, ACT)
        if HAS_RES:
            acc += tl.load(R + m * stride_rm + j, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def gated(g, up, ACT: tl.constexpr):
        """act(g) * up in fp32 (ACT 1: silu, 2: gelu_tanh; 0: g unchanged), the gated activations of the
        GEMV epilogues (this module's, triton_gemv_wq's, triton_sparse_gemv's split sum)."""
        if ACT == 1:  # silu(g) = g * sigmoid(g); the exponent is capped so exp never overflows
            g = g / (1.0 + tl.exp(tl.minimum(-g, 80.0))) * up
        elif ACT == 2:  # gelu_tanh(g) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))
            z = 1.5957691216057308 * (g + 0.044715 * g * g * g)
            g = g / (1.0 + tl.exp(tl.minimum(-z, 80.0))) * up
        return g

    @triton.jit
    def gemv_epilogue(out, up, sq_rows, K, eps, BIAS, up_bias, R, Y, offs_m, offs_n, m_ok, n_ok,
                      stride_rm, stride_ym,
                      HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr):
        """What follows the product in a decode GEMV (this module's and triton_gemv_wq's): out and up
        are the [BLOCK_M, BLOCK_N] fp32 products of the gate (or only) rows and the up rows, sq_rows the
        rows' sums of squares; applies rstd, the bias (the up rows' at BIAS + up_bias), the gated
        activation, the residual, and stores Y."""
        if HAS_NORM:
            rstd = tl.math.rsqrt(sq_rows / K + eps)
            out = out * rstd[:, None]
            up = up * rstd[:, None]
        if HAS_BIAS:
            out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if ACT != 0:
                up += tl.load(BIAS + up_bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = gated(out, up, ACT)
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            out += tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(Y.dtype.element_ty), mask=mask)

    tuning.register_kernel_source("gemv", _gemv_kernel, gemv_epilogue, gated, store_partials, sum_splits_kernel)
    tuning.register_kernel_source("gemv_rows", _gemv_kernel, gemv_epilogue, gated, store_partials,
                                  sum_splits_kernel)

SUM_BLOCK = 1024  # outputs a program of sum_splits_kernel adds up


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _rows(t: torch.Tensor, K: int) -> torch.Tensor:
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, K)


def _check(x, w, bias, norm_weight, residual, glu):
    fn = "gemv"
    require_triton(fn)
    check_tensor(fn, "x", x, min_ndim=1)
    check_tensor(fn, "w", w, ndim=2)
    K = x.shape[-1]
    if w.shape[1] != K:
        raise ValueError(f"{fn}: w must be [N, {K}] to match x's last dim, got {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"{fn}: x ({x.dtype}) and w ({w.dtype}) must share a dtype")
    if glu not in _ACTS:
        raise ValueError(f"{fn}: glu must be one of {sorted(a for a in _ACTS if a)} or None, got {glu!r}")
    if glu is not None and w.shape[0] % 2:
        raise ValueError(f"{fn}: a gated activation needs w's rows to be gate|up halves, got {w.shape[0]} rows")
    n_out = w.shape[0] // 2 if glu else w.shape[0]
    M = x.numel() // K if K else 0
    if M > MAX_ROWS:
        raise ValueError(f"{fn}: x has {M} rows; the kernel is for at most {MAX_ROWS} (use a GEMM)")
    tensors = [("x", x), ("w", w)]
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=1)
        if bias.shape[0] != w.shape[0]:
            raise ValueError(f"{fn}: bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    if norm_weight is not None:
        check_tensor(fn, "norm_weight", norm_weight, ndim=1)
        if norm_weight.shape[0] != K:
            raise ValueError(f"{fn}: norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
        tensors.append(("norm_weight", norm_weight))
    if residual is not None:
        check_tensor(fn, "residual", residual)
        if tuple(residual.shape) != (*x.shape[:-1], n_out):
            raise ValueError(f"{fn}: residual must have shape {(*x.shape[:-1], n_out)}, got {tuple(residual.shape)}")
        tensors.append(("residual", residual))
    check_devices(fn, _gemv_kernel, tensors)
    return M, n_out


def _tuning_entry(M, n_out, x, bias, norm_weight, residual, glu) -> tuple[str, dict]:
    """(tuning kernel name, shape key): one row and several rows have separate candidate lists."""
    return ("gemv" if M == 1 else "gemv_rows",
            {"M": M, "N": n_out, "K": x.shape[-1], "dtype": str(x.dtype).replace("torch.", ""), "act": str(glu),
             "norm": norm_weight is not None, "bias": bias is not None, "res": residual is not None})


def _library(x, w, bias, norm_weight, eps, residual, glu):
    """The unfused ops as a graph without this fusion runs them: norm kernel, cuBLAS, activation, add."""
    from .triton_mlp import geglu, swiglu
    from .triton_norm import rms_norm

    h = x if norm_weight is None else rms_norm(x, norm_weight.to(x.dtype), eps)
    y = F.linear(h, w, None if bias is None else bias.to(x.dtype))
    if glu is not None:
        g, u = y.chunk(2, dim=-1)
        y = swiglu(g, u) if glu == "silu" else geglu(g, u)
    return y if residual is None else y + residual


def by_row(run, x: torch.Tensor, residual: torch.Tensor | None, n_out: int) -> torch.Tensor:
    """``run(row [1, K], residual row [1, n_out] or None)`` for each row of x, stacked as x's rows of n_out:
    a ROWWISE product whose one-row choice is the library path (one call a row, as a one-row step makes it)."""
    K = x.shape[-1]
    rows = _rows(x, K)
    res = _rows(residual, n_out) if residual is not None else None
    out = [run(rows[i:i + 1], None if res is None else res[i:i + 1]) for i in range(rows.shape[0])]
    return torch.cat(out).reshape(*x.shape[:-1], n_out)


def _one_row_config(x, bias, norm_weight, residual, glu, n_out) -> dict:
    """What a one-row product of this shape runs (a decode step's tuned choice)."""
    name, key = _tuning_entry(1, n_out, x, bias, norm_weight, residual, glu)
    return tuning.get_config(name, key, tuning.detect_profile(x.device), _fits(1))


def _launch(x, w, bias, norm_weight, eps, residual, glu, M, n_out, config):
    K = x.shape[-1]
    if config is None and M > 1 and tuning.row_invariant_active():
        config = {"ROWWISE": True}
    if config is None:
        name, key = _tuning_entry(M, n_out, x, bias, norm_weight, residual, glu)
        config = tuning.get_config(name, key, tuning.detect_profile(x.device), _fits(M))
    rowwise = bool(config.get("ROWWISE"))
    if rowwise:  # every row as a one-row product runs it (same config, same code): equal bit for bit
        config = _one_row_config(x, bias, norm_weight, residual, glu, n_out)
    if config.get("library"):
        if rowwise:
            return by_row(lambda row, res: _library(row, w, bias, norm_weight, eps, res, glu), x, residual, n_out)
        return _library(x, w, bias, norm_weight, eps, residual, glu)
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return y
    x2 = _rows(x, K)
    w2 = w if w.stride(-1) == 1 else w.contiguous()
    r2 = _rows(residual, n_out) if residual is not None else y.view(-1, n_out)
    block_n, block_k = int(config["BLOCK_N"]), int(config["BLOCK_K"])
    pdl = pdl_enabled(x.device)
    dot = bool(config.get("DOT"))
    rowloop = bool(config.get("ROWLOOP")) and not dot and not rowwise
    if dot:
        block_n = max(16, block_n)
    elif M > ELEMENTWISE_ROWS and not rowwise and not rowloop:
        raise ValueError(f"gemv: config {config} multiplies elementwise, for at most {ELEMENTWISE_ROWS} rows; "
                         f"x has {M} (use a DOT config)")
    if config.get("SPLIT_K", 1) > 1 and (rowwise or rowloop):
        raise ValueError(f"gemv: config {config}: SPLIT_K is for DOT and elementwise tiles, not ROWWISE or ROWLOOP")
    per_split, splits = k_ranges(K, block_k, config)
    split = splits > 1
    partials, sums = split_buffers(splits, M, n_out, glu, norm_weight is not None, x.device)
    pdl_launch = {"launch_pdl": True} if pdl else {}
    with device_guard(x.device):
        _gemv_kernel[(triton.cdiv(n_out, block_n), M if rowwise else 1, splits)](
            x2, w2, bias if bias is not None else w2, norm_weight if norm_weight is not None else w2, r2, y,
            partials, sums,
            1 if rowwise else M, n_out, K, n_out * w2.stride(0), per_split,
            x2.stride(0), w2.stride(0), r2.stride(0), n_out,
            float(eps),
            HAS_BIAS=bias is not None,
            HAS_NORM=norm_weight is not None,
            HAS_RES=residual is not None,
            ACT=_ACTS[glu],
            DOT=dot,
            ROWLOOP=rowloop,
            IEEE=x.dtype == torch.float32,
            EVEN=n_out % block_n == 0 and K % block_k == 0,
            SPLIT=split,
            BLOCK_M=MAX_ROWS if dot else 1 if rowwise else next_pow2(M),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PDL=pdl,
            **pdl_launch,
            **launch_opts(config),
        )
        if split:
            sum_splits(partials, sums, bias, r2 if residual is not None else None, y, K, eps, glu,
                       norm_weight is not None, pdl)
    return y


def k_ranges(K: int, block_k: int, config: dict) -> tuple[int, int]:
    """(features a range, ranges) for a config's SPLIT_K: whole BLOCK_K blocks a range, none left empty."""
    blocks = triton.cdiv(K, block_k)
    if K == 0:
        return block_k, 1
    per_split = triton.cdiv(blocks, min(max(1, int(config.get("SPLIT_K", 1))), blocks)) * block_k
    return per_split, triton.cdiv(K, per_split)


def split_buffers(splits: int, M: int, n_out: int, glu, norm: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partial products [splits, M, N or 2N] and partial sums of squares [splits, M] of a
    split-K launch (one-element placeholders when there is one range)."""
    split = splits > 1
    partials = torch.empty((splits, M, n_out * 2 if glu else n_out) if split else (1,), dtype=torch.float32,
                           device=device)
    sums = torch.empty((splits, M) if split and norm else (1,), dtype=torch.float32, device=device)
    return partials, sums


def sum_splits(partials, sums, bias, residual, y, K: int, eps: float, glu, norm: bool, pdl: bool) -> None:
    """Launch sum_splits_kernel over a split-K launch's partials into y [M, n_out]; residual: its rows
    [M, n_out] or None; norm: the partials are of normed rows whose sums of squares are in sums."""
    splits, M, width = partials.shape
    n_out = y.shape[-1]
    r = residual if residual is not None else y.view(-1, n_out)
    with device_guard(y.device):
        sum_splits_kernel[(triton.cdiv(M * n_out, SUM_BLOCK),)](
            partials, sums, bias if bias is not None else y, r, y, M, width, n_out, K, splits, r.stride(0),
            float(eps), HAS_NORM=norm, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=_ACTS[glu],
            BLOCK=SUM_BLOCK, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: str | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``x[..., K] @ w[N, K]^T`` for at most ``MAX_ROWS`` rows, with the folds of the module docstring.

    Returns a new tensor ``[..., N]`` (``[..., N // 2]`` with ``glu``) of x's dtype.
    ``config`` overrides the tuned one (``BLOCK_N``, ``BLOCK_K``, ``num_warps``,
    ``num_stages``, or ``{"library": True}`` for the unfused ops).
    """
    M, n_out = _check(x, w, bias, norm_weight, residual, glu)
    return _launch(x, w, bias, norm_weight, eps, residual, glu, M, n_out, config)


def _fits(M: int):
    return lambda cfg: bool(cfg.get("library") or cfg.get("DOT") or cfg.get("ROWWISE") or cfg.get("ROWLOOP")
                            or M <= ELEMENTWISE_ROWS)


L2_SPILL_BYTES = 96 * 2**20  # more than the L2 of the GPUs flashc targets (50 MB on H100/H200)


def tune_gemv(x, w, bias=None, norm_weight=None, eps=1e-6, residual=None, glu=None) -> dict:
    """Time the kernel's candidate configs and the unfused library ops on these inputs; cache the winner.

    Candidates run as a decode step runs them: back to back from a CUDA graph, each
    call on the next of enough copies of ``w`` that the weights come from memory, not L2.
    """
    M, n_out = _check(x, w, bias, norm_weight, residual, glu)
    name, key = _tuning_entry(M, n_out, x, bias, norm_weight, residual, glu)
    profile = tuning.detect_profile(x.device)
    cands = [c for c in tuning.candidates(name, profile) if _fits(M)(c)]
    hit = tuning.cached_config(name, key, profile)
    if hit is not None:  # no weight copies for a cache hit
        return hit
    copies = max(1, min(8, -(-L2_SPILL_BYTES // max(1, w.numel() * w.element_size()))))
    weights = itertools.cycle([w] + [w.clone() for _ in range(copies - 1)] if x.is_cuda else [w])

    def run(cfg):
        return _launch(x, next(weights), bias, norm_weight, eps, residual, glu, M, n_out, cfg)

    return tuning.autotune(name, key, cands, run, profile,
                           bench_fn=tuning.graph_bench_for(x))
