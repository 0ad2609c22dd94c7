"""The static schedule: for every chip, each operation and each transfer, with its start
and end cycle, its unit or link, and what it waits for.

`build_schedule` places the plan's items for a list of micro-batches in order (list
scheduling): an operation starts when its inputs have arrived on its chip and its unit is
free; a transfer starts when its data is ready and its link is free, occupies the link
for bytes / bandwidth and arrives after its hops' latency. Nothing is decided at run time,
as on a statically scheduled chip: the same schedule replays for every token.

Units: "matrix" and "vector" on each chip (a GPU's kernels all run on its one "stream");
links: "link:a->b" between chips of one node, "global:a" for chip a's links out of its node,
"nvlink:a" for a GPU's NVLink port (collectives). Two simplifications, both on the slow side
or neutral: a chip's links out of its node count as one link, and a transfer between nodes
reserves only its first link (its further hops add their latency, not occupancy).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from flashc.backends.lpu.costs import (Phase, Shard, activation_bytes, ceil_cycles, gpu_kernel_starts, op_cost,
                                       transfer_seconds)
from flashc.backends.lpu.partition import Plan, collective_seconds
from flashc.backends.lpu.workload import ACTIVATION_BYTES

SCHEDULE_SCHEMA = 1


@dataclass
class Task:
    """One operation or transfer on the timeline (times in cycles of the profile's clock)."""

    id: int
    chip: int
    unit: str  # "matrix", "vector", "link:a->b", "global:a", "nvlink:a"
    kind: str  # "op", "reduce", "transfer", "collective"
    name: str
    microbatch: int
    start: int
    end: int  # the unit or link is busy in [start, end)
    ready: int  # when the result is usable where it goes (end + hop latency for a transfer)
    deps: tuple[int, ...] = ()
    dst: int = -1  # transfers: the receiving chip
    nbytes: float = 0.0
    flops: float = 0.0
    op: int = -1  # workload op index (-1: not an op of the model)
    work: str = ""  # ops: "matrix" or "vector" (what kind of unit the work needs; a GPU has one stream)
    bound: str = ""  # what limits it: weights, compute, vector, memory (ops); transfer, collective, reduce
    fixed: int = 0  # cycles of it that are fixed latency (a kernel launch, a matrix plane's fill)


@dataclass
class Schedule:
    profile: str
    clock_hz: float
    chips: int
    microbatches: list[dict]
    tasks: list[Task] = field(default_factory=list)

    @property
    def makespan(self) -> int:
        return max((t.ready for t in self.tasks), default=0)

    def finish_of(self, microbatch: int) -> int:
        return max((t.ready for t in self.tasks if t.microbatch == microbatch), default=0)

    def busy(self) -> dict[tuple[int, str], int]:
        """Busy cycles per (chip, unit or link)."""
        out: dict[tuple[int, str], int] = {}
        for t in self.tasks:
            key = (t.chip, t.unit)
            out[key] = out.get(key, 0) + (t.end - t.start)
        return out

    def critical_path(self) -> list[Task]:
        """The chain of tasks that ends last: from the last result back through the input that
        arrived last, or the task that kept the unit busy when that was later."""
        if not self.tasks:
            return []
        on_unit: dict[tuple[int, str], list[Task]] = {}
        for t in self.tasks:
            on_unit.setdefault((t.chip, t.unit), []).append(t)
        for ts in on_unit.values():
            ts.sort(key=lambda t: t.end)
        task = max(self.tasks, key=lambda t: t.ready)
        path = [task]
        while True:
            dep = max((self.tasks[d] for d in task.deps), key=lambda t: t.ready, default=None)
            waited = dep.ready if dep is not None else 0
            if task.start > waited:  # the unit was busy: the task before it on the unit
                before = [t for t in on_unit[(task.chip, task.unit)] if t.end <= task.start and t is not task]
                dep = before[-1] if before else dep
            if dep is None:
                return path[::-1]
            path.append(dep)
            task = dep

    def path_shares(self) -> dict[str, float]:
        """Share of the critical path's time by what bounds each of its tasks."""
        shares: dict[str, float] = {}
        for t in self.critical_path():
            shares["latency"] = shares.get("latency", 0) + t.fixed
            shares[t.bound] = shares.get(t.bound, 0) + (t.ready - t.start - t.fixed)
        total = sum(shares.values()) or 1
        return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}

    def to_dict(self) -> dict:
        return {"schema": SCHEDULE_SCHEMA, "profile": self.profile, "clock_hz": self.clock_hz, "chips": self.chips,
                "microbatches": self.microbatches, "makespan_cycles": self.makespan,
                "tasks": [asdict(t) for t in self.tasks]}

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        from flashc.errors import ArtifactError

        if data.get("schema") != SCHEDULE_SCHEMA:
            raise ArtifactError(f"schedule schema {data.get('schema')!r} is not {SCHEDULE_SCHEMA}; recompile")
        tasks = [Task(**{**t, "deps": tuple(t["deps"])}) for t in data["tasks"]]
        return cls(data["profile"], data["clock_hz"], data["chips"], data["microbatches"], tasks)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)


