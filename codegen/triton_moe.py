"""Top-k mixture of SwiGLU experts (Mixtral) as Triton grouped GEMMs, with a PyTorch reference.

Semantics (``torch.ops.flashc.moe``)::

    x[T, H], router_logits[T, E], gate_up[E, 2F, H] (rows [0, F) gate, [F, 2F) up), down[E, H, F]
    probs = softmax(router_logits.float());  weights, experts = topk(probs, top_k)
    if normalize: weights /= weights.sum(-1);  weights = weights.to(x.dtype)
    out[t] = sum_k weights[t, k] * down[e] @ (silu(gate_up[e, :F] @ x[t]) * (gate_up[e, F:] @ x[t])),
             e = experts[t, k]

``torch.ops.flashc.moe_sparse`` (online pruning of the experts' intermediate, TEAL: Liu et al.,
arXiv:2408.14690; flashc/sparse_ops.py) is the same with ``h = silu(gate) * up`` in ``x.dtype``
zeroed where ``|h| <= threshold`` (0-d, or one per intermediate channel ``[F]``) before the
down projection: ``moe_sparse`` runs these kernels with kernel 1's epilogue doing that.

Only the routed experts' weights are read (the "fused MoE" scheme of vLLM / SGLang):

1. Routing.  The ``P = T * top_k`` (token, expert) pairs, numbered
   ``p = t * top_k + k``, are sorted by expert (stable, so the order is
   deterministic) and each expert's group is padded to a multiple of ``BLOCK_M``
   in a ``rows`` table (padding entries hold ``P``).  The table has a fixed size
   ``num_blocks * BLOCK_M`` with ``num_blocks = min(P, P // BLOCK_M + E)``, an
   upper bound of the padded length known from the shapes alone, and
   ``block_expert[b]`` is the expert of block ``b`` (``E`` for unused blocks).
   At decode (``P`` and ``E`` at most 64) one single-program Triton kernel does
   the softmax, top-k and table, as ~30 tiny PyTorch ops would cost more in
   launches than in work; larger batches use sort / searchsorted / cumsum /
   scatter.  Either way everything stays on the device: no host
   synchronisation, so the whole function can be captured in a CUDA graph.
2. Kernel 1, program ``(block b, column tile n)``: the pairs of block ``b`` gather
   their token rows of ``x`` and multiply them by the gate and up rows ``n`` of
   ``gate_up[block_expert[b]]`` (two fp32 accumulators); the epilogue writes
   ``h[p, n] = silu(gate) * up`` in ``x.dtype`` (``moe_sparse``: 0 where ``|h| <= threshold[n]``,
   the threshold read once per column tile; a constexpr flag, so ``moe``'s code has no trace of it).
3. Kernel 2, same grid shape over ``H``: ``h[p] @ down[e]^T`` times the routing
   weight of ``p``, written in fp32 to ``y[p, :]``.
4. ``out = y.view(T, top_k, H).sum(1)`` (a fixed-order sum, deterministic, unlike
   an atomic scatter-add), cast to ``x.dtype``.

Unused blocks return before loading anything, and a block's weight tiles are
those of its own expert, so each routed expert's weights are read once per
``BLOCK_M`` pairs routed to it and unrouted experts are never read.  At decode
(T of a few tokens) a block holds one or two real pairs; the padding rows are
masked off and cost no memory traffic.  Products accumulate in fp32 (exact fp32
products for fp32 inputs, no TF32); the output has ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashc.ops import moe_routing as route  # the op's routing: the kernel and the reference share it

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    FLOAT_DTYPES,
    check_devices,
    check_same_dtype,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    require_triton,
    triton,
    tl,
)

__all__ = ["moe", "tune_moe", "moe_sparse", "tune_moe_sparse", "route", "reference_moe"]


# ---------------------------------------------------------------------------
# Routing and reference
# ---------------------------------------------------------------------------
def reference_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch MoE in ``x.dtype`` (float64 inputs give the tests' high-precision truth);
    with ``threshold``, ``flashc.moe_sparse``: h zeroed where ``|h| <= threshold``.

    Each token's k-th expert weights are gathered and applied per token, so this
    shares no code with the kernels' sort-and-pad scheme.
    """
    weights, experts = route(router_logits, top_k, normalize, x.dtype)
    f = down.shape[-1]
    out = torch.zeros_like(x)
    for k in range(top_k):
        e = experts[:, k]
        gu = torch.einsum("th,tnh->tn", x, gate_up[e])
        h = F.silu(gu[:, :f]) * gu[:, f:]
        if threshold is not None:
            h = torch.where(h.abs() > threshold, h, torch.zeros((), dtype=h.dtype, device=h.device))
        out = out + torch.einsum("tf,thf->th", h, down[e]) * weights[:, k, None]
    return out


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _moe_gemm_kernel(
        A, W, OUT, ROWS, BLOCK_EXPERT, ROUTE_W, THRESHOLD,
        num_pairs, num_experts, N, K, a_row_div, up_offset,
        stride_am, stride_ak,
        stride_we, stride_wn, stride_wk,
        stride_om, stride_on,
        stride_thr,
        SWIGLU: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_NK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Program (block b, column tile): OUT[p, cols] for the pairs p = ROWS[b*BLOCK_M:(b+1)*BLOCK_M].

        The A row of pair p is p // a_row_div (x's token for the gate/up GEMM, h's
        pair row for the down GEMM); W = weights of expert BLOCK_EXPERT[b], [N, K]
        per expert.  SWIGLU: also multiply by the up rows (up_offset elements
        further) and write silu(gate) * up; else scale by ROUTE_W[p].  HAS_THRESHOLD (SWIGLU
        only): write 0 where |h| <= THRESHOLD[n * stride_thr] (stride 0: one threshold), h
        compared as stored, in OUT's dtype, as flashc.moe_sparse's reference compares it.
        """
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(BLOCK_EXPERT + pid_b)
        if expert >= num_experts:  # past the last padded group: nothing to do, nothing read
            return
        pairs = tl.load(ROWS + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        a_rows = tl.where(row_ok, pairs // a_row_div, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        # W tile loaded transposed, [BLOCK_K, BLOCK_N], so the product is a plain A @ W^T.
        w_ptrs = W + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if SWIGLU:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_NK:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & n_ok[None, :]
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if SWIGLU:
                if EVEN_NK:
                    w_up = tl.load(w_ptrs + up_offset)
                else:
                    w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, w_up, acc_up)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

        if SWIGLU:
            # silu(g) = g * sigmoid(g); the exponent is capped so exp never overflows.
            result = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0))) * acc_up
            if HAS_THRESHOLD:
                thr = tl.load(THRESHOLD + offs_n * stride_thr, mask=n_ok, other=0.0)
                h = result.to(OUT.dtype.element_ty)
                result = tl.where(tl.abs(h.to(thr.dtype)) > thr[None, :], h, 0.0)
        else:
            route_w = tl.load(ROUTE_W + pairs, mask=row_ok, other=0.0).to(tl.float32)
            result = acc * route_w[:, None]
        out_ptrs = OUT + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, result.to(OUT.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _route_kernel(
        LOGITS, ROUTE_W, ROWS, BLOCK_EXPERT,
        num_pairs, num_experts, num_blocks, stride_lt, stride_le,
        TOP_K: tl.constexpr,
        NORMALIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """One program: ``route`` + ``_sort_pairs`` for all P = T * TOP_K pairs.

        Row p of every [BLOCK_P, ...] tile is pair p = t * TOP_K + k; it redoes
        token t's top-k selection and keeps the k-th pick.  Selection ranks the fp32
        logits (the softmax is monotone, so it is the probabilities' order without
        their rounding), NaN highest like torch.topk, ties to the lowest expert.
        Every ROWS entry is written once (pairs by scatter, padding by the block
        tiles), so no barrier is needed.
        """
        p = tl.arange(0, BLOCK_P)
        e = tl.arange(0, BLOCK_E)
        p_ok = p < num_pairs
        e_ok = e < num_experts
        ptrs = LOGITS + (p // TOP_K)[:, None] * stride_lt + e[None, :] * stride_le
        logits = tl.load(ptrs, mask=p_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        logits = tl.where(e_ok[None, :], logits, float("-inf"))
        num = tl.exp(logits - tl.max(logits, 1)[:, None])
        probs = num / tl.sum(num, 1)[:, None]

        key = tl.where(logits != logits, float("inf"), logits)
        taken = tl.broadcast_to(~e_ok[None, :], [BLOCK_P, BLOCK_E])
        k = p % TOP_K
        expert = tl.zeros([BLOCK_P], dtype=tl.int32)
        weight = tl.zeros([BLOCK_P], dtype=tl.float32)
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        for j in range(TOP_K):
            best = tl.max(tl.where(taken, float("-inf"), key), 1)
            pick = tl.min(tl.where(~taken & (key == best[:, None]), e[None, :], BLOCK_E), 1)
            chosen = e[None, :] == pick[:, None]
            w = tl.sum(tl.where(chosen, probs, 0.0), 1)
            expert = tl.where(k == j, pick, expert)
            weight = tl.where(k == j, w, weight)
            total += w
            taken |= chosen
        if NORMALIZE:
            weight = weight / total
        tl.store(ROUTE_W + p, weight.to(ROUTE_W.dtype.element_ty), mask=p_ok)

        # Pair table: groups in expert order, each padded to a multiple of BLOCK_M.
        expert = tl.where(p_ok, expert, BLOCK_E)  # padding rows join no group
        in_group = expert[:, None] == e[None, :]
        counts = tl.sum(in_group.to(tl.int32), 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        starts = ends - padded
        rank = tl.sum(((expert[:, None] == expert[None, :]) & (p[None, :] < p[:, None])).to(tl.int32), 1)
        dest = tl.sum(tl.where(in_group, starts[None, :], 0), 1) + rank
        tl.store(ROWS + dest, p, mask=p_ok)

        b = tl.arange(0, BLOCK_B)
        b_ok = b < num_blocks
        block_expert = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(BLOCK_EXPERT + b, block_expert, mask=b_ok)
        of_block = block_expert[:, None] == e[None, :]
        group_start = tl.sum(tl.where(of_block, starts[None, :], 0), 1)
        group_count = tl.sum(tl.where(of_block, counts[None, :], 0), 1)
        slots = b[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        is_pad = slots - group_start[:, None] >= group_count[:, None]
        pad = tl.full([BLOCK_B, BLOCK_M], num_pairs, tl.int32)
        tl.store(ROWS + slots, pad, mask=b_ok[:, None] & is_pad)

    tuning.register_kernel_source("moe", _moe_gemm_kernel, _route_kernel)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _check_moe(x, router_logits, gate_up, down, top_k, fn: str = "moe") -> None:
    require_triton(fn)
    check_tensor(fn, "x", x, ndim=2)
    check_tensor(fn, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(fn, "gate_up", gate_up, ndim=3)
    check_tensor(fn, "down", down, ndim=3)
    T, H = x.shape
    E = router_logits.shape[1]
    Fd = down.shape[2]
    if router_logits.shape[0] != T:
        raise ValueError(f"{fn}: router_logits must be [T={T}, E], got {tuple(router_logits.shape)}")
    if tuple(gate_up.shape) != (E, 2 * Fd, H):
        raise ValueError(
            f"{fn}: gate_up must be [E={E}, 2F={2 * Fd}, H={H}] (E from router_logits, F from down), "
            f"got {tuple(gate_up.shape)}"
        )
    if tuple(down.shape) != (E, H, Fd):
        raise ValueError(f"{fn}: down must be [E={E}, H={H}, F], got {tuple(down.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k must be an int in [1, E={E}], got {top_k!r}")
    check_same_dtype(fn, [("x", x), ("gate_up", gate_up), ("down", down)])
    check_devices(fn, _moe_gemm_kernel, [("x", x), ("router_logits", router_logits), ("gate_up", gate_up), ("down", down)])


def _check_threshold(x, threshold, Fd: int) -> None:
    """moe_sparse's threshold: a float tensor, 0-d or [F], on x's device."""
    fn = "moe_sparse"
    check_tensor(fn, "threshold", threshold, dtypes=FLOAT_DTYPES + (torch.float64,))
    if threshold.dim() != 0 and tuple(threshold.shape) != (Fd,):
        raise ValueError(f"{fn}: threshold must be 0-d or one per intermediate channel [F={Fd}], "
                         f"got shape {tuple(threshold.shape)}")
    check_devices(fn, _moe_gemm_kernel, [("x", x), ("threshold", threshold)])


def _comparison_threshold(x, threshold) -> torch.Tensor:
    """threshold in the dtype the reference's ``h.abs() > threshold`` compares in (a 0-d fp32
    threshold against bf16 h is rounded to bf16 first), then in fp32, which holds that dtype's
    values exactly (fp64 stays fp64).  Device ops only."""
    dtype = torch.result_type(x, threshold)  # x: h's dtype and, like h, not 0-d
    threshold = threshold.to(dtype)
    return threshold if dtype == torch.float64 else threshold.to(torch.float32)


def _moe_key(x, E: int, Fd: int, top_k: int, sparse: bool = False) -> dict:
    """Tuning key; moe_sparse (``sparse``) is tuned apart from moe, over moe's candidates."""
    T, H = x.shape
    key = {"T": T, "E": E, "H": H, "F": Fd, "top_k": top_k, "dtype": str(x.dtype).replace("torch.", "")}
    return {**key, "sparse": True} if sparse else key


