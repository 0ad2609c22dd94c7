"""Soundness: flashc never gives a silently wrong answer on the generated modules.

A fixed seed and a small budget (the whole file runs in about three minutes on two CPU
cores): every family, two cases on cpu and onnx-cpu at every level, one case on eager
(the cpu backend today) and on tvm-cpu (slow builds) at -O0 and -O3. A test id is family-target-level, so each failing combination shows on
its own; the failure message names the seeds, the outcome and how to replay. Refusing
(a FlashcError) passes; a mismatch or any other exception fails. Checks run in a child
process (worker.py), so a backend that segfaults fails its own test only. The table of all
outcomes is printed at the end of the run (tests/fuzz/conftest.py).

Longer runs: `python tests/fuzz/run.py --seconds 600 --targets cpu,onnx-cpu`.
"""

import importlib.util

import pytest

from fuzz.modules import FAMILY_NAMES, case_seeds, generate
from fuzz.tally import FAILING

CI_SEED = 1000
# (target, levels, cases per family and level)
PLAN = [
    ("cpu", (0, 1, 2, 3), 2),
    ("eager", (0, 3), 1),  # the same backend as cpu today; kept apart so the two can diverge
    ("onnx-cpu", (0, 1, 2, 3), 2),
    ("tvm-cpu", (0, 3), 1),
]
NEEDS = {"onnx-cpu": "onnxruntime", "tvm-cpu": "tvm"}

PARAMS = [pytest.param(family, target, level, count, id=f"{family}-{target}-O{level}")
          for target, levels, count in PLAN for level in levels for family in FAMILY_NAMES]


@pytest.mark.parametrize("family,target,level,count", PARAMS)
def test_no_silent_wrong_answer(family, target, level, count, fuzz_tally, fuzz_worker):
    if target in NEEDS and importlib.util.find_spec(NEEDS[target]) is None:
        pytest.skip(f"{target} needs {NEEDS[target]}")
    failures = []
    for seed in case_seeds(family, count, CI_SEED):
        case = generate(seed)
        outcome = fuzz_worker.check(case, target, level)
        fuzz_tally.add(case, target, level, outcome)
        if outcome.status in FAILING:
            failures.append(f"seed {seed} ({case.variant}): {outcome}\n  replay: python tests/fuzz/run.py "
                            f"--replay {seed} --targets {target} --levels {level}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
