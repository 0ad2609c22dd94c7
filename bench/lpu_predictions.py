"""Predictions of the lpu simulator against what is known: the H100/H200 runs recorded in
bench/RESULTS.md (calibration), the published Groq LPU figures, and the study's claim that
an LPU runs Mixtral about 9x faster than an A100.

Runs on the CPU (nothing is measured here: the measured numbers are quoted from
bench/RESULTS.md and from public sources, each with where it comes from). Models are
flashc's own zoo shapes, captured on the meta device and optimized at -O3, as
`flashc simulate` does.

    python bench/lpu_predictions.py [--out DIR] [--operators TABLE.json ...]

GPU prefill rows take their matmul and attention times from a measured operator table
(bench/gpu_op_rates.py) when one applies: backends/lpu/data/<profile>_operators.json when
present, or the files given with --operators (each applies to the profile it names). The
calibration table says, per row, where its prefill operator times came from.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flashc.backends.lpu.hardware import get_system, with_changes
from flashc.backends.lpu.operators import load_operator_table
from flashc.backends.lpu.simulate import simulate
from flashc.backends.lpu.workload import capture_workload

# Recorded measurements (bench/RESULTS.md), flashc h100 -O3, bf16, random weights.
H100_DECODE = "2026-11-26, 'On an H100, the issue's card' table (kind=nvidia-h100-x1)"
H100_PREFILL = "2026-11-25, 'llama-3.2-1b shapes on one H100' table (session-1 code)"
H200_FINAL = "2026-11-26 session 3, 'Final run of the session' table (H200)"
# the lease that measured the operator table (backends/lpu/data/h100_operators.json): today's code
H100_SESSION11 = "2026-12-05 session 11, 'Prefill on an H100' table (kind=nvidia-h100-x1, same lease as the table)"


@dataclass
class Measured:
    model: str
    profile: str
    case: str  # "decode" or "prefill"
    batch: int
    context: int  # decode: tokens in the KV cache; prefill: prompt length
    ms: float | None
    source: str


MEASURED = [
    Measured("llama-3.2-1b", "h100", "decode", 1, 1024, 1.118, H100_DECODE),
    Measured("llama-3.2-1b", "h100", "decode", 8, 1024, 1.499, H100_DECODE),
    Measured("llama-3-8b", "h100", "decode", 1, 1024, 5.599, H100_DECODE),
    Measured("llama-3-8b", "h100", "decode", 8, 1024, 6.612, H100_DECODE),
    Measured("llama-3.2-1b", "h100", "prefill", 1, 2048, 9.888, H100_SESSION11),
    Measured("llama-3-8b", "h100", "prefill", 1, 2048, 53.283, H100_SESSION11),
    Measured("llama-3.2-1b", "h200", "decode", 1, 1024, 0.934, H200_FINAL),
    Measured("llama-3.2-1b", "h200", "decode", 8, 1024, 1.334, H200_FINAL),
    Measured("llama-3.2-1b", "h200", "prefill", 1, 2048, 9.402, H200_FINAL),
    Measured("llama-3-8b", "h200", "decode", 1, 1024, 4.325, H200_FINAL),
    Measured("llama-3-8b", "h200", "decode", 8, 1024, 4.904, H200_FINAL),
    Measured("llama-3-8b", "h200", "prefill", 1, 2048, 52.005, H200_FINAL),
]

# Published LPU points.
LLAMA70_MEASURED = 185  # tokens/s per user, median, 550 prompt + 150 output tokens, 0.22 s TTFT (issue #17)
LLAMA70_VENDOR = 300  # Groq's claim for Llama-2-70B (TechPowerUp, Feb 2024: "300 tokens/s", 4096 context)
LLAMA70_TTFT = 0.22
MIXTRAL_VENDOR = 480  # Groq's figure for Mixtral-8x7B (TechPowerUp, Feb 2024)
GROQ_70B_CHIPS = 576  # publicly reported size of the system that served Llama-2-70B (8 racks x 9 nodes x 8)
PROMPT, OUTPUT = 550, 150
DECODE_CONTEXT = PROMPT + OUTPUT // 2  # the KV cache halfway through the 150 output tokens
STUDY_RATIO = 9.0  # "LPU about 9x an A100 on Mixtral"
TOLERANCE = 0.25


def _pct(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f}%"


def operator_tables(paths: list[str]) -> dict[str, str]:
    """profile name -> operator table file, for the files given (each names its profile)."""
    from flashc.errors import InputError
    from flashc.profiles import profile_name_for_gpu

    out = {}
    for path in paths:
        table = load_operator_table(path)
        profile = table.profile or profile_name_for_gpu(table.device) or ""
        if profile not in ("a100", "h100", "h200"):
            raise InputError(f"{path}: device {table.device!r} (profile {profile!r}) is none of the GPU profiles "
                             "a100, h100, h200")
        out[profile] = path
    return out


def operator_column(p) -> str:
    """Where a prediction's prefill matmul and attention times came from."""
    s = p.operator_sources
    if not s:
        return "no table: peak rates"
    return f"{s['measured']} measured, {s['scaled']} scaled, {s['roofline']} peak rate"


