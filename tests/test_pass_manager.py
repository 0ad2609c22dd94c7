"""The pass manager's verification: cheap structural checks per pass, shapes once at the end,
and the pass that broke the graph named when the end check fails."""

import pytest
import torch

from flashc.capture import capture
from flashc.errors import VerificationError
from flashc.pass_manager import PassContext, PassManager, PassResult
from flashc.profiles import PROFILES


class Scale(torch.nn.Module):
    def forward(self, x):
        return (x * 2).reshape(4, 8) + 1


class BreakReshape:
    """Makes the reshape impossible: lint passes, shape propagation does not."""
    name = "break_reshape"
    requires = ()
    preserves = ()

    def run(self, program, ctx):
        for node in program.op_nodes():
            if "view" in str(node.target) or "reshape" in str(node.target):
                node.args = (node.args[0], [7, 13])
                return PassResult(True, {"broken": 1})
        return PassResult(False)


class Harmless:
    name = "harmless"
    requires = ()
    preserves = ("shapes",)

    def run(self, program, ctx):
        return PassResult(True)


@pytest.mark.parametrize("mode", ["end", "each"])
def test_a_broken_pass_is_named_whichever_verification_mode(mode):
    program = capture(Scale(), (torch.randn(32),))
    with pytest.raises(VerificationError, match="after pass break_reshape"):
        PassManager([Harmless(), BreakReshape(), Harmless()], verify=mode).run(program, PassContext(PROFILES["cpu"]))


def test_a_sound_pipeline_keeps_the_numbers():
    program = capture(Scale(), (torch.randn(32),))
    x = torch.randn(32)
    records = PassManager([Harmless(), Harmless()]).run(program, PassContext(PROFILES["cpu"]))
    assert [r.name for r in records] == ["harmless", "harmless"]
    assert torch.allclose(program.run_flat(x)[0], (x * 2).reshape(4, 8) + 1)


def test_unknown_verification_mode_is_refused():
    with pytest.raises(ValueError, match="verify must be"):
        PassManager([], verify="sometimes")


class DoubleTheOutput:
    """Changes what the model computes: the numeric check must refuse it."""
    name = "double_the_output"
    requires = ()
    preserves = ("shapes",)

    def run(self, program, ctx):
        out = program.graph.output_node()
        outputs = out.args[0]
        result = outputs[0]
        with program.graph.inserting_before(out):
            doubled = program.graph.call_function(torch.ops.aten.mul.Tensor, (result, 2.0))
        doubled.meta = dict(result.meta)
        out.args = ((doubled, *outputs[1:]),)
        return PassResult(True)


def test_instruments_see_every_pass_in_order_and_may_fill_records(tmp_path):
    from flashc.pass_manager import Instrument

    seen = []

    class Log(Instrument):
        def enter(self, program):
            seen.append("enter")

        def before(self, index, p, program):
            seen.append(f"before {index} {p.name}")

        def after(self, index, p, program, result, record):
            seen.append(f"after {index} {p.name}")
            record.stats["logged"] = 1

        def exit(self, program):
            seen.append("exit")

    program = capture(Scale(), (torch.randn(32),))
    records = PassManager([Harmless(), Harmless()], numeric_check=True, dump_dir=tmp_path,
                          instruments=[Log()]).run(program, PassContext(PROFILES["cpu"]))
    assert seen == ["enter", "before 0 harmless", "after 0 harmless", "before 1 harmless", "after 1 harmless", "exit"]
    assert all(r.stats == {"logged": 1} and r.max_error == 0.0 and r.seconds >= 0 for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_harmless_after.py", "00_harmless_before.py",
                                                         "01_harmless_after.py", "01_harmless_before.py"]


def test_the_numeric_check_names_a_pass_that_changes_the_numbers():
    program = capture(Scale(), (torch.randn(32),))
    with pytest.raises(VerificationError, match="pass double_the_output changed what the model computes"):
        PassManager([Harmless(), DoubleTheOutput()], numeric_check=True).run(program, PassContext(PROFILES["cpu"]))
