"""flashc.codegen.cuda_graphs: every CUDA graph flashc captures owns its cuBLAS workspace.

The capture itself needs a GPU; on the CPU a stand-in for ``torch.cuda.graph`` records the
order of events, which is what the fix of issue "Soundness" is about: PyTorch's cached
cuBLAS workspaces are dropped before the capture begins (so the capture allocates its own, in
the graph's private pool) and after it ends (so no later work shares it).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from flashc.codegen import cuda_graphs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def events(monkeypatch):
    log: list[str] = []

    @contextlib.contextmanager
    def fake_graph(graph, stream=None):
        log.append("capture_begin")
        yield
        log.append("capture_end")

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: log.append("clear"), raising=False)
    return log


def test_workspaces_are_dropped_before_and_after_the_capture(events):
    with cuda_graphs.capture(object()):
        events.append("captured work")
    assert events == ["clear", "capture_begin", "captured work", "capture_end", "clear"]


def test_workspaces_are_dropped_after_a_capture_that_raised(events):
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with cuda_graphs.capture(object()):
            raise RuntimeError("op cannot be captured")
    assert events == ["clear", "capture_begin", "clear"]


def test_without_cuda_support_dropping_workspaces_is_a_no_op(monkeypatch):
    monkeypatch.delattr(torch._C, "_cuda_clearCublasWorkspaces", raising=False)
    cuda_graphs.release_library_workspaces()  # CPU-only builds of torch have no cuBLAS


@pytest.mark.parametrize("path", ["codegen", "backends/cuda.py"])
def test_every_capture_goes_through_the_owning_helper(path):
    sources = [ROOT / path] if path.endswith(".py") else sorted((ROOT / path).glob("*.py"))
    direct = [f"{p.relative_to(ROOT)}:{i + 1}" for p in sources if p.name != "cuda_graphs.py"
              for i, line in enumerate(p.read_text().splitlines()) if re.search(r"torch\.cuda\.graph\(", line)]
    assert direct == []
    assert sum(p.read_text().count("with capture(") for p in sources) == 1  # tuning's bench; the step's
