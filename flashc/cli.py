"""The flashc command line: targets, compile, run, generate, train-draft, inspect, eval, export.

Every failure the user can act on (a bad option, path or size, a model spec whose code
fails) ends as one line on stderr, `flashc: error: ...`, with exit status 2. The user's
own code (a path/to/file.py:factory spec) is loaded, called and run behind one boundary
here, `_user_code`, so what it raises is reported at the user's file and line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from flashc.errors import FlashcError

EXIT_ERROR = 2  # a usage error, a bad input, or a failure of the user's code
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug in flashc itself

EPILOG = """\
MODEL is a zoo name (`flashc targets` lists targets; see flashc.zoo for models) or
path/to/file.py:factory, a function taking no arguments that returns an nn.Module (a model
with config.vocab_size gets random token ids) or (model, example_inputs).

exit status: 0 success; 1 `run` found outputs that differ from the eager model;
2 an error, printed as one line `flashc: error: ...` (errors in a factory file name its
file and line); 70 an internal error: a bug in flashc, printed as one line with the path
of a file holding its traceback.

environment: FLASHC_DEBUG=1 lets every error raise with its full Python traceback
(errors in your own factory code show your frames); FLASHC_DUMP=dir, FLASHC_VERIFY=each
and FLASHC_PDL=0 are described in README.md.
"""


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

    _quantize_option(args)  # a bad scheme or spec is refused before the model is built
    _prune_option(args)
    _ssm_option(args)
    if args.signature == "generate":
        return _compile_generation(args)
    _generation_options_unused(args)
    model, inputs, source = _model_for_compile(args)
    with _user_code(args.model, "capturing the model"):
        cm = flashc.compile(model, args.target, inputs, level=args.level, profile=args.profile,
                            numeric_check=args.numeric_check, source=source, keep_reference_weights=True,
                            quantize=_quantize_option(args), calibration=args.calibration,
                            prune=_prune_option(args), ssm=_ssm_option(args))
    report = cm.report()
    print(report.render())
    prediction = getattr(cm.executable, "prediction", None)  # a simulated target (lpu-v1) says what it predicts
    if prediction is not None:
        from flashc.backends.lpu.backend import render_prediction

        print(render_prediction(prediction))
    if args.report_json:
        from flashc.report import write_json

        print(f"report written to {write_json(args.report_json, report.to_dict())}")
    if args.output:
        path = cm.save(args.output)
        print(f"artifact written to {path}")
    return 0


def _compile_generation(args) -> int:
    """`flashc compile MODEL --signature generate`: decode, prefill and verify entries."""
    from flashc.generation import compile_generation

    head = None
    if args.draft_head is not None:
        from flashc.draft_head import load_draft_head

        if not Path(args.draft_head).is_dir():
            raise FlashcError(f"--draft-head {args.draft_head}: no such directory; train a head with `flashc "
                              f"train-draft {args.model} -o {args.draft_head}`")
        head = load_draft_head(args.draft_head)  # a bad head directory fails before the compile
    model, source, tokenizer = _model_for_generation(args)
    with _user_code(args.model, "capturing the model"):
        gm = compile_generation(model, args.target, cache_len=args.cache_len, batch=args.batch,
                                prefill_chunk=_entry_size(args.prefill_chunk), draft_len=_entry_size(args.draft_len),
                                ragged=args.ragged,
                                source=source, tokenizer=tokenizer, progress=True, level=args.level,
                                profile=args.profile, numeric_check=args.numeric_check,
                                quantize=_quantize_option(args), calibration=args.calibration,
                                prune=_prune_option(args), ssm=_ssm_option(args), draft_head=head,
                                exact_verify=args.exact_verify)
    print(gm.decode.report().render())
    print(gm.describe())
    if args.report_json:
        from flashc.report import write_json

        entries = {name: cm.report().to_dict() for name, cm in gm.entries.items()}
        print(f"report written to {write_json(args.report_json, {'kind': 'generation', 'entries': entries})}")
    if args.output:
        print(f"artifact written to {gm.save(args.output)}")
    return 0


def _entry_size(given: int | None) -> int | str | None:
    """An entry's tokens a call: the option's value (0: no such entry), else compile_generation's default."""
    if given is None:
        return "auto"
    return given or None


def _generation_options_unused(args) -> None:
    for option, value in (("--prefill-chunk", args.prefill_chunk), ("--draft-len", args.draft_len),
                          ("--ragged", args.ragged or None), ("--draft-head", args.draft_head),
                          ("--exact-verify", args.exact_verify or None)):
        if value is not None:
            raise FlashcError(f"{option} applies to --signature generate (the entries it compiles); add "
                              "--signature generate --cache-len N or drop it")


def _model_for_generation(args):
    """The causal LM, its source and tokenizer name for a --signature generate compile."""
    from flashc.compiled import ModelSource
    from flashc.models import is_factory

    if args.cache_len is None:
        raise FlashcError("--signature generate needs --cache-len N, the length of its static KV cache "
                          "(prompt + new tokens)")
    kind = "factory" if is_factory(args.model) else "zoo"
    tokenizer = None
    if kind == "zoo":
        entry = _zoo_entry(args.model, "a zoo name or path/to/file.py:factory")
        if entry.family in ENCODER_FAMILIES:
            raise FlashcError(f"--signature generate: {args.model} is an encoder ({entry.family}), not a causal "
                              "LM: it generates nothing; compile it with --signature prefill")
        tokenizer = args.model if entry.pretrained else None
    source = ModelSource(kind, args.model, args.dtype, args.seed, args.batch, args.seq_len, "prefill", 0)
    model, _ = _eager_model(source)
    if kind == "factory":
        _require_causal_lm(model, args.model)
    _check_positions(model, args.model, "--cache-len", args.cache_len)
    return model, source, tokenizer  # a model with random weights has no tokenizer: ids in, ids out


