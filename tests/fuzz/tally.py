"""Counting outcomes per (family, target, level) and printing them as a table."""

from __future__ import annotations

import collections
import re

from fuzz.harness import OUTCOMES, Outcome
from fuzz.modules import FAMILY_NAMES, Case

TARGETS = ("cpu", "eager", "onnx-cpu", "tvm-cpu")
FAILING = ("mismatch", "crash")


class Tally:
    """Counts of outcomes per (family, target, level), and the failures themselves."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[tuple[Case, str, int, Outcome]] = []
        self.refusals: collections.Counter = collections.Counter()  # (target, message) -> count

    def add(self, case: Case, target: str, level: int, outcome: Outcome) -> None:
        self.counts[case.family, target, level][outcome.status] += 1
        if outcome.status in FAILING:
            self.failures.append((case, target, level, outcome))
        elif outcome.status == "refused":
            self.refusals[target, _without_case(outcome.message)[:160]] += 1

    def table(self) -> str:
        """family x target rows, one ok/refused/mismatch/crash cell per level."""
        levels = sorted({k[2] for k in self.counts})
        targets = [t for t in TARGETS if any(k[1] == t for k in self.counts)]
        head = f"{'family':<20} {'target':<9} " + " ".join(f"{'O' + str(l) + ' ok/ref/MIS/CRASH':>22}"
                                                         for l in levels)
        lines = [head, "-" * len(head)]
        for family in FAMILY_NAMES:
            for target in targets:
                cells = []
                for level in levels:
                    c = self.counts.get((family, target, level))
                    cell = "/".join(str(c[o]) for o in OUTCOMES) if c else "-"
                    flag = " !" if c and (c["mismatch"] or c["crash"]) else "  "
                    cells.append(f"{cell:>20}{flag}")
                if any(cell.strip() != "-" for cell in cells):
                    lines.append(f"{family:<20} {target:<9} " + " ".join(cells))
        total = collections.Counter()
        for c in self.counts.values():
            total.update(c)
        lines.append("total: " + ", ".join(f"{o} {total[o]}" for o in OUTCOMES))
        return "\n".join(lines)

    def failure_list(self) -> str:
        lines = []
        for case, target, level, outcome in self.failures:
            lines.append(f"{case.family:<20} {target:<9} O{level} seed {case.seed:<6} {case.variant[:50]:<50} "
                         f"{outcome.status}: {outcome.message[:400]}")
        return "\n".join(lines)

    def refusal_list(self, n: int = 20) -> str:
        """The most common refusals: allowed, but what a user of that target cannot compile."""
        return "\n".join(f"{count:>4}  {target:<9} {message}" for (target, message), count in self.refusals.most_common(n))


def _without_case(message: str) -> str:
    """A message with the case's source line and node names taken out, so that equal reasons count together."""
    return re.sub(r"\bnode \w+", "node", re.sub(r"<fuzz [^>]*>:\d+ in \w+", "<case>", message))
