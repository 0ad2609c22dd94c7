"""The eager backend: the optimized graph run by PyTorch, flashc ops by their references.

It is the numeric reference for every other backend and the `cpu` target. ATen and
flashc ops are its own; ops of other libraries captured in the graph (e.g. a custom
op of transformers) are reported as fallbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashc.aliasing import aliased_outputs
from flashc.ir import Program
from flashc.lowering import LoweringTable
from flashc.options import NoOptions
from flashc.profiles import HardwareProfile


def run_with_fresh_outputs(program: Program):
    """program.run_flat, except that outputs holding a weight, the model's state or an
    input (a folded constant returned as is, a copy that canonicalization removed) are
    copied: a caller never holds storage that a later call overwrites."""
    aliased = aliased_outputs(program.graph)
    if not aliased:
        return program.run_flat

    def run(*args):
        out = program.run_flat(*args)
        for i in aliased:
            out[i] = out[i].clone()
        return out

    return run


class EagerBackend:
    name = "eager"
    Options = NoOptions
    # PyTorch runs every ATen op and every flashc op (by its reference implementation)
    lowering = LoweringTable("eager", namespaces=frozenset({"aten", "flashc"}))

    def lower(self, program: Program, profile: HardwareProfile, options: NoOptions):
        return run_with_fresh_outputs(program)

    def save_payload(self, executable, directory: Path) -> dict[str, Any]:
        return {}

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]):
        return run_with_fresh_outputs(program)
