"""Long differential-testing runs: generated modules against flashc, until a time budget is spent.

    python tests/fuzz/run.py --seconds 600 --targets cpu,onnx-cpu      # fuzz, print the table
    python tests/fuzz/run.py --replay 1234 --targets onnx-cpu --levels 2  # one seed again, verbosely
    python tests/fuzz/run.py --replay /tmp/flashc-fuzz/kv_cache-1234.py   # a written case

Seeds run in order from --seed; each seed's case is compiled for every target and level,
in a child process (worker.py: a segfault or a hang is one crash). --replay runs in this
process, so a debugger or a traceback reaches the failing code.
Every failing case (mismatch or crash) is written to --out as a standalone source file
whose header records the seed, family and the failures, for --replay.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, so `fuzz` imports

from fuzz.harness import Outcome, check  # noqa: E402
from fuzz.modules import FAMILY_NAMES, Case, family_of, generate  # noqa: E402
from fuzz.tally import FAILING, TARGETS, Tally  # noqa: E402
from fuzz.worker import Worker  # noqa: E402


def write_case(out: Path, case: Case, failures: list[tuple[str, int, Outcome]]) -> Path:
    """The case as a standalone source file, its header naming the seed and the failures."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{case.family}-{case.seed}.py"
    header = [f"# flashc differential fuzz case: seed {case.seed}", f"# family: {case.family}",
              f"# variant: {case.variant}", "# replay: python tests/fuzz/run.py --replay " + str(path)]
    for target, level, outcome in failures:
        header.append(f"# FAIL target {target} level {level}: {outcome.status}: "
                      + " ".join(outcome.message.splitlines())[:1000])
    path.write_text("\n".join(header) + "\n\n" + case.source)
    return path


def read_case(path: Path) -> Case:
    text = path.read_text()
    seed = int(re.search(r"^# flashc differential fuzz case: seed (-?\d+)", text, re.M).group(1))
    family = re.search(r"^# family: (\S+)", text, re.M).group(1)
    variant = re.search(r"^# variant: (.*)$", text, re.M).group(1)
    return Case(family, seed, variant, text)


def replay(spec: str, targets: list[str], levels: list[int]) -> int:
    case = read_case(Path(spec)) if os.path.exists(spec) else generate(int(spec))
    print(f"seed {case.seed}, family {case.family}, variant {case.variant}\n")
    print(case.source)
    failed = 0
    for target in targets:
        for level in levels:
            outcome = check(case, target, level)
            failed += outcome.status in FAILING
            print(f"{target:<9} O{level}: {outcome}")
    return 1 if failed else 0


def fuzz(args) -> int:
    tally = Tally()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    worker = Worker(timeout=args.timeout, stderr=os.path.join(args.out, "backend-stderr.log"))
    deadline = time.monotonic() + args.seconds
    families = set(args.families.split(",")) if args.families else set(FAMILY_NAMES)
    seed, cases = args.seed, 0
    while time.monotonic() < deadline and (args.cases is None or cases < args.cases):
        if family_of(seed) in families:
            case = generate(seed)
            failures = []
            for target in args.targets:
                for level in args.levels:
                    outcome = worker.check(case, target, level)
                    tally.add(case, target, level, outcome)
                    if outcome.status in FAILING:
                        failures.append((target, level, outcome))
            if failures:
                write_case(Path(args.out), case, failures)
            cases += 1
            if args.verbose:
                print(f"seed {seed} {case.family} {case.variant}: "
                      f"{'; '.join(f'{t} O{l} {o.status}' for t, l, o in failures) or 'ok'}", flush=True)
        seed += 1
    worker.close()
    print(f"\n{cases} cases (seeds {args.seed}..{seed - 1}), targets {','.join(args.targets)}, "
          f"levels {','.join(map(str, args.levels))}\n")
    print(tally.table())
    if tally.refusals:
        print("\nmost common refusals (allowed):")
        print(tally.refusal_list())
    print(f"\nthe backends' own warnings: {args.out}/backend-stderr.log")
    if tally.failures:
        print(f"\nfailures (written to {args.out}/<family>-<seed>.py):")
        print(tally.failure_list())
    return 1 if tally.failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300, help="time budget (default 300)")
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--targets", default="cpu,onnx-cpu", help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--levels", default="0,1,2,3")
    p.add_argument("--families", default="", help=f"comma-separated subset of: {', '.join(FAMILY_NAMES)}")
    p.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashc-fuzz"),
                   help="where failing cases are written")
    p.add_argument("--timeout", type=float, default=180, help="seconds one check may take (default 180)")
    p.add_argument("--replay", metavar="SEED|FILE", help="run one case (a seed or a written case file) verbosely")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.levels = [int(l) for l in args.levels.split(",") if l]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; use {', '.join(TARGETS)}")
    if args.families and not set(args.families.split(",")) <= set(FAMILY_NAMES):
        p.error(f"unknown family in {args.families}; use {', '.join(FAMILY_NAMES)}")
    if args.replay is not None:
        return replay(args.replay, args.targets, args.levels)
    return fuzz(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
