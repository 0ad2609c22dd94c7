"""Graphs as JSON: write an optimized FX graph without pickle, read it back.

Node targets are stored by name ('aten.linear.default', 'flashc.rms_norm.default') and
resolved through torch.ops on load; arguments are JSON values with small tagged
objects for nodes, tuples, dtypes and devices. Anything else is refused at save time.
The output structure (a pytree spec) is stored as torch writes it; its types are
resolved on load by importing their modules from a short list of known packages only.
"""

from __future__ import annotations

import importlib
import json
import math
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from flashc.errors import ArtifactError

# Namespaces whose ops are registered by importing a module (not by torch itself).
OP_NAMESPACE_MODULES = {"flashc": "flashc.ops", "transformers": "transformers.integrations.moe"}


def target_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    raise ArtifactError(f"cannot save a graph calling {target!r}: only ATen, flashc and registered "
                        "torch.library ops can be stored")


def resolve_target(name: str):
    if name == "getitem":
        return operator.getitem
    try:
        ns, op, overload = name.split(".")
    except ValueError:
        raise ArtifactError(f"malformed op name {name!r} in graph.json") from None
    if ns in OP_NAMESPACE_MODULES:
        import importlib

        importlib.import_module(OP_NAMESPACE_MODULES[ns])
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise ArtifactError(f"graph.json calls {name}, which this torch ({torch.__version__}) does not "
                            "provide; load the artifact with the torch version that wrote it") from None


def encode(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return {"node": x.name}
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"float": repr(x)}
    if isinstance(x, tuple):
        return {"tuple": [encode(i) for i in x]}
    if isinstance(x, list):
        return [encode(i) for i in x]
    if isinstance(x, dict):
        return {"dict": {k: encode(v) for k, v in x.items()}}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.layout):
        return {"layout": str(x).removeprefix("torch.")}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).removeprefix("torch.")}
    raise ArtifactError(f"cannot store graph argument of type {type(x).__name__}: {x!r}")


def decode(x: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(x, list):
        return [decode(i, nodes) for i in x]
    if not isinstance(x, dict):
        return x
    (tag, value), = x.items()
    if tag == "node":
        if value not in nodes:
            raise ArtifactError(f"graph.json refers to node {value!r} before defining it")
        return nodes[value]
    if tag == "tuple":
        return tuple(decode(i, nodes) for i in value)
    if tag == "dict":
        return {k: decode(v, nodes) for k, v in value.items()}
    if tag == "float":
        return float(value)
    if tag == "device":
        return torch.device(value)
    if tag in ("dtype", "layout", "memory_format"):
        obj = getattr(torch, value, None)
        if obj is None:
            raise ArtifactError(f"unknown torch {tag} {value!r} in graph.json")
        return obj
    raise ArtifactError(f"unknown tag {tag!r} in graph.json")


def graph_to_json(graph: fx.Graph) -> list[dict]:
    out = []
    for n in graph.nodes:
        entry: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = target_name(n.target)
        if n.op in ("call_function", "output"):
            entry["args"] = encode(n.args)
            entry["kwargs"] = encode(n.kwargs)
        elif n.op != "placeholder":
            raise ArtifactError(f"cannot store graph node {n.name} of kind {n.op}")
        out.append(entry)
    return out


def graph_from_json(entries: list[dict]) -> fx.GraphModule:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    try:
        for e in entries:
            if e["op"] == "placeholder":
                node = graph.placeholder(e["name"])
            elif e["op"] == "call_function":
                node = graph.create_node("call_function", resolve_target(e["target"]),
                                         decode(e["args"], nodes), decode(e["kwargs"], nodes), name=e["name"])
            elif e["op"] == "output":
                graph.output(decode(e["args"], nodes)[0])
                continue
            else:
                raise ArtifactError(f"unknown node kind {e['op']!r} in graph.json")
            if node.name != e["name"]:
                raise ArtifactError(f"duplicate node name {e['name']!r} in graph.json")
            nodes[e["name"]] = node
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"graph.json is malformed: {type(err).__name__}: {err}") from None
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph)