class _Builder:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.profile = plan.profile
        self.tasks: list[Task] = []
        self.free: dict[tuple[int, str], int] = {}
        self.kernel_start = None

    def cycles(self, seconds: float) -> int:
        return ceil_cycles(self.profile, seconds)

    def add(self, chip: int, unit: str, kind: str, name: str, mb: int, earliest: int, duration: int,
            deps: tuple[int, ...], *, delay: int = 0, dst: int = -1, nbytes: float = 0.0, flops: float = 0.0,
            op: int = -1, work: str = "", bound: str = "", fixed: int = 0) -> Task:
        key = (chip, unit)
        start = max(earliest, self.free.get(key, 0))
        end = start + duration
        self.free[key] = end
        task = Task(len(self.tasks), chip, unit, kind, name, mb, start, end, end + delay, deps, dst, nbytes, flops,
                    op, work, bound or kind, fixed)
        self.tasks.append(task)
        return task

    def link(self, src: int, dst: int) -> tuple[str, int, int]:
        """(link name, hops, links in parallel) from chip src to chip dst."""
        p = self.profile
        if p.kind == "gpu":
            return f"nvlink:{src}", 1, 1
        if self.plan.node_of(src) == self.plan.node_of(dst):
            return f"link:{src}->{dst}", 1, p.links_per_peer
        return f"global:{src}", p.hops_between_nodes, 1

    def send(self, src: int, dst: int, nbytes: float, name: str, mb: int, after: Task | None) -> Task:
        unit, hops, links = self.link(src, dst)
        busy, arrive = transfer_seconds(self.profile, nbytes, hops, links)
        busy_c = max(1, self.cycles(busy))
        delay = self.cycles(arrive) - self.cycles(busy)
        earliest = after.ready if after is not None else 0
        deps = (after.id,) if after is not None else ()
        return self.add(src, unit, "transfer", name, mb, earliest, busy_c, deps, delay=max(delay, 0), dst=dst,
                        nbytes=nbytes)


def build_schedule(plan: Plan, phases: list[Phase]) -> Schedule:
    """The static schedule of `phases` (one micro-batch each, launched in order) on the plan."""
    b = _Builder(plan)
    items = plan.items
    producers = plan.items_of_op()
    gpu = plan.profile.kind == "gpu"
    for mb, phase in enumerate(phases):
        starts = gpu_kernel_starts([it.op for it in items], phase.rows) if gpu else None
        # (item index, chip) -> task after which the item's output is usable on that chip
        done: dict[tuple[int, int], Task] = {}
        arrived: dict[tuple[int, int], Task] = {}  # (item, chip of another stage) -> transfer bringing it
        for i, it in enumerate(items):
            stage = plan.stages[it.stage]
            inputs: dict[int, list[Task]] = {chip: [] for chip in stage.chips}
            for src_op in set(it.op.inputs):
                for j in producers.get(src_op, []):
                    src_stage = plan.stages[items[j].stage]
                    for pos, chip in enumerate(stage.chips):
                        if items[j].stage == it.stage:
                            inputs[chip].append(done[(j, chip)])
                            continue
                        key = (j, chip)
                        if key not in arrived:
                            src_chip = src_stage.chips[pos % len(src_stage.chips)]
                            size = activation_bytes(items[j].op, phase, items[j].shard)
                            arrived[key] = b.send(src_chip, chip, size, f"{items[j].op.name} to stage {it.stage}",
                                                  mb, done[(j, src_chip)])
                        inputs[chip].append(arrived[key])
            if it.gather and len(stage.chips) > 1:
                inputs = _all_gather(b, plan, it, phase, mb, inputs)
            cost = op_cost(it.op, phase, it.shard, plan.profile, plan.precision)
            launch = plan.profile.vector_latency_s if gpu and starts[i] and cost.pays_launch else 0.0
            seconds = cost.seconds + launch
            fixed = min(b.cycles(cost.latency + launch), b.cycles(seconds))
            unit = "stream" if gpu else cost.unit
            ops = {}
            for chip in stage.chips:
                deps = inputs[chip]
                earliest = max((d.ready for d in deps), default=0)
                ops[chip] = b.add(chip, unit, "op", it.op.name, mb, earliest, b.cycles(seconds),
                                  tuple(d.id for d in deps), nbytes=cost.streamed_bytes, flops=cost.flops,
                                  op=it.op.index, work=cost.unit, bound=cost.bound, fixed=fixed)
            if it.allreduce and len(stage.chips) > 1:
                ops = _all_reduce(b, plan, it, phase, mb, ops)
            for chip, task in ops.items():
                done[(i, chip)] = task
    return Schedule(plan.profile.name, plan.profile.clock_hz, plan.chips,
                    [asdict(p) for p in phases], b.tasks)


