"""flashc.compile end to end on the CPU, and its errors for bad input."""

import pytest
import torch
from flashc_testing import FAMILIES, fresh_ids, rel_err

import flashc
from flashc.errors import CaptureError, InputError, UnknownNameError


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_save_load_run(tiny_models, family, tmp_path):
    model = tiny_models[family]
    cm = flashc.compile(model, "cpu", fresh_ids(family), level=3)
    ids = fresh_ids(family)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert rel_err(cm(ids).logits, ref) < 1e-5
    cm.save(tmp_path / "art")
    loaded = flashc.load(tmp_path / "art")
    out = loaded(ids)
    assert type(out).__name__.endswith("CausalLMOutputWithPast")
    assert rel_err(out.logits, ref) < 1e-5
    assert loaded.report().fused() == cm.report().fused()


def test_report_lists_passes_stats_and_estimate(tiny_models):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", fresh_ids("llama-tiny"), level=2)
    report = cm.report()
    assert report.fused()["attention"] == 2 and report.fused()["add_rms_norm"] == 4
    text = report.render()
    for needle in ("canonicalize", "fold_constants", "fuse", "attention=2", "cost model on cpu", "top time sinks"):
        assert needle in text
    assert report.estimate.seconds > 0 and report.estimate.kernels > 10
    assert all(r.seconds >= 0 for r in report.records)


def test_wrong_input_shape_and_dtype(tiny_models):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", fresh_ids("llama-tiny", seq_len=16))
    with pytest.raises(InputError, match=r"expected int64\[1, 16\], got int64\[1, 9\]"):
        cm(fresh_ids("llama-tiny", seq_len=9))
    with pytest.raises(InputError, match=r"expected int64\[1, 16\], got int32\[1, 16\]"):
        cm(fresh_ids("llama-tiny").int())
    with pytest.raises(InputError, match="expected 1 input"):
        cm()


def test_unknown_target_and_profile(tiny_models):
    with pytest.raises(UnknownNameError, match="unknown target 'h1000'.*did you mean 'h100'.*Known targets: .*cpu"):
        flashc.compile(tiny_models["llama-tiny"], "h1000", fresh_ids("llama-tiny"))
    with pytest.raises(UnknownNameError, match="unknown hardware profile 'x9'.*Known hardware profiles"):
        flashc.compile(tiny_models["llama-tiny"], "cpu", fresh_ids("llama-tiny"), profile="x9")


def test_not_a_module():
    with pytest.raises(CaptureError, match="compiles torch.nn.Module objects, got builtins.function"):
        flashc.compile(lambda x: x, "cpu", torch.randn(2))


def test_capture_failure_names_module_and_line():
    class Inner(torch.nn.Module):
        def forward(self, x):
            return x * int(torch.nonzero(x).sum().item() > 0)  # data-dependent

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Inner()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(CaptureError) as e:
        flashc.compile(Outer(), "cpu", torch.randn(3))
    msg = str(e.value)
    assert "module 'block'" in msg and "test_api.py" in msg and ".item()" in msg


@torch.library.custom_op("flashc_test::soft_clip", mutates_args=())
def soft_clip(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 3


@soft_clip.register_fake
def _(x):
    return torch.empty_like(x)


class _WithForeignOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return soft_clip(self.lin(x))


def test_foreign_op_falls_back_and_is_reported():
    m = _WithForeignOp().eval()
    cm = flashc.compile(m, "cpu", torch.randn(2, 8))
    x = torch.randn(2, 8)
    assert torch.allclose(cm(x), m(x), atol=1e-6)
    fb = {f.op: f for f in cm.fallbacks}
    assert "flashc_test.soft_clip" in fb and "test_api.py" in fb["flashc_test.soft_clip"].where
    assert "flashc_test.soft_clip" in cm.report().render()


def test_onnx_cpu_target_round_trip(tiny_models, tmp_path):
    model = tiny_models["gemma-tiny"]
    cm = flashc.compile(model, "onnx-cpu", fresh_ids("gemma-tiny"), level=3)
    assert cm.fallbacks == []
    ids = fresh_ids("gemma-tiny")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert rel_err(cm(ids).logits, ref) < 1e-4
    cm.save(tmp_path / "onnx")
    assert (tmp_path / "onnx" / "payload" / "model.onnx").exists()
    assert rel_err(flashc.load(tmp_path / "onnx")(ids).logits, ref) < 1e-4


def test_cuda_target_compiles_ahead_of_time_without_gpu(tiny_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    cm = flashc.compile(tiny_models["llama-tiny"], "h100", fresh_ids("llama-tiny"), level=3)
    with pytest.raises(flashc.FlashcError, match="without a GPU"):
        cm(fresh_ids("llama-tiny"))
    cm.save(tmp_path / "h100")
    loaded = flashc.load(tmp_path / "h100")
    assert loaded.target == "h100" and loaded.report().fused()["attention"] == 2


def test_unknown_or_misspelled_option_is_an_error():
    import pytest

    from flashc.errors import FlashcError

    model = torch.nn.Linear(4, 4)
    with pytest.raises(FlashcError, match=r"no option 'contrib_op'; did you mean 'contrib_ops'"):
        flashc.compile(model, "onnx-cpu", torch.randn(2, 4), options={"contrib_op": False})
    with pytest.raises(FlashcError, match=r"target 'cpu' has no option 'tune'.*none"):
        flashc.compile(model, "cpu", torch.randn(2, 4), options={"tune": True})
    cm = flashc.compile(model, "onnx-cpu", torch.randn(2, 4), options={"contrib_ops": False})
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x), atol=1e-6)


def test_why_not_says_where_a_fusion_happened_and_why_not_elsewhere():
    class NotRope(torch.nn.Module):
        """x*cos + rotate_half(x)*sin with the wrong half negated: not rotary, must not fuse."""

        def forward(self, x, cos, sin):
            h = x.shape[-1] // 2
            rotated = torch.cat((-x[..., :h], x[..., h:]), dim=-1)
            return x * cos + rotated * sin

    x, cos, sin = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    report = flashc.why_not(NotRope(), (x, cos, sin), "rotary")
    assert report.fused == 0 and report.candidates
    assert "negated half" in str(report)


def test_the_default_level_is_the_targets(tiny_models):
    """compile without level= takes the target's default level (-O3 on CUDA targets, measured
    fastest there; -O2 elsewhere); an explicit level wins."""
    from flashc.targets import TARGETS

    assert {n: t.default_level for n, t in TARGETS.items() if t.backend.__name__ == "_cuda"} == \
        {"h100": 3, "h200": 3, "a100": 3, "l4": 3}
    model = tiny_models["llama-tiny"]
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert flashc.compile(model, "cpu", (ids,)).level == 2
    assert flashc.compile(model, "cpu", (ids,), level=3).level == 3
    merged = flashc.compile(model, "h100", (ids,))  # no GPU here: lowered for later, passes ran
    assert merged.level == 3 and any(r.name == "merge_projections" and r.changed for r in merged.records)


def test_a_shape_that_depends_on_values_is_refused_naming_the_op():
    """x[x > 0]: torch.export gives it a size no pass may guard on; flashc says which op and where."""
    from flashc.errors import UnsupportedOpError

    class Masked(torch.nn.Module):
        def forward(self, x):
            return x[x > 0] * 2

    with pytest.raises(UnsupportedOpError, match=r"aten.index \(node index, .*test_api.py:\d+ in forward\) "
                                                 r"gives a result whose shape depends on the input's values"):
        flashc.compile(Masked(), target="cpu", example_inputs=(torch.randn(3, 4),))