def cmd_train_draft(args) -> int:
    """`flashc train-draft MODEL -o HEAD_DIR`: train a draft head (flashc.draft_head) on the
    calibration text, print its held-out agreement with the model, save it."""
    from flashc.compiled import ModelSource
    from flashc.draft_head import train_draft_head
    from flashc.models import is_factory
    from flashc.passes.quantize.calibration import calibration_for_model

    import torch

    kind = "factory" if is_factory(args.model) else "zoo"
    if kind == "zoo":
        entry = _zoo_entry(args.model, "a zoo name or path/to/file.py:factory")
        if entry.family in ENCODER_FAMILIES:
            raise FlashcError(f"train-draft: {args.model} is an encoder ({entry.family}), not a causal LM: it drafts "
                              "nothing")
    source = ModelSource(kind, args.model, args.dtype, args.seed, 1, 16, "prefill", 0)
    model, _ = _eager_model(source)
    _require_causal_lm(model, args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlashcError(f"train-draft: --device {device}, but this machine has no CUDA device (use --device cpu)")
    model.to(device)
    data = calibration_for_model(args.calibration, model, source)
    if data.tokens is None:
        raise FlashcError(f"train-draft: --calibration {args.calibration}: give text or token ids, not "
                          f"{data.description}")
    print(f"calibration: {data.description}")
    if args.new_tokens is not None and not args.self_distill:
        raise FlashcError("train-draft: --new-tokens applies to --self-distill N (the length of the model's answers)")
    tokenizer = None
    if args.self_distill and kind == "zoo" and entry.pretrained:
        from flashc import zoo

        tokenizer = zoo.tokenizer(args.model)  # paragraphs of the text, and the chat template if it has one
    with _user_code(args.model, "running the model"):
        head = train_draft_head(model, data.tokens, steps=args.steps, lr=args.lr, context=args.context,
                                checkpoint_dir=args.checkpoint, seed=args.seed, self_distill=args.self_distill,
                                new_tokens=args.new_tokens or 128, tokenizer=tokenizer, unroll=args.unroll)
    print(head.training_report.summary())
    print(f"draft head written to {head.save(args.output)}; use it with `flashc compile {args.model} --signature "
          f"generate --cache-len N --draft-head {args.output}` and `flashc generate DIR --speculate head`")
    return 0


def cmd_generate(args) -> int:
    """`flashc generate ARTIFACT`: generate after a prompt, print the output and the stats."""
    import json

    import torch

    import flashc
    from flashc.generation import GenerationModel

    loaded = flashc.load(args.artifact)
    if isinstance(loaded, flashc.CompiledModel):
        if loaded.program.meta.signature != "decode":
            raise FlashcError(f"{args.artifact}: compiled with the prefill signature; generate needs "
                              "--signature generate (or decode)")
        loaded = GenerationModel.from_decode(loaded)
    gm = loaded
    if (args.prompt is None) == (args.prompt_ids is None):
        raise FlashcError("give the prompt as --prompt TEXT or --prompt-ids 1,2,3 (one of them)")
    if args.prompt is not None:
        prompt = args.prompt if gm.batch == 1 else [args.prompt] * gm.batch
    else:
        try:
            rows = [[int(t) for t in row.split(",") if t.strip()] for row in args.prompt_ids.split(";")]
        except ValueError:
            raise FlashcError(f"--prompt-ids {args.prompt_ids!r}: token ids separated by commas, e.g. 1,2,3 (sequences "
                              "separated by ';')") from None
        rows = rows * gm.batch if len(rows) == 1 else rows
        prompt = [torch.tensor(r) for r in rows]
    result, stats = gm.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, speculate=args.speculate,
                                draft_len=args.draft_len, early_exit=args.early_exit, return_stats=True)
    if args.json:
        ids = [r.tolist() for r in result] if isinstance(result, list) and isinstance(result[0], torch.Tensor) else None
        print(json.dumps({"output": None if ids is not None else result, "ids": ids, "stats": stats.to_dict()}))
        return 0
    c = _console()
    if isinstance(result, list) and result and isinstance(result[0], torch.Tensor):
        for row in result:
            c.print(",".join(map(str, row.tolist())))
    else:
        for text in (result if isinstance(result, list) else [result]):
            c.print(text, markup=False, highlight=False)
    from flashc.generate import stats_table

    c.print(stats_table(stats))
    return 0


def _quantize_option(args):
    """The QuantConfig that --quantize / --group-size / --budget-bits name (None without --quantize)."""
    budget = getattr(args, "budget_bits", None)
    if args.quantize is None:
        if args.group_size is not None or budget is not None:
            raise FlashcError(f"--{'group-size' if args.group_size is not None else 'budget-bits'} applies to "
                              "--quantize: add e.g. --quantize int4-gptq")
        return None
    from flashc.passes.quantize import QuantConfig

    return QuantConfig.parse(args.quantize, args.group_size).with_budget(budget)


def _ssm_option(args):
    """The SSMConfig that --ssm and its training options name (None without --ssm)."""
    extras = {"--ssm-keep-attention": args.ssm_keep_attention, "--align-steps": args.align_steps,
              "--distill-steps": args.distill_steps, "--ssm-checkpoint": args.ssm_checkpoint,
              "--ssm-plot": args.ssm_plot, "--ssm-train": args.ssm_train}
    if args.ssm is None:
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise FlashcError(f"{', '.join(given)} apply to --ssm: add e.g. --ssm all")
        return None
    import dataclasses

    from flashc.passes.ssm import SSMConfig

    config = SSMConfig.parse(args.ssm)
    changes = {}
    if args.ssm_keep_attention is not None:
        changes["keep_attention"] = args.ssm_keep_attention
    if args.align_steps is not None:
        changes["align"] = dataclasses.replace(config.align, steps=args.align_steps)
    if args.distill_steps is not None:
        changes["distill"] = dataclasses.replace(config.distill, steps=args.distill_steps)
    if args.ssm_checkpoint is not None:
        changes["checkpoint_dir"] = args.ssm_checkpoint
    if args.ssm_plot is not None:
        changes["plot"] = args.ssm_plot
    if args.ssm_train is not None:
        changes["train"] = args.ssm_train
    return dataclasses.replace(config, **changes)