def _moe_fits(dtype: torch.dtype, profile: str):
    """Config filter: shared memory of the pipelined gate/up GEMM, an A tile and two W tiles per stage.

    An upper bound: Triton's cp.async pipeline keeps ``num_stages - 1`` buffers.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    smem = tuning.hardware(profile)["smem_per_block"]

    def fits(cfg: dict) -> bool:
        bm, bn, bk = cfg.get("BLOCK_M", 16), cfg.get("BLOCK_N", 64), cfg.get("BLOCK_K", 64)
        stages = max(1, cfg.get("num_stages", 2))
        return stages * (bm * bk + 2 * bk * bn) * elem <= smem

    return fits


def _num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of the pair table: every used block holds a pair, and at most one per expert is partial."""
    return min(num_pairs, num_pairs // block_m + num_experts)


def _sort_pairs(experts: torch.Tensor, num_experts: int, block_m: int):
    """The padded pair table: ``(rows[num_blocks * block_m] int32, block_expert[num_blocks] int32)``.

    ``rows`` lists the pairs ``p = t * top_k + k`` grouped by expert, each group
    padded with ``P`` to a multiple of ``block_m``; ``block_expert[b]`` is the
    expert of block ``b``, ``num_experts`` past the last group.  Device ops only.
    """
    flat = experts.reshape(-1)
    P = flat.numel()
    dev = flat.device
    num_blocks = _num_blocks(P, num_experts, block_m)
    sorted_experts, order = torch.sort(flat, stable=True)
    starts = torch.searchsorted(sorted_experts, torch.arange(num_experts + 1, device=dev, dtype=flat.dtype))
    counts = starts[1:] - starts[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    rank = torch.arange(P, device=dev) - starts[sorted_experts]
    dest = (padded_ends - padded)[sorted_experts] + rank
    rows = torch.full((num_blocks * block_m,), P, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=dev, dtype=padded_ends.dtype) * block_m
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True, out_int32=True)
    return rows, block_expert


# The routing kernel works in one program on [P, E] and [P, P] tiles (the stable
# rank compares all pairs): up to 64 that is at most 4096 elements a tile, which
# 8 warps hold in registers (sm_90: <= 196 registers a thread, no spills).  Larger
# P (prefill) would spill, and there the ~30 PyTorch ops' launches are amortised
# over many tokens anyway.
_ROUTE_KERNEL_MAX = 64


def _launch_route(router_logits, route_w, rows, block_expert, top_k, normalize, block_m):
    """Fill the preallocated route_w, rows and block_expert from router_logits in one launch."""
    P, E = route_w.numel(), router_logits.shape[1]
    block_p, block_e = next_pow2(P), next_pow2(E)
    _route_kernel[(1,)](
        router_logits, route_w, rows, block_expert,
        P, E, block_expert.numel(), router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k,
        NORMALIZE=normalize,
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        BLOCK_E=block_e,
        BLOCK_B=next_pow2(block_expert.numel()),
        # Small tiles fit one warp, whose reductions are shuffles only.
        num_warps=min(8, max(1, block_p * max(block_p, block_e) // 512)),
    )


def _route_pairs(router_logits, top_k: int, normalize: bool, dtype: torch.dtype, block_m: int):
    """``(route_w[P] in dtype, rows, block_expert)``: ``route``'s weights, flattened, and ``_sort_pairs``' table.

    One Triton launch when P = T * top_k and E are at most ``_ROUTE_KERNEL_MAX``
    (decode), PyTorch ops otherwise.
    """
    T, E = router_logits.shape
    P = T * top_k
    if P > _ROUTE_KERNEL_MAX or E > _ROUTE_KERNEL_MAX:
        weights, experts = route(router_logits, top_k, normalize, dtype)
        return (weights.reshape(-1).contiguous(), *_sort_pairs(experts, E, block_m))
    num_blocks = _num_blocks(P, E, block_m)
    dev = router_logits.device
    route_w = torch.empty(P, dtype=dtype, device=dev)
    rows = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    _launch_route(router_logits, route_w, rows, block_expert, top_k, normalize, block_m)
    return route_w, rows, block_expert


def _launch_gemm(a, w, out, rows, block_expert, route_w, num_pairs, num_experts, a_row_div, swiglu, config,
                 threshold=None):
    """One grouped GEMM: out[p] = epilogue(a[p // a_row_div] @ w[expert]^T) for the pairs of the table
    (threshold: the SwiGLU epilogue's, from _comparison_threshold; None: no pruning)."""
    n = out.shape[1]
    k = a.shape[1]
    block_m = int(config["BLOCK_M"])
    block_n = min(int(config["BLOCK_N"]), max(16, next_pow2(n)))
    block_k = min(int(config["BLOCK_K"]), max(16, next_pow2(k)))
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    has_threshold = threshold is not None
    _moe_gemm_kernel[grid](
        a, w, out, rows, block_expert, route_w, threshold if has_threshold else route_w,  # never read
        num_pairs, num_experts, n, k, a_row_div, n * w.stride(1) if swiglu else 0,
        a.stride(0), a.stride(1),
        *w.stride(),
        out.stride(0), out.stride(1),
        threshold.stride(0) if has_threshold and threshold.dim() else 0,
        SWIGLU=swiglu,
        HAS_THRESHOLD=has_threshold,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_NK=n % block_n == 0 and k % block_k == 0,
        IEEE=a.dtype == torch.float32,
        **launch_opts(config),
    )


def _launch_moe(x, router_logits, gate_up, down, top_k, normalize, config, threshold=None) -> torch.Tensor:
    """moe, or with threshold (checked) moe_sparse."""
    T, H = x.shape
    E, Fd = gate_up.shape[0], down.shape[2]
    if T == 0 or H == 0 or Fd == 0:
        return torch.zeros_like(x)
    if config is None:
        profile = tuning.detect_profile(x.device)
        key = _moe_key(x, E, Fd, top_k, sparse=threshold is not None)
        config = tuning.get_config("moe", key, profile, _moe_fits(x.dtype, profile))
    if int(config["BLOCK_M"]) < 16 or min(int(config["BLOCK_N"]), int(config["BLOCK_K"])) < 16:
        raise ValueError(f"moe: BLOCK_M, BLOCK_N and BLOCK_K must be >= 16 (tl.dot), got config {config}")
    P = T * top_k
    h = torch.empty((P, Fd), dtype=x.dtype, device=x.device)
    y = torch.empty((P, H), dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        if threshold is not None:
            threshold = _comparison_threshold(x, threshold)
        route_w, rows, block_expert = _route_pairs(router_logits, top_k, normalize, x.dtype, int(config["BLOCK_M"]))
        _launch_gemm(x, gate_up, h, rows, block_expert, route_w, P, E, top_k, True, config, threshold)
        _launch_gemm(h, down, y, rows, block_expert, route_w, P, E, 1, False, config)
    return y.view(T, top_k, H).sum(1).to(x.dtype)


def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
    config: dict | None = None,
) -> torch.Tensor:
    """``torch.ops.flashc.moe`` with grouped Triton GEMMs over the routed experts only; see the module docstring.

    ``x[T, H]``, ``router_logits[T, E]`` (any float dtype), ``gate_up[E, 2F, H]``
    (gate rows first), ``down[E, H, F]``; x and the weights share one dtype,
    any strides.  Returns a new ``[T, H]`` tensor of ``x.dtype``.  No host
    synchronisation (CUDA-graph capturable).  ``config`` overrides the launch
    config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages``).
    """
    _check_moe(x, router_logits, gate_up, down, top_k)
    return _launch_moe(x, router_logits, gate_up, down, top_k, bool(normalize), config)


def tune_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
) -> dict:
    """Autotune (and cache) the MoE kernels on these example inputs; returns the winning config."""
    _check_moe(x, router_logits, gate_up, down, top_k)
    return _tune(x, router_logits, gate_up, down, top_k, bool(normalize), None)


def moe_sparse(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
    threshold: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """``torch.ops.flashc.moe_sparse``: ``moe`` with each routed pair's intermediate
    ``h = silu(gate) * up`` (in ``x.dtype``) zeroed where ``|h| <= threshold``.

    ``threshold``: a float tensor on x's device, 0-d or one per intermediate channel
    ``[F]``.  The rest as ``moe`` (same kernels, launcher and configs), CUDA-graph
    capturable too.  The down GEMM still reads every weight column (its tile spans
    channels that other pairs of the block keep); what this saves is the reference's
    host synchronisation, and with it the backend's CUDA graph.
    """
    _check_moe(x, router_logits, gate_up, down, top_k, fn="moe_sparse")
    _check_threshold(x, threshold, down.shape[2])
    return _launch_moe(x, router_logits, gate_up, down, top_k, bool(normalize), config, threshold)


def tune_moe_sparse(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
    threshold: torch.Tensor,
) -> dict:
    """Autotune (and cache) ``moe_sparse`` on these example inputs over moe's candidates; returns the winner."""
    _check_moe(x, router_logits, gate_up, down, top_k, fn="moe_sparse")
    _check_threshold(x, threshold, down.shape[2])
    return _tune(x, router_logits, gate_up, down, top_k, bool(normalize), threshold)


def _tune(x, router_logits, gate_up, down, top_k, normalize, threshold) -> dict:
    profile = tuning.detect_profile(x.device)
    fits = _moe_fits(x.dtype, profile)
    cands = [c for c in tuning.candidates("moe", profile) if fits(c)] or tuning.candidates("moe", profile)
    key = _moe_key(x, gate_up.shape[0], down.shape[2], top_k, sparse=threshold is not None)
    return tuning.autotune(
        "moe", key, cands, lambda cfg: _launch_moe(x, router_logits, gate_up, down, top_k, normalize, cfg, threshold),
        profile, bench_fn=tuning.graph_bench_for(x),
    )
