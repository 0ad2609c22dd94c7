"""Rotary position embedding (RoPE) as a Triton kernel, with a PyTorch reference.

Semantics (HF ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``)::

    y = x * cos[:, None] + rotate_half(x) * sin[:, None]
    rotate_half(x) = cat(-x[..., D//2:], x[..., :D//2])

or, with ``interleaved=True`` (``flashc.rotary_interleaved``: GPT-J's and Meta's pairs
``(2i, 2i + 1)``), ``rotate_pairs(x)`` in place of ``rotate_half(x)``: the kernel is the same
with the two register tiles loaded from the even and odd channels instead of the halves.

for ``x[B, H, S, D]`` and ``cos, sin[B, S, D]`` (a leading dim of 1 broadcasts
over the batch).  ``x`` may be any strided view -- typically the transpose of a
``[B, S, H, D]`` projection output -- and the output keeps ``x``'s memory
layout, so a following transpose-back is free.

The kernel computes in fp32 and rounds once to ``x.dtype`` (the eager
expression rounds three times in half precision, so the kernel is slightly
*more* accurate than eager bf16, and agrees with it to a few ulps).
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
    pdl_enabled,
    require_triton,
    triton,
    tl,
)

from flashc.ops import rotate_half, rotate_pairs  # the ops' own, shared

__all__ = ["rotary", "tune_rotary", "reference_rotary", "rotate_half", "rotate_pairs", "rotary_kv_write",
           "reference_rotary_kv_write", "rotary_qkv_write", "reference_rotary_qkv_write"]


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Plain PyTorch RoPE: ``x * cos[:, None] + rotate_half(x) * sin[:, None]`` (``rotate_pairs``
    when ``interleaved``)."""
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)
    return x * c + (rotate_pairs(x) if interleaved else rotate_half(x)) * s


