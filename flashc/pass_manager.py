"""The pass manager: runs a visible list of passes over a Program, with instruments.

The loop itself only runs passes in order and tracks the IR properties they need and keep
(`requires`, `preserves`, `establishes`). Everything else is an instrument handed to it, as
TVM's PassInstrument is: each sees the program before and after every pass.

    StructureCheck  the graph's structure after every changed pass, its shapes and output
                    signature at the end (or after every pass), and that every write to an
                    input or the model's state is kept (flashc.aliasing)
    NumericCheck    the new graph's outputs against the captured graph's on fresh random
                    inputs, over several calls (flashc.checking)
    IRDump          the IR before and after each pass, one file each, into a folder
    Timing          seconds per pass, in its record

`PassManager(passes, verify=..., numeric_check=..., dump_dir=...)` builds the usual set;
FLASHC_VERIFY=each|end and FLASHC_DUMP=dir switch them from the environment (README).
What every pass must keep true is written down in passes/README.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flashc.aliasing import check_writes_kept, output_storage_groups, separate_outputs, write_signature
from flashc.errors import VerificationError
from flashc.ir import Program, output_signature, propagate_shapes, verify
from flashc.profiles import HardwareProfile


@dataclass
class PassResult:
    """What one pass did: whether the graph changed and counts worth reporting."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    details: list[dict] = field(default_factory=list)  # per-item rows, e.g. each quantized layer


@dataclass
class PassContext:
    """What passes may read: the hardware profile and the target's compile options (its
    backend's options dataclass, see flashc.options)."""

    profile: HardwareProfile
    options: Any = None


class Pass(Protocol):
    """A graph pass. `requires` names IR properties it needs, `preserves` those it keeps
    when it changes the graph, `establishes` those it makes true (e.g. 'canonical',
    'shapes'); passes/README.md lists the properties and what every pass keeps."""

    name: str
    requires: tuple[str, ...]
    preserves: tuple[str, ...]
    establishes: tuple[str, ...]

    def run(self, program: Program, ctx: PassContext) -> PassResult: ...


@dataclass
class PassRecord:
    """One pass's entry in the compile report."""

    name: str
    changed: bool
    stats: dict[str, int]
    seconds: float
    nodes_before: int
    nodes_after: int
    max_error: float | None = None
    stage: str = "pipeline"  # or "backend": a backend's late pass (flashc.lowering)
    details: list[dict] | None = None  # PassResult.details (JSON values), when the pass gave any


class Instrument:
    """Something that watches the passes run; every hook does nothing unless overridden."""

    def enter(self, program: Program) -> None:
        """Before the first pass."""

    def before(self, index: int, p: Pass, program: Program) -> None:
        """Before pass `p` (the index-th) runs."""

    def after(self, index: int, p: Pass, program: Program, result: PassResult, record: PassRecord) -> None:
        """After `p` ran; may fill in `record` or raise VerificationError."""

    def exit(self, program: Program) -> None:
        """After the last pass."""


class StructureCheck(Instrument):
    """mode "end": the graph's structure (lint) after every changed pass, its shapes and
    output signature once at the end; "each": shapes and output signature after every
    changed pass too. Both: every write to an input or to the model's state is kept."""

    def __init__(self, mode: str = "end") -> None:
        if mode not in ("end", "each"):
            raise ValueError(f"verify must be 'end', 'each' or False, got {mode!r}")
        self.mode = mode

    def enter(self, program: Program) -> None:
        self.expected = output_signature(program)
        self.writes = write_signature(program.graph)

    def after(self, index, p, program, result, record) -> None:
        if not result.changed:
            return
        where = f"after pass {p.name}"
        if self.mode == "each":
            verify(program, self.expected, where=where)
        else:
            verify(program, None, where=where, shapes=False)
        writes = write_signature(program.graph)
        check_writes_kept(self.writes, writes, where)
        self.writes = writes

    def exit(self, program: Program) -> None:
        if self.mode == "end":
            verify(program, self.expected, where="after the pass pipeline")


class NumericCheck(Instrument):
    """Compares each changed graph with the captured one on the same random inputs, over
    several calls, on private copies of inputs and state (see flashc.checking). A pass that
    changes numerics on purpose (`changes_numerics = True`, e.g. quantization) is measured by
    accuracy instead; later passes are compared with its output."""

    calls = 3

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def enter(self, program: Program) -> None:
        from flashc.checking import random_calls, run_program

        self.inputs = random_calls(program, self.calls, self.seed)
        self.reference = run_program(program, self.inputs)

    def after(self, index, p, program, result, record) -> None:
        from flashc.checking import compare, run_program

        if not result.changed:
            return
        if getattr(p, "changes_numerics", False):
            self.reference = run_program(program, self.inputs)
            return
        error, why = compare(self.reference, run_program(program, self.inputs))
        if why is not None:
            raise VerificationError(f"pass {p.name} changed what the model computes: {why}")
        record.max_error = error


