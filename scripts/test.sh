#!/usr/bin/env bash
# Set up, then run the test suite (CPU; GPU tests skip without CUDA).
# On two or more cores the tests run in worker processes (pytest-xdist, up to 4: each holds PyTorch and a
# model or two), a test file's tests in one worker (their module-scoped fixtures built once), each worker on one
# PyTorch thread so the workers do not oversubscribe the cores. FLASHC_TEST_WORKERS=1 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
workers=${FLASHC_TEST_WORKERS:-$(.venv/bin/python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadscope "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
