"""flashc's IR: an ATen-level FX graph with its weights lifted out as named inputs.

A `Program` is what capture produces, passes rewrite, backends lower and artifacts
store. Its graph's placeholders are the weights (parameters, buffers, constants:
`params`) followed by the user inputs (`inputs`); the output node returns a flat
tuple that `out_spec` folds back into the model's own output structure.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from flashc.errors import InputError, VerificationError


@dataclass(frozen=True)
class InputSpec:
    """One user input: its name, static shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.name}: {dtype_name(self.dtype)}{list(self.shape)}"

    def random(self, high: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random tensor of this signature (ints below `high`, e.g. the vocabulary size)."""
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, dtype=self.dtype, generator=generator)
        high = high or 2
        return torch.randint(0, high, self.shape, dtype=self.dtype, generator=generator)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


@dataclass
class ProgramMeta:
    """What flashc knows of a program beyond its graph, typed; saved in an artifact's
    manifest (`to_json`) and checked when one loads (`from_json`)."""

    capture: str = ""  # how it was captured ("torch.export (non-strict)", or the fallback)
    warnings: list[str] = field(default_factory=list)  # shown in the compile report
    signature: str = "prefill"  # or "decode": one token with a static KV cache (flashc.decode)
    vocab_size: int | None = None  # token-id inputs are drawn below it (checks, `flashc run`)
    input_high: dict[str, int] = field(default_factory=dict)  # input name -> exclusive upper bound
    input_device: str = "cpu"  # where the example inputs were ("meta": a shapes-only capture)
    profile: str | None = None  # the hardware profile it was compiled for (set when an artifact loads)
    eos_token_id: int | None = None  # the model's end token (its generation config): where generate() stops

    SIGNATURES = ("prefill", "decode")

    def to_json(self) -> dict[str, Any]:
        out = {"capture": self.capture, "warnings": list(self.warnings), "signature": self.signature,
               "input_high": dict(self.input_high), "input_device": self.input_device}
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        if self.profile is not None:
            out["profile"] = self.profile
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "meta") -> "ProgramMeta":
        """The metadata an artifact stored; a field of the wrong kind is a VerificationError
        naming it. Older artifacts' `capture_warning` joins the warnings; unknown keys are
        ignored (a newer flashc's additions)."""
        warnings = [str(w) for w in data.get("warnings", [])]
        if data.get("capture_warning"):
            warnings.append(str(data["capture_warning"]))
        meta = cls(capture=str(data.get("capture", "")), warnings=warnings,
                   signature=data.get("signature", "prefill"), vocab_size=data.get("vocab_size"),
                   input_high=dict(data.get("input_high") or {}), input_device=str(data.get("input_device", "cpu")),
                   profile=data.get("profile"), eos_token_id=data.get("eos_token_id"))
        if meta.signature not in cls.SIGNATURES:
            raise VerificationError(f"field '{where}.signature' is {meta.signature!r}; "
                                    f"expected one of {', '.join(cls.SIGNATURES)}")
        bounds = [("vocab_size", meta.vocab_size), *((f"input_high.{k}", v) for k, v in meta.input_high.items())]
        for name, value in bounds:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise VerificationError(f"field '{where}.{name}' is {value!r}; expected a positive integer")
        eos = meta.eos_token_id
        if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
            raise VerificationError(f"field '{where}.eos_token_id' is {eos!r}; expected a token id (an integer >= 0)")
        return meta

    def copy(self) -> "ProgramMeta":
        return dataclasses.replace(self, warnings=list(self.warnings), input_high=dict(self.input_high))


@dataclass
class Program:
    """A captured model: graph + named weights + input signature + output structure."""

    graph_module: fx.GraphModule
    params: dict[str, torch.Tensor]
    inputs: list[InputSpec]
    out_spec: pytree.TreeSpec | None = None
    meta: ProgramMeta = field(default_factory=ProgramMeta)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def param_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.placeholders() if n.name in self.params)

    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.placeholders() if n.name not in self.params]

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """The positional inputs of a call made as a Hugging Face model is called: leading
        positional tensors, the rest by input name (`cm(input_ids=..., attention_mask=...)`,
        `cm(**tokenizer(...))`). An `attention_mask` of all ones that the graph does not take
        is dropped (the model was captured without one, which means the same); any other
        name the graph does not take is an error naming the inputs it does."""
        if not kwargs:
            return tuple(args)
        names = [s.name for s in self.inputs]
        bound: dict[str, Any] = dict(zip(names, args))
        if len(args) > len(names):
            raise InputError(f"expected at most {len(names)} input(s) ({', '.join(names)}), got {len(args)}")
        for name, value in kwargs.items():
            if name in bound:
                raise InputError(f"input {name!r} is given twice (by position and by name)")
            if name not in names:
                if name == "attention_mask" and isinstance(value, torch.Tensor) and bool((value == 1).all()):
                    continue  # what the captured graph assumed: nothing masked
                raise InputError(f"this model takes no input {name!r}; its inputs are {', '.join(names)}"
                                 + (" (it was compiled without an attention mask: compile with example_kwargs="
                                    "{'attention_mask': ...} to pass one)" if name == "attention_mask" else "")
                                 + ("; arguments that are not tensors were fixed at compile time (example_kwargs)"
                                    if not isinstance(value, torch.Tensor) else ""))
            bound[name] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise InputError(f"missing input(s) {', '.join(repr(m) for m in missing)}; the model takes "
                             f"{', '.join(names)}")
        return tuple(bound[n] for n in names)

    def check_inputs(self, args: tuple) -> None:
        """Raise InputError naming the input when args do not match the signature."""
        if len(args) != len(self.inputs):
            names = ", ".join(s.describe() for s in self.inputs)
            raise InputError(f"expected {len(self.inputs)} input(s) ({names}), got {len(args)}")
        for spec, arg in zip(self.inputs, args):
            if not isinstance(arg, torch.Tensor):
                raise InputError(f"input {spec.name!r}: expected a tensor, got {type(arg).__name__}")
            if tuple(arg.shape) != spec.shape or arg.dtype != spec.dtype:
                raise InputError(
                    f"input {spec.name!r}: expected {dtype_name(spec.dtype)}{list(spec.shape)}, "
                    f"got {dtype_name(arg.dtype)}{list(arg.shape)}; the model was compiled for "
                    "that shape: compile again with example inputs of the new shape"
                )
            if arg.device.type == "meta" and self.params and all(
                    t.device.type != "meta" for t in self.params.values()):
                raise InputError(f"input {spec.name!r} is on the meta device (shapes only, no values); "
                                 "the compiled model computes on real tensors: pass one with values")

    def run_flat(self, *args: torch.Tensor) -> list[torch.Tensor]:
        """Run the graph on user inputs; returns the flat outputs."""
        weights = [self.params[n.name] for n in self.param_nodes()]
        out = self.graph_module(*weights, *args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def unflatten(self, flat: list[torch.Tensor]) -> Any:
        if self.out_spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return pytree.tree_unflatten(flat, self.out_spec)

    def __call__(self, *args: torch.Tensor) -> Any:
        self.check_inputs(args)
        return self.unflatten(self.run_flat(*args))

    def add_param(self, base_name: str, value: torch.Tensor, before: fx.Node | None = None) -> fx.Node:
        """Add a weight as a new placeholder (placed with the other weights)."""
        name = base_name
        taken = {n.name for n in self.graph.nodes}
        i = 0
        while name in taken:
            i += 1
            name = f"{base_name}_{i}"
        inputs = self.input_nodes()
        anchor = before if before is not None else (inputs[0] if inputs else None)
        if anchor is not None:
            with self.graph.inserting_before(anchor):
                node = self.graph.placeholder(name)
        else:
            node = self.graph.placeholder(name)
        node.meta["val"] = _fake_like(value)
        self.params[node.name] = value
        return node

    def drop_unused_params(self, nodes: Iterable[fx.Node] | None = None) -> int:
        """Remove the weight placeholders among `nodes` (default: all of them) that nothing reads any more;
        returns how many."""
        dropped = 0
        for node in dict.fromkeys(self.param_nodes() if nodes is None else nodes):
            if not node.users:
                self.graph.erase_node(node)
                del self.params[node.name]
                dropped += 1
        return dropped

    def recompile(self) -> None:
        self.graph.lint()
        self.graph_module.recompile()

    def op_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.graph.nodes if n.op == "call_function")

    def clone(self) -> "Program":
        """A copy whose graph can be rewritten without touching this one (weights shared)."""
        import copy

        graph = copy.deepcopy(self.graph)
        for mine, theirs in zip(self.placeholders(), (n for n in graph.nodes if n.op == "placeholder")):
            # fx renames a copied node named like a builtin (torch.export keeps `input`): inputs and
            # weights are looked up by name
            theirs.name = mine.name
        gm = fx.GraphModule(self.graph_module, graph)
        return Program(gm, dict(self.params), list(self.inputs), self.out_spec, self.meta.copy())


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def written_in_place(node) -> bool:
    """Whether an in-place op (a mutable schema, e.g. add_, index_copy_) reads node."""
    if not isinstance(node, fx.Node):
        return False
    return any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in node.users)


