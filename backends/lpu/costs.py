"""How long one op takes on one chip: the simulator's physics, in one place.

A matrix operation streams its weights (or, for attention, the KV cache) into the
matrix units and pushes its rows of activations through them: it takes the longer of the
two, plus the chip's fixed latency per matrix operation. Vector operations are bound by
the chip's vector ALUs (an LPU) or by moving their operands through memory (a GPU
kernel). Each formula is written out so that a test can redo it by hand. On a GPU profile
with a measured operator table (`operators.py`), a prefill's matmuls and attention take
the table's times instead.

Sizes are per chip: a tensor-parallel shard (`Shard`) divides what the op holds and does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flashc.backends.lpu.hardware import SystemProfile
from flashc.backends.lpu.operators import Lookup, operator_table
from flashc.backends.lpu.workload import ACTIVATION_BYTES, PRECISIONS, Op

# Decode matmuls run as flashc's fused GEMV (RMSNorm before, residual add / GLU after folded
# in) only at one row: the CUDA backend's tuner kept the fused kernel at batch 1 and chose
# cuBLAS plus separate norm/activation kernels for every batch-8 shape (bench/RESULTS.md
# 2026-11-26 session 3, `gemv_shapes.py` "config" column).
GPU_FUSED_GEMV_ROWS = 1

# Vector ops a fused GEMV folds in: the written-out and fused forms of RMSNorm, the residual
# add and the gated activation (backends/cuda_rewrites.py, fuse_small_matmuls).
GEMV_FOLDABLE = {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu", "flashc.geglu", "aten.add",
                 "aten.mul", "aten.to", "aten._to_copy", "aten.pow", "aten.mean", "aten.rsqrt", "aten.silu",
                 "aten.gelu", "aten.sigmoid", "aten.sub", "aten.div", "aten.contiguous", "aten.clone"}

# Softmax of one score on the vector units: max, subtract, exp, sum, divide.
SOFTMAX_OPS_PER_SCORE = 5


@dataclass(frozen=True)
class Phase:
    """What one micro-batch pushes through the model.

    decode: `sequences` sequences, one new token each, attending over `context` tokens.
    prefill: one chunk of `queries` tokens of each sequence, after `prefix` tokens already
    in the cache (causal attention).
    """

    name: str  # "decode" or "prefill"
    sequences: int
    queries: int  # new tokens per sequence
    context: int  # decode: keys each new token attends to; prefill: prefix + queries
    prefix: int = 0

    @property
    def rows(self) -> int:
        return self.sequences * self.queries

    def pairs(self) -> float:
        """Query-key pairs one head scores, over all sequences of the micro-batch."""
        if self.name == "decode":
            return float(self.sequences * self.queries * self.context)
        q = self.queries
        return float(self.sequences * (q * self.prefix + q * (q + 1) / 2))

    def keys(self) -> int:
        return self.context if self.name == "decode" else self.prefix + self.queries


def decode_phase(sequences: int, context: int) -> Phase:
    return Phase("decode", sequences, 1, context)


def prefill_phase(sequences: int, chunk: int, prefix: int) -> Phase:
    return Phase("prefill", sequences, chunk, prefix + chunk, prefix)


@dataclass(frozen=True)
class Shard:
    """What of an op one chip holds: fractions of its columns/rows, heads, experts, vocabulary."""

    mode: str = "all"  # all, column, row, heads, experts, vocab, split, replicated
    ways: int = 1  # tensor-parallel degree of the op's stage
    part: int = 0  # the op split into parts (too large for one chip), each on its own stage
    parts: int = 1

    def fraction(self) -> float:
        split = self.mode in ("column", "row", "experts", "vocab", "split") and self.ways > 1
        return (1.0 / self.ways if split else 1.0) / self.parts

    def heads(self, heads: int) -> float:
        per = heads / self.ways if self.mode == "heads" else heads
        return per / self.parts

    def kv_heads(self, kv_heads: int) -> float:
        """KV heads one chip keeps: heads are split over chips down to one per chip."""
        per = max(1.0, kv_heads / self.ways) if self.mode == "heads" else kv_heads
        return per / self.parts


@dataclass(frozen=True)
class Cost:
    """One op on one chip: its unit, duration and what it moved and computed."""

    unit: str  # "matrix" or "vector"
    seconds: float
    streamed_bytes: float  # weights / KV cache into the matrix units (or bytes a GPU kernel moves)
    flops: float
    bound: str  # what bounds the rest of its time: "weights", "compute", "vector", "memory" ("measured": a table time)
    latency: float = 0.0  # fixed part of `seconds` (an LPU matrix plane's fill, its vector latency)
    # "roofline" (the profile's rates), or from the operator table: "measured" (the exact
    # shape) or "scaled" (the nearest shape); a table time includes the kernel's launch and tail
    source: str = "roofline"

    @property
    def pays_launch(self) -> bool:
        """Whether a GPU kernel of this cost adds the profile's per-kernel latency."""
        return self.source == "roofline"


