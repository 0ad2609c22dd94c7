"""The eager backend: the optimized graph run by PyTorch, flashc ops by their references.

It is the numeric reference for every other backend and the `cpu` target. ATen and
flashc ops are its own; ops of other libraries captured in the graph (e.g. a custom
op of transformers) are reported as fallbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashc.ir import Program
from flashc.profiles import HardwareProfile


class EagerBackend:
    name = "eager"

    def lowers(self, op: str) -> bool:
        return op.startswith(("aten.", "flashc.")) or op == "getitem"

    def lower(self, program: Program, profile: HardwareProfile, options: dict[str, Any]):
        return program.run_flat

    def save_payload(self, executable, directory: Path) -> dict[str, Any]:
        return {}

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]):
        return program.run_flat