NODE_META = ("val", "stack_trace", "nn_module_stack")  # what a node's replacement keeps: its value, where it came from


def replace_with_call(graph: fx.Graph, node: fx.Node, target: Callable, args: tuple) -> fx.Node:
    """``target(*args)`` inserted where node was, with node's value and source, read by all node's users;
    node erased. The caller vouches that the call computes node's value."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update({k: v for k, v in node.meta.items() if k in NODE_META})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def upstream(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """The roots and every node they depend on."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def function_of_one_input(program: "Program", outputs: list[fx.Node]
                          ) -> tuple[fx.Node, Callable[[torch.Tensor], list[torch.Tensor]]] | None:
    """(input, evaluate) when `outputs` are computed from one user input and the weights by
    ops without side effects: evaluate(value) runs those nodes on the CPU with the input set
    to value and returns the outputs' values. None when they read several inputs or none,
    write in place, or read weights that have no values (a meta-device model)."""
    seen = upstream(outputs)
    nodes = [n for n in program.graph.nodes if n in seen]
    sources = [n for n in nodes if n.op == "placeholder" and n.name not in program.params]
    if len(sources) != 1 or sources[0] not in program.input_nodes():
        return None
    if any(n.op not in ("placeholder", "call_function") for n in nodes):
        return None
    if any(getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable for n in nodes):
        return None  # evaluating them would write somewhere
    source = sources[0]
    weights = {n: program.params[n.name] for n in nodes if n.op == "placeholder" and n is not source}
    if any(w.device.type == "meta" for w in weights.values()):
        return None

    def on_cpu(a):
        return torch.device("cpu") if isinstance(a, torch.device) else a

    def evaluate(value: torch.Tensor) -> list[torch.Tensor]:
        env: dict[fx.Node, Any] = {n: w.cpu() for n, w in weights.items()}
        env[source] = value
        for n in nodes:
            if n not in env:
                args, kwargs = fx.node.map_aggregate(
                    (n.args, n.kwargs), lambda a: env[a] if isinstance(a, fx.Node) else on_cpu(a))
                env[n] = n.target(*args, **kwargs)
        return [env[o] for o in outputs]

    return source, evaluate


