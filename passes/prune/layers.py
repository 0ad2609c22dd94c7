"""What the pruning passes share: the linear layers of a Program found as quantization finds
them, the reasons a layer is left alone, the calibration run, weights swapped for new ones.

Layers are matched by flashc.passes.quantize.weights (aten.linear / mm / matmul / addmm
with a parameter weight, fused flashc.moe experts), so both passes see the same layers
and skip heads and routers for the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo
from flashc.errors import FlashcError
from flashc.ir import Program
from flashc.passes.prune.config import PruneConfig
from flashc.passes.quantize.calibration import CalibrationCalls, CalibrationData, calibration_calls
from flashc.passes.quantize.grid import output_error
from flashc.passes.quantize.weights import (
    DenseLayer, MoeLayer, _dense_layer as dense_layer, _feeds_router as feeds_router,
    _input_groups as input_groups, _is_output_head as is_output_head, _moe_layer as moe_layer,
    _op_label as op_label,
)

__all__ = ["CalibratedPrunePass", "DenseLayer", "MoeLayer", "Skipped", "calibration_run", "dense_layer",
           "dense_skip_reason", "input_groups", "moe_layer", "moe_skip_reason", "nbytes", "nonzeros",
           "op_label", "real_weights", "relative_error", "replace_param", "replace_weight"]


class CalibratedPrunePass:
    """What every calibrated pruning pass is built from: a PruneConfig (or its spec) of one of the
    pass's `methods` (refused otherwise, with `refusal` formatted with the spec), the calibration
    data and whether to show progress."""

    methods: tuple[str, ...] = ()
    refusal = "{spec} is another pass's"

    def __init__(self, config: PruneConfig | str, calibration: CalibrationData | None = None,
                 progress: bool = True) -> None:
        self.config = PruneConfig.parse(config)
        if self.config.method not in self.methods:
            raise ValueError(self.refusal.format(spec=self.config.spec))
        self.calibration = calibration
        self.progress = progress


@dataclass
class Skipped:
    """A layer a pruning pass leaves as it is, and why (one report row)."""

    name: str
    op: str
    reason: str
    params: int
    nbytes: int

    def detail(self) -> dict:
        return {"layer": self.name, "op": self.op, "status": "skipped", "params_before": self.params,
                "params_after": self.params, "bytes_before": self.nbytes, "bytes_after": self.nbytes,
                "note": self.reason}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def nonzeros(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t))


def dense_skip_reason(program: Program, layer: DenseLayer, mutations: MutationInfo, lm_head: bool) -> str | None:
    """Why a dense layer is not pruned (None: it is)."""
    if mutations.is_written(layer.weight):
        return "weight is written in place by the graph"
    if feeds_router(layer.node):
        return "MoE router: kept dense (small; routing is sensitive)"
    if not lm_head and is_output_head(layer.node, layer.weight):
        return "output head: kept dense, as Wanda, SparseGPT and TEAL leave it (PruneConfig(lm_head=True) prunes it)"
    return None


def moe_skip_reason(layer: MoeLayer, mutations: MutationInfo, experts: bool) -> str | None:
    if not experts:
        return "MoE experts kept dense (PruneConfig(experts=True) prunes them)"
    if any(mutations.is_written(p) for p in (layer.gate_up, layer.down)):
        return "expert weights are written in place by the graph"
    return None


def real_weights(program: Program, tensors: list[torch.Tensor], what: str) -> torch.device:
    """The device of the weights; an error for a shape-only (meta) model."""
    if any(t.device.type == "meta" for t in tensors):
        raise FlashcError(f"{what} reads the weights, and this model is on the meta device (shapes only): "
                          "build it with real weights")
    return tensors[0].device


def calibration_run(program: Program, data: CalibrationData | None, config, needed: int, what: str,
                    device: torch.device) -> CalibrationCalls:
    """The calibration calls for program, checked to give at least `needed` rows."""
    if data is None:
        raise FlashcError(f"{what} needs calibration data: pass calibration='builtin' (flashc's built-in text), "
                          "a text or .safetensors file, or token ids")
    calls = calibration_calls(program, data, config.calibration_tokens, device)
    if calls.rows < needed:
        raise FlashcError(f"calibration data too small: {data.description} gives {calls.rows} {calls.unit} in "
                          f"{calls.count} calls of {calls.rows_per_call}; {what} needs at least {needed} "
                          f"(PruneConfig.min_calibration_tokens={config.min_calibration_tokens}): give more text or "
                          "samples")
    return calls


def replace_weight(program: Program, layer: DenseLayer, weight: torch.Tensor) -> fx.Node:
    """Make layer read a new parameter: `weight` [N, K] stored in the layer's own layout. The
    old parameter goes when nothing else reads it (a weight tied elsewhere stays)."""
    graph = program.graph
    stored = weight.t().contiguous() if layer.transposed else weight
    new = program.add_param(f"{layer.weight.name}_pruned", stored)
    if layer.view is None:
        layer.node.replace_input_with(layer.weight, new)
    elif len(layer.view.users) == 1:
        layer.view.replace_input_with(layer.weight, new)
    else:  # the transpose also feeds something else: give this layer its own
        with graph.inserting_before(layer.node):
            view = graph.node_copy(layer.view, lambda n: new if n is layer.weight else n)
        layer.node.replace_input_with(layer.view, view)
    program.drop_unused_params([layer.weight])
    return new


def replace_param(program: Program, node: fx.Node, old: fx.Node, value: torch.Tensor, suffix: str = "pruned"
                  ) -> fx.Node:
    """node reads a new parameter `value` where it read the parameter `old`."""
    new = program.add_param(f"{old.name}_{suffix}", value)
    node.replace_input_with(old, new)
    program.drop_unused_params([old])
    return new


def relative_error(w: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor | None) -> float | None:
    """sqrt(||(W' - W) X^T||^2 / ||W X^T||^2) on the calibration inputs (None without them)."""
    if hessian is None:
        return None
    h = hessian.float()
    base = float(output_error(w.float(), h))
    return (float(output_error(new.float() - w.float(), h)) / base) ** 0.5 if base > 0 else None
