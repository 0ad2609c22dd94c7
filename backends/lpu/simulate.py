"""Plan a workload onto a system and run the static schedule: the prediction.

Decode: `batch` sequences generate a token each per step, in micro-batches that follow
each other through the pipeline stages. A sequence's next token needs its previous one,
so the time between two of its tokens (`decode_ms`) is the longer of one micro-batch's
way through every stage (its traversal) and the time the busiest unit or link needs for
all micro-batches of a step. Prefill: the prompt goes through in chunks, pipelined
across stages; time to first token is when the last chunk's logits come out.

The planner tries each tensor-parallel degree and micro-batching. Without a chip budget
the chip count comes from capacity: the fewest chips that hold the model, and among the
plans of that many chips the one whose schedule is fastest. With a budget it considers
stage counts from a fixed ladder above the fewest, up to the budget; for every chip count
on the way it schedules the plan that an estimate from stage times ranks best so far, and
keeps the fastest schedule. The plans scheduled for a smaller budget are all scheduled for
a larger one, so more chips never predict a slower plan.

On a GPU profile with a measured operator table (`operators.py`) the prefill's matmuls and
attention take the table's times; `Prediction.operator_sources` and a note say how many did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from flashc.backends.lpu.costs import decode_phase, op_cost, prefill_phase
from flashc.backends.lpu.hardware import SystemProfile
from flashc.backends.lpu.operators import operator_table
from flashc.backends.lpu.partition import (Plan, activation_buffer, item_times, partition, required_bytes,
                                           tp_choices)
from flashc.backends.lpu.schedule import Schedule, build_schedule
from flashc.backends.lpu.workload import PRECISIONS, Workload, check_precision
from flashc.errors import InputError

# Prefill chunk counts tried (a chunk is prompt / count tokens): 1 keeps the matrix units
# busiest per weight streamed, more overlap the stages of a pipeline.
PREFILL_CHUNKS = (1, 2, 4, 8, 16, 32)
# Task schedules larger than this are not built for prefill chunk counts; the stage-level
# recurrence (exact for stages that run their ops one after another) gives TTFT instead.
MAX_PREFILL_TASKS = 400_000


@dataclass
class Prediction:
    """What the simulator predicts for one model on one system."""

    model: str
    profile: str
    kind: str
    precision: str
    batch: int
    context: int
    prompt: int
    chips: int
    tensor_parallel: int
    stages: int
    microbatches: int
    microbatch_size: int
    decode_ms: float  # between two tokens of one sequence
    traversal_ms: float  # one micro-batch's token through every stage
    ttft_s: float
    prefill_chunks: int
    ttft_from: str  # "schedule", or "stage estimate" when the prefill schedule is too large to list
    tokens_per_s_per_user: float
    tokens_per_s: float  # the whole system, all sequences
    utilization: float  # mean over chips of matrix-unit busy time / decode step
    bottleneck: str
    weight_bytes: float
    kv_cache_bytes: float
    max_memory_per_chip: float
    memory_per_chip: float
    notes: list[str] = field(default_factory=list)
    # prefill matmul and attention kernels (per chip, over the prompt's chunks) by where their
    # time came from: "measured" / "scaled" (the GPU's operator table) or "roofline" (the rates)
    operator_sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Simulation:
    plan: Plan
    decode: Schedule  # the schedule of one decode step (all its micro-batches)
    prefill: Schedule | None  # the schedule of the prompt's chunks (None when too large to list)
    prediction: Prediction


def simulate(workload: Workload, profile: SystemProfile, precision: str = "bf16", batch: int = 1,
             context: int = 1024, prompt: int = 128, chips: int | None = None, tp: int | None = None,
             build_prefill: bool = True) -> Simulation:
    """Plan and schedule `workload` on `profile`; see the module docstring."""
    check_precision(precision)
    for name, value in (("batch", batch), ("context", context), ("prompt", prompt)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if chips is not None and not 1 <= chips <= profile.max_chips:
        raise InputError(f"chips {chips}: {profile.name} systems have 1 to {profile.max_chips} chips")
    check_fits(workload, profile, precision, batch, context)
    budget = chips if chips is not None else profile.max_chips
    candidates = []
    fewest_needed = math.inf
    refusals: list[InputError] = []
    for t in ([tp] if tp else tp_choices(profile)):
        for m in _microbatch_counts(batch):
            size = math.ceil(batch / m)
            try:
                fewest = partition(workload, profile, precision, t, batch, context, size)
            except InputError as e:  # an op too large for this degree's shards: try the others
                refusals.append(e)
                continue
            fewest_needed = min(fewest_needed, fewest.chips)
            if fewest.chips > budget:
                continue
            if m > len(fewest.stages) and chips is None:
                continue  # more micro-batches than stages: they would wait at the first stage
            for groups in _group_ladder(len(fewest.stages), budget // t if chips is not None else None):
                plan = fewest if groups == len(fewest.stages) else partition(
                    workload, profile, precision, t, batch, context, size, groups)
                candidates.append((_estimate(plan, m), plan.chips, plan, m))
    if not candidates and refusals and fewest_needed == math.inf:
        raise refusals[0]
    if not candidates:
        raise InputError(f"{workload.model} at {precision} needs at least {fewest_needed} {profile.name} chips "
                         f"(batch {batch}, context {context}); "
                         + (f"the budget is {budget}: raise --chips, or quantize (--quantize int8 or int4)"
                            if chips is not None else f"the largest system has {profile.max_chips}: quantize "
                            "(--quantize int8 or int4), or use a smaller batch or context"))
    # the chip count comes from capacity: every plan of the fewest chips is scheduled; with a
    # budget, so are the plans that the estimate ranks best up to each larger chip count
    fewest_chips = min(c[1] for c in candidates)
    pool = [c for c in candidates if c[1] == fewest_chips]
    if chips is not None:
        pool += [c for c in _prefix_best(candidates) if c[1] > fewest_chips]
    scheduled = []
    for _, n_chips, plan, m in pool:
        one = build_schedule(plan, [decode_phase(plan.microbatch, context)])
        scheduled.append((_decode_metrics(plan, one, m)["period"], n_chips, plan, m, one))
    scheduled.sort(key=lambda c: (c[0], c[1]))
    _, _, plan, m, one = scheduled[0]
    metrics = _decode_metrics(plan, one, m)
    shown = min(m, 4)  # the artifact's schedule shows a few micro-batches in flight
    decode = one if shown == 1 else build_schedule(plan, [decode_phase(plan.microbatch, context)] * shown)
    chunks, ttft, prefill, phases = _prefill(plan, prompt, build_prefill)
    sources = _operator_sources(plan, phases)
    period = metrics["period"]
    need = required_bytes(workload, precision, batch, context)
    prediction = Prediction(
        model=workload.model, profile=profile.name, kind=profile.kind, precision=precision, batch=batch,
        context=context, prompt=prompt, chips=plan.chips, tensor_parallel=plan.tp, stages=len(plan.stages),
        microbatches=m, microbatch_size=plan.microbatch, decode_ms=period * 1e3,
        traversal_ms=metrics["traversal"] * 1e3, ttft_s=ttft, prefill_chunks=chunks,
        ttft_from="schedule" if prefill is not None else "stage estimate",
        tokens_per_s_per_user=1.0 / period, tokens_per_s=batch / period, utilization=metrics["utilization"],
        bottleneck=metrics["bottleneck"], weight_bytes=need["weights"], kv_cache_bytes=need["kv_cache"],
        max_memory_per_chip=max(s.memory_bytes for s in plan.stages), memory_per_chip=profile.memory_bytes,
        notes=list(workload.notes) + _operator_notes(profile, sources), operator_sources=sources)
    return Simulation(plan, decode, prefill, prediction)


def check_fits(workload: Workload, profile: SystemProfile, precision: str, batch: int, context: int) -> None:
    """Refuse a model that no system of this kind can hold, saying how many bytes it needs."""
    need = required_bytes(workload, precision, batch, context)
    most = profile.max_chips * profile.memory_bytes
    if need["total"] <= most:
        return
    fits = [p for p in PRECISIONS if PRECISIONS[p][0] < PRECISIONS[precision][0]
            and required_bytes(workload, p, batch, context)["total"] <= most]
    hint = ("quantize (--quantize): " + ", ".join(
        f"at {p} it needs {required_bytes(workload, p, batch, context)['total']:.4g} bytes" for p in fits)
            if fits else "no precision flashc offers makes it fit: use a smaller batch or context, or a larger system")
    raise InputError(f"{workload.model} at {precision} needs {need['total']:.4g} bytes (weights {need['weights']:.4g}, "
                     f"KV cache {need['kv_cache']:.4g} for batch {batch} x context {context}); the largest "
                     f"{profile.name} system holds {profile.max_chips} x {profile.memory_bytes:.4g} = {most:.4g} "
                     f"bytes; {hint}")


def _prefix_best(candidates: list) -> list:
    """For each chip count a candidate has, the best-estimated candidate of at most that many
    chips. The plans scheduled for a budget are then those of every smaller budget plus
    perhaps more, so a larger budget's pick is never slower than a smaller one's."""
    out, best = [], None
    for c in sorted(candidates, key=lambda c: (c[1], c[0])):
        if best is None or c[0] < best[0]:
            best = c
            out.append(c)
    return out


def _microbatch_counts(batch: int) -> list[int]:
    out, m = [], 1
    while m <= batch:
        out.append(m)
        m *= 2
    return out


def _group_ladder(fewest: int, most: int | None) -> list[int]:
    """Stage counts tried: the fewest that fit, and with a budget a fixed ladder above it.

    The ladder depends only on `fewest`, so a larger budget's candidates include a smaller
    budget's: more chips never predict a slower plan.
    """
    if most is None:
        return [fewest]
    ladder = set(range(fewest, fewest + 8))
    g = float(fewest)
    while g < 1e6:
        g *= 1.25
        ladder.add(int(math.ceil(g)))
    return sorted(x for x in ladder if x <= most)


def _estimate(plan: Plan, microbatches: int) -> float:
    """Decode step estimate from stage times: max(traversal, busiest stage x micro-batches)."""
    times = [s.seconds for s in plan.stages]
    return max(sum(times), microbatches * max(times))


def _decode_metrics(plan: Plan, one: Schedule, microbatches: int) -> dict:
    """Period, traversal, utilization and bottleneck from the schedule of one micro-batch."""
    profile = plan.profile
    traversal = one.makespan / profile.clock_hz
    busy = one.busy()
    (chip, busiest), most = max(busy.items(), key=lambda kv: kv[1]) if busy else ((0, "matrix"), 0)
    step = microbatches * most / profile.clock_hz
    period = max(traversal, step)
    if period <= 0:
        raise InputError(f"{plan.workload.model}: the plan has no work to schedule")
    unit = "stream" if profile.kind == "gpu" else "matrix"
    matrix = [busy.get((c, unit), 0) * microbatches / profile.clock_hz / period for c in range(plan.chips)]
    if traversal >= step:
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in one.path_shares().items() if v >= 0.005)
        bottleneck = f"one token's path through {len(plan.stages)} stage(s): {shares}"
    else:
        bottleneck = f"{busiest} of chip {chip} ({microbatches} micro-batches per step)"
    return {"period": period, "traversal": traversal, "utilization": sum(matrix) / len(matrix),
            "bottleneck": bottleneck}


def _prefill(plan: Plan, prompt: int, build: bool) -> tuple[int, float, Schedule | None, list]:
    """(chunks, time to first token in seconds, schedule, the chunks' phases) for one prompt of
    `prompt` tokens.

    With an operator table, chunkings whose matmuls and attention the table times (exactly or
    scaled) come first: a chunking it cannot time falls back to the peak rates, which would
    look faster only because they are not measured.
    """
    best = None
    for count in PREFILL_CHUNKS:
        if count > prompt:
            break
        chunk = math.ceil(prompt / count)
        phases = [prefill_phase(1, min(chunk, prompt - k * chunk), k * chunk) for k in range(count)
                  if k * chunk < prompt]
        if not _chunk_fits(plan, phases[0]):
            continue
        estimate = _stage_recurrence(plan, phases)
        untimed = _operator_sources(plan, phases).get("roofline", 0) > 0
        if best is None or (untimed, estimate) < (best[3], best[1]):
            best = (len(phases), estimate, phases, untimed)
    if best is None:
        raise InputError(f"{plan.workload.model}: a prompt of {prompt} tokens does not fit the activation memory "
                         f"left on the chips of this plan, even in {PREFILL_CHUNKS[-1]} chunks; use a shorter "
                         "prompt or more chips")
    count, estimate, phases, _ = best
    if not build or len(plan.items) * plan.tp * len(phases) * 3 > MAX_PREFILL_TASKS:
        return count, estimate, None, phases
    schedule = build_schedule(plan, phases)
    return count, schedule.makespan / plan.profile.clock_hz, schedule, phases


def _operator_sources(plan: Plan, phases) -> dict[str, int]:
    """Where the prefill's matmul and attention times come from, counted per item and chunk
    (empty for a profile without an operator table)."""
    if not plan.profile.operators:
        return {}
    counts = {"measured": 0, "scaled": 0, "roofline": 0}
    for phase in phases:
        for it in plan.items:
            if it.op.kind in ("matmul", "attention"):
                counts[op_cost(it.op, phase, it.shard, plan.profile, plan.precision).source] += 1
    return counts


def _operator_notes(profile: SystemProfile, sources: dict[str, int]) -> list[str]:
    if not sources:
        return []
    table = operator_table(profile)
    return [f"prefill matmuls and attention: {sources['measured']} timed from the measured operator table "
            f"{table.describe()}, {sources['scaled']} scaled by FLOPs from its nearest shape, "
            f"{sources['roofline']} at the profile's peak rates (no shape close enough); decode does not use it"]


def _chunk_fits(plan: Plan, phase) -> bool:
    for stage in plan.stages:
        peak = max(activation_buffer(plan.items[i], phase) for i in stage.items)
        if stage.weight_bytes + stage.kv_bytes + peak > plan.profile.memory_bytes:
            return False
    return True


def _stage_recurrence(plan: Plan, phases) -> float:
    """Pipeline of stages serving chunks in order: finish[s][k] = max(finish[s-1][k] + send,
    finish[s][k-1]) + time[s][k]. Exact when a stage runs its ops one after another."""
    from flashc.backends.lpu.costs import transfer_seconds

    per_phase = [item_times(plan.items, ph, plan.profile, plan.precision) for ph in phases]
    finish_prev_stage = [0.0] * len(phases)
    for s, stage in enumerate(plan.stages):
        row, last = [], 0.0
        for k, times in enumerate(per_phase):
            t = sum(times[i] for i in stage.items)
            arrive = finish_prev_stage[k]
            if s > 0:
                sent = phases[k].rows * plan.stages[s - 1].send_bytes_per_row
                arrive += transfer_seconds(plan.profile, sent, plan.profile.hops_between_nodes)[1]
            last = max(arrive, last) + t
            row.append(last)
        finish_prev_stage = row
    return finish_prev_stage[-1]


__all__ = ["Prediction", "Simulation", "simulate", "check_fits"]