def weight_bytes(op: Op, precision: str, shard: Shard) -> float:
    """Bytes of the op's weights one chip holds (matrices at the precision, small params in bf16)."""
    per_weight = PRECISIONS[precision][0]
    small = op.small_params * ACTIVATION_BYTES
    if op.kind in ("matmul", "moe", "embedding"):
        return op.weight_params * per_weight * shard.fraction() + small
    return small / shard.parts


def kv_bytes(op: Op, sequences: int, context: int, shard: Shard) -> float:
    """Bytes of one attention op's KV cache on one chip."""
    if op.kind != "attention":
        return 0.0
    return 2.0 * sequences * context * shard.kv_heads(op.kv_heads) * op.head_dim * ACTIVATION_BYTES


def elements(op: Op, phase: Phase, shard: Shard) -> tuple[float, float]:
    """(output, input) elements of a vector op for the phase, on one chip."""
    if op.constant:
        scale = 1.0
    elif op.pair_scaled:
        scale = phase.sequences * phase.queries * phase.keys()
    else:
        scale = phase.rows
    frac = shard.fraction() if shard.mode == "split" else 1.0 / shard.parts
    return op.out_elements * scale * frac, op.in_elements * scale * frac


def activation_bytes(op: Op, phase: Phase, shard: Shard) -> float:
    """Bytes of the op's output for the phase on one chip (what a transfer of it moves)."""
    if op.kind == "vector":
        return elements(op, phase, shard)[0] * ACTIVATION_BYTES
    if op.kind == "attention":
        frac = shard.heads(op.heads) / op.heads
    elif op.kind == "matmul":  # a column slice (column split, or a part of the columns)
        frac = shard.fraction() if shard.mode == "column" else 1.0 / shard.parts
    else:  # moe, embedding: every part and every chip holds a partial sum of the whole output
        frac = 1.0
    return op.out_elements * phase.rows * frac * ACTIVATION_BYTES


def op_cost(op: Op, phase: Phase, shard: Shard, profile: SystemProfile, precision: str) -> Cost:
    """Time of `op` (one micro-batch of `phase`) on one chip of `profile`, without kernel
    launch costs on a GPU (the schedule adds those per kernel, see `gpu_kernel_starts`)."""
    per_weight, compute = PRECISIONS[precision]
    lpu = profile.kind == "lpu"
    frac = shard.fraction()
    if op.kind == "matmul":
        k, n = op.k, op.n
        weights = k * n * per_weight * frac
        flops = 2.0 * phase.rows * k * n * frac
        # a GPU kernel also reads its input rows and writes its output rows through HBM
        act = 0.0 if lpu else phase.rows * (k + n) * ACTIVATION_BYTES
        cost = _matrix(profile, weights + act, flops, compute, 1)
        return _from_table(cost, profile, phase, lambda table: _table_matmul(table, op, phase, shard))
    if op.kind == "attention":
        heads, kv = shard.heads(op.heads), shard.kv_heads(op.kv_heads)
        keys = phase.keys()
        kv_cache = 2.0 * phase.sequences * keys * kv * op.head_dim * ACTIVATION_BYTES
        flops = 4.0 * heads * phase.pairs() * op.head_dim
        if lpu:
            # keys and values stream into the matrix units as the stationary operand
            # (Q.K^T, then P.V: two dependent matrix operations), softmax on the vector units
            mm = _matrix(profile, kv_cache, flops, "float16", 2)
            softmax = heads * phase.pairs() * SOFTMAX_OPS_PER_SCORE / profile.vector_ops
            return Cost("matrix", mm.seconds + softmax, kv_cache, flops, mm.bound, mm.latency)
        qo = 2.0 * phase.rows * heads * op.head_dim * ACTIVATION_BYTES
        writes = 2.0 * phase.rows * kv * op.head_dim * ACTIVATION_BYTES  # new keys/values into the cache
        cost = _matrix(profile, kv_cache + qo + writes, flops, "bfloat16", 0)
        return _from_table(cost, profile, phase, lambda table: _table_attention(table, heads, kv, op, phase))
    if op.kind == "moe":
        experts = op.experts * frac
        expert_bytes = 3.0 * op.k * op.ffn * per_weight
        if profile.static_schedule:
            # a static schedule streams every expert it holds and computes every token with it
            active, routed_rows = experts, phase.rows * experts
        else:
            # expected distinct experts chosen by `rows` tokens picking top_k of E uniformly
            # (the same estimate as bench/decode.py's floor: 7.2 of 8 at batch 8)
            chosen = op.experts * (1 - (1 - op.top_k / op.experts) ** phase.rows)
            active, routed_rows = chosen * frac, phase.rows * op.top_k * frac
        flops = 2.0 * routed_rows * 3 * op.k * op.ffn
        act = 0.0 if lpu else phase.rows * op.k * 2 * ACTIVATION_BYTES
        return _matrix(profile, active * expert_bytes + act, flops, compute, 2)
    if op.kind == "embedding":
        rows_bytes = phase.rows * op.k * per_weight + phase.rows * op.k * ACTIVATION_BYTES
        seconds = rows_bytes / profile.activation_bandwidth
        latency = profile.vector_latency_s if lpu else 0.0
        return Cost("vector", seconds + latency, rows_bytes, 0.0, "memory", latency)
    out, inp = elements(op, phase, shard)
    ops = out * op.ops_per_element
    if lpu:
        seconds = ops / profile.vector_ops + profile.vector_latency_s
        return Cost("vector", seconds, 0.0, ops, "vector", profile.vector_latency_s)
    moved = (out + inp) * ACTIVATION_BYTES
    return Cost("vector", moved / profile.activation_bandwidth, moved, ops, "memory")


