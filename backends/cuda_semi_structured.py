"""The CUDA backend's late pass for 2:4-pruned weights: prefill-sized linears whose stored
weight has the exact 2:4 pattern -> ``flashc.linear_24`` (flashc/semi_structured_ops.py), which
the backend runs on the sparse tensor cores where tuning measured that faster than the dense
GEMM (codegen/semi_structured.py).

Decode-sized products (at most ``max_rows`` rows) are left to the GEMV path
(``FuseSmallMatmuls``, backends/cuda_rewrites.py): a 2:4 GEMM does not help a GEMV, which
reads the whole weight once anyway. The op keeps the dense weight as its argument, so the
rewritten graph computes exactly what the pruned graph computed (the op's reference is
``F.linear``); it keeps shapes in meta["val"] and every in-place write (a linear reads, and the
call stands where it stood), and rewrites no weight the graph writes in place.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo
from flashc.codegen.semi_structured import MULTIPLES, shape_fits
from flashc.ir import Program, replace_with_call
from flashc.pass_manager import PassContext, PassResult
from flashc.semi_structured_ops import is_2_4

from .cuda_rewrites import _val

LINEAR = torch.ops.aten.linear.default
LINEAR_24 = torch.ops.flashc.linear_24.default
FEATURE = "sparsity_2_4"  # flashc.profiles: chips with sparse tensor cores
NOT_2_4 = "the weight is not stored with a 2:4 pattern (more than 2 nonzeros in some group of 4 inputs, or computed)"


class FuseSemiStructuredMatmuls:
    """linear(x, w, b) with more than `max_rows` rows and a stored 2:4 weight -> flashc.linear_24(x, w, b)."""

    name = "cuda_semi_structured_matmuls"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        done, skipped = fuse_semi_structured_matmuls(program, self.max_rows, ctx.profile)
        # the report lists the 2:4 weights that stay dense (why a pruned layer gains nothing);
        # the linears of weights without the pattern are only counted, or every unpruned
        # model's compile would list each of its layers
        kept = [(node, why) for node, why in skipped if why != NOT_2_4]
        details = [{"layer": node, "op": "aten.linear", "status": "dense", "note": why} for node, why in kept]
        return PassResult(done > 0, {"matmuls_to_linear_24": done, "semi_structured_kept_dense": len(kept),
                                     "not_2_4": len(skipped) - len(kept)}, details=details)


def _skip_reason(program: Program, info: MutationInfo, node: fx.Node, max_rows: int, profile,
                 pattern: dict[str, bool]) -> str | None:
    """Why linear(x, w, b) at node cannot become a linear_24 (None: it can); NOT_2_4 when the
    weight is not a stored one with the pattern. `pattern` caches the 2:4 check per weight
    name (a weight read by several linears is checked once)."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not isinstance(w, fx.Node) or w.op != "placeholder" or w.name not in program.params:
        return NOT_2_4
    weight = program.params[w.name]
    if weight.device.type == "meta":
        return "the weight's values are not known here (meta tensor): its pattern cannot be checked"
    if w.name not in pattern:
        pattern[w.name] = is_2_4(weight)
    if not pattern[w.name]:
        return NOT_2_4
    xv, wv = _val(x), _val(w)
    if node.kwargs or xv is None or wv is None:
        return "no shapes recorded, or keyword arguments"
    if not all(isinstance(d, int) for d in (*xv.shape, *wv.shape)):
        return "symbolic shapes: the rows are not known at compile time"
    if wv.dim() != 2 or xv.dtype != wv.dtype or xv.dtype not in (torch.float16, torch.bfloat16):
        return (f"input {xv.dtype} and weight {wv.dtype}{list(wv.shape)}: the sparse tensor cores take "
                "a 2-d fp16/bf16 weight of x's dtype")
    bv = _val(bias)
    if bias is not None and (bv is None or bv.dtype != xv.dtype):
        return "a bias of another dtype than x"
    rows = xv.numel() // xv.shape[-1] if xv.shape[-1] else 0
    if rows <= max_rows:
        return f"{rows} rows: at most {max_rows}, the decode GEMV path (2:4 does not speed up a GEMV)"
    n, k = wv.shape
    if not shape_fits(n, k, wv.dtype):
        return (f"weight [{n}, {k}]: the sparse libraries take N, K multiples of "
                + " or ".join(f"({r}, {c})" for r, c in MULTIPLES.values()))
    if info.is_written(w):
        return "the graph writes the weight in place: a packed copy would go stale"
    if profile is not None and FEATURE not in profile.features:
        return f"profile {profile.name} has no 2:4 sparse tensor cores"
    return None


def fuse_semi_structured_matmuls(program: Program, max_rows: int, profile=None) -> tuple[int, list[tuple[str, str]]]:
    """Rewrite ``aten.linear(x, w, b)`` into ``flashc.linear_24(x, w, b)`` where x has more than
    ``max_rows`` rows and ``w`` is a weight of the program (not computed, never written in
    place) of fp16/bf16 with at most 2 nonzeros in every group of 4 consecutive inputs of each
    row (every group checked) and a shape the sparse libraries take; returns (how many,
    [(linear node, why not)] for the other linears: NOT_2_4 for weights without the pattern).
    ``profile``: a HardwareProfile, whose features must include 2:4 sparsity (None: not checked).
    """
    graph = program.graph
    info = MutationInfo.of(graph)
    pattern: dict[str, bool] = {}
    skipped: list[tuple[str, str]] = []
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != LINEAR:
            continue
        why = _skip_reason(program, info, node, max_rows, profile, pattern)
        if why is not None:
            skipped.append((node.name, why))
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        replace_with_call(graph, node, LINEAR_24, (x, w, bias))
        count += 1
    graph.lint()
    return count, skipped
