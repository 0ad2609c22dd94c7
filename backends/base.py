"""What a backend is: it lowers an optimized Program for one target.

A backend lists the ops it lowers itself; every other op runs its reference
implementation (PyTorch), and the compile report names those ops and where they
came from in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from flashc.ir import Program, module_path, op_name, source_location
from flashc.profiles import HardwareProfile

Executable = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class Fallback:
    """An op the backend did not lower: it runs its PyTorch reference implementation."""

    op: str
    count: int
    where: str  # first module path and source line


class Backend(Protocol):
    name: str

    def lowers(self, op: str) -> bool:
        """Whether the backend generates code for op (e.g. 'flashc.rms_norm')."""

    def lower(self, program: Program, profile: HardwareProfile, options: dict[str, Any]) -> Executable: ...

    def save_payload(self, executable: Executable, directory: Path) -> dict[str, Any]: ...

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]) -> Executable: ...


def fallbacks(program: Program, backend: Backend) -> list[Fallback]:
    """Ops of program that backend leaves to the reference implementation, by op."""
    seen: dict[str, list] = {}
    for node in program.op_nodes():
        name = op_name(node)
        if backend.lowers(name):
            continue
        entry = seen.setdefault(name, [0, node])
        entry[0] += 1
    out = []
    for name, (count, node) in seen.items():
        where = module_path(node)
        loc = source_location(node)
        out.append(Fallback(name, count, f"{where} ({loc})" if where else loc))
    return out