def op_name(node: fx.Node) -> str:
    """A short readable name for a call_function target: 'aten.linear', 'flashc.rms_norm'."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        return f"{ns}.{name}"
    return getattr(t, "__name__", str(t))


def source_location(node: fx.Node) -> str:
    """'file:line in fn' of the model code that produced node, when capture recorded it."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return "<unknown>"
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip().startswith("File ")]
    if not lines:
        return "<unknown>"
    # 'File "x.py", line 12, in forward' -> 'x.py:12 in forward'; the model's own line rather
    # than torch's (an nn.Embedding's F.embedding call says little about where it is)
    outside_torch = [l for l in lines if "/torch/" not in l]
    last = (outside_torch or lines)[-1]
    try:
        path = last.split('"')[1]
        rest = last.split('"')[2]
        line = rest.split("line")[1].split(",")[0].strip()
        fn = rest.split(" in ")[-1].strip()
        return f"{path}:{line} in {fn}"
    except IndexError:
        return last


def module_path(node: fx.Node) -> str:
    """The dotted path of the nn.Module that produced node ('model.layers.0.mlp')."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def propagate_shapes(program: Program) -> None:
    """Recompute node.meta['val'] (fake tensors) for every node of the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # user inputs live where the weights live (the signature records no device)
    device = next(iter(program.params.values())).device if program.params else torch.device("cpu")
    if device.type == "meta":  # a shape-only model: its inputs were meta or CPU tensors at capture
        device = torch.device("meta" if program.meta.input_device == "meta" else "cpu")
    fakes = []
    for node in program.placeholders():
        if node.name in program.params:
            fakes.append(mode.from_tensor(program.params[node.name]))
        else:
            spec = next(s for s in program.inputs if s.name == node.name)
            fakes.append(mode.from_tensor(torch.empty(spec.shape, dtype=spec.dtype, device=device)))
    FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*fakes)


def output_signature(program: Program) -> list[tuple[tuple[int, ...], torch.dtype]]:
    out = program.graph.output_node()
    vals = pytree.tree_leaves(out.args[0])
    return [(tuple(v.meta["val"].shape), v.meta["val"].dtype) for v in vals if isinstance(v, fx.Node)]


def verify(program: Program, expected_outputs: list | None = None, where: str = "", shapes: bool = True) -> None:
    """Check the graph is well formed, (with `shapes`) shapes propagate and the outputs keep their signature."""
    try:
        program.graph.lint()
    except Exception as e:  # fx raises RuntimeError with the offending node
        raise VerificationError(f"{where}: graph lint failed: {e}") from e
    for node in program.op_nodes():
        if not (isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem):
            raise VerificationError(
                f"{where}: node {node.name} calls {node.target!r}, which is not an ATen or flashc op"
            )
    if not shapes:
        return
    try:
        propagate_shapes(program)
    except Exception as e:
        raise VerificationError(f"{where}: shape propagation failed: {e}") from e
    if expected_outputs is not None:
        got = output_signature(program)
        if got != expected_outputs:
            raise VerificationError(f"{where}: outputs changed from {expected_outputs} to {got}")