def _all_reduce(b: _Builder, plan: Plan, it, phase: Phase, mb: int, ops: dict[int, Task]) -> dict[int, Task]:
    """Partial sums on the stage's chips -> the sum on every chip."""
    chips = list(ops)
    full = activation_bytes(it.op, phase, Shard("all", 1))
    if plan.profile.kind == "gpu":
        start = max(t.ready for t in ops.values())
        seconds = collective_seconds(plan.profile, full * (len(chips) - 1) / len(chips), len(chips), 2)
        return {c: b.add(c, f"nvlink:{c}", "collective", f"all-reduce {it.op.name}", mb, start, b.cycles(seconds),
                         tuple(t.id for t in ops.values()), nbytes=full) for c in chips}
    share = full / len(chips)
    # reduce-scatter: each chip sends the other chips their share of its partial sum ...
    incoming: dict[int, list[Task]] = {c: [ops[c]] for c in chips}
    for c in chips:
        for d in chips:
            if d != c:
                incoming[d].append(b.send(c, d, share, f"reduce-scatter {it.op.name}", mb, ops[c]))
    reduced = {}
    for c in chips:  # ... and adds what it received to its own share on the vector units
        elements = share / ACTIVATION_BYTES * (len(chips) - 1)
        seconds = elements / plan.profile.vector_ops if plan.profile.vector_ops else 0.0
        deps = incoming[c]
        reduced[c] = b.add(c, "vector", "reduce", f"sum {it.op.name}", mb, max(t.ready for t in deps),
                           max(1, b.cycles(seconds)), tuple(t.id for t in deps), flops=elements)
    # all-gather: each chip sends its reduced share to the others
    gathered: dict[int, list[Task]] = {c: [reduced[c]] for c in chips}
    for c in chips:
        for d in chips:
            if d != c:
                gathered[d].append(b.send(c, d, share, f"all-gather {it.op.name}", mb, reduced[c]))
    return {c: max(gathered[c], key=lambda t: t.ready) for c in chips}


def _all_gather(b: _Builder, plan: Plan, it, phase: Phase, mb: int,
                inputs: dict[int, list[Task]]) -> dict[int, list[Task]]:
    """Split inputs -> every chip gets all shares before the item runs."""
    chips = list(inputs)
    producers = plan.items_of_op()
    srcs = [plan.items[j] for o in it.op.inputs for j in producers.get(o, [])]
    full = sum(activation_bytes(s.op, phase, Shard("all", 1)) for s in srcs) or 1.0
    share = full / len(chips)
    ready = {c: max(inputs[c], key=lambda t: t.ready) if inputs[c] else None for c in chips}
    out = {c: list(inputs[c]) for c in chips}
    if plan.profile.kind == "gpu":
        start = max((t.ready for t in ready.values() if t is not None), default=0)
        seconds = collective_seconds(plan.profile, full * (len(chips) - 1) / len(chips), len(chips), 1)
        for c in chips:
            out[c].append(b.add(c, f"nvlink:{c}", "collective", f"all-gather for {it.op.name}", mb, start,
                                b.cycles(seconds), tuple(t.id for t in inputs[c]), nbytes=full))
        return out
    for c in chips:
        for d in chips:
            if d != c:
                out[d].append(b.send(c, d, share, f"all-gather for {it.op.name}", mb, ready[c]))
    return out


__all__ = ["Task", "Schedule", "build_schedule", "SCHEDULE_SCHEMA"]