def _prune_option(args):
    """The PruneConfig that --prune (and --recover-steps) name (None without --prune)."""
    if args.recover_steps is not None:
        if args.prune is None:
            raise FlashcError("--recover-steps distils a pruned model: add --prune, e.g. --prune wanda-50%")
        import dataclasses

        from flashc.distill import DistillConfig
        from flashc.passes.prune import PruneConfig

        return dataclasses.replace(PruneConfig.parse(args.prune), recover=DistillConfig(steps=args.recover_steps),
                                   recover_plot=args.recover_plot, recover_checkpoint=args.recover_checkpoint)
    if args.recover_plot is not None or args.recover_checkpoint is not None:
        raise FlashcError("--recover-plot and --recover-checkpoint apply to --recover-steps")
    if args.prune is None:
        return None
    from flashc.passes.prune import PruneConfig

    return PruneConfig.parse(args.prune)


def cmd_run(args) -> int:
    import torch

    import flashc
    from flashc.checking import random_inputs, relative_error

    cm = flashc.load(args.artifact)
    inputs = random_inputs(cm.program, seed=args.seed)
    ran = _time(lambda: cm.executable(*inputs), args.repeat)
    model, _ = _eager_model(cm.source)
    if cm.reference_weights is not None:
        try:
            missing, unexpected = model.load_state_dict(cm.reference_weights, strict=False)
        except RuntimeError as e:  # shapes that differ: the source changed since the compile
            raise FlashcError(f"{args.artifact}: its reference weights do not fit the model rebuilt from "
                              f"{cm.source.name} ({_one_line(str(e))[:300]}); was it changed since the compile? "
                              "Recompile") from e
        if unexpected:
            raise FlashcError(f"{args.artifact}: reference weights do not fit the rebuilt model: {unexpected[:3]}")
    from flashc.decode import DecodeStep

    kwargs = {"use_cache": False} if hasattr(model, "config") and not isinstance(model, DecodeStep) else {}
    ref_inputs = [t.clone() for t in inputs]  # a decode step writes its KV cache in place
    with _user_code(cm.source.name, "the eager model"), torch.no_grad():
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
    outputs = []
    for i, (g, r) in enumerate(zip(got, ref_flat)):
        err = relative_error(g, r)
        worst = max(worst, err)
        abs_err = (g.double() - r.double()).abs().max().item()
        outputs.append({"output": i, "shape": list(g.shape), "max_abs_error": abs_err, "relative_error": err})
        t.add_row(str(i), str(list(g.shape)), f"{abs_err:.3e}", f"{err:.3e}")
    c = _console()
    c.print(t)
    c.print(f"time per call (median of {args.repeat}): flashc {ran * 1e3:.3f} ms, eager model {eager * 1e3:.3f} ms "
            f"({eager / ran:.2f}x eager on this machine)")
    tol = 1e-3 if got[0].dtype == torch.float32 else 5e-2
    passed = worst <= tol
    if args.report_json:
        from flashc.report import REPORT_SCHEMA, write_json

        run = {"schema": REPORT_SCHEMA, "kind": "run", "artifact": str(args.artifact), "target": cm.target,
               "inputs": [s.describe() for s in cm.inputs], "seed": args.seed, "outputs": outputs,
               "tolerance": tol, "passed": passed,
               "seconds_per_call": {"flashc": ran, "eager": eager}, "repeat": args.repeat,
               "compile": cm.report().to_dict()}
        c.print(f"report written to {write_json(args.report_json, run)}")
    if not passed:
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

    if args.why_not:
        return _inspect_why_not(args)
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


def _inspect_why_not(args) -> int:
    """`flashc inspect MODEL --why-not OP`: every place the fusion OP could happen in the
    model, and whether it did or why not, from the pipeline run up to the pass that fuses OP."""
    from rich.markup import escape
    from rich.table import Table

    from flashc.ir import module_path
    from flashc.pass_manager import PassContext
    from flashc.pipelines import pipeline
    from flashc.rewrite import fusion_owner, short_source, why_not

    if Path(args.model).is_dir():
        raise FlashcError(f"--why-not {args.why_not}: {args.model} is an artifact, whose graph is already optimized; "
                          "give the zoo name or path/to/file.py:factory it was compiled from")
    if args.level < 2:
        raise FlashcError(f"--why-not {args.why_not}: -O{args.level} fuses nothing; fusions run at -O2 and -O3")
    passes = pipeline(args.level)
    fusion_owner(passes, args.why_not)  # an unknown name fails before the model is built
    # captured only (-O0): why_not runs the pipeline itself, as far as the pass that fuses OP
    program, profile = _optimized_program_for_inspect(argparse.Namespace(**{**vars(args), "level": 0}))
    report = why_not(program, passes, PassContext(profile), args.why_not)
    t = Table(title=f"why not {report.name}: {args.model} at -O{args.level}, pass {report.pass_name} "
                    f"(fused {report.fused} of {len(report.candidates)} candidates)", title_justify="left")
    for col in ("node", "module", "source", "pattern", "result"):
        t.add_column(col)
    for cand in report.candidates:
        result = "[green]fused[/]" if cand.fused else escape(cand.reason)
        t.add_row(cand.node.name, module_path(cand.node), short_source(cand.node), cand.pattern, result)
    if args.limit and len(report.candidates) > args.limit:
        t = _truncate_table(t, args.limit)
    c = _console()
    c.print(t)
    c.print(f"{report.name}: fused {report.fused} of {len(report.candidates)} candidate places")
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
    from flashc.api import optimize
    from flashc.compiled import ModelSource
    from flashc.ir import dtype_from_name
    from flashc.models import is_factory
    from flashc.profiles import get_profile
    from flashc.targets import get_target

    profile = get_profile(args.profile or get_target(args.target).profile)
    kind = "factory" if is_factory(args.model) else "zoo"
    entry = None
    if kind == "zoo":
        entry = _zoo_entry(args.model, "a zoo name, path/to/file.py:factory or an artifact directory")
    if entry is not None and not entry.tiny and not entry.pretrained:
        # real-size shapes: weights on the meta device, nothing allocated
        model = zoo.build(args.model, dtype=dtype_from_name(args.dtype), device="meta")
        inputs = zoo.example_inputs(args.model, args.batch, args.seq_len)
    else:
        model, inputs = _eager_model(ModelSource(kind, args.model, args.dtype, 0, args.batch, args.seq_len))
    _check_positions(model, args.model, "--seq-len", args.seq_len)
    with _user_code(args.model, "capturing the model"):
        program, _ = optimize(model, inputs, level=args.level, profile=profile)
    return program, profile


