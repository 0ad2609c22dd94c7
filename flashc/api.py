"""flashc.compile: capture -> passes -> backend, timed, with a report."""

from __future__ import annotations

import time
from typing import Any

import torch

from flashc import lowering
from flashc.capture import capture
from flashc.compiled import CompiledModel, ModelSource
from flashc.errors import FlashcError, VerificationError
from flashc.ir import Program, propagate_shapes
from flashc.options import parse_options
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import HardwareProfile, get_profile
from flashc.targets import get_target


def compile(
    model: torch.nn.Module,
    target: str = "cpu",
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    level: int | None = None,
    profile: str | HardwareProfile | None = None,
    numeric_check: bool = False,
    verify: bool = True,
    dump_dir: str | None = None,
    source: ModelSource | None = None,
    keep_reference_weights: bool = False,
    options: dict[str, Any] | None = None,
    accuracy_limit: int | None = 8,
    quantize: Any = None,
    calibration: Any = None,
    prune: Any = None,
    recover: Any = None,
    ssm: Any = None,
) -> CompiledModel:
    """Compile `model` for `target`; returns a callable CompiledModel.

    example_inputs fix the input signature (shapes and dtypes). For Hugging Face models
    `use_cache=False` is passed unless example_kwargs say otherwise, so the captured
    graph is the pure forward pass. level (0-3) defaults to the target's `default_level`,
    the fastest level measured correct there (flashc.targets: -O3 on CUDA targets).
    numeric_check compares every pass's output with the captured graph on fresh random
    inputs after every pass, over several calls.
    verify (on by default) runs what the backend built against the captured program on
    the example inputs (two calls, on copies of the inputs and of the model's state) and
    refuses with VerificationError naming the first pass or the backend that diverged;
    verify=False skips that check. When a pass that changes numerics ran
    (one whose class sets `changes_numerics = True`, e.g. quantization) and the model
    is a zoo model with real weights, the report carries its perplexity against the
    float model (at most `accuracy_limit` windows per text).
    quantize ("int4-gptq", "int4-awq", "int4-rtn", "int8-weight" or a QuantConfig) appends
    weight-only quantization after the level's pipeline; calibration (None or "builtin":
    flashc's calibration text, a text or .safetensors file, or token ids) feeds GPTQ/AWQ.
    prune ("wanda-50%", "sparsegpt-50%", "magnitude-50%", "2:4", "wanda-2:4", "online-40%",
    "dejavu-40%", "ffn-25%", "experts-2", "heads-25%" or a PruneConfig) appends pruning after the level's
    pipeline and before quantization (heads: a rewrite of a copy of the model before capture,
    passes/prune/heads.py); calibration feeds it too (every method but magnitude). recover (a
    flashc.distill.DistillConfig) then distils the pruned weights against the unpruned model
    on the calibration text (weight pruning methods and experts).
    ssm ("all", "auto", "1,3,5", a list of layer indices, a dict or a flashc.passes.ssm.SSMConfig)
    first replaces those attention layers of the model with state-space layers and distils
    them on the calibration text (passes/ssm); the rest of the pipeline compiles the result.
    """
    if example_inputs is None:
        raise FlashcError("flashc.compile needs example_inputs (a tensor or tuple of tensors) "
                          "to fix the input signature")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    tgt = get_target(target)
    original, rewrite = model, None
    if ssm is not None and _prunes_heads(prune):  # refused before either trains or calibrates
        raise FlashcError("prune='heads-...' and ssm= both rewrite the attention layers; use one of them")
    if ssm is not None:  # a model-level rewrite: the rest of the pipeline compiles the new model
        rewrite = _ssm_rewrite(ssm, calibration, model, source)
        model, example_inputs = _with_rewritten(model, rewrite.model, example_inputs)
        calibration = None if quantize is None and prune is None else calibration
    level = tgt.default_level if level is None else level
    prof = get_profile(profile or tgt.profile)
    backend = tgt.backend()
    opts = parse_options(backend.Options, options, target)
    if recover is not None:
        prune = _with_recovery(prune, recover)
    heads = None
    if _prunes_heads(prune):  # a model-level rewrite too: head counts are literal sizes in a captured graph
        heads = _heads_rewrite(prune, calibration, model, source)
        model, example_inputs = _with_rewritten(model, heads.model, example_inputs)
        prune, calibration = None, None if quantize is None else calibration
    pruner = _prune_pass(prune, calibration, quantize, model, source)
    quantizer = _quantize_pass(quantize, calibration, model, source, pruner)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    program = capture_program(model, example_inputs, example_kwargs)
    timings["capture"] = time.perf_counter() - start
    captured = program.clone() if verify else None
    t = time.perf_counter()
    passes = pipeline(level) + [p for p in (pruner, quantizer) if p is not None]
    ctx = PassContext(prof, opts)
    records = PassManager(passes, numeric_check=numeric_check, dump_dir=dump_dir).run(
        program, ctx)
    timings["passes"] = time.perf_counter() - t
    t = time.perf_counter()
    executable, backend_records, fallbacks = lowering.lower(backend, program, prof, opts,
                                                            numeric_check=numeric_check, dump_dir=dump_dir)
    records += backend_records
    timings["lower"] = time.perf_counter() - t
    # Checked here when it runs here. The CUDA backend is not: its first call captures the
    # CUDA graph around the inputs it is given, and a check on copies would bind the graph
    # to those copies (bench/gpu_decode_check.py checks it against eager on the GPU).
    runs_here = prof.kind in ("cpu", "lpu") and backend.name != "cuda"  # lpu: the reference, on the CPU
    if captured is not None and runs_here:
        t = time.perf_counter()
        # A pass that changes numerics on purpose (quantization) is measured by the accuracy
        # rows instead; the backend is then checked against the optimized graph.
        exact = not any(getattr(p, "changes_numerics", False) for p in passes)
        tensor_kwargs = {k: v for k, v in (example_kwargs or {}).items() if isinstance(v, torch.Tensor)}
        check_end_to_end(captured if exact else program, program, executable,
                         program.bind(tuple(example_inputs), tensor_kwargs),
                         passes if exact else [], ctx, target)
        timings["verify"] = time.perf_counter() - t
        del captured
    timings["total"] = time.perf_counter() - start
    if any(n.meta.get("val") is None for n in program.op_nodes()):
        propagate_shapes(program)
    src = source or ModelSource("module", type(model).__name__)
    reference = None
    if keep_reference_weights:
        reference = {k: v.detach() for k, v in model.state_dict().items()}
    compiled = CompiledModel(program, target, prof, level, executable, records, fallbacks, src, timings, reference)
    if rewrite is not None:
        compiled.rewrites = {"attention -> SSM": rewrite.rows()}
        timings["ssm rewrite"] = rewrite.seconds
    if heads is not None:
        compiled.rewrites = {**(compiled.rewrites or {}), f"pruning ({heads.config.spec})": heads.rows()}
        timings["prune heads"] = heads.seconds
    if rewrite is not None or heads is not None or any(getattr(p, "changes_numerics", False) for p in passes):
        compiled.accuracy = _accuracy_rows(compiled, original, src, accuracy_limit)
    return compiled


