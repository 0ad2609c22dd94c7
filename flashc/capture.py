"""Capture: turn an nn.Module and example inputs into a flashc Program.

The main path is `torch.export` (non-strict) at ATen level. When export fails, the
fallback traces the module to an ATen FX graph with `make_fx` on the real example
values (no symbolic shapes, so some constructs export rejects go through); the Program
records which path was taken so the report can say so. When both fail, CaptureError names the module and the source line that broke.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from flashc.errors import CaptureError
from flashc.ir import InputSpec, Program, ProgramMeta, propagate_shapes


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    example_kwargs: dict[str, Any] | None = None,
    input_names: list[str] | None = None,
) -> Program:
    """Capture `model(*example_inputs, **example_kwargs)` into a Program.

    Tensor positional inputs become the Program's inputs; kwargs are baked in as
    constants (e.g. `use_cache=False`).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"flashc compiles torch.nn.Module objects, got {type(model).__module__}.{type(model).__name__}; "
            "wrap the function in an nn.Module whose forward calls it"
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example input {i} is a {type(x).__name__}; flashc needs tensors "
                               "(pass other arguments as example_kwargs)")
    kwargs = dict(example_kwargs or {})
    names = input_names or _input_names(model, len(example_inputs))
    model.eval()
    export_error = None
    with _module_tracker(model) as tracker:
        try:
            program = _capture_export(model, example_inputs, kwargs, names)
        except Exception as e:  # export raises many types; all mean "not capturable this way"
            export_error = e
            export_where = tracker.failing_module()
    if export_error is None:
        _refuse_value_dependent_shapes(program)
        return _own_state(program)
    with _module_tracker(model) as tracker:
        try:
            program = _capture_fx(model, example_inputs, kwargs, names)
        except Exception as fx_error:
            raise CaptureError(_capture_failure_message(model, export_error, export_where, fx_error,
                                                        tracker.failing_module())) from export_error
    program.meta.capture = "torch.fx make_fx, real values (fallback)"
    program.meta.warnings.append(
        f"torch.export failed ({type(export_error).__name__}: {str(export_error).splitlines()[0][:200]}); "
        "the fallback specialises data-dependent control flow on the example inputs"
    )
    return _own_state(program)