def cmd_eval(args) -> int:
    """Accuracy of a zoo model or an artifact against a baseline, as a table or (--json) one
    JSON object on stdout; with --json everything else goes to stderr."""
    import json

    if args.json:
        with contextlib.redirect_stdout(sys.stderr):  # a library's stray print must not corrupt the JSON
            evaluation = _evaluate(args)
        print(json.dumps(evaluation.to_dict(), indent=2, allow_nan=False))
        for note in evaluation.notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    from rich.table import Table

    evaluation = _evaluate(args)
    against = f"baseline {evaluation.baseline}" if evaluation.baseline else "no baseline"
    t = Table(title=f"flashc eval {args.model}  ({_METRICS[evaluation.metric]}, {against})", title_justify="left")
    for col in ("metric", "baseline", "model", "change"):
        t.add_column(col)
    for r in evaluation.rows:
        t.add_row(*r.cells())
    if evaluation.headline not in evaluation.rows:
        t.add_section()
        t.add_row(*evaluation.headline.cells())
    c = _console()
    c.print(t)
    for note in evaluation.notes:
        c.print(f"note: {note}")
    return 0


def _evaluate(args):
    """The Evaluation `flashc eval` prints: what is compared with what, on which metric."""
    from flashc import zoo
    from flashc.accuracy import compiled_window, perplexity_evaluation

    real = "a zoo model with real weights (smollm2-135m, mixtral-ref, minilm-l6)"
    artifact = None
    if Path(args.model).is_dir():
        import flashc

        artifact = flashc.load(args.model)
        source = artifact.source.name if artifact.source.kind == "zoo" else None
        baseline_name = args.baseline or source
        if baseline_name is None:
            raise FlashcError(f"{args.model}: compiled from {artifact.source.name} ({artifact.source.kind}), which "
                              f"has no tokenizer or float model flashc knows: pass --baseline MODEL, {real} to "
                              "compare with (its tokenizer is used too)")
        tokenizer_name = source or baseline_name
    else:
        _zoo_entry(args.model, f"{real} or an artifact directory")
        if args.baseline == args.model:
            raise FlashcError(f"--baseline {args.baseline} is the model itself: it agrees with itself by construction; "
                              f"compare an artifact compiled from it (flashc compile {args.model} -o DIR; "
                              "flashc eval DIR) or another model")
        baseline_name, tokenizer_name = args.baseline, args.model
    metric = _eval_metric(args.metric, tokenizer_name, _zoo_entry(tokenizer_name, real).family)
    if metric == "embed" and baseline_name is None:
        raise FlashcError(f"{args.model}: embedding agreement compares two encoders, and a zoo model alone has "
                          f"nothing to be compared with: evaluate an artifact compiled from it (flashc compile "
                          f"{args.model} -o DIR; flashc eval DIR) or pass --baseline MODEL")
    if metric == "embed" and args.limit is not None and args.limit < 7:
        raise FlashcError(f"--limit {args.limit}: embedding agreement needs at least 7 sentences (it compares "
                          "top-5 neighbours); use --limit 7 or more")
    if baseline_name is not None:
        base_entry = _zoo_entry(baseline_name, real)
        if not base_entry.pretrained:
            raise FlashcError(f"--baseline {baseline_name} has random weights; compare with {real}")
        if (base_entry.family in ENCODER_FAMILIES) != (metric == "embed"):
            raise FlashcError(f"--baseline {baseline_name} is {_kind_of(base_entry.family)}, and {args.model} "
                              f"is scored by {_METRICS[metric]}: compare it with a model of its own kind")
    if args.window is not None and (artifact is not None or metric == "embed"):
        raise FlashcError(f"--window {args.window}: only a perplexity of a zoo model takes a window (an artifact's "
                          "window is the sequence length it was compiled for); drop --window")
    tokenizer = zoo.tokenizer(tokenizer_name)  # a model with random weights has none, and says so
    if metric == "ppl":
        window = compiled_window(artifact) if artifact is not None else args.window or 256
        candidate = artifact if artifact is not None else zoo.build(args.model)
        baseline = zoo.build(baseline_name) if baseline_name else None
        return perplexity_evaluation(candidate, baseline, tokenizer, args.texts, window, window // 2, args.limit,
                                     args.model, baseline_name)
    return _embedding_evaluation(args, artifact, tokenizer, baseline_name)


_METRICS = {"ppl": "perplexity", "embed": "embedding agreement"}


def _kind_of(family: str) -> str:
    return f"an encoder ({family})" if family in ENCODER_FAMILIES else f"a causal LM ({family})"


def _eval_metric(requested: str, name: str, family: str) -> str:
    """'embed' for an encoder, 'ppl' for a causal LM; an explicit --metric must fit the model."""
    encoder = family in ENCODER_FAMILIES
    metric = requested if requested != "auto" else "embed" if encoder else "ppl"
    if encoder != (metric == "embed"):
        fits = "embed" if encoder else "ppl"
        raise FlashcError(f"--metric {requested}: {name} is {_kind_of(family)}, scored by {_METRICS[fits]}: "
                          f"use --metric {fits} (or leave --metric out)")
    return metric


