"""The `lpu` backend: plan the optimized program onto a statically scheduled, SRAM-only
chip (or a GPU profile of the same simulator) and predict what it would do.

There is no such chip here to run on: the executable runs the program's reference
implementation on the CPU (so numerics stay checkable against eager) and carries the plan,
the static schedule and the prediction as attributes. An artifact's payload holds the
schedule (JSON), the prediction report and, with matplotlib installed, a per-chip timeline
picture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashc.backends.lpu.hardware import BUILTIN, SystemProfile, get_system
from flashc.backends.lpu.schedule import Schedule
from flashc.backends.lpu.simulate import Prediction, Simulation, simulate
from flashc.backends.lpu.workload import check_precision, extract_workload
from flashc.errors import ArtifactError, FlashcError
from flashc.ir import Program
from flashc.lowering import LoweringTable
from flashc.profiles import HardwareProfile

SCHEDULE_FILE = "schedule.json"
REPORT_FILE = "prediction.md"
TIMELINE_FILE = "timeline.png"


@dataclass(frozen=True)
class LpuOptions:
    """What the plan assumes; None takes the example inputs' batch and length."""

    precision: str = "bf16"  # weights at bf16, fp8, int8 or int4 (what the chips hold)
    batch: int | None = None  # sequences decoding together
    context: int | None = None  # tokens each decode step attends to
    prompt: int | None = None  # prompt tokens for the time to first token
    chips: int | None = None  # a chip budget (default: the fewest chips that hold the model)
    tensor_parallel: int | None = None  # chips per stage (default: the planner's choice)
    system_profile: str | None = None  # a JSON profile file (default: the built-in of the target's profile)


class LpuExecutable:
    """Runs the program's reference implementation; `.plan`, `.schedule`, `.prediction` say
    what the simulated system would do."""

    def __init__(self, program: Program, simulation: Simulation | None, schedule: Schedule,
                 prediction: Prediction, prefill: Schedule | None = None) -> None:
        from flashc.backends.eager import run_with_fresh_outputs

        self._run = run_with_fresh_outputs(program)
        self.simulation = simulation
        self.plan = simulation.plan if simulation is not None else None
        self.schedule = schedule
        self.prefill_schedule = prefill
        self.prediction = prediction

    def __call__(self, *args):
        return self._run(*args)


class LpuBackend:
    name = "lpu"
    Options = LpuOptions
    # every ATen and flashc op is planned (cost by kind) and runs its reference on the CPU
    lowering = LoweringTable("lpu", namespaces=frozenset({"aten", "flashc"}))

    def lower(self, program: Program, profile: HardwareProfile, options: LpuOptions) -> LpuExecutable:
        system = system_for(profile, options.system_profile)
        check_precision(options.precision)
        work = extract_workload(program, "model")
        batch, tokens = (int(d) for d in program.inputs[0].shape)
        # a decode step (flashc.decode.DecodeStep) attends over its static cache, filled by a prompt as long
        cache = program.meta.input_high.get("cache_position")
        length = int(cache) if program.meta.signature == "decode" and cache else tokens
        sim = simulate(work, system, options.precision, batch=options.batch or batch,
                       context=options.context or length, prompt=options.prompt or length,
                       chips=options.chips, tp=options.tensor_parallel)
        return LpuExecutable(program, sim, sim.decode, sim.prediction, sim.prefill)

    def save_payload(self, executable: LpuExecutable, directory: Path) -> dict[str, Any]:
        data = {"prediction": executable.prediction.to_dict(), "decode": executable.schedule.to_dict(),
                "prefill": executable.prefill_schedule.to_dict() if executable.prefill_schedule else None}
        (directory / SCHEDULE_FILE).write_text(json.dumps(data))
        (directory / REPORT_FILE).write_text(render_prediction(executable.prediction))
        info = {"schedule": SCHEDULE_FILE, "report": REPORT_FILE}
        try:
            from flashc.backends.lpu.timeline import draw_timeline

            draw_timeline(executable.schedule, directory / TIMELINE_FILE,
                          f"{executable.prediction.model} on {executable.prediction.profile}: one decode step")
            info["timeline"] = TIMELINE_FILE
        except FlashcError:  # matplotlib is an optional extra: the JSON and the report still go in
            pass
        return info

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]) -> LpuExecutable:
        path = directory / info.get("schedule", SCHEDULE_FILE)
        try:
            data = json.loads(path.read_text())
            prediction = Prediction(**data["prediction"])
            decode = Schedule.from_dict(data["decode"])
            prefill = Schedule.from_dict(data["prefill"]) if data.get("prefill") else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: not a readable lpu schedule ({type(e).__name__}: {e}); recompile") from e
        return LpuExecutable(program, None, decode, prediction, prefill)


def system_for(profile: HardwareProfile | str, path: str | None = None) -> SystemProfile:
    """The simulator's profile for a flashc hardware profile (or a JSON file when given)."""
    if path:
        return get_system(path)
    name = profile if isinstance(profile, str) else profile.name
    if name not in BUILTIN:
        raise FlashcError(f"the lpu backend has no simulator profile for hardware profile {name!r}; use one of "
                          f"{', '.join(BUILTIN)} or give options={{'system_profile': 'path/to/profile.json'}}")
    return get_system(name)


def render_prediction(p: Prediction) -> str:
    """The prediction as a short Markdown report."""
    lines = [f"# {p.model} on {p.profile} ({p.kind}), weights {p.precision}", "",
             "| figure | value |", "| --- | --- |"]
    rows = [
        ("chips (tensor parallel x stages)", f"{p.chips} ({p.tensor_parallel} x {p.stages})"),
        ("batch x context, prompt", f"{p.batch} x {p.context}, {p.prompt}"),
        ("micro-batches x size", f"{p.microbatches} x {p.microbatch_size}"),
        ("decode ms/token (per sequence)", f"{p.decode_ms:.4f}"),
        ("one token's traversal ms", f"{p.traversal_ms:.4f}"),
        ("time to first token s", f"{p.ttft_s:.6f} ({p.prefill_chunks} chunks)"),
        ("tokens/s per user", f"{p.tokens_per_s_per_user:.1f}"),
        ("tokens/s (system)", f"{p.tokens_per_s:.1f}"),
        ("matrix-unit utilization", f"{100 * p.utilization:.1f}%"),
        ("bound by", p.bottleneck),
        ("weights, KV cache", f"{p.weight_bytes / 1e9:.3f} GB, {p.kv_cache_bytes / 1e9:.3f} GB"),
        ("most memory used on a chip", f"{p.max_memory_per_chip / 1e6:.1f} of {p.memory_per_chip / 1e6:.1f} MB"),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if p.notes:
        lines += [""] + [f"- {n}" for n in p.notes]
    return "\n".join(lines) + "\n"


__all__ = ["LpuBackend", "LpuOptions", "LpuExecutable", "system_for", "render_prediction"]