def _refuse_value_dependent_shapes(program: Program) -> None:
    """A result whose shape depends on the values of the input (`x[x > 0]`, `nonzero`, `unique`,
    `masked_select`): the passes and backends compile shapes known at compile time, so say which
    op gives one, and where, rather than fail inside a pass."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    from flashc.errors import UnsupportedOpError
    from flashc.ir import op_name, source_location

    for node in program.graph.nodes:
        val = node.meta.get("val")
        values = val if isinstance(val, (list, tuple)) else [val]
        if node.op == "call_function" and any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v)
                                              for v in values):
            raise UnsupportedOpError(
                f"{op_name(node)} (node {node.name}, {source_location(node)}) gives a result whose shape depends on "
                "the input's values (a boolean mask index, nonzero, unique, masked_select); flashc compiles "
                "shapes known when it compiles. Keep the shape fixed (torch.where(mask, x, 0), "
                "x.masked_fill(~mask, 0)) or run that part outside the compiled model")


def _own_state(program: Program) -> Program:
    """Give the program its own copy of the buffers its graph writes in place (a KV cache
    held in the module, a step counter): the compiled model keeps and updates them as the
    module's forward updates its own, and neither compiling nor calling it changes the
    module. Weights that are only read stay shared with the module."""
    from flashc.aliasing import written_placeholders

    for node in written_placeholders(program.graph):
        if node.name in program.params:
            program.params[node.name] = program.params[node.name].clone()
    return program


def _input_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    if callable(getattr(model, "input_names", None)):
        return list(model.input_names())[:n]
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), n)]


def _capture_export(model, args, kwargs, names) -> Program:
    # Inference graphs: under no_grad, torch.no_grad regions inside the model (HF's
    # rotary embedding) are no-ops instead of set_grad_enabled wrapper sub-graphs.
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    sig = ep.graph_signature
    from torch.export.graph_signature import InputKind, OutputKind

    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        kinds = sorted({s.kind.name for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT})
        raise CaptureError(f"the model mutates its state in forward ({', '.join(kinds)}); "
                           "flashc captures pure forward passes: pass state (e.g. a KV cache) as inputs")
    gm = ep.graph_module
    state = {**ep.state_dict, **ep.constants}
    params: dict[str, torch.Tensor] = {}
    inputs: list[InputSpec] = []
    user_index = 0
    flat_user_args = pytree.tree_leaves((args, kwargs))
    for spec, node in zip(sig.input_specs, [n for n in gm.graph.nodes if n.op == "placeholder"]):
        if spec.kind == InputKind.USER_INPUT:
            value = flat_user_args[user_index]
            user_index += 1
            if isinstance(value, torch.Tensor):
                name = names[len(inputs)] if len(inputs) < len(names) else node.name
                node.name = node.target = name
                inputs.append(InputSpec(name, tuple(value.shape), value.dtype))
            else:  # a constant kwarg: export specialised on it, nothing reads the placeholder
                if node.users:
                    raise CaptureError(f"non-tensor input {node.name}={value!r} is read by the graph")
                gm.graph.erase_node(node)
        else:
            params[node.name] = state[spec.target].detach()
    gm.recompile()
    out_spec = ep.module_call_graph[0].signature.out_spec if ep.module_call_graph[0].signature else None
    program = Program(gm, params, inputs, out_spec, ProgramMeta(capture="torch.export (non-strict)",
                                                                input_device=_input_device(args)))
    return program


def _capture_fx(model, args, kwargs, names) -> Program:
    from torch.fx.experimental.proxy_tensor import make_fx

    state = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    keys = list(state)

    def run(*flat):
        weights = dict(zip(keys, flat[: len(keys)]))
        return torch.func.functional_call(model, weights, tuple(flat[len(keys):]), kwargs)

    # tracing_mode="real" runs the model on the example values, so Python control
    # flow on tensor values is taken as it falls for these inputs (specialised).
    with torch.no_grad():
        gm = make_fx(run, tracing_mode="real", pre_dispatch=True)(*state.values(), *args)
    out_leaves, out_spec = pytree.tree_flatten(run(*state.values(), *args))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {}
    for node, key in zip(placeholders, keys):
        node.name = node.target = "p_" + key.replace(".", "_")
        params[node.name] = state[key]
    inputs = []
    for node, name, x in zip(placeholders[len(keys):], names, args):
        node.name = node.target = name
        inputs.append(InputSpec(name, tuple(x.shape), x.dtype))
    # make_fx returns the pytree as-is; flatten it in the graph so outputs stay flat
    out = gm.graph.output_node()
    out.args = (tuple(pytree.tree_leaves(out.args[0])),)
    gm.recompile()
    program = Program(gm, params, inputs, out_spec, ProgramMeta(input_device=_input_device(args)))
    propagate_shapes(program)
    return program


def _input_device(inputs) -> str:
    """Where the example inputs were (shape propagation of a meta-device model needs it)."""
    return str(inputs[0].device) if inputs else "cpu"


class _ModuleTracker:
    """Remembers which submodule was running when capture failed."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.deepest_failed: str | None = None

    def failing_module(self) -> str:
        return self.deepest_failed or (self.stack[-1] if self.stack else "")


@contextmanager
def _module_tracker(model: torch.nn.Module):
    tracker = _ModuleTracker()
    handles = []
    for name, mod in model.named_modules():
        def pre(_m, _a, name=name):
            tracker.stack.append(name or "<root>")

        def post(_m, _a, _o, name=name):
            if tracker.stack:
                tracker.stack.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        yield tracker
    finally:
        if tracker.stack and tracker.deepest_failed is None:
            tracker.deepest_failed = tracker.stack[-1]
        for h in handles:
            h.remove()


def _user_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch and flashc: the user's line."""
    frames = traceback.extract_tb(error.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/flashc/" not in f.filename]
    if not user:
        return "<unknown>"
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _capture_failure_message(model, export_error, export_where, fx_error, fx_where) -> str:
    first = str(export_error).strip().splitlines()[0][:300] if str(export_error).strip() else ""
    return (
        f"could not capture {type(model).__name__}: torch.export failed in module "
        f"'{export_where or '<root>'}' at {_user_frame(export_error)} "
        f"({type(export_error).__name__}: {first}); the torch.fx (make_fx) fallback failed in module "
        f"'{fx_where or '<root>'}' ({type(fx_error).__name__}: {str(fx_error).splitlines()[0][:200] if str(fx_error) else ''}). "
        "Fix: make that code traceable (no Python control flow on tensor values, no .item()/.tolist()), "
        "or wrap it in a torch.library custom op"
    )
