"""The flashc command line: targets, compile, run, inspect, eval, export."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _console():
    from rich.console import Console

    import shutil

    return Console(width=max(170, shutil.get_terminal_size((170, 40)).columns))


def cmd_targets(args) -> int:
    from rich.table import Table

    from flashc.profiles import PROFILES
    from flashc.targets import TARGETS

    t = Table(title="targets", title_justify="left")
    for col in ("target", "default profile", "status", "what it emits"):
        t.add_column(col)
    for tg in TARGETS.values():
        t.add_row(tg.name, tg.profile, tg.status, tg.description)
    p = Table(title="hardware profiles", title_justify="left")
    for col in ("profile", "kind", "bf16 TFLOP/s", "fp32 TFLOP/s", "memory BW TB/s", "memory GB", "SMs", "features"):
        p.add_column(col)
    for pr in PROFILES.values():
        p.add_row(pr.name, pr.kind, f"{pr.peak_flops.get('bfloat16', 0) / 1e12:g}",
                  f"{pr.peak_flops.get('float32', 0) / 1e12:g}", f"{pr.memory_bandwidth / 1e12:g}",
                  f"{pr.memory_bytes / 1e9:.1f}", str(pr.sm_count or "-"), ", ".join(sorted(pr.features)) or "-")
    c = _console()
    c.print(t)
    c.print(p)
    return 0


def cmd_compile(args) -> int:
    import flashc
    from flashc.models import resolve

    model, inputs, source = resolve(args.model, args.dtype, args.batch, args.seq_len, args.seed,
                                    signature=args.signature, cache_len=args.cache_len)
    cm = flashc.compile(model, args.target, inputs, level=args.level, profile=args.profile,
                        numeric_check=args.numeric_check, source=source, keep_reference_weights=True)
    print(cm.report().render())
    if args.output:
        path = cm.save(args.output)
        print(f"artifact written to {path}")
    return 0


def cmd_run(args) -> int:
    import torch

    import flashc
    from flashc.models import build_model
    from flashc.pass_manager import random_inputs, relative_error

    cm = flashc.load(args.artifact)
    inputs = random_inputs(cm.program, seed=args.seed)
    ran = _time(lambda: cm.executable(*inputs), args.repeat)
    model, _ = build_model(cm.source)
    if cm.reference_weights is not None:
        missing, unexpected = model.load_state_dict(cm.reference_weights, strict=False)
        if unexpected:
            raise flashc.FlashcError(f"{args.artifact}: reference weights do not fit the rebuilt model: {unexpected[:3]}")
    from flashc.decode import DecodeStep

    kwargs = {"use_cache": False} if hasattr(model, "config") and not isinstance(model, DecodeStep) else {}
    ref_inputs = [t.clone() for t in inputs]  # a decode step writes its KV cache in place
    with torch.no_grad():
        reference = model(*ref_inputs, **kwargs)
        eager = _time(lambda: model(*ref_inputs, **kwargs), args.repeat)
    got = cm.executable(*inputs)
    from torch.utils import _pytree as pytree

    ref_flat = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    from rich.table import Table

    t = Table(title=f"flashc run {args.artifact}  (target {cm.target}, inputs: "
                    + ", ".join(s.describe() for s in cm.inputs) + ")", title_justify="left")
    for col in ("output", "shape", "max abs error", "rel. error"):
        t.add_column(col)
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref_flat)):
        err = relative_error(g, r)
        worst = max(worst, err)
        t.add_row(str(i), str(list(g.shape)), f"{(g.double() - r.double()).abs().max().item():.3e}", f"{err:.3e}")
    c = _console()
    c.print(t)
    c.print(f"time per call (median of {args.repeat}): flashc {ran * 1e3:.3f} ms, eager model {eager * 1e3:.3f} ms")
    tol = 1e-3 if got[0].dtype == torch.float32 else 5e-2
    if not worst <= tol:
        c.print(f"[red]outputs differ from the eager model beyond {tol:g}[/]")
        return 1
    return 0


def _time(fn, repeat: int) -> float:
    import statistics

    import torch

    times = []
    with torch.no_grad():
        fn()
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cmd_inspect(args) -> int:
    from rich.table import Table

    from flashc.cost_model import estimate, human_bytes, human_seconds
    from flashc.profiles import get_profile
    from flashc.targets import get_target

    if Path(args.model).is_dir():
        import flashc

        cm = flashc.load(args.model)
        program, profile = cm.program, get_profile(args.profile or cm.profile.name)
        from flashc.ir import propagate_shapes

        propagate_shapes(program)
    else:
        program, profile = _optimized_program_for_inspect(args)
    est = estimate(program, profile)
    c = _console()
    t = Table(title=f"IR of {args.model} on {profile.name} ({len(est.nodes)} ops)", title_justify="left")
    for col in ("layer", "node", "op", "shape", "dtype", "GFLOP", "bytes", "est. time", "bound"):
        t.add_column(col)
    layer_totals = est.by_layer()
    current = None
    for n in est.nodes:
        if not n.kernel and not args.all:
            continue
        if n.layer != current and n.layer != current:
            current = n.layer
            t.add_section()
        t.add_row(n.layer, n.node, n.op, str(list(n.shape)), n.dtype, f"{n.flops / 1e9:.4f}", human_bytes(n.bytes),
                  human_seconds(n.seconds), n.bound)
    if args.limit and len(est.nodes) > args.limit:
        t = _truncate_table(t, args.limit)
    c.print(t)
    lt = Table(title="estimated time by layer", title_justify="left")
    lt.add_column("layer")
    lt.add_column("time")
    lt.add_column("share")
    for layer, s in layer_totals.items():
        lt.add_row(layer, human_seconds(s), f"{100 * s / est.seconds:.1f}%")
    c.print(lt)
    top = Table(title="top time sinks", title_justify="left")
    for col in ("node", "op", "layer", "shape", "est. time", "bound"):
        top.add_column(col)
    for n in est.top(args.top):
        top.add_row(n.node, n.op, n.layer, str(list(n.shape)), human_seconds(n.seconds), n.bound)
    c.print(top)
    c.print(f"total: {human_seconds(est.seconds)} per forward, {est.flops / 1e9:.2f} GFLOP, "
            f"{human_bytes(est.bytes)} moved, {est.kernels} kernels")
    return 0


def _truncate_table(t, limit):
    from rich.table import Table

    new = Table(title=f"{t.title} (first {limit} rows; --limit 0 for all)", title_justify="left")
    for col in t.columns:
        new.add_column(col.header)
    cells = [list(col._cells) for col in t.columns]
    for i in range(min(limit, len(cells[0]))):
        new.add_row(*[c[i] for c in cells])
    return new


def _optimized_program_for_inspect(args):
    from flashc import zoo
    from flashc.capture import capture
    from flashc.ir import dtype_from_name
    from flashc.models import is_factory, resolve
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import get_profile
    from flashc.targets import get_target

    profile = get_profile(args.profile or get_target(args.target).profile)
    if not is_factory(args.model) and not zoo.get_entry(args.model).tiny:
        # real-size shapes: weights on the meta device, nothing allocated
        model = zoo.build(args.model, dtype=dtype_from_name(args.dtype), device="meta")
        inputs = zoo.example_inputs(args.model, args.batch, args.seq_len)
    else:
        model, inputs, _ = resolve(args.model, args.dtype, args.batch, args.seq_len)
    program = capture(model, inputs, {"use_cache": False} if hasattr(model, "config") else {})
    PassManager(pipeline(args.level)).run(program, PassContext(profile))
    return program, profile


def cmd_eval(args) -> int:
    from rich.table import Table

    from flashc import zoo
    from flashc.accuracy import AccuracyRow, compiled_window, perplexity_rows

    is_artifact = Path(args.model).is_dir()
    if is_artifact:
        import flashc

        candidate = flashc.load(args.model)
        name = candidate.source.name
        window = compiled_window(candidate)
        baseline_name = args.baseline or name
    else:
        name = args.model
        candidate = None
        window = args.window
        baseline_name = args.baseline
    c = _console()
    if args.metric == "ppl":
        tokenizer = zoo.tokenizer(name)
        if candidate is None:
            candidate = zoo.build(name)
        baseline = zoo.build(baseline_name) if baseline_name else None
        rows = perplexity_rows(candidate, baseline, tokenizer, args.texts, window, window // 2, args.limit)
    else:
        from flashc import pretrained
        from flashc.evaluation import embedding_agreement

        if is_artifact:
            raise flashc.FlashcError("embedding evaluation runs on zoo encoders (minilm-l6); artifacts are "
                                     "compiled for one static sequence length")
        model, tok = pretrained.load_minilm()
        ref_model = zoo.build(baseline_name or name)
        res = embedding_agreement(lambda s: pretrained.minilm_embed(model, tok, s),
                                  lambda s: pretrained.minilm_embed(ref_model, tok, s))
        rows = [AccuracyRow("mean cosine vs baseline", 1.0, res.mean_cosine),
                AccuracyRow("min cosine vs baseline", 1.0, res.min_cosine),
                AccuracyRow("spearman of neighbour rankings (mean)", 1.0, res.spearman_mean)]
    t = Table(title=f"flashc eval {args.model}" + (f" (baseline {baseline_name})" if baseline_name else ""),
              title_justify="left")
    for col in ("metric", "baseline", "model", "change"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r.cells())
    c.print(t)
    return 0


EXPORT_TARGETS = {"onnx": "onnx-cpu", "onnx-cuda": "onnx-cuda", "tvm": "tvm-cpu", "tvm-cuda": "tvm-cuda"}


def cmd_export(args) -> int:
    import dataclasses

    import flashc
    from flashc.backends.base import fallbacks
    from flashc.targets import get_target

    cm = flashc.load(args.artifact)
    target = get_target(EXPORT_TARGETS[args.format])
    backend = target.backend()
    t = time.perf_counter()
    executable = backend.lower(cm.program, cm.profile if target.profile == "cpu" else flashc.get_profile(target.profile),
                               {})
    timings = {**cm.timings, "export": time.perf_counter() - t}
    exported = dataclasses.replace(cm, target=target.name, executable=executable,
                                   fallbacks=fallbacks(cm.program, backend), timings=timings)
    out = Path(args.output or f"{str(args.artifact).rstrip('/')}-{args.format}")
    exported.save(out)
    payload = sorted(str(p.relative_to(out)) for p in (out / "payload").rglob("*") if p.is_file())
    print(f"exported {args.artifact} (target {cm.target}) to {out} (target {target.name}): {', '.join(payload)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashc", description="compile PyTorch LLMs for a target and hardware profile")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("targets", help="list targets and hardware profiles").set_defaults(func=cmd_targets)

    def model_args(sp):
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--batch", type=int, default=1)
        sp.add_argument("--seq-len", type=int, default=16)
        sp.add_argument("-O", dest="level", type=int, default=2, choices=[0, 1, 2, 3])
        sp.add_argument("--profile", default=None, help="hardware profile (default: the target's)")

    c = sub.add_parser("compile", help="compile a zoo model or path/to/file.py:factory")
    c.add_argument("model")
    c.add_argument("--target", default="cpu")
    c.add_argument("-o", "--output", default=None, help="artifact directory to write")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--numeric-check", action="store_true", help="compare every pass with the graph before it")
    c.add_argument("--signature", choices=["prefill", "decode"], default="prefill",
                   help="prefill: input_ids[batch, seq-len]; decode: one token with a static KV cache")
    c.add_argument("--cache-len", type=int, default=0, help="static KV cache length of a decode signature")
    model_args(c)
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run an artifact on random inputs and compare with its eager model")
    r.add_argument("artifact")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--repeat", type=int, default=10)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="the IR as a table with FLOPs, bytes and estimated time")
    i.add_argument("model", help="zoo name, path/to/file.py:factory, or an artifact directory")
    i.add_argument("--target", default="cpu")
    i.add_argument("--top", type=int, default=10)
    i.add_argument("--limit", type=int, default=60, help="rows of the op table to print (0: all)")
    i.add_argument("--all", action="store_true", help="also list view ops (no kernel)")
    model_args(i)
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="accuracy: perplexity (causal LMs) or embedding agreement (encoders)")
    e.add_argument("model", help="zoo model with real weights (smollm2-135m, mixtral-ref, minilm-l6) or an artifact")
    e.add_argument("--metric", choices=["ppl", "embed"], default="ppl")
    e.add_argument("--baseline", default=None, help="zoo model to compare with (default for an artifact: its source)")
    e.add_argument("--limit", type=int, default=None, help="at most this many windows per text")
    e.add_argument("--window", type=int, default=256, help="perplexity window for zoo models (artifacts: their length)")
    e.add_argument("--texts", nargs="+", default=["prose", "code"], choices=["prose", "code"])
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="re-target an artifact's optimized graph to ONNX or TVM")
    x.add_argument("artifact")
    x.add_argument("--format", choices=sorted(EXPORT_TARGETS), required=True)
    x.add_argument("-o", "--output", default=None, help="new artifact directory (default: ARTIFACT-FORMAT)")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    args = build_parser().parse_args(argv)
    from flashc.errors import FlashcError

    try:
        return args.func(args)
    except FlashcError as e:
        print(f"flashc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
