"""Fixtures of the differential tests, and their outcome table printed at the end."""

import pytest

from fuzz.tally import Tally

_TALLY = Tally()


@pytest.fixture
def fuzz_tally() -> Tally:
    return _TALLY


@pytest.fixture(scope="session")
def fuzz_worker():
    from fuzz.worker import Worker

    worker = Worker(timeout=180)
    yield worker
    worker.close()


def pytest_terminal_summary(terminalreporter):
    if _TALLY.counts:
        terminalreporter.write_sep("=", "differential fuzz outcomes (ok/refused/mismatch/crash)")
        terminalreporter.write_line(_TALLY.table())
