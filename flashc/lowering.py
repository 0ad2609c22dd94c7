"""Lowering, the one path from an optimized Program to what runs: a backend's late passes
(run, verified, dumped and reported by the PassManager like any other pass), then its
lowering table.

A backend declares (see backends/base.py) its name, a typed options dataclass, its late
passes and a `LoweringTable`: which ops it lowers and with what, kept as data. Which ops
fall back to their PyTorch reference and the "unsupported op" message both come from the
table, here, for every backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx

from flashc.errors import UnsupportedOpError
from flashc.ir import Program, module_path, op_name, source_location
from flashc.pass_manager import PassContext, PassManager
from flashc.profiles import HardwareProfile


Executable = Callable[..., list[torch.Tensor]]  # what a backend builds: flat tensors in, flat tensors out


@dataclass(frozen=True)
class Fallback:
    """An op the backend did not lower: it runs its PyTorch reference implementation."""

    op: str
    count: int
    where: str  # first module path and source line


@dataclass(frozen=True)
class LoweringTable:
    """flashc op name ('flashc.rms_norm', 'aten.linear') -> the backend's lowering of it.

    `namespaces` are op namespaces a library lowers wholesale for the backend (the CUDA
    backend runs every 'aten' op through PyTorch's CUDA kernels). A value is whatever the
    backend lowers with: a kernel launcher, an ONNX emitter, a TVM converter.
    """

    backend: str
    ops: Mapping[str, Any] = field(default_factory=dict)
    namespaces: frozenset[str] = frozenset()

    def lowers(self, op: str) -> bool:
        """Whether the backend lowers op itself (else it runs its reference or is refused)."""
        return op == "getitem" or op in self.ops or op.split(".", 1)[0] in self.namespaces

    def get(self, op: str) -> Any:
        return self.ops.get(op)

    def fallbacks(self, program: Program) -> list[Fallback]:
        """Ops of program the backend leaves to the reference implementation, by op."""
        seen: dict[str, list] = {}
        for node in program.op_nodes():
            name = op_name(node)
            if not self.lowers(name):
                seen.setdefault(name, [0, node])[0] += 1
        return [Fallback(name, count, where_in_model(node)) for name, (count, node) in seen.items()]

    def unsupported(self, refusals: Iterable[tuple[fx.Node, str]], runs_them: str = "cpu, eager") -> UnsupportedOpError:
        """One error listing each refused op (first occurrence per reason), where it came
        from in the model and why, and the targets that run every op."""
        return unsupported_op_error(self.backend, refusals, runs_them)


def where_in_model(node: fx.Node) -> str:
    """'<module path> (<file:line in fn>)' of a graph node, or the source line alone."""
    where = module_path(node)
    loc = source_location(node)
    return f"{where} ({loc})" if where else loc


def unsupported_op_error(backend: str, refusals: Iterable[tuple[fx.Node, str]],
                         runs_them: str = "cpu, eager") -> UnsupportedOpError:
    """The "unsupported op" error of every backend, built in one place."""
    lines, seen = [], set()
    for node, why in refusals:
        name = op_name(node)
        if (name, why) in seen:
            continue
        seen.add((name, why))
        lines.append(f"  {name}, node {node.name} ({where_in_model(node)}): {why}")
    return UnsupportedOpError(f"the {backend} backend cannot lower these ops:\n" + "\n".join(lines)
                              + f"\ntargets that run every op: {runs_them}; compile for one of them, "
                              "or rewrite the model code at the line shown")


def late_passes(backend, profile: HardwareProfile, options: Any) -> list:
    """The backend's own passes, run after the optimization pipeline (none if it has none)."""
    declared = getattr(backend, "late_passes", None)
    return list(declared(profile, options)) if declared is not None else []


def run_late_passes(backend, program: Program, profile: HardwareProfile, options: Any, *,
                    numeric_check: bool = False, dump_dir: str | os.PathLike | None = None):
    """(program after the backend's late passes, their records with stage "backend"): a copy
    when there are any, so `program` stays portable; `program` itself when there are none."""
    passes = late_passes(backend, profile, options)
    if not passes:
        return program, []
    lowered = program.clone()
    records = PassManager(passes, numeric_check=numeric_check, dump_dir=dump_dir).run(
        lowered, PassContext(profile, options))
    for r in records:
        r.stage = "backend"
    return lowered, records


def lower(backend, program: Program, profile: HardwareProfile, options: Any, *,
          numeric_check: bool = False, dump_dir: str | os.PathLike | None = None):
    """Run the backend's late passes on a copy of program, then lower that copy.

    Returns (executable, records of the late passes, fallbacks). `program` itself stays
    portable (what artifacts keep and other targets export): a backend's late passes
    rewrite into ops only that backend runs fast, so an artifact re-runs them at load.
    """
    lowered, records = run_late_passes(backend, program, profile, options,
                                       numeric_check=numeric_check, dump_dir=dump_dir)
    executable = backend.lower(lowered, profile, options)
    return executable, records, backend.lowering.fallbacks(lowered)


def load(backend, program: Program, profile: HardwareProfile, directory, info: dict[str, Any]):
    """What `lower` gives, rebuilt from an artifact's payload: the late passes run again on a
    copy of the stored (portable) program, then the backend reads its payload."""
    lowered, _ = run_late_passes(backend, program, profile, backend.Options())
    return backend.load_payload(lowered, directory, info)
