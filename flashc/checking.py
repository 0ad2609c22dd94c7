"""Sound numeric checks: programs and executables run on private copies of their inputs
and state, over several calls, compared with NaN- and infinity-aware tolerances.

Used by the pass manager's per-pass check (`numeric_check=True`) and by compile's
end-to-end check of what a backend built against the captured program (on by default,
`verify=False` turns it off). Neither changes the model, the program's state or the
caller's tensors: state a graph writes (a KV cache in a buffer) is copied for each run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from flashc.aliasing import written_placeholders
from flashc.ir import Program

# Relative error (Frobenius norm of the finite part) allowed per output dtype: rounding
# differences after reassociation and fusion stay well below these (see tests).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Trace:
    """What a run of several calls produced: outputs per call and, per call, the values of
    the inputs the graph writes in place (the caller sees those too)."""

    outputs: list[list[torch.Tensor]]
    written_inputs: list[list[torch.Tensor]]


def written_state(program: Program) -> list[str]:
    """Names of the weights/buffers the graph writes in place (the compiled model's state)."""
    return [n.name for n in written_placeholders(program.graph) if n.name in program.params]


def written_input_indexes(program: Program) -> list[int]:
    written = {n.name for n in written_placeholders(program.graph)}
    return [i for i, spec in enumerate(program.inputs) if spec.name in written]


def _detached_copy(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def run_program(program: Program, calls: Sequence[tuple]) -> Trace:
    """Run program's graph once per entry of calls, on a private copy of its state."""
    params = dict(program.params)
    for name in written_state(program):
        params[name] = params[name].clone()
    weights = [params[n.name] for n in program.param_nodes()]

    def step(*args):
        out = program.graph_module(*weights, *args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return _run(step, calls, written_input_indexes(program))


def run_executable(executable: Callable, program: Program, calls: Sequence[tuple]) -> Trace:
    """Run a backend's executable; the state it writes through program.params is restored after."""
    state = {name: program.params[name] for name in written_state(program)}
    saved = {name: t.clone() for name, t in state.items() if t.device.type != "meta"}
    try:
        return _run(executable, calls, written_input_indexes(program))
    finally:
        with torch.no_grad():
            for name, t in saved.items():
                state[name].copy_(t)


def _run(step: Callable, calls: Sequence[tuple], written: list[int]) -> Trace:
    trace = Trace([], [])
    with torch.no_grad():
        for args in calls:
            args = tuple(_detached_copy(a) for a in args)
            out = step(*args)
            trace.outputs.append([_detached_copy(o) for o in out])
            trace.written_inputs.append([args[i].clone() for i in written])
    return trace


def compare(reference: Trace, got: Trace) -> tuple[float, str | None]:
    """(worst relative error, None) when got matches reference, else (error, what differs)."""
    worst = 0.0
    for call, (ref_out, got_out) in enumerate(zip(reference.outputs, got.outputs)):
        pairs = [(f"output {i}", r, g) for i, (r, g) in enumerate(zip(ref_out, got_out))]
        if len(ref_out) != len(got_out):
            return float("inf"), f"call {call + 1}: {len(got_out)} outputs, expected {len(ref_out)}"
        pairs += [(f"written input {i}", r, g) for i, (r, g) in
                  enumerate(zip(reference.written_inputs[call], got.written_inputs[call]))]
        for what, r, g in pairs:
            err, why = tensor_difference(g, r)
            if why is not None:
                return err, f"call {call + 1}, {what}: {why}"
            worst = max(worst, err)
    return worst, None


def tensor_difference(got, ref) -> tuple[float, str | None]:
    """Relative error of got against ref and, past the dtype's tolerance, why they differ."""
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
        same = type(got) is type(ref) and got == ref
        return (0.0, None) if same else (float("inf"), f"{got!r} != {ref!r}")
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return float("inf"), f"{got.dtype}{list(got.shape)} instead of {ref.dtype}{list(ref.shape)}"
    if ref.device.type == "meta" or got.device.type == "meta":
        return 0.0, None
    got, ref = got.cpu(), ref.cpu()
    if not ref.is_floating_point() and not ref.is_complex():
        mismatched = int((got != ref).sum())
        return (0.0, None) if mismatched == 0 else (float("inf"), f"{mismatched} of {ref.numel()} values differ")
    r, g = ref.double(), got.double()
    for name, mask_fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if not torch.equal(mask_fn(r), mask_fn(g)):
            return float("inf"), f"{name} at different positions ({int(mask_fn(g).sum())} vs {int(mask_fn(r).sum())})"
    finite = torch.isfinite(r)
    r, g = r[finite], g[finite]
    err = (g - r).norm().item() / (r.norm().item() or 1.0)
    if err != err:
        err = float("inf")
    tol = TOLERANCE.get(ref.dtype, 0.0)
    return (err, None) if err <= tol else (err, f"relative error {err:.3g} > {tol:g}")


def random_inputs(program: Program, seed: int | torch.Generator = 0) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs of the program's signature, on the CPU (token ids within the
    vocabulary, positions within the cache)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    vocab = program.meta.vocab_size
    highs = program.meta.input_high  # e.g. cache_position < max_cache_len
    return tuple(_distinct_positions(spec, highs[spec.name], g) if spec.name in highs else spec.random(vocab, g)
                 for spec in program.inputs)


def _distinct_positions(spec, high: int, g: torch.Generator) -> torch.Tensor:
    """Random positions below `high`, distinct along the last dimension (the tokens one call
    writes into a cache: a repeated position would make the write's result depend on order)."""
    shape = tuple(spec.shape)
    tokens = shape[-1] if shape else 1
    if tokens > high:
        return spec.random(high, g)
    rows = 1
    for n in shape[:-1]:
        rows *= n
    drawn = [torch.randperm(high, generator=g)[:tokens] for _ in range(rows)]
    return torch.stack(drawn).reshape(shape).to(spec.dtype)


def random_calls(program: Program, count: int, seed: int = 0) -> list[tuple]:
    """random_inputs for `count` calls, where the example inputs were."""
    g = torch.Generator().manual_seed(seed)
    device = program.meta.input_device
    device = "cpu" if device == "meta" else device
    return [tuple(t.to(device) for t in random_inputs(program, g)) for _ in range(count)]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (0 for exact integer matches); NaN never passes."""
    if not ref.dtype.is_floating_point:
        return 0.0 if torch.equal(got, ref) else float("inf")
    r, g = ref.double(), got.double()
    denom = r.norm().item() or 1.0
    err = (g - r).norm().item() / denom
    return err if err == err else float("inf")