# Packages whose modules load may import to find an output type that is not registered
# yet (transformers registers a ModelOutput class as a pytree node when its module is
# imported). Importing runs a module's code, so only flashc and what it depends on are
# listed; a type from anywhere else loads as a flat tuple, with a warning.
OUTPUT_TYPE_PACKAGES = ("builtins", "collections", "torch", "transformers", "flashc")


def output_type_name(spec: pytree.TreeSpec) -> str | None:
    """The qualified name of an output structure's outermost type, e.g. 'builtins.tuple';
    None for a single tensor (a leaf)."""
    if spec.is_leaf():
        return None
    return f"{spec.type.__module__}.{spec.type.__qualname__}"


def _type_names(text: str) -> list[str]:
    """Every type a pytree spec written by treespec_dumps names, without resolving any.

    That is each node's type, the class of a namedtuple, and 'enum:<module>' for an Enum
    in a node's context (torch imports that module while reading the context).
    """
    protocol, root = json.loads(text)
    if protocol != 1:
        raise ValueError(f"pytree spec protocol {protocol!r}; this flashc reads protocol 1")
    names: list[str] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise ValueError("a node is not {type, context, children_spec}")
        kind, context, children = node["type"], node["context"], node["children_spec"]
        if not (kind is None or isinstance(kind, str)) or not isinstance(children, list):
            raise ValueError(f"node type {kind!r} or its children are malformed")
        if kind is not None:
            names.append(kind)
        if kind == "collections.namedtuple" and isinstance(context, str):
            names.append(context)
        elif isinstance(context, str):
            names += _enum_modules(context)
        stack.extend(children)
    return names


def _enum_modules(context: str) -> list[str]:
    try:
        value = json.loads(context)
    except ValueError:
        return []  # a context with its own (de)serializer: not JSON, not read by json here
    found, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if "__enum__" in v:
                found.append("enum:" + str(v.get("fqn", "")).partition(":")[0])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return found


def _resolve_type(name: str) -> str | None:
    """Make `name` a registered pytree type; None when it is, else why it cannot be."""
    if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return None
    allowed = ", ".join(OUTPUT_TYPE_PACKAGES)
    if name.startswith("enum:"):  # torch imports an Enum's module itself while reading the context
        module = name.removeprefix("enum:")
        if module.split(".")[0] in OUTPUT_TYPE_PACKAGES:
            return None
        return f"an Enum in it comes from {module!r}, which is not a package flashc imports from ({allowed})"
    if name.split(".")[0] not in OUTPUT_TYPE_PACKAGES:
        return f"{name} is not from a package flashc imports from ({allowed})"
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):  # 'pkg.mod.Outer.Inner': try pkg.mod.Outer, then pkg.mod
        module = ".".join(parts[:end])
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        except Exception as e:  # an allowed module that fails on import: report it, do not crash load
            return f"importing {module} for {name} failed ({type(e).__name__}: {e})"
        break
    if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return None
    return f"{name} is not importable here (or its module does not register it as a pytree node)"


def output_spec_from_json(text: str, where: str, stacklevel: int = 2) -> pytree.TreeSpec | None:
    """The output structure saved as `text`, with its types imported where allowed.

    A malformed spec is an ArtifactError naming `where`; a type that cannot be resolved
    safely gives a warning and None (outputs then load as a flat tuple).
    """
    try:
        names = _type_names(text)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{where} is not a pytree spec ({e}); the manifest was edited or damaged: "
                            "recompile") from None
    problems = [p for p in dict.fromkeys(_resolve_type(n) for n in names) if p is not None]
    if not problems:
        try:
            return pytree.treespec_loads(text)
        except Exception as e:  # torch refuses the context: the same fallback as an unknown type
            problems = [f"torch cannot read it ({type(e).__name__}: {e})"]
    warnings.warn(f"{where}: the model's output type cannot be rebuilt: {'; '.join(problems)}. Outputs load as "
                  "a flat tuple (a bare tensor when there is one): import the module that defines the type "
                  "before flashc.load, or recompile", stacklevel=stacklevel)
    return None
