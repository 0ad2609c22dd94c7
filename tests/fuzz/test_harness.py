"""The oracle itself: it must see each kind of silent difference it claims to, and the
generator must produce modules that run eagerly and are the same for the same seed."""

import copy

import pytest
import torch

from flashc.errors import CaptureError
from fuzz.harness import Mismatch, check, compare_tensor
from fuzz.modules import FAMILY_NAMES, Case, case_seeds, family_of, generate

SOURCE = '''import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x):
        self.total.add_(x[0])
        x[1] = 0.0
        return x * 2, x * 2, self.total * 1


def make_inputs(g):
    return (torch.randn(2, 3, generator=g),)
'''
CASE = Case("custom", 7, "buffer and input written", SOURCE)


def eager_copy_compile(run):
    """A stand-in for flashc.compile whose result calls run(its own copy of the model, args)."""
    def compile_fn(model, target, example_inputs, level):
        own = copy.deepcopy(model)
        return lambda *args: run(own, args)
    return compile_fn


def test_compare_tensor_checks_nan_and_inf_positions_and_tolerance():
    want = torch.tensor([float("nan"), float("inf"), 1.0])
    compare_tensor(torch.tensor([float("nan"), float("inf"), 1.00005]), want, "close")
    for got in ([float("nan"), float("-inf"), 1.0], [0.0, float("inf"), 1.0], [float("nan"), float("inf"), 1.001]):
        with pytest.raises(Mismatch):
            compare_tensor(torch.tensor(got), want, "different")
    with pytest.raises(Mismatch, match="int32"):
        compare_tensor(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2]), "dtype")
    with pytest.raises(Mismatch, match="1/2 elements differ"):
        compare_tensor(torch.tensor([1, 3]), torch.tensor([1, 2]), "ints")


def test_a_faithful_compile_is_ok():
    def run(model, args):
        return model(*args)
    assert check(CASE, "cpu", 0, eager_copy_compile(run)).status == "ok"


def test_a_lost_write_to_the_callers_input_is_a_mismatch():
    def run(model, args):
        return model(*[a.clone() for a in args])
    outcome = check(CASE, "cpu", 0, eager_copy_compile(run))
    assert outcome.status == "mismatch" and "input after the call" in outcome.message


def test_state_not_kept_between_calls_is_a_mismatch():
    def run(model, args):
        return copy.deepcopy(model)(*args)
    outcome = check(CASE, "cpu", 0, eager_copy_compile(run))
    assert outcome.status == "mismatch" and outcome.message.startswith("call 2 ")


def test_outputs_sharing_memory_are_a_mismatch():
    def run(model, args):
        y, _, total = model(*args)
        return y, y, total  # eager returns two new tensors
    outcome = check(CASE, "cpu", 0, eager_copy_compile(run))
    assert outcome.status == "mismatch" and "after the caller wrote into outputs" in outcome.message


def test_compiling_that_changes_the_module_is_a_mismatch():
    def compile_fn(model, target, example_inputs, level):
        model(*example_inputs)
        return model
    outcome = check(CASE, "cpu", 0, compile_fn)
    assert outcome.status == "mismatch" and "compiling changed the module's 'total'" in outcome.message


def test_a_compiled_model_sharing_the_modules_state_is_a_mismatch():
    def compile_fn(model, target, example_inputs, level):
        return model
    outcome = check(CASE, "cpu", 0, compile_fn)
    assert outcome.status == "mismatch" and "calling the compiled model changed the module's 'total'" in outcome.message


def test_flashc_errors_are_refusals_and_other_errors_crashes():
    def refuse(model, target, example_inputs, level):
        raise CaptureError("no")

    def crash(model, target, example_inputs, level):
        raise KeyError("add_")
    assert check(CASE, "cpu", 0, refuse).status == "refused"
    assert check(CASE, "cpu", 0, crash).status == "crash"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generated_modules_run_eagerly_and_depend_only_on_the_seed(family):
    for seed in case_seeds(family, 8, base=5000):
        case, again = generate(seed), generate(seed)
        assert family_of(seed) == family and case.source == again.source
        a, b = case.build(), again.build()
        with torch.no_grad():
            for stream in range(3):
                out_a, out_b = a(*case.inputs(stream)), b(*again.inputs(stream))
                flat_a, flat_b = torch.utils._pytree.tree_leaves(out_a), torch.utils._pytree.tree_leaves(out_b)
                assert len(flat_a) == len(flat_b)
                for x, y in zip(flat_a, flat_b):
                    assert torch.equal(x, y) or torch.allclose(x, y, equal_nan=True)


def test_a_check_that_kills_its_process_is_one_crash(fuzz_worker):
    dying = Case("custom", 1, "dies", SOURCE.replace("super().__init__()",
                                                      "super().__init__()\n        import os, signal\n"
                                                      "        os.kill(os.getpid(), signal.SIGKILL)"))
    outcome = fuzz_worker.check(dying, "cpu", 0)
    assert outcome.status == "crash" and "SIGKILL" in outcome.message
    assert fuzz_worker.check(CASE, "cpu", 0).status == "ok"  # a fresh process runs the next check