def calibration(workloads, tables: dict[str, str] | None = None) -> list[str]:
    tables = tables or {}
    lines = ["| model | profile | case | measured ms | predicted ms | error | within 10% | prefill matmul/attention "
             "times | peak-rate prediction ms | measured in |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in MEASURED:
        prof = get_system(m.profile)
        if m.profile in tables:
            prof = with_changes(prof, operators=tables[m.profile])
        if m.case == "decode":  # decode never reads an operator table
            pred = simulate(workloads[m.model], prof, "bf16", batch=m.batch, context=m.context, prompt=16)
            ms = pred.prediction.decode_ms
            case = f"decode b{m.batch} ctx{m.context}"
            where, peak = "- (decode: GEMV fit)", "-"
        else:
            pred = simulate(workloads[m.model], prof, "bf16", batch=1, context=m.context, prompt=m.context)
            ms = pred.prediction.ttft_s * 1e3
            case = f"prefill {m.context}"
            where, peak = operator_column(pred.prediction), "-"
            if prof.operators:  # the same row at the profile's rates alone, to show what the table changed
                bare = simulate(workloads[m.model], with_changes(prof, operators=""), "bf16", batch=1,
                                context=m.context, prompt=m.context)
                peak = f"{bare.prediction.ttft_s * 1e3:.3f}"
        if m.ms is None:
            lines.append(f"| {m.model} | {m.profile} | {case} | - | {ms:.3f} | - | - | {where} | {peak} | {m.source} |")
            continue
        ok = "yes" if abs(ms - m.ms) <= 0.10 * m.ms else "no"
        lines.append(f"| {m.model} | {m.profile} | {case} | {m.ms:.3f} | {ms:.3f} | {_pct(ms, m.ms)} | {ok} | "
                     f"{where} | {peak} | {m.source} |")
    return lines


def lpu_points(workloads) -> tuple[list[str], dict]:
    lpu = get_system("lpu-v1")
    lines = ["| model | weights | plan | chips (tp x stages) | tokens/s per user | published | within 25% | "
             "TTFT (prompt 550) | decode bound by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keep = {}
    for model, published, low, high in [
            ("llama-2-70b", f"{LLAMA70_MEASURED} measured - {LLAMA70_VENDOR} vendor", LLAMA70_MEASURED, LLAMA70_VENDOR),
            ("mixtral-8x7b", f"~{MIXTRAL_VENDOR} vendor", MIXTRAL_VENDOR, MIXTRAL_VENDOR)]:
        for precision in ("int8", "bf16"):
            for plan, tp in (("default: fewest chips", None), ("pipeline only (tp 1)", 1)):
                sim = simulate(workloads[model], lpu, precision, batch=1, context=DECODE_CONTEXT, prompt=PROMPT,
                               tp=tp, build_prefill=False)
                p = sim.prediction
                keep[(model, precision, plan)] = p
                ok = "yes" if (1 - TOLERANCE) * low <= p.tokens_per_s_per_user <= (1 + TOLERANCE) * high else "no"
                lines.append(f"| {model} | {precision} | {plan} | {p.chips} ({p.tensor_parallel} x {p.stages}) | "
                             f"{p.tokens_per_s_per_user:.0f} | {published} | {ok} | {p.ttft_s * 1e3:.2f} ms | "
                             f"{p.bottleneck} |")
    return lines, keep


def study_claim(workloads, lpu_predictions) -> list[str]:
    lines = ["| system | weights | chips | tokens/s per user (batch 1) | LPU / this |",
             "| --- | --- | --- | --- | --- |"]
    a100 = {}
    for precision in ("bf16", "int8"):
        p = simulate(workloads["mixtral-8x7b"], get_system("a100"), precision, batch=1, context=DECODE_CONTEXT,
                     prompt=PROMPT, build_prefill=False).prediction
        a100[precision] = p
    for precision in ("int8", "bf16"):
        lp = lpu_predictions[("mixtral-8x7b", precision, "default: fewest chips")]
        lines.append(f"| lpu-v1 (flashc plan) | {precision} | {lp.chips} | {lp.tokens_per_s_per_user:.0f} | |")
    for precision, p in a100.items():
        ratios = ", ".join(
            f"{lpu_predictions[('mixtral-8x7b', q, 'default: fewest chips')].tokens_per_s_per_user / p.tokens_per_s_per_user:.1f}x"
            f" (lpu {q})" for q in ("int8", "bf16"))
        lines.append(f"| a100 | {precision} | {p.chips} | {p.tokens_per_s_per_user:.0f} | {ratios}; vendor 480 / this: "
                     f"{MIXTRAL_VENDOR / p.tokens_per_s_per_user:.1f}x |")
    return lines


def stream_what_if(workloads) -> list[str]:
    """How the LPU points move if fewer of the 64 streams carried weights (a what-if, not a fit:
    lpu-v1 keeps the 64-stream upper bound)."""
    from flashc.backends.lpu.hardware import with_changes

    lpu = get_system("lpu-v1")
    lines = ["| streams carrying weights | weight stream TB/s | llama-2-70b int8 tokens/s per user | "
             "mixtral-8x7b int8 tokens/s per user |", "| --- | --- | --- | --- |"]
    for streams in (64, 32, 16):
        prof = with_changes(lpu, weight_bandwidth=streams * 320 * lpu.clock_hz)
        row = [f"{streams}", f"{prof.weight_bandwidth / 1e12:.1f}"]
        for model in ("llama-2-70b", "mixtral-8x7b"):
            p = simulate(workloads[model], prof, "int8", batch=1, context=DECODE_CONTEXT, prompt=PROMPT,
                         build_prefill=False).prediction
            row.append(f"{p.tokens_per_s_per_user:.0f} ({p.chips} chips)")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for lpu_predictions.md")
    parser.add_argument("--operators", nargs="+", default=[], metavar="TABLE.json",
                        help="measured operator tables (bench/gpu_op_rates.py), each for the GPU profile it names "
                             "(default: backends/lpu/data/<profile>_operators.json when present)")
    args = parser.parse_args(argv)
    tables = operator_tables(args.operators)
    from rich.console import Console

    console = Console(file=sys.stderr)
    workloads = {}
    for name in ("llama-3.2-1b", "llama-3-8b", "llama-2-70b", "mixtral-8x7b"):
        with console.status(f"capturing {name} (meta device, -O3)"):
            t = time.perf_counter()
            workloads[name] = capture_workload(name, level=3)
        console.print(f"captured {name}: {len(workloads[name].ops)} ops, "
                      f"{workloads[name].parameters / 1e9:.2f} B parameters, {time.perf_counter() - t:.1f} s")
    out = ["## Calibration: h100 / h200 profiles against recorded runs (bf16, -O3)", ""]
    for name in ("h100", "h200"):
        path = tables.get(name) or get_system(name).operators
        out.append(f"- {name} prefill operators: " + (load_operator_table(path).describe() if path
                                                     else "no measured table (every op at the peak rates)"))
    out.append("")
    with console.status("calibration"):
        out += calibration(workloads, tables)
    out += ["", "## Published LPU points (batch 1; 550 prompt tokens, decode at 625 tokens of context)", ""]
    with console.status("LPU points"):
        lines, keep = lpu_points(workloads)
    out += lines
    out += ["", f"Groq's Llama-2-70B system was publicly reported as {GROQ_70B_CHIPS} chips.", "",
            "## The study's claim: LPU about 9x an A100 on Mixtral-8x7B (batch 1)", ""]
    with console.status("A100"):
        out += study_claim(workloads, keep)
    out += ["", "## What if fewer streams carried weights into the matrix units (lpu-v1 otherwise)", ""]
    with console.status("streams what-if"):
        out += stream_what_if(workloads)
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lpu_predictions.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
