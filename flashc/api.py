"""flashc.compile: capture -> passes -> backend, timed, with a report."""

from __future__ import annotations

import time
from typing import Any

import torch

from flashc.backends.base import fallbacks
from flashc.capture import capture
from flashc.compiled import CompiledModel, ModelSource
from flashc.errors import FlashcError
from flashc.ir import propagate_shapes
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
    level: int = 2,
    profile: str | HardwareProfile | None = None,
    numeric_check: bool = False,
    dump_dir: str | None = None,
    source: ModelSource | None = None,
    keep_reference_weights: bool = False,
    options: dict[str, Any] | None = None,
    accuracy_limit: int | None = 8,
) -> CompiledModel:
    """Compile `model` for `target`; returns a callable CompiledModel.

    example_inputs fix the input signature (shapes and dtypes). For Hugging Face models
    `use_cache=False` is passed unless example_kwargs say otherwise, so the captured
    graph is the pure forward pass. numeric_check compares every pass's output with
    the graph before it on fresh random inputs. When a pass that changes numerics ran
    (one whose class sets `changes_numerics = True`, e.g. quantization) and the model
    is a zoo model with real weights, the report carries its perplexity against the
    float model (at most `accuracy_limit` windows per text).
    """
    if example_inputs is None:
        raise FlashcError("flashc.compile needs example_inputs (a tensor or tuple of tensors) "
                          "to fix the input signature")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    tgt = get_target(target)
    prof = get_profile(profile or tgt.profile)
    backend = tgt.backend()
    kwargs = dict(example_kwargs) if example_kwargs is not None else _default_kwargs(model)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    program = capture(model, tuple(example_inputs), kwargs)
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        program.meta["vocab_size"] = int(config.vocab_size)
    if getattr(model, "max_cache_len", None):  # a DecodeStep: positions index the cache
        program.meta["input_high"] = {"cache_position": int(model.max_cache_len)}
        program.meta["signature"] = "decode"
    warning = program.meta.pop("capture_warning", None)
    program.meta["warnings"] = [warning] if warning else []
    timings["capture"] = time.perf_counter() - start
    t = time.perf_counter()
    passes = pipeline(level)
    records = PassManager(passes, numeric_check=numeric_check, dump_dir=dump_dir).run(
        program, PassContext(prof, dict(options or {})))
    timings["passes"] = time.perf_counter() - t
    t = time.perf_counter()
    executable = backend.lower(program, prof, dict(options or {}))
    timings["lower"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    if any(n.meta.get("val") is None for n in program.op_nodes()):
        propagate_shapes(program)
    src = source or ModelSource("module", type(model).__name__)
    reference = None
    if keep_reference_weights:
        reference = {k: v.detach() for k, v in model.state_dict().items()}
    compiled = CompiledModel(program, target, prof, level, executable, records, fallbacks(program, backend), src,
                             timings, reference)
    if any(getattr(p, "changes_numerics", False) for p in passes):
        compiled.accuracy = _accuracy_rows(compiled, model, src, accuracy_limit)
    return compiled


def _accuracy_rows(compiled: CompiledModel, model: torch.nn.Module, source: ModelSource, limit: int | None):
    """Perplexity of the compiled model vs the float model, for zoo models with real weights."""
    from flashc import zoo
    from flashc.accuracy import compiled_window, perplexity_rows

    if source.kind != "zoo" or not zoo.get_entry(source.name).pretrained or source.signature != "prefill":
        return [["accuracy", "not measured", "-", "no real-weight baseline for this model"]]
    window = compiled_window(compiled)
    rows = perplexity_rows(compiled, model, zoo.tokenizer(source.name), window=window, stride=window // 2,
                           limit=limit)
    return [r.cells() for r in rows]


def _default_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return {}
    if isinstance(model, PreTrainedModel):
        return {"use_cache": False}
    return {}