def _matrix(profile: SystemProfile, streamed: float, flops: float, dtype: str, dependent_steps: int) -> Cost:
    t_stream = streamed / profile.weight_bandwidth
    t_compute = flops / profile.ops_for(dtype)
    latency = profile.matrix_latency_s * dependent_steps if profile.kind == "lpu" else 0.0
    bound = "weights" if t_stream >= t_compute else "compute"
    return Cost("matrix", max(t_stream, t_compute) + latency, streamed, flops, bound, latency)


def _from_table(cost: Cost, profile: SystemProfile, phase: Phase, lookup) -> Cost:
    """`cost` with its time from the profile's operator table, for a GPU prefill op the table
    has (or a shape near it); otherwise `cost` as the rates give it. Decode never reads the table."""
    if profile.kind != "gpu" or phase.name != "prefill" or not profile.operators:
        return cost
    found: Lookup | None = lookup(operator_table(profile))
    if found is None:
        return cost
    return Cost(cost.unit, found.seconds, cost.streamed_bytes, cost.flops, "measured", 0.0, found.source)


def matmul_shape(op: Op, shard: Shard) -> tuple[float, float]:
    """(K, N) of a matmul's shard on one chip: a row split divides K, columns and parts divide N."""
    if shard.mode == "row" and shard.ways > 1:
        return op.k / shard.ways, op.n / shard.parts
    return float(op.k), op.n * shard.fraction()


def _table_matmul(table, op: Op, phase: Phase, shard: Shard) -> Lookup | None:
    k, n = matmul_shape(op, shard)
    if k != int(k) or n != int(n):
        return None
    return table.matmul_time(phase.rows, int(k), int(n))


def _table_attention(table, heads: float, kv: float, op: Op, phase: Phase) -> Lookup | None:
    if heads != int(heads) or kv != int(kv):
        return None
    return table.attention_time(int(heads), int(kv), op.head_dim, phase.sequences, phase.queries, phase.prefix)


def gpu_kernel_starts(ops: list[Op], rows: int) -> list[bool]:
    """For each op of a GPU stage (in order), whether it launches a kernel of its own.

    Matmuls, attention, MoE and embeddings are kernels. The vector ops between two of them
    are one fused kernel (flashc's fused ops: add+RMSNorm, rotary + KV-cache write, GLU),
    or no kernel at all when every one of them folds into a neighbouring decode GEMV
    (`GPU_FUSED_GEMV_ROWS`, `GEMV_FOLDABLE`).
    """
    starts = [False] * len(ops)
    i = 0
    fused = rows <= GPU_FUSED_GEMV_ROWS
    while i < len(ops):
        if ops[i].kind != "vector":
            starts[i] = True
            i += 1
            continue
        j = i
        while j < len(ops) and ops[j].kind == "vector":
            j += 1
        region = ops[i:j]
        before = ops[i - 1] if i > 0 else None
        after = ops[j] if j < len(ops) else None
        gemv_next = fused and any(o is not None and o.kind == "matmul" for o in (before, after))
        foldable = all(o.op in GEMV_FOLDABLE for o in region)
        starts[i] = not (gemv_next and foldable)
        i = j
    return starts


def transfer_seconds(profile: SystemProfile, nbytes: float, hops: int, links: int = 1) -> tuple[float, float]:
    """(time a link is busy, arrival delay after the start) for nbytes over `links` links."""
    busy = nbytes / (profile.link_bandwidth * max(links, 1))
    return busy, busy + hops * profile.hop_latency_s


def ceil_cycles(profile: SystemProfile, seconds: float) -> int:
    return int(math.ceil(seconds * profile.clock_hz - 1e-9)) if seconds > 0 else 0
