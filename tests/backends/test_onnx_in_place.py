"""onnx-cpu against eager PyTorch over several calls in a row: in-place writes to the caller's
inputs, to the model's buffers (its state) and through views (`backends/onnx/_in_place.py`),
and the writes the exporter refuses, naming the op, the node and the line.

`check_against_eager` is shared with the other ONNX soundness tests."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import flashc  # noqa: E402
from flashc.errors import UnsupportedOpError  # noqa: E402

CALLS = 3
LEVELS = [0, 1, 2, 3]


def line_of(cls, text: str) -> str:
    """'<file>:<line>' of the first line of cls's source containing text (what errors cite)."""
    lines, first = inspect.getsourcelines(cls)
    return f"{inspect.getsourcefile(cls)}:{first + next(i for i, line in enumerate(lines) if text in line)}"


def _assert_close(got, ref, what: str, atol: float, rtol: float) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{what}: {got.dtype}{list(got.shape)} " \
                                                              f"vs {ref.dtype}{list(ref.shape)}"
    assert torch.allclose(got.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=True), \
        f"{what}: max difference {(got.double() - ref.double()).abs().max().item():.3g}"


def check_against_eager(module: nn.Module, make_inputs, level: int, buffers: tuple[str, ...] = (),
                        atol: float = 1e-5, rtol: float = 1e-5):
    """Compile a copy of module for onnx-cpu and call it CALLS times next to another copy run
    eagerly, on clones of fresh inputs: outputs, the caller's tensors (written in place) and
    the buffers (the compiled model's own, program.params) must match after every call."""
    eager = copy.deepcopy(module)
    cm = flashc.compile(copy.deepcopy(module), target="onnx-cpu", example_inputs=make_inputs(), level=level)
    for call in range(CALLS):
        inputs = make_inputs()
        mine, theirs = [t.clone() for t in inputs], [t.clone() for t in inputs]
        with torch.no_grad():
            got, ref = cm(*mine), eager(*theirs)
        got_leaves, ref_leaves = pytree.tree_leaves(got), pytree.tree_leaves(ref)
        assert len(got_leaves) == len(ref_leaves)
        for i, (g, r) in enumerate(zip(got_leaves, ref_leaves)):
            _assert_close(g, r, f"O{level} call {call + 1} output {i}", atol, rtol)
        for i, (g, r) in enumerate(zip(mine, theirs)):
            _assert_close(g, r, f"O{level} call {call + 1} input {i} after the call", atol, rtol)
        for name in buffers:
            _assert_close(cm.program.params[f"b_{name}"], getattr(eager, name),
                          f"O{level} call {call + 1} buffer {name}", atol, rtol)
    return cm


# --- in-place writes ---------------------------------------------------------------------------

class CacheInBuffer(nn.Module):
    """The issue's graph: a buffer written by index_copy_, then through slices (add_, copy_)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(4, 4))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, self.proj(x))
        self.cache[2:3].add_(1)
        self.cache[2:3].copy_(self.cache[2:3] * 0.5)
        return self.cache.sum(0)


def _cache_inputs():
    return torch.randn(1, 4), torch.randint(0, 4, (1,))


class StepCounter(nn.Module):
    """A whole buffer written (+= 1) and read after the write."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x * self.count


class WritesInputsThroughViews(nn.Module):
    """The caller's tensor written through select, slice and a transposed view."""

    def forward(self, x, y):
        x[0].mul_(2)
        x[:, 1:3].add_(y[:, :2])
        col = x.t()[0]
        col.masked_fill_(col > 0, -1.0)
        return x.sum(-1), y * 2


class ViewsTakenBeforeWrites(nn.Module):
    """Views taken before a write and read after it see the write (they alias the storage)."""

    def forward(self, x):
        flat, col = x.view(-1), x[:, 0]
        x.add_(1)
        x[1].zero_()
        return flat * 2, col + 0


