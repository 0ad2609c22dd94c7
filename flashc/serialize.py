"""Graphs as JSON: write an optimized FX graph without pickle, read it back.

Node targets are stored by name ('aten.linear.default', 'flashc.rms_norm.default') and
resolved through torch.ops on load; arguments are JSON values with small tagged
objects for nodes, tuples, dtypes and devices. Anything else is refused at save time.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

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