def _embedding_evaluation(args, artifact, tokenizer, baseline_name: str):
    """An artifact at its static shape against the float baseline, or two zoo encoders at
    the sentences' own lengths (the sentence-transformers pipeline, `minilm_embed`)."""
    from flashc import zoo
    from flashc.accuracy import embedding_evaluation, static_shape_embedders
    from flashc.evaluation import load_eval_sentences
    from flashc.pretrained import minilm_embed

    sentences = load_eval_sentences()[:args.limit]
    reference = zoo.build(baseline_name)
    if artifact is not None:
        embed, ref_embed, notes = static_shape_embedders(artifact, reference, tokenizer, sentences)
    else:
        model = zoo.build(args.model)

        def embed(s):
            return minilm_embed(model, tokenizer, s)

        def ref_embed(s):
            return minilm_embed(reference, tokenizer, s)

        notes = []
    return embedding_evaluation(embed, ref_embed, sentences, args.model, baseline_name, notes)


EXPORT_TARGETS = {"onnx": "onnx-cpu", "onnx-cuda": "onnx-cuda", "tvm": "tvm-cpu", "tvm-cuda": "tvm-cuda"}


def cmd_export(args) -> int:
    import dataclasses

    import flashc
    from flashc import lowering
    from flashc.targets import get_target

    cm = flashc.load(args.artifact)
    target = get_target(EXPORT_TARGETS[args.format])
    backend = target.backend()
    profile = cm.profile if target.profile == "cpu" else flashc.get_profile(target.profile)
    t = time.perf_counter()
    executable, records, fallbacks = lowering.lower(backend, cm.program, profile, backend.Options())
    timings = {**cm.timings, "export": time.perf_counter() - t}
    pipeline = [r for r in cm.records if r.stage == "pipeline"] + records  # the new backend's late passes
    exported = dataclasses.replace(cm, target=target.name, executable=executable, records=pipeline,
                                   fallbacks=fallbacks, timings=timings)
    out = Path(args.output or f"{str(args.artifact).rstrip('/')}-{args.format}")
    exported.save(out)
    payload = sorted(str(p.relative_to(out)) for p in (out / "payload").rglob("*") if p.is_file())
    print(f"exported {args.artifact} (target {cm.target}) to {out} (target {target.name}): {', '.join(payload)}")
    return 0


# ---------------------------------------------------------------------------------------
# Models named on the command line, and the boundary with the user's code. A
# path/to/file.py:factory spec is imported, called and its model run inside `_user_code`:
# an exception whose traceback passes through the user's file is the user's, reported at
# its innermost line there; any other exception is flashc's own and is not disguised.

# Zoo families that are encoders: no next-token logits, no KV cache, so no decode step.
ENCODER_FAMILIES = frozenset({"bert"})


def _model_for_compile(args):
    """The model, example inputs and source that `flashc compile` options name, sizes checked."""
    from flashc.compiled import ModelSource
    from flashc.models import is_factory

    decode = args.signature == "decode"
    if decode and args.cache_len is None:
        raise FlashcError("--signature decode needs --cache-len N, the length of its static KV cache")
    if not decode and args.cache_len is not None:
        raise FlashcError(f"--cache-len {args.cache_len}: only a --signature decode has a KV cache; "
                          "add --signature decode or drop --cache-len")
    kind = "factory" if is_factory(args.model) else "zoo"
    if kind == "zoo":
        entry = _zoo_entry(args.model, "a zoo name or path/to/file.py:factory")
        if decode and entry.family in ENCODER_FAMILIES:
            raise FlashcError(f"--signature decode: {args.model} is an encoder ({entry.family}), not a causal LM: "
                              "it has no next-token logits and no KV cache; compile it with --signature prefill")
    source = ModelSource(kind, args.model, args.dtype, args.seed, args.batch, args.seq_len, args.signature,
                         args.cache_len or 0)
    model, inputs = _eager_model(source)
    if decode:
        _check_positions(model, args.model, "--cache-len", args.cache_len)
    else:
        _check_positions(model, args.model, "--seq-len", args.seq_len)
    return model, inputs, source


def _eager_model(source):
    """The eager model and example inputs a ModelSource names (a factory's behind `_user_code`)."""
    from flashc.models import build_model

    if source.kind == "factory":
        return _factory_model(source)
    return build_model(source)


def _zoo_entry(spec: str, accepted: str):
    """The zoo entry `spec` names; a path or a .py file without a factory gets its own message."""
    from flashc import zoo
    from flashc.models import is_factory

    if spec in zoo.ZOO:
        return zoo.ZOO[spec]
    if is_factory(spec):
        raise FlashcError(f"{spec}: a factory is not accepted here; MODEL is {accepted}")
    if spec.endswith(".py"):
        raise FlashcError(f"{spec}: name the factory function too: {spec}:FUNCTION (MODEL is {accepted})")
    path = Path(spec)
    if "/" in spec or os.sep in spec or path.exists():
        what = "is a directory" if path.is_dir() else "is a file" if path.exists() else "no such file or directory"
        raise FlashcError(f"{spec}: {what}; MODEL is {accepted}")
    return zoo.get_entry(spec)  # an unknown name, with the closest known ones


