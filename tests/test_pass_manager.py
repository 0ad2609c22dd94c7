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
