"""Recognise attention over a static KV cache and give it its own op.

A decode step (flashc.decode) attends over the whole static cache with a mask computed
from the `cache_position` input: key j is visible to the query at position p iff j <= p.
The mask is boolean, or additive (0 where visible, the dtype's min or -inf elsewhere)
where the model's attention adds it to the scores, as transformers' eager attention does.
As a mask it is just a tensor, so a kernel would read it and still visit every cache
slot. `flashc.decode_attention(q, k, v, cache_position, scale)` says the same thing as a
length, which a decode kernel (Flash-Decoding) uses to skip the dead part of the cache.

Which masks qualify is decided by evaluating the mask's subgraph, not by its spelling:
the mask must be a function of one integer input of shape [S] (the positions of the S
new queries) and constants only, and for a set of probe positions it must equal
`flashc.ops.decode_mask` broadcast to the attention's scores; an additive mask must be 0
exactly where that is True and below -1e4 elsewhere, so a boolean mask cast to 0/1 never
qualifies. Probing covers the first, last and middle slots and a few random ones; masks
that are a function of position alone and agree there are the decode mask in every
model we know of.

Each attention that keeps its mask has a reason, which `flashc inspect --why-not
decode_attention` shows (`DecodeAttention.explain`).
"""

from __future__ import annotations

import random

import torch
import torch.fx as fx

import flashc.ops  # noqa: F401  (registers torch.ops.flashc)
from flashc.ir import Program, function_of_one_input, replace_with_call, upstream
from flashc.ops import decode_mask
from flashc.pass_manager import PassContext, PassResult
from flashc.rewrite import Candidate, describe

flashc_ops = torch.ops.flashc

_PROBES = 12


class DecodeAttention:
    """flashc.attention(q, k, v, <decode mask of pos>, False, s) -> flashc.decode_attention(q, k, v, pos, s)."""

    name = "decode_attention"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")
    explains = ("decode_attention",)  # the fusion `explain` reports on

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        return self._run(program)

    def explain(self, program: Program, ctx: PassContext, name: str) -> list[Candidate]:
        """Run the pass as `run` does; each flashc.attention, rewritten or why not."""
        found: list[Candidate] = []
        self._run(program, found)
        return found

    def _run(self, program: Program, found: list[Candidate] | None = None) -> PassResult:
        verdicts: dict[fx.Node, fx.Node | str] = {}  # mask node -> position input, or why it is none
        rewritten = 0
        for node in list(program.op_nodes()):
            if node.target != flashc_ops.attention.default:
                continue
            q, k, v, mask, is_causal, scale = node.args
            if mask is None or is_causal:
                if found is not None:
                    why = "causal (is_causal), not masked by cache positions" if is_causal else "attends to every key"
                    found.append(Candidate(node, self.name, False, f"no mask to read a cache length from: {why}"))
                continue
            if mask not in verdicts:
                verdicts[mask] = _position_input(program, mask, q.meta["val"], k.meta["val"])
            position = verdicts[mask]
            if isinstance(position, str):
                if found is not None:
                    found.append(Candidate(node, self.name, False, position))
                continue
            if found is not None:
                found.append(Candidate(node, self.name, True))
            replace_with_call(program.graph, node, flashc_ops.decode_attention.default, (q, k, v, position, scale))
            rewritten += 1
        if rewritten:
            program.graph.eliminate_dead_code()
        return PassResult(rewritten > 0, {"decode_attention": rewritten})


def _position_input(program: Program, mask: fx.Node, q: torch.Tensor, k: torch.Tensor) -> fx.Node | str:
    """The input the mask is a decode mask of, or why it is not one."""
    found = function_of_one_input(program, [mask])
    if found is None:
        return _not_of_one_input(program, mask)
    pos, evaluate = found
    val = pos.meta.get("val")
    b, hq, s, _ = q.shape
    length = k.shape[2]
    if val is None or val.dtype not in (torch.int32, torch.int64) or tuple(val.shape) != (s,):
        held = f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}" if val is not None else "of unknown shape"
        return (f"the mask ({describe(mask)}) is computed from input {pos.name}, {held}, not from cache positions "
                f"(one integer per new query, [{s}])")
    if length < s:
        return f"the cache ({length} slots) is shorter than the {s} new queries"
    rng = random.Random(0)
    starts = {0, 1, length // 2, length - s} | {rng.randrange(length - s + 1) for _ in range(_PROBES)}
    for start in sorted(p for p in starts if 0 <= p <= length - s):
        positions = torch.arange(start, start + s, dtype=val.dtype)
        at = f"positions {start}..{start + s - 1} of {pos.name}"
        try:
            got, = evaluate(positions)
            want = decode_mask(positions, length).expand(b, hq, s, length)
            got = torch.broadcast_to(got, want.shape)
        except Exception as e:  # shapes that do not broadcast, ops that need a device: not our mask
            return f"evaluating the mask ({describe(mask)}) at {at} raised {type(e).__name__}: {e}"[:300]
        if got.dtype == torch.bool:
            ok = torch.equal(got, want)
        elif got.is_floating_point():  # additive: 0 where visible, very negative elsewhere
            ok = bool(((got == 0) == want).all()) and bool((got[~want] < -1e4).all())
        else:
            return f"the mask ({describe(mask)}) is {got.dtype}, neither boolean nor additive"
        if not ok:
            rule = "0 where visible, below -1e4 elsewhere" if got.is_floating_point() else "True where visible"
            return (f"the mask ({describe(mask)}) differs from the decode mask at {at}: key j is visible to the "
                    f"query at position p iff j <= p ({rule})")
    return pos


def _not_of_one_input(program: Program, mask: fx.Node) -> str:
    """Why function_of_one_input refused the mask, in words."""
    seen = upstream([mask])
    inputs = [n.name for n in program.input_nodes() if n in seen]
    if len(inputs) != 1:
        read = f"reads the inputs {', '.join(inputs)}" if inputs else "reads no input (a constant)"
        return f"the mask ({describe(mask)}) {read}: a decode mask is a function of the cache positions alone"
    names = {n.name for n in seen}
    if any(w.device.type == "meta" for name, w in program.params.items() if name in names):
        return f"the mask ({describe(mask)}) reads weights that have no values (a meta-device model): cannot be probed"
    return f"the mask ({describe(mask)}) is computed by ops with side effects (in-place writes): not probed"