def _check_positions(model, spec: str, option: str, length: int) -> None:
    """Refuse a sequence or cache longer than the model's position embeddings go."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise FlashcError(f"{option} {length}: {spec} has {limit} positions (config.max_position_embeddings); "
                          f"use {option} {limit} or less")


def _factory_model(source):
    """What models.build_model makes of a factory source, with every failure of the user's
    code, or of what it returned, as one FlashcError naming the file."""
    import torch

    from flashc.ir import dtype_from_name

    model, inputs = _call_factory(source.name, source.seed)
    with _user_code(source.name, f"{type(model).__name__}.to({source.dtype})"):
        model = model.to(dtype_from_name(source.dtype)).eval()
    if source.signature == "decode":
        from flashc.decode import DecodeStep, decode_example_inputs

        _require_causal_lm(model, source.name)
        return DecodeStep(model, source.cache_len), decode_example_inputs(model, source.batch, source.cache_len)
    if inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            raise FlashcError(f"{source.name} returned a {type(model).__name__} without config.vocab_size, so "
                              "flashc cannot make example token ids: return (model, example_inputs) from the factory")
        g = torch.Generator().manual_seed(source.seed)
        inputs = (torch.randint(0, vocab, (source.batch, source.seq_len), generator=g),)
    return model, inputs


def _call_factory(spec: str, seed: int):
    """(model, example_inputs or None) from calling the factory of a file.py:factory spec."""
    import inspect

    import torch

    factory = _load_factory(spec)
    name = spec.rpartition(":")[2]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None  # no signature to read (a builtin): the call itself will tell
    try:
        if signature is not None:
            signature.bind()
    except TypeError as e:
        code = getattr(factory, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno}" if code else _factory_file(spec)
        raise FlashcError(f"{where}: factory {name}{signature} needs arguments ({e}); flashc calls it with none: "
                          "give its parameters defaults") from None
    torch.manual_seed(seed)
    with _user_code(spec, f"factory {name}()"):
        made = factory()
    return _split_factory_result(made, spec)


def _split_factory_result(made, spec: str):
    """(model, inputs or None) from what a factory returned; anything else is the user's error."""
    import torch

    if isinstance(made, torch.nn.Module):
        return made, None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        inputs = made[1] if isinstance(made[1], tuple) else (made[1],)
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise FlashcError(f"{spec}: example input {i} is a {type(x).__name__}, not a tensor: return "
                                  "(model, example_inputs) with a tensor or a tuple of tensors")
        return made[0], inputs
    if made is None:
        got = "None (no return statement?)"
    elif isinstance(made, tuple):
        got = (f"a tuple of {len(made)} items" if len(made) != 2
               else f"a tuple whose first item is a {type(made[0]).__name__}")
    else:
        got = f"a {type(made).__name__}"
    raise FlashcError(f"{spec}: the factory returned {got}; it must return an nn.Module or (model, example_inputs)")


def _require_causal_lm(model, spec: str) -> None:
    """The decode step runs a transformers causal LM: its config sizes the KV cache, its head gives logits."""
    from transformers import GenerationMixin

    if isinstance(model, GenerationMixin) and getattr(model, "config", None) is not None:
        return
    raise FlashcError(f"--signature decode: {spec} returned a {type(model).__name__}, not a causal LM with a config "
                      "(a transformers ...ForCausalLM): the decode step sizes its KV cache from the config and "
                      "returns next-token logits; compile it with --signature prefill")


def _factory_file(spec: str) -> Path:
    return Path(spec.rpartition(":")[0])


def _load_factory(spec: str):
    """The factory a file.py:factory spec names; a file that fails to import is named with its line."""
    from flashc.models import load_factory

    file = _factory_file(spec)
    try:
        return load_factory(spec)
    except FlashcError:
        raise
    except SyntaxError as e:  # IndentationError too
        where = f"{e.filename}:{e.lineno}" if e.filename else str(file)
        via = "" if e.filename and _same_file(e.filename, file) else f" (imported by {file})"
        raise FlashcError(f"{where}: syntax error: {e.msg}{via}") from e
    except ModuleNotFoundError as e:
        raise FlashcError(f"{_where(e, file)}: no module named {e.name!r} (ModuleNotFoundError while importing "
                          f"{file}): install it, or fix the import") from e
    except (Exception, SystemExit) as e:
        raise FlashcError(f"{_where(e, file)}: importing {file} raised {_exception_text(e)}") from e


@contextlib.contextmanager
def _user_code(spec: str, doing: str):
    """Run code of the model `spec` names. For a file.py:factory spec, an exception that passed
    through that file becomes a FlashcError naming its innermost line there; others propagate."""
    from flashc.models import is_factory

    try:
        yield
    except FlashcError:
        raise
    except (Exception, SystemExit) as e:
        frame = _user_frame(e, _factory_file(spec)) if is_factory(spec) else None
        if frame is None:
            raise
        raise FlashcError(f"{frame.filename}:{frame.lineno} in {frame.name}: {doing} raised "
                          f"{_exception_text(e)}") from e