def capture_program(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
                    example_kwargs: dict[str, Any] | None = None) -> Program:
    """The model captured as flashc.compile captures it: with `use_cache=False` for Hugging
    Face models (unless example_kwargs say otherwise) and what flashc knows of its inputs
    (vocabulary size, a decode step's cache length) in the program's metadata."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {**_default_kwargs(model), **(example_kwargs or {})}  # decoder_input_ids, and still no cache
    program = capture(model, tuple(example_inputs), kwargs)
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        program.meta.vocab_size = int(config.vocab_size)
    if getattr(model, "max_cache_len", None):  # a DecodeStep: positions index the cache
        program.meta.input_high = {"cache_position": int(model.max_cache_len)}
        program.meta.signature = "decode"
        _end_token(getattr(model, "model", model), program.meta)
    return program


def _end_token(model: torch.nn.Module, meta) -> None:
    """The end token generate() stops at by default: the model's generation config's (Hugging Face
    stops there too); with several, the first, and the compile report says so."""
    generation_config = getattr(model, "generation_config", None)
    eos = (generation_config.eos_token_id if generation_config is not None
           else getattr(getattr(model, "config", None), "eos_token_id", None))
    if isinstance(eos, (list, tuple)):
        if len(eos) > 1:
            meta.warnings.append(f"the model's generation config lists {len(eos)} end tokens {list(eos)}; "
                                 f"generate() stops at the first ({eos[0]}) unless given eos_token_id=")
        eos = eos[0] if eos else None
    if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0:
        meta.eos_token_id = eos


def optimize(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor, *,
             example_kwargs: dict[str, Any] | None = None, level: int = 2,
             profile: str | HardwareProfile = "cpu", numeric_check: bool = False) -> tuple[Program, list]:
    """The optimized program flashc.compile lowers, without lowering it: capture, then the
    level's pipeline (what `flashc inspect` shows). Returns (program, pass records)."""
    prof = profile if isinstance(profile, HardwareProfile) else get_profile(profile)
    program = capture_program(model, example_inputs, example_kwargs)
    records = PassManager(pipeline(level), numeric_check=numeric_check).run(program, PassContext(prof))
    return program, records


