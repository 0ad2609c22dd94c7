"""ATen ops flashc does not lower itself, lowered through onnxscript's torchlib
(backends/onnx/_torchlib.py): each against eager on fresh inputs, a network refused before
and compiled now, in-place forms, fp16/bf16 rounding, and the refusals that remain."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import flashc  # noqa: E402
from flashc.backends.onnx import _torchlib, lowers  # noqa: E402
from flashc.backends.onnx.backend import via_torchlib  # noqa: E402
from flashc.backends.onnx.table import LOWERINGS, find_lowering  # noqa: E402
from flashc.capture import capture  # noqa: E402
from flashc.errors import UnsupportedOpError  # noqa: E402
from flashc_testing import rel_err  # noqa: E402
from test_onnx_in_place import check_against_eager, line_of  # noqa: E402

aten = torch.ops.aten


class Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _grid(n: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(n, h, w, 2) * 2.2 - 1.1  # some points outside [-1, 1]: the padding mode counts


# (name, function, input shapes, the torchlib op it must use); none of these ops is in flashc's table
CASES = [
    ("roll", lambda x: torch.roll(x, (1, -2), (0, 2)), [(3, 4, 5)], "aten.roll"),
    ("logsumexp", lambda x: torch.logsumexp(x * 4, -1), [(3, 7)], "aten.logsumexp"),
    ("softplus", lambda x: F.softplus(x * 3, beta=2.0, threshold=5.0), [(4, 9)], "aten.softplus"),  # an inlined function
    ("hardswish", lambda x: F.hardswish(x * 4), [(4, 9)], "aten.hardswish"),
    ("asinh", lambda x: torch.asinh(x * 3), [(5, 6)], "aten.asinh"),  # (atan2: exact_math.py, torchlib's is NaN at 0/0)
    ("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), [(2, 8, 3, 5)], "aten.pixel_shuffle"),
    ("upsample_nearest", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), [(2, 3, 4, 5)],
     "aten.upsample_nearest2d"),
    ("grid_sample", lambda x, g: F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False),
     [(2, 3, 6, 7), "grid"], "aten.grid_sampler"),  # GridSample's modes were renamed at opset 20
    ("group_norm", lambda x: F.group_norm(x, 2, torch.linspace(0.5, 1.5, 6), torch.linspace(-1, 1, 6)),
     [(2, 6, 4, 4)], "aten.group_norm"),
    ("log1p_expm1", lambda x: torch.log1p(x.abs()) + torch.expm1(x), [(6, 8)], "aten.log1p"),
]


def _inputs(shapes):
    return tuple(_grid(2, 5, 4) if s == "grid" else torch.randn(s) for s in shapes)


@pytest.mark.parametrize("name,fn,shapes,op", CASES, ids=[c[0] for c in CASES])
def test_op_flashc_does_not_lower_matches_eager(name, fn, shapes, op):
    module = Op(fn).eval()
    program = capture(module, _inputs(shapes))
    assert any(n.target not in LOWERINGS and str(n.target).startswith("aten." + op.split(".")[1])
               for n in program.op_nodes()), f"{op} is lowered by flashc: pick another op"
    torch.manual_seed(0)
    cm = flashc.compile(module, target="onnx-cpu", example_inputs=_inputs(shapes), level=0)
    assert via_torchlib(cm.executable).get(op, 0) >= 1
    assert cm.fallbacks == []  # lowered, not left to PyTorch
    for _ in range(2):
        xs = _inputs(shapes)
        with torch.no_grad():
            want = module(*xs)
        got = cm(*xs)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_err(got, want) < 1e-5


class PoolWithIndices(nn.Module):
    """Several results from one torchlib function (max_pool2d_with_indices: values, indices)."""

    def forward(self, x):
        values, indices = F.max_pool2d(x, 2, return_indices=True)
        return values * 2, indices


def test_an_op_with_several_results(monkeypatch):
    # flashc lowers max pooling with indices itself (NaN as PyTorch has it): set that aside to reach torchlib's
    monkeypatch.delitem(LOWERINGS, aten.max_pool2d_with_indices.default)
    module = PoolWithIndices()
    cm = flashc.compile(module, target="onnx-cpu", example_inputs=(torch.randn(2, 3, 6, 8),), level=0)
    assert via_torchlib(cm.executable) == {"aten.max_pool2d_with_indices": 1}
    x = torch.randn(2, 3, 6, 8)
    got, want = cm(x), module(x)
    assert torch.equal(got[1], want[1]) and rel_err(got[0], want[0]) < 1e-6


class MobileStyleNet(nn.Module):
    """Pieces flashc's own table lacks, in one network: group norm, hardswish, pixel shuffle
    (sub-pixel upsampling), nearest upsampling, a roll (shifted windows) and logsumexp pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = F.hardswish(self.norm(self.stem(x)))
        x = torch.roll(x, shifts=(1, 1), dims=(2, 3))
        x = F.pixel_shuffle(self.up(x), 2)  # [n, 4, 2h, 2w]
        x = F.interpolate(x, scale_factor=0.5, mode="nearest") + F.avg_pool2d(x, 2)
        return self.head(torch.logsumexp(x.flatten(2), -1))


