"""Mutation and aliasing facts: storage roots through views, writes, and their positions."""

import torch

from flashc.aliasing import MutationInfo, aliased_outputs, check_writes_kept, write_signature, written_placeholders
from flashc.capture import capture
from flashc.errors import VerificationError


class CacheWrite(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 8), persistent=False)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x, pos):
        before = self.cache.sum(0)
        self.cache.index_copy_(0, pos, x)
        self.cache[2:3] += 1
        return before + self.cache.sum(0) * self.scale, self.cache[1]


def _program():
    return capture(CacheWrite(), (torch.randn(1, 8), torch.tensor([1])))


def _node(program, name):
    return next(n for n in program.graph.nodes if n.name == name)


def test_views_and_writes_resolve_to_the_buffer():
    program = _program()
    info = MutationInfo.of(program.graph)
    cache = _node(program, "b_cache")
    writes = info.writes[cache]
    assert [w.target for w in writes] == [torch.ops.aten.index_copy_.default, torch.ops.aten.add_.Tensor,
                                         torch.ops.aten.copy_.default]
    slices = [n for n in program.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert slices and all(info.root_of(s) is cache for s in slices)
    assert info.is_written(cache) and not info.is_written(_node(program, "b_scale"))
    assert [n.name for n in written_placeholders(program.graph)] == ["b_cache"]
    assert write_signature(program.graph) == ["b_cache"] * 3


def test_written_between_sees_writes_by_position():
    program = _program()
    info = MutationInfo.of(program.graph)
    sums = [n for n in program.graph.nodes if n.target == torch.ops.aten.sum.dim_IntList]
    first, second = sums[0], sums[1]
    # the first sum reads the buffer before the writes, the second after all of them
    assert info.written_between(first.args[0], first, second)
    assert not info.written_between(second.args[0], second, program.graph.output_node())


def test_outputs_holding_state_are_reported():
    program = _program()
    # output 1 is a view of the cache buffer; output 0 is a fresh sum
    assert aliased_outputs(program.graph) == [1]


def test_dropped_write_is_caught():
    with_write = ["b_cache", "b_cache"]
    check_writes_kept(with_write, ["b_cache", "b_cache", "local"], "here")
    try:
        check_writes_kept(with_write, ["b_cache"], "after pass x")
    except VerificationError as e:
        assert "after pass x" in str(e)
    else:
        raise AssertionError("a dropped write was not reported")


def test_capture_gives_the_program_its_own_state():
    model = CacheWrite()
    program = capture(model, (torch.randn(1, 8), torch.tensor([1])))
    assert program.params["b_cache"].data_ptr() != model.cache.data_ptr()  # written: copied
    assert program.params["b_scale"].data_ptr() == model.scale.data_ptr()  # only read: shared


class _Outputs(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return x * 2, x * 2, y, y, y * 1, (x * 2).view(-1)  # equal values, one tensor returned twice


def test_outputs_passes_made_one_tensor_are_copies_again():
    """CSE merges equal values and cleanup drops `* 1`: the caller must still get a tensor of its
    own wherever the model returned one (writing into it changes nothing else), and one tensor
    where the model returned the same one twice."""
    import flashc
    from flashc.aliasing import output_storage_groups

    model = _Outputs()
    assert output_storage_groups(capture(model, (torch.randn(3, 4),)).graph) == [0, 1, 2, 2, 4, 5]
    for level in (0, 1, 3):
        cm = flashc.compile(model, target="cpu", example_inputs=(torch.randn(3, 4),), level=level)
        x = torch.randn(3, 4)
        got, want = cm(x), model(x)
        storages = [t.untyped_storage().data_ptr() for t in got]
        assert len(set(storages)) == 5 and storages[2] == storages[3], level
        got[0].fill_(7.0)
        got[2].fill_(5.0)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, torch.full_like(w, 7.0) if i == 0 else torch.full_like(w, 5.0) if i in (2, 3)
                               else w), (level, i)
