"""Partition a workload onto chips: how many, which op where, split how.

Inside a stage of `tp` chips (one node at most) matrices are split Megatron-style: a
matmul whose input every chip holds whole is split by columns (each chip computes a slice
of the output); one whose input is such a slice is split by rows (each chip a partial sum,
then an all-reduce). Attention follows its inputs' heads, MoE splits its experts, the
embedding its vocabulary. Consecutive ops form pipeline stages across chips and nodes.

The chip count comes from capacity: every chip's weights, KV cache and activation buffers
must fit its memory at the chosen precision. An op too large for one chip is first cut into
parts (columns, experts, vocabulary or heads) that go to consecutive stages. Stages are
balanced on compute and communication together: each stage's time (its ops plus sending
what later stages read) is kept under a bound found by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flashc.backends.lpu.costs import (Phase, Shard, activation_bytes, decode_phase, gpu_kernel_starts, kv_bytes,
                                       op_cost, transfer_seconds, weight_bytes)
from flashc.backends.lpu.hardware import SystemProfile
from flashc.backends.lpu.workload import ACTIVATION_BYTES, Op, Workload
from flashc.errors import InputError

# An op larger than this fraction of a chip's memory is cut into parts, so that the
# balancer can still pack other ops beside each part (a planning choice, not a property
# of any chip).
PART_FRACTION = 0.5


@dataclass
class Item:
    """One op, or one part of an op, as placed: its shard and its per-chip sizes."""

    op: Op
    shard: Shard
    allreduce: bool = False  # its output is a partial sum over the stage's chips
    gather: bool = False  # a reduction whose input arrives split: gathered first
    split_output: bool = False  # each chip holds a slice of the output
    stage: int = -1
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0


@dataclass
class Stage:
    index: int
    chips: tuple[int, ...]
    items: list[int] = field(default_factory=list)  # indices into Plan.items
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    activation_bytes: float = 0.0
    seconds: float = 0.0  # one decode micro-batch through the stage, sending on included (estimate)
    send_bytes_per_row: float = 0.0  # what later stages read from it, per token row

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


@dataclass
class Plan:
    """Where every op runs: `tp` chips per stage, stages in pipeline order."""

    workload: Workload
    profile: SystemProfile
    precision: str
    tp: int
    batch: int
    context: int
    microbatch: int  # sequences per decode micro-batch the memory was sized for
    items: list[Item]
    stages: list[Stage]

    @property
    def chips(self) -> int:
        return self.tp * len(self.stages)

    def node_of(self, chip: int) -> int:
        return chip // self.profile.chips_per_node

    def items_of_op(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, it in enumerate(self.items):
            out.setdefault(it.op.index, []).append(i)
        return out


# ---------------------------------------------------------------------------------------
# Shards: which ops split how inside a stage of tp chips.


def assign_shards(ops: list[Op], tp: int) -> list[Item]:
    """Megatron-style modes for every op, following which inputs arrive split or partial."""
    split: dict[int, bool] = {}  # op index -> its output is split over the stage's chips
    items = []
    for op in ops:
        in_split = any(split.get(i, False) for i in op.inputs)
        if tp == 1:
            items.append(Item(op, Shard("all", 1)))
            split[op.index] = False
            continue
        if op.kind == "matmul":
            if in_split:
                items.append(Item(op, Shard("row", tp), allreduce=True))
                split[op.index] = False
            else:
                items.append(Item(op, Shard("column", tp), split_output=True))
                split[op.index] = True
        elif op.kind == "attention":
            items.append(Item(op, Shard("heads", tp), split_output=in_split, gather=not in_split))
            split[op.index] = True
        elif op.kind == "moe":
            items.append(Item(op, Shard("experts", tp), allreduce=True, gather=in_split))
            split[op.index] = False
        elif op.kind == "embedding":
            items.append(Item(op, Shard("vocab", tp), allreduce=True))
            split[op.index] = False
        elif op.reduces and in_split:
            items.append(Item(op, Shard("replicated", tp), gather=True))
            split[op.index] = False
        else:
            items.append(Item(op, Shard("split" if in_split else "replicated", tp), split_output=in_split))
            split[op.index] = in_split
    return items


def cut_large_items(items: list[Item], profile: SystemProfile, precision: str, sequences: int,
                    context: int) -> list[Item]:
    """Items whose per-chip weights or KV cache exceed PART_FRACTION of a chip, cut into parts."""
    budget = profile.memory_bytes * PART_FRACTION
    out = []
    for it in items:
        size = weight_bytes(it.op, precision, it.shard) + kv_bytes(it.op, sequences, context, it.shard)
        limit = _max_parts(it)
        parts = max(1, math.ceil(size / budget))
        if parts > limit:
            raise _too_large(it, size, limit, profile, precision)
        if parts == 1:
            out.append(it)
            continue
        for p in range(parts):
            shard = Shard(it.shard.mode, it.shard.ways, p, parts)
            out.append(Item(it.op, shard, it.allreduce, it.gather, it.split_output))
    return out


def _max_parts(it: Item) -> int:
    """How many parts an op can be cut into along the dimension a part takes."""
    op = it.op
    if op.kind == "matmul":
        return max(1, op.n // (it.shard.ways if it.shard.mode == "column" else 1))
    if op.kind == "moe":  # whole experts, then slices of each expert's hidden units
        return max(1, op.experts * op.ffn // (it.shard.ways if it.shard.mode == "experts" else 1))
    if op.kind == "embedding":
        return max(1, op.n // it.shard.ways)
    if op.kind == "attention":
        return max(1, int(it.shard.kv_heads(op.kv_heads)))
    return 1


def _too_large(it: Item, size: float, limit: int, profile: SystemProfile, precision: str) -> InputError:
    return InputError(f"op {it.op.name} ({it.op.op}) needs {size / 1e6:.1f} MB per chip at {precision} and cannot be "
                      f"cut into more than {limit} parts, so one part exceeds half of a {profile.name} chip's "
                      f"{profile.memory_bytes / 1e6:.1f} MB; use a smaller precision (--quantize), a smaller batch "
                      "or context, or a chip with more memory")


# ---------------------------------------------------------------------------------------
# Stages.


def partition(workload: Workload, profile: SystemProfile, precision: str, tp: int, batch: int, context: int,
              microbatch: int, groups: int | None = None) -> Plan:
    """Split the workload into stages of tp chips; `groups` stages (None: the fewest that fit).

    Stage times are decode times of one micro-batch of `microbatch` sequences at `context`.
    With more stages than needed the bottleneck time is minimised by bisection; stages the
    balance does not need stay unused (a plan never uses chips that would slow it).
    """
    if tp < 1 or tp > profile.chips_per_node:
        raise InputError(f"tensor parallelism {tp}: must be 1..{profile.chips_per_node} (chips of one node)")
    items = cut_large_items(assign_shards(workload.ops, tp), profile, precision, batch, context)
    phase = decode_phase(microbatch, context)
    for it in items:
        it.weight_bytes = weight_bytes(it.op, precision, it.shard)
        it.kv_bytes = kv_bytes(it.op, batch, context, it.shard)
    times = item_times(items, phase, profile, precision)
    act = [activation_buffer(it, phase) for it in items]
    memory = [it.weight_bytes + it.kv_bytes for it in items]
    live_after = _live_bytes_after(items, phase)
    cut_time = [transfer_seconds(profile, b, profile.hops_between_nodes)[1] if b else 0.0 for b in live_after]
    capacity = profile.memory_bytes
    for i, it in enumerate(items):
        if memory[i] + act[i] > capacity:
            raise _too_large(it, memory[i] + act[i], 1, profile, precision)
    fewest = _greedy(times, memory, act, cut_time, capacity, math.inf)
    if groups is None or groups <= len(fewest):
        bounds = fewest
    else:
        bounds = _balanced(times, memory, act, cut_time, capacity, groups)
    stages = []
    for s, (lo, hi) in enumerate(bounds):
        chips = tuple(range(s * tp, (s + 1) * tp))
        stage = Stage(s, chips, list(range(lo, hi)))
        for i in range(lo, hi):
            items[i].stage = s
        stage.weight_bytes = _stage_weights(items[lo:hi])
        stage.kv_bytes = sum(items[i].kv_bytes for i in range(lo, hi))
        stage.activation_bytes = max(act[lo:hi])
        stage.seconds = sum(times[lo:hi]) + (cut_time[hi - 1] if hi < len(items) else 0.0)
        stage.send_bytes_per_row = live_after[hi - 1] / phase.rows if hi < len(items) else 0.0
        stages.append(stage)
    return Plan(workload, profile, precision, tp, batch, context, microbatch, items, stages)


def _stage_weights(items: list[Item]) -> float:
    """Weight bytes one chip of a stage holds: a weight two of its items read (tied
    embeddings on a one-stage plan) is there once."""
    seen, total = set(), 0.0
    for it in items:
        key = (it.op.weight, it.shard.part, it.shard.parts, it.shard.ways)
        if it.op.weight and key in seen:
            continue
        seen.add(key)
        total += it.weight_bytes
    return total


def item_times(items: list[Item], phase: Phase, profile: SystemProfile, precision: str) -> list[float]:
    """Per-chip seconds of each item for one micro-batch, with its collectives and (GPU) launches."""
    costs = [op_cost(it.op, phase, it.shard, profile, precision) for it in items]
    times = [c.seconds for c in costs]
    if profile.kind == "gpu":  # a kernel timed from the operator table has its launch in its time
        starts = gpu_kernel_starts([it.op for it in items], phase.rows)
        times = [t + (profile.vector_latency_s if s and c.pays_launch else 0.0)
                 for t, s, c in zip(times, starts, costs)]
    for i, it in enumerate(items):
        if it.allreduce or it.gather:
            nbytes = activation_bytes(it.op, phase, Shard("all", 1)) * (it.shard.ways - 1) / it.shard.ways
            times[i] += collective_seconds(profile, nbytes, it.shard.ways, 2 if it.allreduce else 1)
    return times


def collective_seconds(profile: SystemProfile, nbytes: float, ways: int, phases: int) -> float:
    """An all-reduce (2 phases: reduce-scatter, all-gather) or all-gather (1) over `ways` chips.

    LPU: in each phase every chip sends its 1/ways share to each peer over its own links,
    one hop. GPU: NCCL over NVLink, a fixed cost per collective plus the bus traffic.
    """
    if ways <= 1:
        return 0.0
    if profile.kind == "gpu":
        return profile.hop_latency_s + phases * nbytes / profile.link_bandwidth
    share = nbytes / (ways - 1)  # nbytes is (ways-1)/ways of the tensor: one share per peer
    return phases * transfer_seconds(profile, share, 1, profile.links_per_peer)[1]


def activation_buffer(it: Item, phase: Phase) -> float:
    """Activations an item holds while it runs: its output and its inputs' size."""
    out = activation_bytes(it.op, phase, it.shard)
    if it.op.kind == "vector":
        return out + it.op.in_elements / max(it.op.out_elements, 1e-9) * out
    if it.op.kind == "matmul":
        return phase.rows * (it.op.k + it.op.n) * ACTIVATION_BYTES
    return 2 * out


