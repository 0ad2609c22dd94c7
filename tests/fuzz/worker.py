"""Checks run in a child process, so that a backend that segfaults or hangs costs one
"crash" outcome instead of the whole run (TVM warns that its fast gather mode segfaults
on out-of-bounds indices). The child is started with spawn, so no OpenMP or runtime
thread state is inherited through fork, and restarted after it dies or is killed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

from fuzz.harness import Outcome
from fuzz.modules import Case


class Worker:
    """Runs harness.check(case, target, level) in a child process, one at a time."""

    def __init__(self, timeout: float = 180.0, stderr: str | None = None) -> None:
        self.timeout = timeout
        self.stderr = stderr  # a file for the child's stderr (TVM logs warnings there in C++)
        self._process = None
        self._conn = None

    def check(self, case: Case, target: str, level: int) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._start()
        self._conn.send((case.family, case.seed, case.variant, case.source, target, level))
        if not self._conn.poll(self.timeout):
            self._stop(wait=0)
            return Outcome("crash", f"no result after {self.timeout:.0f} s: the check was killed")
        try:
            status, message = self._conn.recv()
            return Outcome(status, message)
        except EOFError:
            self._process.join(5)
            code = self._process.exitcode
            self._stop(wait=0)
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            return Outcome("crash", f"the process running the check died ({how})")

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, self.stderr), daemon=True)
        self._process.start()
        child.close()

    def close(self) -> None:
        """Let the child finish (it exits when the pipe closes); kill it if it does not."""
        self._stop(wait=10)

    def _stop(self, wait: float) -> None:
        if self._process is not None:
            self._conn.close()
            self._process.join(wait)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._process = self._conn = None


def _serve(conn, stderr: str | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if stderr:
        with open(stderr, "a") as f:
            os.dup2(f.fileno(), 2)
    from fuzz.harness import check

    while True:
        try:
            family, seed, variant, source, target, level = conn.recv()
        except EOFError:
            return
        outcome = check(Case(family, seed, variant, source), target, level)
        conn.send((outcome.status, outcome.message))