def test_a_network_refused_before_now_compiles(monkeypatch):
    torch.manual_seed(1)
    model = MobileStyleNet().eval()
    with monkeypatch.context() as m:  # flashc's table alone, as before torchlib
        m.setattr(_torchlib, "covers", lambda target: False)
        with pytest.raises(UnsupportedOpError) as err:
            flashc.compile(model, target="onnx-cpu", example_inputs=(torch.randn(2, 3, 8, 8),))
    for op in ("aten.group_norm", "aten.roll"):  # the others decompose into ops flashc's table has
        assert op in str(err.value)
    for op in ("aten.hardswish", "aten.pixel_shuffle", "aten.logsumexp"):
        assert op not in str(err.value)
    cm = flashc.compile(model, target="onnx-cpu", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert set(via_torchlib(cm.executable)) >= {"aten.group_norm", "aten.hardswish", "aten.roll",
                                                 "aten.pixel_shuffle", "aten.logsumexp"}
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert rel_err(cm(x), model(x)) < 1e-5


def test_flashc_lowerings_win_over_torchlib():
    program = capture(Op(lambda x: torch.cumsum(F.silu(x), 1) + 1), (torch.randn(3, 4),))
    for node in program.op_nodes():
        assert node.target in LOWERINGS and find_lowering(node)[0] is LOWERINGS[node.target]
    cm = flashc.compile(Op(lambda x: torch.cumsum(F.silu(x), 1) + 1), target="onnx-cpu",
                        example_inputs=(torch.randn(3, 4),), level=0)
    assert via_torchlib(cm.executable) == {}
    assert lowers("aten.roll") and lowers("aten.roll_") and lowers("aten.cumsum")


# --- in place ------------------------------------------------------------------------------------

class AtanThroughView(nn.Module):
    """In-place ops only torchlib lowers (atan_, hardswish_), one written through a slice."""

    def forward(self, x):
        x[:, 1:3].atan_()
        y = x * 2
        F.hardswish(y, inplace=True)
        return y + x


class RunningAverage(nn.Module):
    """A buffer updated by lerp_ and addcmul_ (torchlib: a traced and an inlined function)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("avg", torch.zeros(4, 6))

    def forward(self, x):
        self.avg.lerp_(x, 0.25)
        self.avg.addcmul_(x, x, value=0.1)
        return self.avg.sum(-1)


@pytest.mark.parametrize("level", [0, 2])
def test_in_place_ops_lowered_through_torchlib_write_back(level):
    cm = check_against_eager(AtanThroughView(), lambda: (torch.randn(3, 5),), level)
    assert via_torchlib(cm.executable) == {"aten.atan_": 1, "aten.hardswish_": 1}
    cm = check_against_eager(RunningAverage(), lambda: (torch.randn(4, 6),), level, buffers=("avg",))
    assert via_torchlib(cm.executable) == {"aten.lerp_": 1, "aten.addcmul_": 1}


# --- fp16 / bf16 ---------------------------------------------------------------------------------

class LowPrecisionOps(nn.Module):
    def forward(self, x):
        return torch.logsumexp(x, -1), F.softplus(x * 3), torch.roll(x, 3, 1), torch.atan2(x, x.flip(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_fp32_and_rounded_once_like_pytorch(dtype):
    """PyTorch's CPU kernels compute these in fp32 and round the result once: so does the export
    (an ONNX Runtime computing them natively in fp16 would differ by several units in the last place)."""
    cm = flashc.compile(LowPrecisionOps(), target="onnx-cpu", example_inputs=(torch.randn(4, 64).to(dtype),),
                        level=0)
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for _ in range(2):
        x = torch.randn(4, 64).to(dtype)
        for got, want in zip(cm(x), LowPrecisionOps()(x)):
            assert got.dtype == dtype
            bound = ulp * want.double().abs().clamp_min(1.0)  # one unit in the last place
            assert bool(((got.double() - want.double()).abs() <= bound).all())


# --- refusals --------------------------------------------------------------------------------------

class Digamma(nn.Module):
    def forward(self, x):
        return torch.digamma(x.abs() + 1)


def test_an_op_neither_lowers_is_refused_naming_op_and_line():
    with pytest.raises(UnsupportedOpError) as err:
        flashc.compile(Digamma(), target="onnx-cpu", example_inputs=(torch.randn(4),))
    msg = str(err.value)
    assert "aten.digamma" in msg and line_of(Digamma, "digamma(") in msg
    assert "neither flashc's nor onnxscript's torchlib" in msg
    assert not lowers("aten.digamma")


@pytest.fixture
def without_onnxscript(monkeypatch):
    """onnxscript not installed, as on a machine with torch and onnx only."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    _torchlib._modules.cache_clear()
    yield
    monkeypatch.undo()
    _torchlib._modules.cache_clear()


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, 0)