def _live_bytes_after(items: list[Item], phase: Phase) -> list[float]:
    """Bytes per chip that must cross a cut after each item (outputs read by later items)."""
    last_use: dict[int, int] = {}
    producer: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        producer.setdefault(it.op.index, []).append(i)
        for src in it.op.inputs:
            last_use[src] = i
    delta = [0.0] * (len(items) + 1)
    for op_index, made in producer.items():
        end = last_use.get(op_index)
        if end is None:
            continue
        for i in made:
            if end > i:
                size = activation_bytes(items[i].op, phase, items[i].shard)
                delta[i] += size
                delta[end] -= size
    live, out = 0.0, []
    for i in range(len(items)):
        live += delta[i]
        out.append(live)
    return out


def _greedy(times, memory, act, cut_time, capacity, bound) -> list[tuple[int, int]]:
    """Stages as (first, end) item ranges: fill each while time <= bound and memory fits."""
    stages = []
    lo, t, mem, peak = 0, 0.0, 0.0, 0.0
    for i in range(len(times)):
        new_t, new_mem, new_peak = t + times[i], mem + memory[i], max(peak, act[i])
        fits = new_mem + new_peak <= capacity and new_t + cut_time[i] <= bound
        if i > lo and not fits:
            stages.append((lo, i))
            lo, new_t, new_mem, new_peak = i, times[i], memory[i], act[i]
        t, mem, peak = new_t, new_mem, new_peak
    stages.append((lo, len(times)))
    return stages