if HAS_TRITON:

    @triton.jit
    def _rope_tile(xb, sx_d, cb, sc_d, sb, ss_d, d1, d2, mask):
        """The rotated channels d1 and d2 (fp32) of a [BLOCK_S, D/2] tile of pairs (d1[j], d2[j]):
        rows at xb, cos at cb, sin at sb. y[d1] = x[d1] cos[d1] - x[d2] sin[d1], y[d2] = x[d2] cos[d2]
        + x[d1] sin[d2], for the halves (d2 = d1 + D/2) and for interleaved pairs (d2 = d1 + 1) alike."""
        x1 = tl.load(xb + d1 * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xb + d2 * sx_d, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cb + d1 * sc_d, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cb + d2 * sc_d, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sb + d1 * ss_d, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sb + d2 * ss_d, mask=mask, other=0.0).to(tl.float32)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _rotary_kernel(
        X, COS, SIN, Y,
        H, S, D_HALF,
        sx_b, sx_h, sx_s, sx_d,
        sc_b, sc_s, sc_d,
        ss_b, ss_s, ss_d,
        sy_b, sy_h, sy_s, sy_d,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INTERLEAVED: tl.constexpr,
    ):
        """Program (b*H + h, s-block) rotates BLOCK_S positions of one head.

        The two channels of every pair (the halves of D, or with INTERLEAVED the
        even and odd channels) are loaded as separate tiles, so the rotation is
        just a swap of the two register tiles (no gather).  cos/sin are re-read
        per head; they are tiny and stay in L2.
        """
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_s < S)[:, None] & (offs_d < D_HALF)[None, :]
        s64 = offs_s.to(tl.int64)[:, None]
        if INTERLEAVED:
            d1 = 2 * offs_d.to(tl.int64)[None, :]
            d2 = d1 + 1
        else:
            d1 = offs_d.to(tl.int64)[None, :]
            d2 = d1 + D_HALF

        y1, y2 = _rope_tile(X + b * sx_b + h * sx_h + s64 * sx_s, sx_d,
                            COS + b * sc_b + s64 * sc_s, sc_d,
                            SIN + b * ss_b + s64 * ss_s, ss_d, d1, d2, mask)
        yb = Y + b * sy_b + h * sy_h + s64 * sy_s
        tl.store(yb + d1 * sy_d, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yb + d2 * sy_d, y2.to(Y.dtype.element_ty), mask=mask)

    tuning.register_kernel_source("rotary", _rotary_kernel, _rope_tile)

    @triton.jit
    def _rotary_kv_write_kernel(
        Q, QO, K, V, COS, SIN, KC, VC, POS,
        HQ, H, S, L, D_HALF,
        sq_b, sq_h, sq_s, sq_d,
        sqo_b, sqo_h, sqo_s, sqo_d,
        sk_b, sk_h, sk_s, sk_d,
        sv_b, sv_h, sv_s, sv_d,
        sc_b, sc_s, sc_d,
        ss_b, ss_s, ss_d,
        skc_b, skc_h, skc_l, skc_d,
        svc_b, svc_h, svc_l, svc_d,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
        INTERLEAVED: tl.constexpr = False,
    ):
        """Program (b*(HQ+H) + j, s-block) handles BLOCK_S new tokens of one head row of batch b:
        j < HQ rotates query head j into QO; otherwise it rotates key head j - HQ and stores it,
        and its values, at rows POS[s] of the caches (rows outside [0, L) are skipped).
        HQ = 0 is the keys-and-values-only launch."""
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = (pid_bh // (HQ + H)).to(tl.int64)
        j = pid_bh % (HQ + H)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < S
        load_mask = s_ok[:, None] & (offs_d < D_HALF)[None, :]
        s64 = offs_s.to(tl.int64)[:, None]
        if INTERLEAVED:  # pairs (2i, 2i + 1)
            d1 = 2 * offs_d.to(tl.int64)[None, :]
            d2 = d1 + 1
        else:  # halves (i, i + D/2)
            d1 = offs_d.to(tl.int64)[None, :]
            d2 = d1 + D_HALF
        cb = COS + b * sc_b + s64 * sc_s
        sb = SIN + b * ss_b + s64 * ss_s

        if j < HQ:
            hq = j.to(tl.int64)
            y1, y2 = _rope_tile(Q + b * sq_b + hq * sq_h + s64 * sq_s, sq_d, cb, sc_d, sb, ss_d,
                                d1, d2, load_mask)
            qob = QO + b * sqo_b + hq * sqo_h + s64 * sqo_s
            tl.store(qob + d1 * sqo_d, y1.to(QO.dtype.element_ty), mask=load_mask)
            tl.store(qob + d2 * sqo_d, y2.to(QO.dtype.element_ty), mask=load_mask)
        else:
            h = (j - HQ).to(tl.int64)
            row = tl.load(POS + offs_s, mask=s_ok, other=-1).to(tl.int64)
            store_mask = load_mask & ((row >= 0) & (row < L))[:, None]
            r64 = row[:, None]
            y1, y2 = _rope_tile(K + b * sk_b + h * sk_h + s64 * sk_s, sk_d, cb, sc_d, sb, ss_d,
                                d1, d2, load_mask)
            kcb = KC + b * skc_b + h * skc_h + r64 * skc_l
            tl.store(kcb + d1 * skc_d, y1.to(KC.dtype.element_ty), mask=store_mask)
            tl.store(kcb + d2 * skc_d, y2.to(KC.dtype.element_ty), mask=store_mask)

            vb = V + b * sv_b + h * sv_h + s64 * sv_s
            vcb = VC + b * svc_b + h * svc_h + r64 * svc_l
            v1 = tl.load(vb + d1 * sv_d, mask=load_mask, other=0.0)
            v2 = tl.load(vb + d2 * sv_d, mask=load_mask, other=0.0)
            tl.store(vcb + d1 * svc_d, v1.to(VC.dtype.element_ty), mask=store_mask)
            tl.store(vcb + d2 * svc_d, v2.to(VC.dtype.element_ty), mask=store_mask)


def _check(x, cos, sin, fn="rotary"):
    require_triton(fn)
    check_tensor(fn, "x", x, ndim=4)
    check_tensor(fn, "cos", cos, ndim=3)
    check_tensor(fn, "sin", sin, ndim=3)
    B, H, S, D = x.shape
    if D % 2:
        raise ValueError(f"{fn}: head dim D must be even (pairs of channels), got x of shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, D):
            raise ValueError(
                f"{fn}: {name} must have shape ({B}, {S}, {D}) (or (1, {S}, {D})) for x of shape "
                f"{tuple(x.shape)} [B, H, S, D], got {tuple(t.shape)}"
            )
    check_same_dtype(fn, [("x", x), ("cos", cos), ("sin", sin)])
    check_devices(fn, _rotary_kernel, [("x", x), ("cos", cos), ("sin", sin)])


def _key(x: torch.Tensor, heads: int | None = None, interleaved: bool = False) -> dict:
    """Tuning key of a launch over ``x[B, H, S, D]``; ``heads`` overrides the ``B*H`` head rows it covers.
    Interleaved pairs (strided loads) are tuned apart from the halves; the halves' key is unchanged."""
    B, H, S, D = x.shape
    key = {"D": D, "S": S, "BH": B * H if heads is None else heads, "dtype": str(x.dtype).replace("torch.", "")}
    return {**key, "pairs": "interleaved"} if interleaved else key


def _table_batch_strides(batch: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, int]:
    """cos/sin strides over b: a batch-1 table broadcasts (stride 0)."""
    return (cos.stride(0) if cos.shape[0] == batch else 0), (sin.stride(0) if sin.shape[0] == batch else 0)


def _launch(x, cos, sin, y, config, interleaved=False):
    B, H, S, D = x.shape
    if y.numel() == 0:
        return
    if config is None:
        config = tuning.get_config("rotary", _key(x, interleaved=interleaved), tuning.detect_profile(x.device))
    block_s = int(config.get("BLOCK_S", 16))
    grid = (B * H, triton.cdiv(S, block_s))
    if grid[1] > 65535:
        raise ValueError(f"rotary: S={S} needs {grid[1]} programs on grid axis 1 (max 65535); use a larger BLOCK_S")
    sc_b, ss_b = _table_batch_strides(B, cos, sin)
    with device_guard(x.device):
        _rotary_kernel[grid](
            x, cos, sin, y,
            H, S, D // 2,
            *x.stride(),
            sc_b, cos.stride(1), cos.stride(2),
            ss_b, sin.stride(1), sin.stride(2),
            *y.stride(),
            BLOCK_S=block_s,
            BLOCK_D=next_pow2(D // 2),
            INTERLEAVED=interleaved,
            **launch_opts(config),
        )


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Apply RoPE to ``x[B, H, S, D]`` (any strides) with ``cos, sin[B or 1, S, D]``.

    Rotates the pairs ``(i, i + D/2)`` (``flashc.rotary``), or with ``interleaved`` the pairs
    ``(2i, 2i + 1)`` with tables in the pairs' order (``flashc.rotary_interleaved``).
    Returns a new tensor with ``x``'s shape, dtype and (when ``x`` is dense)
    memory layout, or ``out`` (any strides, not sharing memory with the inputs).
    ``config`` overrides the launch config (``BLOCK_S``, ``num_warps``).
    """
    fn = "rotary_interleaved" if interleaved else "rotary"
    _check(x, cos, sin, fn)
    if out is None:
        out = torch.empty_like(x)  # preserve_format: keeps x's strides when x is dense
    else:
        check_out(fn, "out", out, x.shape, x.dtype, x.device, inputs=(x, cos, sin))
    _launch(x, cos, sin, out, config, interleaved)
    return out


def reference_rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions, interleaved: bool = False) -> None:
    """Plain PyTorch: k_cache[:, :, positions] = rope(k); v_cache[:, :, positions] = v."""
    k_cache.index_copy_(2, positions, reference_rotary(k, cos, sin, interleaved).to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v.to(v_cache.dtype))


def reference_rotary_qkv_write(q, k, v, cos, sin, k_cache, v_cache, positions,
                               interleaved: bool = False) -> torch.Tensor:
    """Plain PyTorch: ``reference_rotary_kv_write(...)``, and returns ``rope(q)``."""
    reference_rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions, interleaved)
    return reference_rotary(q, cos, sin, interleaved)


def _check_kv_write(fn, k, v, cos, sin, k_cache, v_cache, positions) -> None:
    _check(k, cos, sin)
    check_tensor(fn, "v", v, ndim=4)
    check_tensor(fn, "k_cache", k_cache, ndim=4)
    check_tensor(fn, "v_cache", v_cache, ndim=4)
    check_tensor(fn, "positions", positions, ndim=1, dtypes=(torch.int32, torch.int64))
    B, H, S, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"{fn}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[:2] != (B, H) or c.shape[3] != D:
            raise ValueError(f"{fn}: {name} must be [{B}, {H}, L, {D}], got {tuple(c.shape)}")
    if positions.shape[0] != S:
        raise ValueError(f"{fn}: positions must have shape ({S},), got {tuple(positions.shape)}")
    check_devices(fn, _rotary_kv_write_kernel, [("k", k), ("v", v), ("k_cache", k_cache),
                                                ("v_cache", v_cache), ("positions", positions)])


def _launch_kv_write(q, q_out, k, v, cos, sin, k_cache, v_cache, positions, config, interleaved=False) -> None:
    """One launch over B*(Hq + H) head rows; ``q is None`` launches the B*H key/value rows only."""
    B, H, S, D = k.shape
    if k.numel() == 0:
        return
    HQ = 0 if q is None else q.shape[1]
    if config is None:
        config = tuning.get_config("rotary", _key(k, B * (HQ + H), interleaved), tuning.detect_profile(k.device))
    block_s = int(config.get("BLOCK_S", 16))
    if q is None:  # the q pointers are never dereferenced when HQ = 0
        q = q_out = k
    sc_b, ss_b = _table_batch_strides(B, cos, sin)
    pdl = pdl_enabled(k.device)
    with device_guard(k.device):
        _rotary_kv_write_kernel[(B * (HQ + H), triton.cdiv(S, block_s))](
            q, q_out, k, v, cos, sin, k_cache, v_cache, positions,
            HQ, H, S, k_cache.shape[2], D // 2,
            *q.stride(), *q_out.stride(), *k.stride(), *v.stride(),
            sc_b, cos.stride(1), cos.stride(2),
            ss_b, sin.stride(1), sin.stride(2),
            *k_cache.stride(), *v_cache.stride(),
            BLOCK_S=block_s,
            BLOCK_D=next_pow2(D // 2),
            PDL=pdl,
            INTERLEAVED=interleaved,
            **launch_opts(config),
            **({"launch_pdl": True} if pdl else {}),
        )


def rotary_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    interleaved: bool = False,
    config: dict | None = None,
) -> None:
    """One kernel for a decode step's cache update: RoPE of the new keys ``k[B, H, S, D]``
    written to ``k_cache[B, H, L, D]`` at rows ``positions[S]``, and the new values ``v`` to
    ``v_cache`` at the same rows (what ``rotary`` + two ``index_copy_`` do in three).

    Any strides; ``cos, sin[B or 1, S, D]``; rows outside ``[0, L)`` are not written.
    ``interleaved``: RoPE on the pairs (2i, 2i + 1) (``rotary_interleaved``), tables in pair order.
    """
    _check_kv_write("rotary_kv_write", k, v, cos, sin, k_cache, v_cache, positions)
    _launch_kv_write(None, None, k, v, cos, sin, k_cache, v_cache, positions, config, interleaved)


def rotary_qkv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    interleaved: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """``rotary_kv_write(k, v, ...)`` that also returns RoPE of the new queries ``q[B, Hq, S, D]``,
    all in one launch (what ``rotary(q)`` + ``rotary_kv_write`` do in two).

    ``Hq`` is a multiple of ``H`` (grouped-query attention); ``q`` has ``k``'s dtype and any
    strides.  Returns a new contiguous tensor of ``q``'s shape and dtype, or ``out`` (any
    strides, not sharing memory with the inputs).
    """
    fn = "rotary_qkv_write"
    _check_kv_write(fn, k, v, cos, sin, k_cache, v_cache, positions)
    check_tensor(fn, "q", q, ndim=4)
    B, H, S, D = k.shape
    Hq = q.shape[1]
    if (q.shape[0], q.shape[2], q.shape[3]) != (B, S, D):
        raise ValueError(f"{fn}: q must be [{B}, Hq, {S}, {D}] to match k of shape {tuple(k.shape)}, "
                         f"got {tuple(q.shape)}")
    if H == 0 or Hq == 0 or Hq % H:
        raise ValueError(f"{fn}: q's head count ({Hq}) must be a positive multiple of k's ({H})")
    check_same_dtype(fn, [("k", k), ("q", q)])
    check_devices(fn, _rotary_kv_write_kernel, [("k", k), ("q", q)])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check_out(fn, "out", out, q.shape, q.dtype, q.device,
                  inputs=(q, k, v, cos, sin, k_cache, v_cache, positions))
    _launch_kv_write(q, out, k, v, cos, sin, k_cache, v_cache, positions, config, interleaved)
    return out


def tune_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> dict:
    """Autotune (and cache) the rotary kernel on these example inputs; returns the winning config."""
    _check(x, cos, sin, "rotary_interleaved" if interleaved else "rotary")
    profile = tuning.detect_profile(x.device)
    y = torch.empty_like(x)
    return tuning.autotune("rotary", _key(x, interleaved=interleaved), tuning.candidates("rotary", profile),
                           lambda cfg: _launch(x, cos, sin, y, cfg, interleaved), profile)