def why_not(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor, fusion: str, *,
            example_kwargs: dict[str, Any] | None = None, level: int = 2, profile: str | HardwareProfile = "cpu"):
    """Where the fusion `fusion` ('rotary', 'attention', 'rms_norm', 'flashc.swiglu', ...) could
    happen in the model and, at each place, that it did or why not (flashc.rewrite.WhyNot;
    print it, or read `.fused` and `.candidates`). `flashc inspect MODEL --why-not OP` prints the same."""
    from flashc.rewrite import why_not as explain

    prof = profile if isinstance(profile, HardwareProfile) else get_profile(profile)
    program = capture_program(model, example_inputs, example_kwargs)
    return explain(program, pipeline(level), PassContext(prof), fusion)


def check_end_to_end(captured: Program, program: Program, executable, example_inputs: tuple, passes: list,
                     ctx: PassContext, target: str) -> None:
    """What the backend built against the captured program, on the example inputs, twice
    (state carried between calls, on private copies). On a mismatch the pipeline is replayed
    with a numeric check after every pass to name the pass that diverged; if none did, the
    backend's lowering is named."""
    from flashc.checking import compare, run_executable, run_program

    tensors = [*captured.params.values(), *example_inputs]
    if any(t.device.type == "meta" for t in tensors):
        return  # a shape-only model: nothing to run
    calls = [example_inputs, example_inputs]
    _, why = compare(run_program(captured, calls), run_executable(executable, program, calls))
    if why is None:
        return
    try:
        PassManager(passes, numeric_check=True).run(captured.clone(), ctx)
    except VerificationError as e:
        raise VerificationError(f"the compiled model does not compute what the model computes on the example "
                                f"inputs ({why}): {e}. Compile at a lower level, or report the model") from None
    except Exception as e:  # the replay's random inputs are ones the model cannot take (an integer x // 0)
        raise VerificationError(f"target {target!r} computes something else than the model on the example inputs "
                                f"({why}); replaying the passes on random inputs to find the one at fault failed "
                                f"({type(e).__name__}: {e}). Use target 'cpu', or compile with verify=False at your "
                                "own risk") from None
    raise VerificationError(f"target {target!r} computes something else than the model on the example inputs "
                            f"({why}); every pass checked out, so its lowering is at fault. Use target 'cpu', "
                            "or compile with verify=False at your own risk")


def _accuracy_rows(compiled: CompiledModel, model: torch.nn.Module, source: ModelSource, limit: int | None):
    """Perplexity of the compiled model vs the float model, for zoo models with real weights."""
    from flashc import zoo
    from flashc.accuracy import compiled_window, perplexity_rows

    if source.kind != "zoo" or not zoo.get_entry(source.name).pretrained or source.signature != "prefill":
        return [["accuracy", "not measured", "-", "no real-weight baseline for this model"]]
    window = compiled_window(compiled)
    rows = perplexity_rows(compiled, model, zoo.tokenizer(source.name), window=window, stride=window // 2,
                           limit=limit)
    return rows  # AccuracyRow: the report renders its cells and keeps its numbers exact in to_dict()