def _balanced(times, memory, act, cut_time, capacity, groups: int) -> list[tuple[int, int]]:
    """At most `groups` stages minimising the largest stage time (bisection on the bound)."""
    low = max(t + c for t, c in zip(times, cut_time))
    high = sum(times) + max(cut_time)
    best = _greedy(times, memory, act, cut_time, capacity, math.inf)
    for _ in range(60):
        mid = (low + high) / 2
        trial = _greedy(times, memory, act, cut_time, capacity, mid)
        if len(trial) <= groups:
            best, high = trial, mid
        else:
            low = mid
        if high - low <= 1e-9 * high:
            break
    return best


def required_bytes(workload: Workload, precision: str, batch: int, context: int) -> dict[str, float]:
    """What the model needs in total at a precision: weights, KV cache (bytes)."""
    weights = workload.weight_bytes(precision)
    kv = workload.kv_bytes(batch, context)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def tp_choices(profile: SystemProfile) -> list[int]:
    """Tensor-parallel degrees a stage can take: powers of two within one node."""
    out, tp = [], 1
    while tp <= profile.chips_per_node:
        out.append(tp)
        tp *= 2
    return out


__all__ = ["Item", "Stage", "Plan", "partition", "assign_shards", "required_bytes",
           "tp_choices", "collective_seconds", "item_times", "activation_buffer", "PART_FRACTION"]
