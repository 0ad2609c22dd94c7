"""Deja Vu pruning (passes/prune/dejavu.py): the flashc.predicted_sparsify op against its reference;
llama-tiny pruned at dejavu-40% against a float64 model applying the same masks, its sparsity and
its predictors' recall against a random mask; artifacts, the ONNX and TVM lowerings, the CLI, and
what is left dense or refused."""

import copy
import re
from dataclasses import replace

import pytest
import torch
import torch.fx as fx

import flashc
from flashc import cli, zoo
from flashc.errors import FlashcError
from flashc.evaluation import load_eval_text
from flashc.ir import module_path
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import PredictMlpSparsity, PruneConfig
from flashc.passes.prune.dejavu import fit_threshold, top_neurons, train_predictor
from flashc.passes.quantize import CalibrationData
from flashc.predictor_ops import predicted_mask
from flashc.profiles import get_profile
from flashc_testing import optimized_program, rel_err
from test_prune_ffn import GeluMlp  # a language model whose MLP is not gated: down(gelu(up x))

PREDICTED = torch.ops.flashc.predicted_sparsify.default
SPARSIFY = torch.ops.flashc.sparsify.default
TARGET = 0.4


def small(spec: str = "dejavu-40%", **kwargs) -> PruneConfig:
    """A spec with a calibration and training budget that keeps the tests fast."""
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 256, "calibration_tokens": 4096,
                                               "predictor_rows": 2048, "predictor_steps": 200, **kwargs})


def text_ids(kind: str | None = None, n: int | None = None) -> torch.Tensor:
    """UTF-8 bytes as token ids (what flashc calibrates a tokenizer-less model with): the built-in
    calibration text, or an evaluation text that calibration never reads."""
    if kind is None:
        return CalibrationData.builtin(vocab_size=512).tokens[:n]
    return torch.frombuffer(bytearray(load_eval_text(kind).encode()), dtype=torch.uint8).long()[:n]


