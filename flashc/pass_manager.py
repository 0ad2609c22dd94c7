"""The pass manager: runs a visible list of passes over a Program.

After each pass it verifies the graph (lint, shape/dtype propagation, unchanged output
signature), optionally compares the new graph's outputs with the previous graph's on
fresh random inputs, records time and stats, and dumps the IR before and after each
pass when `FLASHC_DUMP=dir` (or `dump_dir`) is set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flashc.aliasing import check_writes_kept, write_signature
from flashc.errors import VerificationError
from flashc.ir import Program, output_signature, propagate_shapes, verify
from flashc.profiles import HardwareProfile


@dataclass
class PassResult:
    """What one pass did: whether the graph changed and counts worth reporting."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read: the hardware profile and compile options."""

    profile: HardwareProfile
    options: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    """A graph pass. `requires`/`preserves` name IR properties (e.g. 'canonical')."""

    name: str
    requires: tuple[str, ...]
    preserves: tuple[str, ...]

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


class PassManager:
    """Runs passes in order with verification, optional numeric checks, timing and dumps."""

    def __init__(self, passes: list[Pass], verify: bool | str = True, numeric_check: bool = False,
                 dump_dir: str | os.PathLike | None = None) -> None:
        """verify: "end" (or True) checks the graph's structure after every changed pass and its
        shapes and output signature once at the end, replaying the pipeline with full checks
        after each pass to name the culprit if that fails; "each" propagates shapes after every
        changed pass (FLASHC_VERIFY=each); False checks nothing."""
        self.passes = list(passes)
        if verify is True:
            verify = os.environ.get("FLASHC_VERIFY", "end")
        if verify not in (False, "end", "each"):
            raise ValueError(f"verify must be 'end', 'each' or False, got {verify!r}")
        self.verify = verify
        self.numeric_check = numeric_check
        dump_dir = dump_dir or os.environ.get("FLASHC_DUMP")
        self.dump_dir = Path(dump_dir) if dump_dir else None

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
        expected = output_signature(program)
        writes = write_signature(program.graph)
        checker = NumericCheck(program) if self.numeric_check else None
        for index, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in held]
            if "shapes" in missing:
                propagate_shapes(program)
                missing.remove("shapes")
            if missing:
                raise VerificationError(f"pass {p.name} requires {missing}, which no earlier pass established; "
                                        "fix the pipeline order")
            self._dump(program, index, p.name, "before")
            nodes_before = len(program.graph.nodes)
            start = time.perf_counter()
            result = p.run(program, ctx)
            if result.changed:
                program.recompile()
            seconds = time.perf_counter() - start
            establishes = set(getattr(p, "establishes", ()))
            if not result.changed:  # a pass that changed nothing leaves every property as it was
                held |= establishes
            else:
                held = (held & set(p.preserves)) | establishes
                if self.verify == "each":
                    verify(program, expected, where=f"after pass {p.name}")
                    held.add("shapes")
                elif self.verify == "end":
                    verify(program, None, where=f"after pass {p.name}", shapes=False)
                if self.verify:
                    after = write_signature(program.graph)
                    check_writes_kept(writes, after, f"after pass {p.name}")
                    writes = after
            record = PassRecord(p.name, result.changed, dict(result.stats), seconds,
                                nodes_before, len(program.graph.nodes))
            if checker is not None and result.changed:
                if getattr(p, "changes_numerics", False):  # measured by accuracy, not checked
                    checker.rebase(program)
                else:
                    record.max_error = checker.check(program, f"pass {p.name}")
            self._dump(program, index, p.name, "after")
            records.append(record)
        program.recompile()  # cheap once; guards against a pass that changed the graph but said it did not
        if self.verify == "end":
            verify(program, expected, where="after the pass pipeline")
        return records

    def _dump(self, program: Program, index: int, name: str, when: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{index:02d}_{name}_{when}.py").write_text(program.graph_module.code)


class NumericCheck:
    """Compares each changed graph with the captured one on the same random inputs, over
    several calls, on private copies of inputs and state (see flashc.checking)."""

    calls = 3

    def __init__(self, program: Program, seed: int = 0) -> None:
        from flashc.checking import random_calls, run_program

        self.inputs = random_calls(program, self.calls, seed)
        self.reference = run_program(program, self.inputs)

    def rebase(self, program: Program) -> None:
        """Compare later passes with this graph (after a pass that changes numerics on purpose)."""
        from flashc.checking import run_program

        self.reference = run_program(program, self.inputs)

    def check(self, program: Program, where: str) -> float:
        from flashc.checking import compare, run_program

        error, why = compare(self.reference, run_program(program, self.inputs))
        if why is not None:
            raise VerificationError(f"{where} changed what the model computes: {why}")
        return error
