"""flashc.moe_sparse (the experts' intermediate sparsified, written by SparsifyActivations)
through the ONNX and TVM backends: mixtral-tiny with its flashc.moe nodes rewritten to
moe_sparse, against the program run eagerly (the op's reference)."""

from __future__ import annotations

import pytest
import torch
from flashc_testing import fresh_ids, rel_err

from flashc.capture import capture
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import get_profile

MOE = torch.ops.flashc.moe.default
MOE_SPARSE = torch.ops.flashc.moe_sparse.default
TOL = 1e-4


def with_experts_sparsified(model, per_channel: bool):
    """mixtral-tiny at -O3 with every flashc.moe rewritten to flashc.moe_sparse, as the pass
    rewrites it, with a threshold (0-d, or one per intermediate channel) that zeroes a real share."""
    program = capture(model, (fresh_ids("mixtral-tiny"),), {"use_cache": False})
    PassManager(pipeline(3)).run(program, PassContext(get_profile("cpu")))
    dense = program.clone()
    moes = [n for n in program.op_nodes() if n.target is MOE]
    assert moes
    g = torch.Generator().manual_seed(0)
    for i, node in enumerate(moes):
        f = program.params[node.args[3].name].shape[-1]
        threshold = torch.rand(f, generator=g) * 0.1 if per_channel else torch.tensor(0.05)
        param = program.add_param(f"moe_{i}_sparsify_threshold", threshold)
        node.target = MOE_SPARSE
        node.args = (*node.args[:6], param)
    program.graph.lint()
    program.recompile()
    ids = fresh_ids("mixtral-tiny", seed=5)
    assert rel_err(program.run_flat(ids)[0], dense.run_flat(ids)[0]) > 1e-3  # the threshold matters
    return program


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnx_lowers_moe_sparse(tiny_models, per_channel, tmp_path):
    pytest.importorskip("onnxruntime")
    from flashc.backends.onnx import OnnxRuntimeModel, export_onnx

    program = with_experts_sparsified(tiny_models["mixtral-tiny"], per_channel)
    model = OnnxRuntimeModel.load(export_onnx(program, tmp_path / "model.onnx"))
    for seed in (1, 2):
        ids = fresh_ids("mixtral-tiny", seed=seed)
        assert rel_err(model(ids)[0], program.run_flat(ids)[0]) < TOL


def test_tvm_lowers_moe_sparse(tiny_models, tmp_path):
    pytest.importorskip("tvm")
    from flashc.backends.tvm import TvmBackend, TvmModel, build_tvm

    assert TvmBackend().lowering.lowers("flashc.moe_sparse")
    program = with_experts_sparsified(tiny_models["mixtral-tiny"], per_channel=True)
    build_tvm(program, "llvm").export(tmp_path / "art")
    model = TvmModel.load(tmp_path / "art")
    for seed in (1, 2):
        ids = fresh_ids("mixtral-tiny", seed=seed)
        assert rel_err(model(ids)[0], program.run_flat(ids)[0]) < TOL