class IRDump(Instrument):
    """The IR before and after each pass, as Python, in `directory` (NN_<pass>_before.py, ..._after.py)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def _write(self, program: Program, index: int, name: str, when: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{index:02d}_{name}_{when}.py").write_text(program.graph_module.code)

    def before(self, index, p, program) -> None:
        self._write(program, index, p.name, "before")

    def after(self, index, p, program, result, record) -> None:
        self._write(program, index, p.name, "after")


class Timing(Instrument):
    """Seconds each pass took (its run and recompile), in its record."""

    def before(self, index, p, program) -> None:
        self.start = time.perf_counter()

    def after(self, index, p, program, result, record) -> None:
        record.seconds = time.perf_counter() - self.start


class PassManager:
    """Runs passes in order, tracking the IR properties they need, under instruments."""

    def __init__(self, passes: list[Pass], verify: bool | str = True, numeric_check: bool = False,
                 dump_dir: str | os.PathLike | None = None, instruments: list[Instrument] | None = None) -> None:
        """verify: "end" (or True) checks the graph's structure after every changed pass and its
        shapes and output signature once at the end, replaying the pipeline with full checks
        after each pass to name the culprit if that fails; "each" propagates shapes after every
        changed pass (FLASHC_VERIFY=each); False checks nothing. numeric_check adds a
        NumericCheck, dump_dir (or FLASHC_DUMP) an IRDump; `instruments` are added after those."""
        self.passes = list(passes)
        if verify is True:
            verify = os.environ.get("FLASHC_VERIFY", "end")
        self.verify = verify
        self.instruments: list[Instrument] = [Timing()]
        if verify is not False:
            self.instruments.append(StructureCheck(verify))
        if numeric_check:
            self.instruments.append(NumericCheck())
        dump_dir = dump_dir or os.environ.get("FLASHC_DUMP")
        if dump_dir:
            self.instruments.append(IRDump(dump_dir))
        self.instruments += list(instruments or [])
        self.numeric_check = numeric_check

    def run(self, program: Program, ctx: PassContext) -> list[PassRecord]:
        original = program.clone() if self.verify == "end" else None
        try:
            return self._run(program, ctx)
        except VerificationError:
            if original is not None:  # find the pass that broke the graph: replay with full checks
                PassManager(self.passes, verify="each", numeric_check=self.numeric_check)._run(original, ctx)
            raise

    def _run(self, program: Program, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        held: set[str] = {"shapes"}
        if any(n.meta.get("val") is None and n.users for n in program.op_nodes()):  # capture sets them
            propagate_shapes(program)
        for instrument in self.instruments:
            instrument.enter(program)
        storage_groups = output_storage_groups(program.graph)
        for index, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in held]
            if "shapes" in missing:
                propagate_shapes(program)
                missing.remove("shapes")
            if missing:
                raise VerificationError(f"pass {p.name} requires {missing}, which no earlier pass established; "
                                        "fix the pipeline order")
            for instrument in reversed(self.instruments):  # nested: Timing, first, sees only the pass
                instrument.before(index, p, program)
            nodes_before = len(program.graph.nodes)
            result = p.run(program, ctx)
            if result.changed:
                program.recompile()
            establishes = set(getattr(p, "establishes", ()))
            if not result.changed:  # a pass that changed nothing leaves every property as it was
                held |= establishes
            else:
                held = (held & set(p.preserves)) | establishes
                if isinstance(self.verify, str) and self.verify == "each":
                    held.add("shapes")  # StructureCheck("each") propagated them
            record = PassRecord(p.name, result.changed, dict(result.stats), 0.0, nodes_before,
                                len(program.graph.nodes), details=[dict(d) for d in result.details] or None)
            for instrument in self.instruments:
                instrument.after(index, p, program, result, record)
            records.append(record)
        separate_outputs(program.graph, storage_groups)  # outputs that passes made share storage get copies
        program.recompile()  # cheap once; guards against a pass that changed the graph but said it did not
        for instrument in self.instruments:
            instrument.exit(program)
        return records
