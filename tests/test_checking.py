"""Sound numeric checks: private copies of state and inputs, several calls, inf/NaN-aware."""

import math

import pytest
import torch

from flashc.capture import capture
from flashc.checking import compare, random_calls, run_executable, run_program, tensor_difference


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x):
        x.mul_(2)
        self.total.add_(x)
        return self.total * 1.0


def test_runs_leave_state_and_inputs_untouched_and_carry_state_across_calls():
    model = Counter()
    program = capture(model, (torch.randn(3),))
    calls = random_calls(program, 3, seed=1)
    originals = [a[0].clone() for a in calls]
    trace = run_program(program, calls)
    assert torch.equal(model.total, torch.zeros(3)) and torch.equal(program.params["b_total"], torch.zeros(3))
    assert all(torch.equal(a[0], o) for a, o in zip(calls, originals))  # the caller's tensors
    running = torch.zeros(3)
    for (x,), out, written in zip(calls, trace.outputs, trace.written_inputs):
        running = running + 2 * x
        assert torch.allclose(out[0], running) and torch.allclose(written[0], 2 * x)


def test_executable_state_is_restored():
    program = capture(Counter(), (torch.randn(3),))
    calls = random_calls(program, 2)
    ref = run_program(program, calls)
    got = run_executable(program.run_flat, program, calls)
    assert compare(ref, got) == (0.0, None)
    assert torch.equal(program.params["b_total"], torch.zeros(3))


@pytest.mark.parametrize("ref,got,ok", [
    ([1.0, math.inf, -math.inf, math.nan], [1.0, math.inf, -math.inf, math.nan], True),
    ([1.0, math.inf], [1.0, -math.inf], False),       # sign of infinity
    ([1.0, math.nan], [1.0, 0.0], False),
    ([1.0, 2.0], [1.0, 2.0 + 1e-7], True),
    ([1.0, 2.0], [1.0, 2.1], False),
])
def test_tensor_difference_is_inf_and_nan_aware(ref, got, ok):
    _, why = tensor_difference(torch.tensor(got), torch.tensor(ref))
    assert (why is None) == ok


def test_dtype_or_shape_change_is_a_difference():
    assert tensor_difference(torch.ones(3, dtype=torch.float16), torch.ones(3))[1] is not None
    assert tensor_difference(torch.ones(2), torch.ones(3))[1] is not None
