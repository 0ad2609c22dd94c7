"""The CUDA backend's state late pass (backends/cuda_rewrites.py: FuseStateWrites), checked on the CPU: a
state-space layer's reset multiply, mixing and state copy become one ssm_mix_into / gla_mix_into writing the
state buffer in place, and the rewritten decode step computes what the original did, restarts included."""

import pytest
import torch
from flashc_testing import rel_err

import flashc
from flashc.backends.cuda import CudaBackend
from flashc.backends.cuda_rewrites import FuseStateWrites
from flashc.capture import capture
from flashc.decode import DecodeStep, decode_example_inputs
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.ssm import attention_sites, convert
from flashc.profiles import PROFILES

INTO = {"mamba2": "flashc.ssm_mix_into", "gla": "flashc.gla_mix_into"}


def converted_decode(tiny_models, kind):
    model = convert(tiny_models["llama-tiny"], list(range(len(attention_sites(tiny_models["llama-tiny"])))), kind)
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3)
    return model, cm.program


def decode_outputs(model, program, positions, seed=0):
    """Logits of one decode step a position, from the same random (stale) states; and the final states."""
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(t.shape, generator=g).to(t.dtype) for t in decode_example_inputs(model, 2, 16)[2:]]
    tokens = torch.randint(0, model.config.vocab_size, (2, len(positions)), generator=g)
    logits = [program.run_flat(tokens[:, i:i + 1], torch.tensor([p]), *states)[0] for i, p in enumerate(positions)]
    return torch.stack(logits), states


@pytest.mark.parametrize("kind", ["mamba2", "gla"])
def test_state_reset_mix_and_copy_become_one_op_in_place(tiny_models, kind):
    model, program = converted_decode(tiny_models, kind)
    lowered = program.clone()
    passes = CudaBackend().late_passes(PROFILES["h100"], None)
    records = PassManager(passes, numeric_check=True).run(lowered, PassContext(PROFILES["h100"]))
    stats = {r.name: r.stats for r in records}
    layers = model.config.num_hidden_layers
    assert stats["cuda_fuse_state_writes"]["state_writes_fused"] == layers
    ops = [op_name(n) for n in lowered.op_nodes()]
    assert ops.count(INTO[kind]) == layers and "aten.copy_" not in ops
    assert not any(op_name(n) == "aten.mul" and n.args[0].op == "placeholder" and "state" in n.args[0].name
                   for n in lowered.op_nodes())  # no pass over the state to reset it
    positions = [0, 1, 2, 0, 1]  # position 0 again: each sequence restarts from a zero state
    want, states_want = decode_outputs(model, program, positions)
    got, states_got = decode_outputs(model, lowered, positions)
    assert rel_err(got, want) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(states_got, states_want))
    stale, _ = decode_outputs(model, lowered, [3, 4, 5, 6, 7])  # no restart: the random states carry on
    assert rel_err(stale[0], got[0]) > 1e-3


class ReadsTheOldState(torch.nn.Module):
    """ssm_mix of a state buffer, then a read of the buffer before the new state is copied in."""

    def forward(self, q, k, v, dt, a_log, state):
        y, new = torch.ops.flashc.ssm_mix(q, k, v, dt, a_log, state, 2, 1, 1e-6)
        old = state.sum()
        state.copy_(new)
        return y + old


def test_a_read_of_the_old_state_before_the_copy_keeps_the_ops_apart():
    b, d = 2, 16
    args = (torch.randn(b, 1, 2 * d), torch.randn(b, 1, d), torch.randn(b, 1, d), torch.randn(b, 1, 2),
            torch.zeros(2), torch.randn(b, 2, d, d))
    program = capture(ReadsTheOldState(), args)
    lowered = program.clone()
    (record,) = PassManager([FuseStateWrites()], numeric_check=True).run(lowered, PassContext(PROFILES["h100"]))
    assert record.stats == {"state_writes_fused": 0}
    assert "flashc.ssm_mix" in [op_name(n) for n in lowered.op_nodes()]