def predict(program, config, ids: torch.Tensor):
    calibration = CalibrationData.from_tensors(ids)
    return PassManager([PredictMlpSparsity(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


@pytest.fixture(scope="module")
def pruned(tiny_models):
    """llama-tiny compiled for the cpu target at dejavu-40%, calibrated on the built-in text."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=64), prune=small(),
                        calibration=text_ids())
    return model, cm


def record_of(cm):
    return next(r for r in cm.records if r.name == "predict_mlp_sparsity")


class MaskRecorder(fx.Interpreter):
    """Runs a program's graph and keeps, per MLP (module path), the mask each predicted_sparsify applied."""

    def __init__(self, program) -> None:
        super().__init__(program.graph_module)
        self.program = program
        self.masks: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        if n.target is PREDICTED:
            _, x, a, b, threshold = self.fetch_args_kwargs_from_env(n)[0]
            self.masks[module_path(n).rsplit(".", 1)[0]] = predicted_mask(x, a, b, threshold)
        return super().run_node(n)

    def __call__(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.run(*[self.program.params[n.name] for n in self.program.param_nodes()], ids)
        return self.masks


def float64_with_masks(model, masks: dict[str, torch.Tensor]):
    """model in float64 whose MLPs compute down(act(gate x) * up x * mask), the masks given per MLP."""
    reference = copy.deepcopy(model).double()
    for path, mask in masks.items():
        mlp = reference.get_submodule(path)
        mlp.forward = lambda x, mlp=mlp, mask=mask: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)
    return reference


def test_predicted_sparsify_op_matches_its_reference():
    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 16, generator=g)
    a, b = torch.randn(16, 4, generator=g), torch.randn(4, 24, generator=g)
    for threshold in (torch.tensor(0.3), torch.linspace(-1, 1, 24)):
        want = h * (((x @ a) @ b) > threshold)
        assert torch.equal(torch.ops.flashc.predicted_sparsify(h, x, a, b, threshold), want)
        torch.library.opcheck(PREDICTED, (h, x, a, b, threshold))
    half = torch.ops.flashc.predicted_sparsify(h.bfloat16(), x.bfloat16(), a.bfloat16(), b.bfloat16(),
                                               torch.tensor(0.3, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and 0.2 < float((half == 0).float().mean()) < 0.8


def test_graph_masks_the_intermediate_and_down_reads_it_through_sparsify(pruned):
    _, cm = pruned
    nodes = [n for n in cm.program.op_nodes() if n.target is PREDICTED]
    assert len(nodes) == 2
    for node in nodes:
        assert node.args[0].target is torch.ops.flashc.swiglu.default  # h: act(gate x) * up x
        (sparse,) = node.users
        assert sparse.target is SPARSIFY and float(cm.program.params[sparse.args[1].name]) == 0.0
        (down,) = sparse.users
        assert down.target is torch.ops.aten.linear.default and "down_proj" in down.args[1].name
        a, b, threshold = (cm.program.params[n.name] for n in node.args[2:])
        assert a.shape == (128, 16) and b.shape == (16, 256) and threshold.shape == (256,)  # rank min(128, K // 8)


def test_compiled_model_equals_a_float64_model_applying_the_same_masks(pruned):
    model, cm = pruned
    record = MaskRecorder(cm.program)
    for kind, start in (("prose", 0), ("code", 3000)):  # windows of the evaluation texts, never calibrated on
        ids = text_ids(kind, start + 64)[start:].unsqueeze(0)
        masks = record(ids)
        assert sorted(masks) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        with torch.no_grad():
            want = float64_with_masks(model, masks)(ids, use_cache=False).logits
            dense = model(ids, use_cache=False).logits
            got = cm(ids).logits
        assert rel_err(got, want) < 1e-5
        assert rel_err(got, dense) > 1e-2  # the masks bite


def test_fixed_thresholds_keep_the_target_on_new_text(pruned):
    """One window's sparsity varies (26-44% over 64-token windows of the evaluation texts), their mean
    stays near the target."""
    _, cm = pruned
    record = MaskRecorder(cm.program)
    zeroed = []
    for kind in ("prose", "code"):
        for start in range(0, 20000, 5000):
            masks = record(text_ids(kind, start + 64)[start:].unsqueeze(0))
            zeroed += [float((~mask).float().mean()) for mask in masks.values()]
    assert abs(sum(zeroed) / len(zeroed) - TARGET) < 0.05


def test_report_gives_recall_and_sparsity_and_beats_a_random_mask(pruned):
    _, cm = pruned
    record = record_of(cm)
    rows = [d for d in record.details if d["status"] == "sparsified"]
    assert [d["layer"] for d in rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for d in rows:
        assert abs(d["sparsity"] - TARGET) < 0.03  # measured on held-out rows
        assert d["rank"] == 16 and d["neurons"] == 256
        # a random mask keeps 1 - sparsity of the oracle's neurons, and of their mass about as much
        assert d["recall"] > (1 - TARGET) + 0.08 and d["mass_recall"] > (1 - TARGET) + 0.1
        assert d["mass_recall"] < d["oracle_mass_recall"] <= 1 and 0 < d["rel_error"] < 1
        assert d["params_after"] < d["params_before"]  # the predictor's reads included
    assert record.stats["mlps"] == 2 and abs(record.stats["sparsity"] - TARGET) < 0.03
    text = cm.report().render(width=240)
    assert "pruning (Deja Vu predictors)" in text and "rank 16: recall" in text and "(random mask 60.0%)" in text


def test_training_learns_what_a_low_rank_linear_score_can():
    """Neurons that grow with a rank-8 linear map of x: a rank-8 predictor finds more than 90% of the
    oracle's top set (a random mask keeps 60% of it), and the same seed trains the same predictor."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    h = torch.exp(x @ torch.randn(32, 8, generator=g) @ torch.randn(8, 64, generator=g) / 16)
    predictor = train_predictor(x[:3072], h[:3072], TARGET, rank=8, steps=300)
    threshold = fit_threshold(x[3072:3584], predictor.a, predictor.b, predictor.offset, TARGET)
    kept = predicted_mask(x[3584:], predictor.a, predictor.b, threshold)
    oracle = top_neurons(h[3584:], TARGET)
    assert float((kept & oracle).sum() / oracle.sum()) > 0.9
    assert abs(float((~kept).float().mean()) - TARGET) < 0.03
    again = train_predictor(x[:3072], h[:3072], TARGET, rank=8, steps=300)
    assert torch.equal(again.a, predictor.a) and torch.equal(again.b, predictor.b)


def test_artifact_keeps_the_predictors(pruned, tmp_path):
    _, cm = pruned
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    names = [n for n in loaded.program.params if re.search(r"down_proj_weight_predictor_(a|b|threshold)$", n)]
    assert len(names) == 6
    for name in names:
        assert torch.equal(loaded.program.params[name], cm.program.params[name])
    ids = text_ids("code", 64).unsqueeze(0)
    assert torch.equal(loaded(ids).logits, cm(ids).logits)


def test_onnx_and_tvm_lower_the_masks(pruned, tmp_path):
    _, cm = pruned
    program = cm.program
    ids = text_ids("code", 64).unsqueeze(0)
    want = program.run_flat(ids)[0]
    pytest.importorskip("onnxruntime")
    from flashc.backends.onnx import OnnxRuntimeModel, export_onnx

    onnx_model = OnnxRuntimeModel.load(export_onnx(program, tmp_path / "model.onnx"))
    assert rel_err(onnx_model(ids)[0], want) < 1e-4
    pytest.importorskip("tvm")
    from flashc.backends.tvm import TvmBackend, TvmModel, build_tvm

    assert all(TvmBackend().lowering.lowers(op) for op in ("flashc.predicted_sparsify", "flashc.sparsify"))
    build_tvm(program, "llvm").export(tmp_path / "tvm")
    assert rel_err(TvmModel.load(tmp_path / "tvm")(ids)[0], want) < 1e-4


def test_cuda_late_pass_reads_only_the_kept_neurons(pruned):
    """The CUDA backend's FuseSparseMatmuls matches linear(sparsify(h', 0), w): each down projection
    becomes flashc.sparse_gemv, which skips the weight rows of the neurons the predictor dropped."""
    from flashc.backends.cuda_rewrites import fuse_sparse_matmuls

    _, cm = pruned
    program = cm.program.clone()
    assert fuse_sparse_matmuls(program, 64) == (2, [])
    program.recompile()
    gemvs = [n for n in program.op_nodes() if n.target is torch.ops.flashc.sparse_gemv.default]
    assert len(gemvs) == 2 and all(n.args[0].target is PREDICTED for n in gemvs)
    ids = text_ids("prose", 64).unsqueeze(0)
    assert rel_err(program.run_flat(ids)[0], cm.program.run_flat(ids)[0]) < 1e-5


def test_cli_prunes_with_the_spec(capsys):
    assert cli.main(["compile", "llama-tiny", "--seq-len", "64", "--prune", "dejavu-40%"]) == 0
    out = capsys.readouterr().out
    assert "pruning (Deja Vu predictors)" in out and "predict_mlp_sparsity" in out
    assert cli.main(["compile", "llama-tiny", "--prune", "dejavu-96%"]) == 2
    assert "within 0-95%" in capsys.readouterr().err


def test_mlps_it_cannot_predict_are_listed_and_left_dense(tiny_models):
    net = GeluMlp().eval()
    ids = torch.randint(0, 300, (1, 32))
    cm = flashc.compile(net, "cpu", (ids,), prune=small(), calibration=text_ids(n=1024) % 300)
    record = record_of(cm)
    assert not record.changed and [d["status"] for d in record.details] == ["skipped"]
    assert "not a gated MLP (down(gelu(up x)))" in record.details[0]["note"]
    assert not any(n.target is PREDICTED for n in cm.program.op_nodes())
    mixtral = optimized_program(tiny_models["mixtral-tiny"], "mixtral-tiny", seq_len=32)
    moe = predict(mixtral, small(), text_ids())
    assert not moe.changed and {d["op"] for d in moe.details} == {"moe experts"} and len(moe.details) == 2
    assert "a predictor per expert is not built" in moe.details[0]["note"]


def test_errors_say_what_and_what_to_do(tiny_models):
    from flashc.distill import DistillConfig

    program = optimized_program(tiny_models["llama-tiny"], "llama-tiny", seq_len=32, level=1)  # swiglu not fused
    with pytest.raises(FlashcError, match=r"found no MLP .* compile at -O2 or above"):
        predict(program, small(), text_ids())
    with pytest.raises(FlashcError, match=r"prune='dejavu-120%': the sparsity must be within 0-95%"):
        PruneConfig.parse("dejavu-120%")
    with pytest.raises(FlashcError, match=r"predictor_rank must be a positive integer or None"):
        PruneConfig(method="dejavu", sparsity=0.4, predictor_rank=0)
    with pytest.raises(FlashcError, match=r"recovery distillation is built for"):
        PruneConfig(method="dejavu", sparsity=0.4, recover=DistillConfig(steps=1))
    with pytest.raises(FlashcError, match=r"gives \d+ tokens .* needs at least 256"):
        predict(optimized_program(tiny_models["llama-tiny"], "llama-tiny", seq_len=32), small(), text_ids(n=200))


def test_dejavu_0_leaves_every_mlp_dense(tiny_models):
    program = optimized_program(tiny_models["llama-tiny"], "llama-tiny", seq_len=32)
    record = predict(program, small("dejavu-0%"), text_ids())
    assert not record.changed and [d["status"] for d in record.details] == ["dense", "dense"]
    assert not any(n.target is PREDICTED for n in program.op_nodes())