def _user_frame(error: BaseException, file: Path) -> traceback.FrameSummary | None:
    """The innermost frame of `error`'s traceback that runs code of `file`."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _same_file(f.filename, file)]
    return frames[-1] if frames else None


def _where(error: BaseException, file: Path) -> str:
    frame = _user_frame(error, file)
    return f"{frame.filename}:{frame.lineno}" if frame else str(file)


def _same_file(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _exception_text(error: BaseException, limit: int = 500) -> str:
    """'Type: message' on one line, the message cut at `limit` characters."""
    text = _one_line(str(error))
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------
# Options and the entry point.


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `flashc: error: ...`, exit status 2."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"flashc: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int, meaning: str):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be {meaning}")
        return value

    return parse


POSITIVE = _int_at_least(1, "a positive integer")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return value
NON_NEGATIVE = _int_at_least(0, "0 or more")


def _artifact_output(text: str) -> Path:
    """An argparse type: a directory to write an artifact to, refused early if it cannot be."""
    from flashc.artifact import is_artifact

    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give the artifact directory to write")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path}: is a file, not an artifact directory; flashc will not "
                                             "replace it: choose another path or remove the file yourself")
        foreign = path.is_dir() and any(path.iterdir()) and not is_artifact(path)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read it ({e.strerror or e})") from None
    if foreign:
        raise argparse.ArgumentTypeError(f"{path}: exists and is not a flashc artifact; flashc will not replace "
                                         "it: choose another path, or empty or remove the directory yourself")
    return path


def _report_output(text: str) -> Path:
    """An argparse type: a JSON file to write a report to, refused before a long compile if it cannot be."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give the JSON file to write")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a directory; give a file name for the JSON report")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent}: no such directory for the JSON report; create it first")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{parent}: not writable; choose another place for the JSON report")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashc", description="compile PyTorch LLMs for a target and hardware profile", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("targets", help="list targets and hardware profiles").set_defaults(func=cmd_targets)

    def model_args(sp):
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--batch", type=POSITIVE, default=1)
        sp.add_argument("--seq-len", type=POSITIVE, default=16,
                        help="prefill length (at most the model's config.max_position_embeddings)")
        sp.add_argument("-O", dest="level", type=int, default=None, choices=[0, 1, 2, 3],
                        help="optimization level (default: the target's, -O3 on GPU targets, -O2 elsewhere)")
        sp.add_argument("--profile", default=None, help="hardware profile (default: the target's)")

    c = sub.add_parser("compile", help="compile a zoo model or path/to/file.py:factory", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model")
    c.add_argument("--target", default="cpu")
    c.add_argument("-o", "--output", type=_artifact_output, default=None, help="artifact directory to write")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--numeric-check", action="store_true", help="compare every pass with the graph before it")
    c.add_argument("--signature", choices=["prefill", "decode", "generate"], default="prefill",
                   help="prefill: input_ids[batch, seq-len]; decode (causal LMs): one token with a static KV cache; "
                        "generate: decode, prefill and verify entries over one KV cache (flashc generate)")
    c.add_argument("--cache-len", type=POSITIVE, default=None,
                   help="static KV cache length of a decode or generate signature (at most the model's positions)")
    c.add_argument("--prefill-chunk", type=NON_NEGATIVE, default=None,
                   help="generate: prompt tokens a prefill call writes (default 256, at most the cache; 0: no prefill "
                        "entry)")
    c.add_argument("--ragged", action="store_true",
                   help="generate: a position per sequence, so a batch holds prompts of different lengths")
    c.add_argument("--draft-len", type=NON_NEGATIVE, default=None,
                   help="generate: the most drafted tokens a speculative round verifies (default 8; 0: no verify "
                        "entry)")
    c.add_argument("--draft-head", default=None, metavar="HEAD_DIR",
                   help="generate: a draft head from `flashc train-draft`, saved with the artifact, for "
                        "`flashc generate --speculate head`")
    c.add_argument("--exact-verify", action="store_true",
                   help="generate, CUDA targets, batch 1: the verify entry computes each token as the decode entry "
                        "does, so greedy speculation is plain decoding bit for bit in bf16 too (weights read once a "
                        "drafted token)")
    c.add_argument("--report-json", type=_report_output, default=None, metavar="FILE",
                   help="also write the compile report as JSON to FILE (replaced atomically)")
    c.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="weight-only quantization: int4-gptq, int4-awq, int4-rtn, int8-weight (see QuantConfig)")
    c.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="input columns sharing a scale (default: the scheme's)")
    c.add_argument("--budget-bits", type=float, default=None, metavar="BITS",
                   help="mixed precision: 2, 3, 4 or 8 bits per layer by measured sensitivity, at most BITS stored "
                        "bits a weight on average (with --quantize int4-gptq / int4-rtn, or --quantize mixed-3.5)")
    c.add_argument("--prune", default=None, metavar="SPEC",
                   help="pruning, before any quantization: wanda-50%%, sparsegpt-50%%, magnitude-50%%, 2:4, wanda-2:4, "
                        "online-40%%, dejavu-40%%, ffn-25%%, heads-25%%, experts-2 (see PruneConfig)")
    c.add_argument("--recover-steps", type=POSITIVE, default=None, metavar="N",
                   help="after --prune (magnitude, wanda, sparsegpt, ffn, experts): N steps distilling the pruned weights "
                        "against the unpruned model on the calibration text")
    c.add_argument("--recover-plot", default=None, metavar="FILE.png", help="--recover-steps: the loss curve")
    c.add_argument("--recover-checkpoint", default=None, metavar="DIR",
                   help="--recover-steps: checkpoints here; the same command again resumes")
    c.add_argument("--calibration", default=None, metavar="builtin|FILE",
                   help="calibration data of GPTQ/AWQ, pruning and --ssm's training: flashc's built-in text "
                        "(default), a text or .safetensors file")
    c.add_argument("--ssm", default=None, metavar="all|auto|1,3,5[:gla]",
                   help="replace attention layers with a state-space layer (Mamba-2 style) and distil it on the "
                        "calibration text: all, auto (measured, within a perplexity budget) or layer indices; "
                        "':gla' (e.g. all:gla) makes the layers gated linear attention instead")
    c.add_argument("--ssm-keep-attention", type=NON_NEGATIVE, default=None, metavar="K",
                   help="--ssm all/auto: keep the K attention layers whose replacement hurts most")
    c.add_argument("--align-steps", type=NON_NEGATIVE, default=None,
                   help="--ssm: steps aligning each new layer with its attention (default 100; 0 skips)")
    c.add_argument("--distill-steps", type=NON_NEGATIVE, default=None,
                   help="--ssm: steps of end-to-end logit distillation (default 200; 0 skips)")
    c.add_argument("--ssm-checkpoint", default=None, metavar="DIR",
                   help="--ssm: training checkpoints here; the same command again resumes")
    c.add_argument("--ssm-plot", default=None, metavar="FILE.png", help="--ssm: save the loss curves as a PNG")
    c.add_argument("--ssm-train", default=None, choices=["ssm", "blocks", "all"],
                   help="--ssm: what the logit distillation trains: the new layers (ssm, default), the decoder "
                        "blocks holding them (blocks: their MLPs and norms too) or every weight (all)")
    model_args(c)
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run an artifact on random inputs and compare with its eager model")
    r.add_argument("artifact")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--repeat", type=POSITIVE, default=10)
    r.add_argument("--report-json", type=_report_output, default=None, metavar="FILE",
                   help="also write the errors, times and the artifact's compile report as JSON to FILE")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="the IR as a table with FLOPs, bytes and estimated time")
    i.add_argument("model", help="zoo name, path/to/file.py:factory, or an artifact directory")
    i.add_argument("--target", default="cpu")
    i.add_argument("--top", type=NON_NEGATIVE, default=10)
    i.add_argument("--limit", type=NON_NEGATIVE, default=60, help="rows of the op table to print (0: all)")
    i.add_argument("--all", action="store_true", help="also list view ops (no kernel)")
    i.add_argument("--why-not", metavar="OP", default=None,
                   help="a fusion (rotary, attention, rms_norm, swiglu, moe, decode_attention, ...): where it could "
                        "happen and why it did not")
    model_args(i)
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="accuracy: perplexity (causal LMs) or embedding agreement (encoders)")
    e.add_argument("model", help="zoo model with real weights (smollm2-135m, mixtral-ref, minilm-l6) or an artifact")
    e.add_argument("--metric", choices=["auto", "ppl", "embed"], default="auto",
                   help="auto: embed for encoders (minilm-l6), ppl for causal LMs")
    e.add_argument("--baseline", default=None,
                   help="zoo model to compare with (default for an artifact: its float source model)")
    e.add_argument("--limit", type=POSITIVE, default=None,
                   help="ppl: at most this many windows per text; embed: the first N sentences (7 or more)")
    e.add_argument("--window", type=_int_at_least(2, "2 or more (the stride is half the window)"), default=None,
                   help="perplexity window of a zoo model (default 256; an artifact's is its sequence length)")
    e.add_argument("--texts", nargs="+", default=["prose", "code"], choices=["prose", "code"])
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (metric, model, baseline, relative_change, rows) and nothing else "
                        "on stdout")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate after a prompt with a --signature generate (or decode) artifact")
    g.add_argument("artifact")
    g.add_argument("--prompt", default=None,
                   help="text (the artifact needs a tokenizer: a zoo model with real weights)")
    g.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="token ids separated by commas; sequences of a batch separated by ';' (one is repeated)")
    g.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=POSITIVE, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculate", default=None, metavar="ngram|head|draft:ARTIFACT|layerskip:E",
                   help="speculative decoding: prompt lookup, the artifact's draft head (compiled with --draft-head), "
                        "a smaller compiled model with the same tokenizer, or the model's own first E layers "
                        "(compiled on first use from the artifact's source model)")
    g.add_argument("--draft-len", type=POSITIVE, default=None, help="the most drafts a round (default: the artifact's)")
    g.add_argument("--early-exit", default=None, metavar="E[:TAU]",
                   help="lossy, greedy: emit a token after layer E where the exit's top probability is >= TAU "
                        "(default: calibrated on the built-in text for 99%% agreement with the full model)")
    g.add_argument("--json", action="store_true", help="print one JSON object (output, ids, stats)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-draft", help="train a draft head on the model's last hidden state (--speculate head)")
    t.add_argument("model", help="zoo name (a causal LM) or path/to/file.py:factory")
    t.add_argument("-o", "--output", type=_artifact_output, required=True, metavar="HEAD_DIR",
                   help="directory to write the head to")
    t.add_argument("--steps", type=POSITIVE, default=300, help="training steps (default 300)")
    t.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW's peak learning rate (default 3e-3)")
    t.add_argument("--context", type=_int_at_least(16, "16 or more"), default=256,
                   help="tokens per forward of the model when collecting its hidden states (default 256)")
    t.add_argument("--calibration", default=None, metavar="builtin|FILE",
                   help="training text: flashc's built-in text (default), a text or .safetensors file of token ids")
    t.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="training checkpoints here; the same command again resumes")
    t.add_argument("--self-distill", type=POSITIVE, default=0, metavar="N",
                   help="train on the model's own greedy answers to N prompts made from the training text (chat "
                        "messages when the model's tokenizer has a chat template; the last 10%% held out) instead "
                        "of on the text itself")
    t.add_argument("--new-tokens", type=POSITIVE, default=None, metavar="M",
                   help="--self-distill: the most tokens the model answers each prompt with (default 128)")
    t.add_argument("--unroll", type=POSITIVE, default=2, metavar="K",
                   help="steps the head is trained to draft on its own predictions (default 2; the draft length "
                        "generation uses, e.g. 4, trains drafts 2..K too)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--device", default=None, help="where the model runs and the head trains (default: cuda when "
                                                   "there is one, else cpu)")
    t.set_defaults(func=cmd_train_draft)

    x = sub.add_parser("export", help="re-target an artifact's optimized graph to ONNX or TVM")
    x.add_argument("artifact")
    x.add_argument("--format", choices=sorted(EXPORT_TARGETS), required=True)
    x.add_argument("-o", "--output", type=_artifact_output, default=None,
                   help="new artifact directory (default: ARTIFACT-FORMAT)")
    x.set_defaults(func=cmd_export)
    from flashc.backends.lpu.cli import add_simulate_parser

    add_simulate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    debug = os.environ.get("FLASHC_DEBUG", "") not in ("", "0")
    try:
        if getattr(args, "level", 0) is None:  # -O not given: the target's default level
            from flashc.targets import get_target

            args.level = get_target(getattr(args, "target", "cpu")).default_level
        return args.func(args)
    except KeyboardInterrupt:
        print("flashc: interrupted", file=sys.stderr)
        return 130
    except FlashcError as e:
        if debug:
            raise
        print(f"flashc: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if debug:
            raise
        if _out_of_memory(e):
            print(f"flashc: error: out of memory ({_exception_text(e, 300)}): try a smaller --batch or --seq-len",
                  file=sys.stderr)
            return EXIT_ERROR
        return _report_internal_error(e)


def _out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError))


def _report_internal_error(error: BaseException) -> int:
    """A bug in flashc: one line naming the exception and where it was raised; the traceback
    goes to a file named in that line (or to stderr when no file can be written)."""
    import tempfile

    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = "".join(traceback.format_exception(error))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="flashc-traceback-", suffix=".txt", delete=False) as f:
            f.write(text)
        kept = f"its traceback is in {f.name}"
    except OSError:
        sys.stderr.write(text)
        kept = "its traceback is above"
    print(f"flashc: internal error: {_exception_text(error)}{where}; this is a bug in flashc, please report "
          f"it: {kept} (FLASHC_DEBUG=1 raises it)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