class LocalScratch(nn.Module):
    """Writes to tensors the graph allocates; a reshape that copies is a copy."""

    def forward(self, x):
        h = x * 2
        h[1:].add_(1)
        h.masked_fill_(h > 1, 0.0)
        y = h.t().reshape(-1)
        y.add_(100)
        return h, y


class InputCache(nn.Module):
    """A whole-tensor write to a user input (a KV cache passed in), read after the write."""

    def forward(self, x, cache, pos):
        cache.index_copy_(1, pos, x)
        return cache.sum(1)


@pytest.mark.parametrize("level", LEVELS)
def test_buffer_written_through_slices_keeps_state_across_calls(level):
    cm = check_against_eager(CacheInBuffer(), _cache_inputs, level, buffers=("cache",))
    assert cm.executable.state_names == ["b_cache"]


@pytest.mark.parametrize("level", LEVELS)
def test_counter_buffer_counts_calls(level):
    check_against_eager(StepCounter(), lambda: (torch.randn(3),), level, buffers=("count",))


@pytest.mark.parametrize("level", LEVELS)
def test_caller_tensor_written_through_views(level):
    check_against_eager(WritesInputsThroughViews(), lambda: (torch.randn(3, 4), torch.randn(3, 4)), level)


@pytest.mark.parametrize("level", LEVELS)
def test_views_taken_before_a_write_see_it(level):
    check_against_eager(ViewsTakenBeforeWrites(), lambda: (torch.randn(3, 4),), level)


@pytest.mark.parametrize("level", LEVELS)
def test_writes_to_local_tensors_and_copies(level):
    check_against_eager(LocalScratch(), lambda: (torch.randn(3, 4),), level)


@pytest.mark.parametrize("level", LEVELS)
def test_input_cache_written_whole(level):
    check_against_eager(InputCache(), lambda: (torch.randn(2, 1, 3), torch.randn(2, 5, 3),
                                               torch.randint(0, 5, (1,))), level)


class CounterPair(StepCounter):
    def forward(self, x):
        return super().forward(x), self.count * 2


def test_state_is_saved_and_loaded_with_the_artifact(tmp_path):
    cm = flashc.compile(CounterPair(), target="onnx-cpu", example_inputs=(torch.randn(3),), level=1)
    x = torch.randn(3)
    cm(x)
    cm(x)
    loaded = flashc.load(cm.save(tmp_path / "counter"))
    assert torch.equal(loaded(x)[0], x * 3) and torch.equal(cm(x)[0], x * 3)
    assert loaded.program.params["b_count"].item() == 3.0 and torch.equal(loaded(x)[1], torch.tensor(8.0))


class ShapeChangedInPlace(nn.Module):
    def forward(self, x):
        y = x * 2
        y.t_()
        return y + 1


class NoFunctionalLowering(nn.Module):
    def forward(self, x):
        y = x * 2
        y.digamma_()
        return y


@pytest.mark.parametrize("module,op,why", [(ShapeChangedInPlace, "aten.t_", "changes the shape"),
                                           (NoFunctionalLowering, "aten.digamma_", "no ONNX lowering")])
def test_writes_it_cannot_carry_are_refused_naming_op_node_and_line(module, op, why):
    text = "t_()" if module is ShapeChangedInPlace else "digamma_"
    with pytest.raises(UnsupportedOpError) as err:
        flashc.compile(module(), target="onnx-cpu", example_inputs=(torch.randn(3, 2),), level=0)
    msg = str(err.value)
    assert op in msg and why in msg and line_of(module, text) in msg and "node " in msg
    assert "cpu (eager)" in msg


class PermuteInPlace(nn.Module):
    """The caller's tensor overwritten by a gather of itself: the new value may not be written
    into its buffer while the gather still reads it."""

    def forward(self, x, perm):
        x.copy_(x.index_select(0, perm))
        return x.sum(0)


def test_a_write_that_reads_its_own_tensor_shuffled():
    cm = check_against_eager(PermuteInPlace(), lambda: (torch.randn(64, 32), torch.randperm(64)), 0)
    assert not cm.executable._runs.shared  # copied back after the run, not written over its input
