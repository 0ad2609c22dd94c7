"""`flashc simulate`: predict what a model does on a system profile, and what-if sweeps.

    flashc simulate MODEL --profile P [--batch B] [--context C] [--prompt N]
        [--quantize int8|int4|fp8|bf16] [--json] [--sweep chips=...|sram=...|link-bw=...]
        [--plot FILE] [--operators TABLE.json]

`flashc/cli.py` wires it in with `add_simulate_parser(subparsers)`; `cmd_simulate(args)`
runs it. A sweep varies one thing (a chip budget, the memory per chip, the bandwidth of a
chip-to-chip link) and prints one row per value; `--plot` draws the sweep (or, without a
sweep, the per-chip timeline of one decode step).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass

from flashc.errors import FlashcError, InputError

PRECISION_CHOICES = ("bf16", "fp8", "int8", "int4")
SWEEP_LIMIT = 64  # values in one sweep
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


@dataclass(frozen=True)
class SweepSpec:
    parameter: str  # "chips", "sram" or "link-bw"
    values: tuple[float, ...]
    unit: str  # how values print


# what each sweep may take: (lowest, highest, unit text); highs are far beyond any chip built
_RANGES = {
    "chips": (1, None, "chips"),
    "sram": (2**20, 2**40, "bytes per chip (1 MiB .. 1 TiB)"),
    "link-bw": (1e6, 1e13, "bytes/s per link and direction (1 MB/s .. 10 TB/s)"),
}


def parse_sweep(text: str, max_chips: int) -> SweepSpec:
    """`chips=8,16,32`, `chips=64:512:64` (first:last:step), `sram=110MiB,220MiB`, `link-bw=7GB,14GB`."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or name not in _RANGES:
        raise InputError(f"--sweep {text!r}: write PARAMETER=VALUES with PARAMETER one of {', '.join(_RANGES)} "
                         "(e.g. chips=8,16,32 or sram=110MiB,220MiB or link-bw=7GB,14GB)")
    rest = rest.strip()
    if not rest:
        raise InputError(f"--sweep {text!r}: no values after '='")
    if ":" in rest:
        parts = rest.split(":")
        if len(parts) != 3:
            raise InputError(f"--sweep {text!r}: a range is FIRST:LAST:STEP")
        first, last, step = (_number(p, name, text) for p in parts)
        if step <= 0 or last < first:
            raise InputError(f"--sweep {text!r}: a range needs STEP > 0 and LAST >= FIRST")
        count = int((last - first) // step) + 1
        if count > SWEEP_LIMIT:
            raise InputError(f"--sweep {text!r}: {count} values; at most {SWEEP_LIMIT} per sweep")
        values = [first + i * step for i in range(count)]
    else:
        values = [_number(v, name, text) for v in rest.split(",") if v.strip()]
        if len(values) > SWEEP_LIMIT:
            raise InputError(f"--sweep {text!r}: {len(values)} values; at most {SWEEP_LIMIT} per sweep")
    low, high, unit = _RANGES[name]
    high = max_chips if name == "chips" else high
    for v in values:
        if name == "chips" and v != int(v):
            raise InputError(f"--sweep {text!r}: chips must be whole numbers, got {v:g}")
        if not low <= v <= high:
            raise InputError(f"--sweep {text!r}: value {v:g} is out of range for {name}: {low:g} to {high:g} {unit}")
    return SweepSpec(name, tuple(values), unit)


def _number(text: str, name: str, whole: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*(?:/s)?)\s*", text)
    unit = m.group(2).lower().removesuffix("/s") if m else ""
    if re.fullmatch(r"\s*-\s*[0-9.].*", text):
        raise InputError(f"--sweep {whole!r}: {text.strip()!r} is negative; {name} takes positive values")
    if not m or unit not in _UNITS:
        raise InputError(f"--sweep {whole!r}: {text.strip()!r} is not a number (units: "
                         f"{', '.join(u for u in _UNITS if u)}, optionally /s)")
    value = float(m.group(1)) * _UNITS[unit]
    if name == "chips" and m.group(2):
        raise InputError(f"--sweep {whole!r}: chips take no unit, got {text.strip()!r}")
    return value


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `flashc simulate` to the CLI's subparsers (flashc/cli.py calls this)."""
    from flashc.backends.lpu.hardware import BUILTIN

    s = subparsers.add_parser(
        "simulate", help="predict decode and prefill speed on an LPU or GPU profile (no hardware needed)",
        description="Plan MODEL onto a system profile and predict decode ms/token, time to first token, "
                    "tokens/s per user and for the system, chips and utilization.")
    s.add_argument("model", help="zoo name or path/to/file.py:factory")
    s.add_argument("--profile", default="lpu-v1",
                   help=f"system profile: {', '.join(BUILTIN)} or path/to/profile.json (default lpu-v1)")
    s.add_argument("--batch", type=_positive, default=1, help="sequences decoding together (default 1)")
    s.add_argument("--context", type=_positive, default=1024, help="tokens each decode step attends to")
    s.add_argument("--prompt", type=_positive, default=128, help="prompt tokens (time to first token)")
    s.add_argument("--quantize", choices=PRECISION_CHOICES, default="bf16", help="weight precision (default bf16)")
    s.add_argument("--chips", type=_positive, default=None, help="chip budget (default: the fewest that fit)")
    s.add_argument("--tp", type=_positive, default=None, help="chips per pipeline stage (tensor parallel)")
    s.add_argument("-O", dest="level", type=int, default=3, choices=[0, 1, 2, 3],
                   help="optimization level of the graph that is planned (default 3)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--sweep", default=None, help="chips=A,B,..|sram=...|link-bw=... (or FIRST:LAST:STEP)")
    s.add_argument("--plot", default=None, help="PNG: the sweep, or the per-chip timeline of one decode step")
    s.add_argument("--operators", default=None, metavar="TABLE.json",
                   help="a GPU's measured operator table (bench/gpu_op_rates.py): prefill matmul and attention "
                        "times from it (default for a built-in GPU profile: backends/lpu/data/<profile>_operators."
                        "json when present)")
    s.set_defaults(func=cmd_simulate)
    return s


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive integer")
    return value


def cmd_simulate(args) -> int:
    from flashc.backends.lpu.hardware import get_system, with_changes
    from flashc.backends.lpu.simulate import simulate

    profile = get_system(args.profile)
    if getattr(args, "operators", None):
        profile = with_changes(profile, operators=args.operators)
    sweep = parse_sweep(args.sweep, profile.max_chips) if args.sweep else None
    if args.chips is not None and args.chips > profile.max_chips:
        raise InputError(f"--chips {args.chips}: {profile.name} systems have at most {profile.max_chips} chips")
    if args.tp is not None and args.tp > profile.chips_per_node:
        raise InputError(f"--tp {args.tp}: a stage is at most one node, {profile.chips_per_node} chips")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot {args.plot}: the picture is written as PNG; name a .png file")
    if args.plot:
        from flashc.backends.lpu.timeline import pyplot

        pyplot()  # a missing matplotlib is said before the long work, not after
    work = _workload(args)

    def run(prof, chips):
        return simulate(work, prof, args.quantize, args.batch, args.context, args.prompt, chips=chips, tp=args.tp)

    if sweep is None:
        sim = run(profile, args.chips)
        p = sim.prediction
        if args.plot:
            from flashc.backends.lpu.timeline import draw_timeline

            draw_timeline(sim.decode, args.plot, f"{p.model} on {p.profile}: one decode step")
        if args.json:
            print(json.dumps(p.to_dict()))
        else:
            from flashc.backends.lpu.backend import render_prediction

            _console().print(render_prediction(p))
            if args.plot:
                print(f"timeline written to {args.plot}")
        return 0
    rows = []
    from rich.progress import track

    for value in track(sweep.values, description=f"sweeping {sweep.parameter}", console=_console(sys.stderr),
                       disable=args.json or not sys.stderr.isatty()):
        if sweep.parameter == "chips":
            try:
                pred = run(profile, int(value)).prediction
            except InputError as e:  # a budget below what the model needs: a row that says so
                if "needs at least" not in str(e):
                    raise
                rows.append((value, str(e).split(";")[0]))
                continue
        elif sweep.parameter == "sram":
            pred = run(with_changes(profile, memory_bytes=value), args.chips).prediction
        else:
            pred = run(with_changes(profile, link_bandwidth=value), args.chips).prediction
        rows.append((value, pred))
    fitting = [(v, p) for v, p in rows if not isinstance(p, str)]
    if not fitting:
        raise InputError(f"--sweep {args.sweep}: no value fits the model: {rows[0][1]}")
    if args.plot:
        from flashc.backends.lpu.timeline import plot_sweep

        plot_sweep(sweep.parameter, [v for v, _ in fitting],
                   {"decode ms/token": [p.decode_ms for _, p in fitting],
                    "tokens/s per user": [p.tokens_per_s_per_user for _, p in fitting],
                    "chips used": [p.chips for _, p in fitting]},
                   args.plot, f"{work.model} on {profile.name}, {args.quantize}, batch {args.batch}")
    if args.json:
        print(json.dumps({"sweep": sweep.parameter,
                          "rows": [{"value": v, **({"error": p} if isinstance(p, str) else p.to_dict())}
                                   for v, p in rows]}))
        return 0
    from rich.table import Table

    t = Table(title=f"{work.model} on {profile.name}: sweep of {sweep.parameter} ({args.quantize}, batch "
                    f"{args.batch}, context {args.context}, prompt {args.prompt})", title_justify="left")
    for col in (sweep.parameter, "chips used", "tp x stages", "decode ms", "tokens/s per user", "tokens/s",
                "TTFT ms", "utilization", "bound by"):
        t.add_column(col)
    for v, p in rows:
        if isinstance(p, str):
            t.add_row(_show(sweep.parameter, v), "-", "-", "-", "-", "-", "-", "-", p)
            continue
        t.add_row(_show(sweep.parameter, v), str(p.chips), f"{p.tensor_parallel} x {p.stages}", f"{p.decode_ms:.4f}",
                  f"{p.tokens_per_s_per_user:.1f}", f"{p.tokens_per_s:.1f}", f"{p.ttft_s * 1e3:.3f}",
                  f"{100 * p.utilization:.1f}%", p.bottleneck)
    _console().print(t)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _show(parameter: str, value: float) -> str:
    if parameter == "chips":
        return str(int(value))
    if parameter == "sram":
        return f"{value / 2**20:g} MiB"
    return f"{value / 1e9:g} GB/s"


def _workload(args):
    from flashc.backends.lpu.workload import capture_workload

    with _console(sys.stderr).status(f"capturing {args.model} (meta device, -O{args.level}) ..."):
        try:
            return capture_workload(args.model, level=args.level)
        except FlashcError:
            raise
        except Exception as e:  # a factory's own code: flashc/cli.py's boundary reports it at its line
            if ":" in args.model and args.model.split(":")[0].endswith(".py"):
                raise FlashcError(f"{args.model}: building or capturing the model raised "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from e
            raise


def _console(file=None):
    from rich.console import Console

    return Console(file=file, width=170)


__all__ = ["add_simulate_parser", "cmd_simulate", "parse_sweep", "SweepSpec"]
