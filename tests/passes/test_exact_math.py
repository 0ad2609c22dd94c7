"""passes/exact_math.py: each decomposition against PyTorch's own op on every pair of special values
(signed zeros, infinities, NaN, the kinks of the piecewise ones, values near overflow) and on fresh
random values, in float32, float64 and float16; then through the ONNX and TVM backends, which use
them where their own converters answer otherwise."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from flashc.passes.exact_math import EXACT_MATH

aten = torch.ops.aten
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 3.0, -3.0, 1e-4,
           -1e-4, 20.0, -20.0, 88.9, -88.9, 89.2, -89.2, 100.0, -100.0, 1e30, -1e30, 0.999, 1e-7, 2.0, -2.0]
ARGS = {aten.logit.default: [(), (1e-6,), (0.2,)], aten.celu.default: [(), (1.5,), (0.5,)],
        aten.softshrink.default: [(), (1.5,), (0.0,)]}
UNARY = [op for op in EXACT_MATH if len(op._schema.arguments) == 1 or op in ARGS]
SHIFTS = (aten.__lshift__.Tensor, aten.__rshift__.Tensor, aten.bitwise_right_shift.Scalar_Tensor)  # integers: below
BINARY = [op for op in EXACT_MATH if op not in UNARY and op not in SHIFTS and op is not aten.cdist.default]


def _same(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 1e-30) -> None:
    """Equal shapes and dtypes, NaN and the infinities where want has them, finite values within tolerance."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    g, w = got[finite].double(), want[finite].double()
    bad = (g - w).abs() > atol + rtol * w.abs().clamp(min=1e-6)
    assert not bad.any(), (g[bad], w[bad])


RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3}  # float16: PyTorch rounds some steps in half


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("op", UNARY, ids=str)
def test_unary_edges_and_random_values(op, dtype):
    x = torch.tensor(SPECIAL, dtype=torch.float64)
    x = torch.cat([x, torch.randn(200, dtype=torch.float64) * 5, torch.rand(50, dtype=torch.float64)]).to(dtype)
    if op is aten.logit.default:
        x = torch.cat([x, torch.rand(50).to(dtype)])
    if op in (aten.sinh.default, aten.cosh.default):  # PyTorch answers inf or not there (see exact_math.sinh)
        x = x[~((x.abs() > 88.7) & (x.abs() < 89.5))]
    for extra in ARGS.get(op, [()]):
        _same(EXACT_MATH[op](x, *extra), op(x, *extra), RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("op", BINARY, ids=str)
def test_binary_edges_and_random_values(op, dtype):
    s = torch.tensor(SPECIAL, dtype=torch.float64)
    a, b = s.repeat_interleave(len(s)), s.repeat(len(s))  # every pair
    a = torch.cat([a, torch.randn(500, dtype=torch.float64) * 10]).to(dtype)
    b = torch.cat([b, torch.randn(500, dtype=torch.float64) * 10]).to(dtype)
    _same(EXACT_MATH[op](a, b), op(a, b), RTOL[dtype])


def test_signed_zeros_where_pytorch_gives_them():
    z = torch.tensor([0.0, -0.0])
    for fn, want in ((EXACT_MATH[aten.sinh.default], torch.sinh), (EXACT_MATH[aten.softshrink.default], F.softshrink)):
        assert torch.equal(torch.signbit(fn(z)), torch.signbit(want(z)))
    ys, xs = torch.tensor([0.0, -0.0, 0.0, -0.0]), torch.tensor([0.0, 0.0, -0.0, -0.0])
    got, want = EXACT_MATH[aten.atan2.default](ys, xs), torch.atan2(ys, xs)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    a, b = torch.tensor([-0.0, 0.0, 1.0, -1.0]), torch.tensor([5.0, -5.0, 5.0, -5.0])
    assert torch.equal(torch.signbit(EXACT_MATH[aten.floor_divide.default](a, b)), torch.signbit(a // b))


class Elementwise(torch.nn.Module):
    def forward(self, x, y):
        return (torch.sinh(x), torch.cosh(x), torch.logaddexp(x, y), F.logsigmoid(x), torch.atan2(x, y),
                torch.heaviside(x, y), torch.hypot(x, y), torch.fmax(x, y), torch.fmin(x, y), torch.exp2(x),
                torch.logit(x, eps=0.2), torch.logit(y), F.celu(x, 1.5), F.softshrink(x, 1.5), x // y)


def _inputs():
    x, y = torch.randn(4, 16) * 3, torch.randn(4, 16)
    x.view(-1)[:12] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.5, -1.5, 100.0, -100.0,
                                    float("inf"), 0.0, 87.5])
    y.view(-1)[:12] = torch.tensor([0.0, 0.0, float("inf"), float("-inf"), 1.0, 2.0, -0.0, 3.0, float("nan"),
                                    2.0, -0.0, 1.0])
    return x, y


@pytest.mark.parametrize("target", ["onnx-cpu", "tvm-cpu"])
def test_backends_answer_as_pytorch_at_the_edges(target):
    """Both backends compile the ops (before: sinh/cosh failed TVM's build; hypot, fmax, fmin, exp2 and logit
    were refused) and answer as eager where they did not: the compile-time check of the example inputs
    (which hold the special values) would have refused it otherwise, and fresh inputs are compared here."""
    import flashc

    if importlib.util.find_spec("onnxruntime" if target == "onnx-cpu" else "tvm") is None:
        pytest.skip(f"{target} is not installed")
    model = Elementwise()
    cm = flashc.compile(model, target, example_inputs=_inputs(), level=0)
    for _ in range(2):
        x, y = _inputs()
        x[-1] = (torch.randn(16) * 50).clamp(-80, 80)  # large, outside the band where sinh overflows or not
        for i, (got, want) in enumerate(zip(cm(x, y), model(x, y))):
            _same(got, want, 1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, float("inf")])
@pytest.mark.parametrize("rows", [3, 30])  # 30: PyTorch's matmul way for p = 2
def test_cdist_as_pytorch(p, rows):
    x1, x2 = torch.randn(2, rows, 5, dtype=torch.float64), torch.randn(2, 7, 5, dtype=torch.float64)
    x2[0, 0] = x1[0, 0]  # a distance of 0
    for a, b in ((x1, x2), (x1, x1)):
        torch.testing.assert_close(EXACT_MATH[aten.cdist.default](a, b, p), torch.cdist(a, b, p), rtol=1e-9, atol=1e-7)
    mm = EXACT_MATH[aten.cdist.default](x1, x1, 2.0, 1)
    torch.testing.assert_close(mm, torch.cdist(x1, x1, compute_mode="use_mm_for_euclid_dist"), rtol=1e-9, atol=1e-7)


class Shifts(torch.nn.Module):
    def forward(self, x, s):
        return x << s, x >> s, x << 3, x >> 2, torch.bitwise_left_shift(x, s), torch.bitwise_right_shift(7, s)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8])
@pytest.mark.parametrize("target", ["onnx-cpu", "tvm-cpu"])
def test_shifts_as_pytorch_beyond_the_width(target, dtype):
    """Shift amounts past the type's width and negative ones: 0, or the sign fill for >> of signed types, as
    PyTorch's kernels answer (LLVM's shifts are undefined there). TVM lowers the shifts itself; ONNX gets
    `x << s` of two tensors as bitwise_left_shift (EXACT_MATH). Built without the compile-time check."""
    import flashc

    if importlib.util.find_spec("onnxruntime" if target == "onnx-cpu" else "tvm") is None:
        pytest.skip(f"{target} is not installed")
    x, s = torch.randint(0, 100, (9,)).to(dtype), torch.arange(-2, 7).to(dtype)
    for op in SHIFTS:
        assert torch.equal(EXACT_MATH[op](x, s), op(x, s)) if op._overloadname == "Tensor" else torch.equal(
            EXACT_MATH[op](7, s), op(7, s))

    def inputs():
        low = 0 if dtype == torch.uint8 else -100
        x = torch.randint(low, 100, (4, 20)).to(dtype)
        return x, torch.cat([torch.arange(-3, 17), torch.randint(0, 80, (60,))]).view(4, 20).to(dtype)

    model = Shifts()
    cm = flashc.compile(model, target, example_inputs=inputs(), level=0, verify=False)
    args = inputs()
    for got, want in zip(cm(*args), model(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)
