"""A roofline cost model: FLOPs and bytes per node, time per node on a hardware profile.

time(node) = max(flops / peak_flops[dtype], bytes / memory_bandwidth) + kernel overhead.
Bytes count each input read once and each output written once, the fewest a kernel
can move; views cost nothing and launch no kernel. Decode on a GPU launches a
hundred-odd kernels per token, so the per-kernel overhead is counted, not ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from flashc.ir import Program, module_path, op_name
from flashc.profiles import HardwareProfile

aten = torch.ops.aten

# Ops that only reinterpret memory (no kernel, no bytes moved).
VIEW_OPS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.t", "aten.permute",
            "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.slice", "aten.select", "aten.alias",
            "aten.detach", "getitem", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
            "aten.narrow", "aten.as_strided"}


@dataclass
class NodeCost:
    """Cost of one node on one profile."""

    node: str
    op: str
    layer: str
    shape: tuple
    dtype: str
    flops: float
    bytes: float
    seconds: float
    bound: str  # "memory", "compute" or "overhead"
    kernel: bool


def _tensors(x) -> list[torch.Tensor]:
    out = []
    for v in (x if isinstance(x, (list, tuple)) else [x]):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def _bytes(ts) -> float:
    return float(sum(t.numel() * t.element_size() for t in ts))


def _input_vals(node: fx.Node) -> list[torch.Tensor]:
    return [v for n in node.all_input_nodes for v in _tensors(n.meta.get("val"))]


def node_flops(node: fx.Node) -> float:
    """Floating-point operations of a node (multiply-add = 2)."""
    name = op_name(node)
    out = _tensors(node.meta.get("val"))
    ins = [a.meta.get("val") for a in node.args if isinstance(a, fx.Node)]
    if name == "aten.linear":
        x, w = ins[0], ins[1]
        return 2.0 * x.numel() / x.shape[-1] * w.shape[0] * w.shape[1]
    if name in ("flashc.linear_wq", "flashc.gemv_wq"):  # x[..., K] by a packed [N, K] weight (quantized_ops)
        x, q = ins[0], ins[1]
        return 2.0 * x.numel() / x.shape[-1] * q.shape[0] * x.shape[-1]
    if name == "flashc.gemv":  # a decode linear with its folds (flashc/ops.py)
        x, w = ins[0], ins[1]
        return 2.0 * x.numel() / x.shape[-1] * w.shape[0] * w.shape[1]
    if name in ("aten.matmul", "aten.bmm", "aten.mm"):
        a, b = ins[0], ins[1]
        return 2.0 * out[0].numel() * a.shape[-1]
    if name in ("flashc.attention", "flashc.decode_attention", "aten.scaled_dot_product_attention"):
        q, k = ins[0], ins[1]
        b, h, s, d = q.shape
        l = k.shape[-2]
        causal = node.args[4] if name == "flashc.attention" and len(node.args) > 4 else False
        pairs = s * l - (s * (s - 1) / 2 if causal else 0)
        return 4.0 * b * h * pairs * d
    if name == "flashc.moe":
        x, _, gate_up, down = ins[:4]
        t, h = x.shape
        f = down.shape[-1]
        k = node.args[4]
        return 2.0 * t * k * (2 * f * h + h * f)
    if name in VIEW_OPS or name == "aten.embedding":
        return 0.0
    return float(sum(t.numel() for t in out)) * 4  # elementwise / reductions: a few ops per element


def node_bytes(node: fx.Node) -> float:
    """Fewest bytes a kernel for this node must move through main memory."""
    name = op_name(node)
    if name in VIEW_OPS:
        return 0.0
    out = _tensors(node.meta.get("val"))
    if name == "aten.embedding":
        return 2 * _bytes(out)  # gathers only the rows it outputs
    if name == "flashc.moe":
        x, logits, gate_up, down = [a.meta["val"] for a in node.args[:4]]
        experts = gate_up.shape[0]
        active = min(experts, x.shape[0] * node.args[4])
        per_expert = (gate_up.numel() + down.numel()) * gate_up.element_size() / experts
        return _bytes([x, logits]) + active * per_expert + _bytes(out)
    return _bytes(_input_vals(node)) + _bytes(out)


def node_cost(node: fx.Node, profile: HardwareProfile) -> NodeCost:
    out = _tensors(node.meta.get("val"))
    name = op_name(node)
    dtype = out[0].dtype if out else torch.float32
    flops, nbytes = node_flops(node), node_bytes(node)
    kernel = name not in VIEW_OPS
    peak = profile.flops_for(dtype) or 1.0
    t_compute, t_memory = flops / peak, nbytes / profile.memory_bandwidth
    overhead = profile.kernel_overhead_s if kernel else 0.0
    bound = "compute" if t_compute > t_memory else "memory"
    if overhead > max(t_compute, t_memory):
        bound = "overhead"
    return NodeCost(node.name, name, layer_of(node), tuple(out[0].shape) if out else (), str(dtype).removeprefix("torch."),
                    flops, nbytes, max(t_compute, t_memory) + overhead, bound if kernel else "-", kernel)


def layer_of(node: fx.Node) -> str:
    """'model.layers.3' for nodes inside a decoder layer, else the top module path."""
    path = module_path(node)
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2]) if path else "<model>"


@dataclass
class Estimate:
    """The cost model's estimate of one forward pass on one profile."""

    profile: str
    nodes: list[NodeCost]

    @property
    def seconds(self) -> float:
        return sum(n.seconds for n in self.nodes)

    @property
    def flops(self) -> float:
        return sum(n.flops for n in self.nodes)

    @property
    def bytes(self) -> float:
        return sum(n.bytes for n in self.nodes)

    @property
    def kernels(self) -> int:
        return sum(1 for n in self.nodes if n.kernel)

    def by_layer(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.nodes:
            out[n.layer] = out.get(n.layer, 0.0) + n.seconds
        return out

    def top(self, k: int = 10) -> list[NodeCost]:
        return sorted(self.nodes, key=lambda n: -n.seconds)[:k]

    def summary(self) -> dict:
        return {"profile": self.profile, "seconds": self.seconds, "gflops": self.flops / 1e9,
                "gbytes": self.bytes / 1e9, "kernels": self.kernels}


def estimate(program: Program, profile: HardwareProfile) -> Estimate:
    """Estimate every call node of the program on the profile (shapes must be propagated)."""
    return Estimate(profile.name, [node_cost(n, profile) for n in program.op_nodes() if n.meta.get("val") is not None])


def human_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def human_bytes(b: float) -> str:
    if b <= 0:
        return "0 B"
    units = ["B", "KB", "MB", "GB", "TB"]
    i = min(int(math.log(b, 1000)), len(units) - 1)
    return f"{b / 1000 ** i:.1f} {units[i]}"
