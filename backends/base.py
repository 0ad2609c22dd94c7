"""What a backend is: everything it declares, in one place.

    name         the backend's name ('cuda', 'onnx', 'tvm-cpu', ...)
    Options      a frozen dataclass of the compile options it reads (flashc.options parses
                 a user's dict into it: an unknown key or a wrong type is an error)
    lowering     a flashc.lowering.LoweringTable: which ops it lowers and with what; every
                 other op runs its PyTorch reference (reported as a fallback) or is refused
    late_passes  (optional) passes of its own, run by the PassManager after the pipeline
                 on the backend's copy of the program (verified, dumped, reported)
    lower, save_payload, load_payload
                 build what runs, and write / read it in an artifact's payload/ folder

`flashc.lowering.lower` is the one path from an optimized program to an executable that
`flashc.compile`, `flashc.load` and `flashc export` all take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from flashc.ir import Program
from flashc.lowering import Executable, LoweringTable
from flashc.profiles import HardwareProfile


class Backend(Protocol):
    name: str
    Options: type
    lowering: LoweringTable

    def lower(self, program: Program, profile: HardwareProfile, options: Any) -> Executable: ...

    def save_payload(self, executable: Executable, directory: Path) -> dict[str, Any]: ...

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]) -> Executable: ...