def test_without_onnxscript_the_op_is_refused_saying_what_to_install(without_onnxscript):
    with pytest.raises(UnsupportedOpError) as err:
        flashc.compile(Roll(), target="onnx-cpu", example_inputs=(torch.randn(3, 2),))
    msg = str(err.value)
    assert "aten.roll" in msg and line_of(Roll, "roll(") in msg and _torchlib.INSTALL_ONNXSCRIPT in msg
    # flashc's own lowerings need no onnxscript
    cm = flashc.compile(Op(lambda x: torch.relu(x) + 1), target="onnx-cpu", example_inputs=(torch.randn(3, 2),))
    x = torch.randn(3, 2)
    assert torch.equal(cm(x), torch.relu(x) + 1)


def test_inlined_functions_get_their_shapes_inferred_without_a_warning(caplog):
    """torchlib's aten_isnan (inside nan_to_num) types its IsNaN result as a scalar in its own body: once inlined,
    onnx's shape inference refused to contradict that and onnx-ir logged a traceback at every compile."""
    import logging

    module = Op(lambda x: torch.nan_to_num(torch.log(x), nan=0.5, posinf=3.0, neginf=-3.0)).eval()
    with caplog.at_level(logging.WARNING):
        cm = flashc.compile(module, target="onnx-cpu", example_inputs=(torch.randn(4, 5),), level=0)
    assert not [r for r in caplog.records if "Shape inference failed" in r.getMessage()]
    x = torch.randn(4, 5)
    x[0, 0] = 0.0  # log: -inf
    x[1, 1] = float("inf")
    got, want = cm(x), module(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and rel_err(got, want) < 1e-6


NAN_CASES = {
    "max_all": lambda x: x.max() + x,  # torchlib's ReduceMax: +inf where PyTorch has NaN
    "min_all": lambda x: x.min() + x,
    "max_pool": lambda x: F.max_pool2d(x, 2),  # ORT's MaxPool passes over NaN (the lowest float for a NaN window)
    "max_pool_padded": lambda x: F.max_pool2d(x, 3, 1, 1),
    "kthvalue": lambda x: torch.kthvalue(x, 2, -1).values,  # by a sort (passes/decompose.py): no ONNX lowering
    "median": lambda x: x.median(-1, keepdim=True).values,
    "nanmedian": lambda x: x.nanmedian(),
    "norm_inf": lambda x: torch.linalg.vector_norm(x, float("inf"), -1),  # torchlib's passed over NaN
    "sqrt_by_pow": lambda x: x ** 0.5 + x.abs() ** -0.5,  # PyTorch: sqrt (NaN at -inf, -0.0 at -0.0), rsqrt
}


@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_reaches_the_result_as_in_pytorch(name):
    fn = NAN_CASES[name]
    cm = flashc.compile(Op(fn).eval(), target="onnx-cpu", example_inputs=(torch.randn(2, 3, 4, 6),))
    x = torch.randn(2, 3, 4, 6)
    x[0, 0, 1, 1] = float("nan")
    x[1, 2] = float("nan")  # whole planes of NaN
    x[0, 1, 2, 3] = float("inf")
    x[0, 1, 3, :2] = torch.tensor([float("-inf"), -0.0])
    got, want = cm(x), fn(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=1e-6, atol=0)  # rsqrt: 1 ulp


def test_logcumsumexp_is_refused_rather_than_nan_at_infinities():
    with pytest.raises(UnsupportedOpError, match="logcumsumexp is NaN where a prefix holds an infinity"):
        flashc.compile(Op(lambda x: torch.logcumsumexp(x, -1)).eval(), target="onnx-cpu",
                       example_inputs=(torch.randn(3, 5),))


POOLS_WITH_INDICES = {
    "k2": lambda x: F.max_pool2d(x, 2, return_indices=True),
    "k3_s1_p1": lambda x: F.max_pool2d(x, 3, 1, 1, return_indices=True),
    "dilated_ceil": lambda x: F.max_pool2d(x, 2, 2, 0, 2, ceil_mode=True, return_indices=True),
    "3d": lambda x: F.max_pool3d(x[None], (1, 2, 2), return_indices=True),
    "1d": lambda x: F.max_pool1d(x.flatten(2), 3, return_indices=True),
    "adaptive": lambda x: F.adaptive_max_pool2d(x, (7, 4), return_indices=True),
    "adaptive_global": lambda x: F.adaptive_max_pool2d(x, 1, return_indices=True),
}


@pytest.mark.parametrize("name", list(POOLS_WITH_INDICES))
def test_max_pool_indices_count_within_the_plane_and_take_the_last_nan(name):
    """Indices as PyTorch's: within each plane (ONNX's MaxPool counts over the tensor), the first of equal maxima,
    the last NaN of a window holding NaN (torchlib's passed over NaN, values and indices)."""
    fn = POOLS_WITH_INDICES[name]
    cm = flashc.compile(Op(fn).eval(), target="onnx-cpu", example_inputs=(torch.randn(2, 3, 7, 8),))
    x = torch.randn(2, 3, 7, 8)
    x[0, 0, 1, 1:3] = float("nan")
    x[0, 1] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    x[1, 0, :2, :2] = 1.0  # ties
    for inputs in (x, x.nan_to_num(nan=0.5)):
        (values, indices), (want_values, want_indices) = cm(inputs), fn(inputs)
        assert torch.equal(values.isnan(), want_values.isnan())
        assert torch.equal(values.nan_to_num(), want_values.nan_to_num())
        assert torch.equal(indices, want_indices)