def _ssm_rewrite(ssm, calibration, model: torch.nn.Module, source: ModelSource | None):
    """The attention-to-SSM rewrite compile's `ssm` asks for, trained on the calibration text."""
    from flashc.passes.quantize.calibration import calibration_for_model
    from flashc.passes.ssm import SSMConfig, attention_sites, rewrite

    from flashc.decode import DecodeStep

    config = SSMConfig.parse(ssm)
    if isinstance(model, DecodeStep):  # the rewrite trains the language model inside the step
        model = model.model
    attention_sites(model)  # an unknown attention is refused before the calibration text is read
    data = calibration_for_model(calibration, model, source)
    if data.tokens is None:
        raise FlashcError("the attention-to-SSM rewrite trains on a token stream: give calibration text or token "
                          f"ids, not per-input tensors ({data.description})")
    return rewrite(model, config, data.tokens, checkpoint_dir=config.checkpoint_dir, plot=config.plot)


def _with_rewritten(model: torch.nn.Module, rewritten: torch.nn.Module, example_inputs: tuple):
    """(the model to capture, its example inputs) once a rewrite replaced the language model:
    a decode step is rebuilt around it, with example caches of the new layout (a state per
    state-space layer instead of its k and v) for the same batch, tokens and positions."""
    from flashc.decode import DecodeStep, decode_example_inputs

    if not isinstance(model, DecodeStep):
        return rewritten, example_inputs
    ids, pos = example_inputs[0], example_inputs[1]
    fresh = decode_example_inputs(rewritten, ids.shape[0], model.max_cache_len, device=ids.device,
                                  tokens=ids.shape[1], per_sequence=pos.dim() == 2)
    return DecodeStep(rewritten, model.max_cache_len), (ids, pos, *fresh[2:])


def _quantize_pass(quantize, calibration, model: torch.nn.Module, source: ModelSource | None, pruner=None):
    """The weight-quantization pass compile's `quantize` asks for (None when it asks none)."""
    if quantize is None:
        if calibration is not None and pruner is None:
            raise FlashcError("calibration= is read by quantization and pruning only: add quantize=, e.g. "
                              "'int4-gptq', or prune=, e.g. 'wanda-50%'")
        return None
    from flashc.passes.quantize import QuantConfig, QuantizeWeights

    if pruner is not None and not QuantConfig.parse(quantize).needs_calibration:
        calibration = None  # pruning reads it; a round-to-nearest scheme reads none
    return QuantizeWeights.for_model(quantize, calibration, model, source)


def _with_recovery(prune, recover):
    """The PruneConfig of prune= with recover= (a flashc.distill.DistillConfig) in it."""
    import dataclasses

    from flashc.passes.prune import PruneConfig

    if prune is None:
        raise FlashcError("recover= distils a pruned model back towards the original: add prune=, e.g. "
                          "'wanda-50%'")
    return dataclasses.replace(PruneConfig.parse(prune), recover=recover)


def _prunes_heads(prune) -> bool:
    """Whether prune= asks for attention-head pruning (a rewrite of the model before capture)."""
    if prune is None:
        return False
    from flashc.passes.prune import MODEL_REWRITES, PruneConfig

    return PruneConfig.parse(prune).method in MODEL_REWRITES


def _heads_rewrite(prune, calibration, model: torch.nn.Module, source: ModelSource | None):
    """The head pruning compile's `prune` asks for, on a copy of the model (of the language model
    inside a decode step), scored on the calibration text."""
    from flashc.decode import DecodeStep
    from flashc.passes.prune import heads_for_model

    if isinstance(model, DecodeStep):
        model = model.model
    return heads_for_model(prune, calibration, model, source)


def _prune_pass(prune, calibration, quantize, model: torch.nn.Module, source: ModelSource | None):
    """The pruning pass compile's `prune` asks for (None when it asks none)."""
    if prune is None:
        return None
    from flashc.passes import prune as pruning
    from flashc.passes.quantize import QuantConfig

    quantize_reads_it = quantize is not None and QuantConfig.parse(quantize).needs_calibration
    return pruning.for_model(prune, calibration, model, source, quantize_reads_it=quantize_reads_it)


def _default_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return {}
    if isinstance(model, PreTrainedModel):
        return {"use_cache": False}
    return {}
