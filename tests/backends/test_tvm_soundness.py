"""The TVM backend never answers silently wrong: small modules compiled for tvm-cpu against
eager PyTorch on fresh random inputs (row reductions, bfloat16/float16 casts, NaN and inf,
negative and out-of-range indices, batch norm and pooling, non-tensor outputs, in-place
writes), and every failure a flashc error naming the op and its line."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tvm", reason="Apache TVM is not installed: pip install apache-tvm==0.27.0.post1 "
                                  "apache-tvm-ffi==0.1.14.post0")

import flashc  # noqa: E402
from flashc.errors import FlashcError, InputError, UnsupportedOpError  # noqa: E402


def _compile(model, inputs, level=1):
    return flashc.compile(model.eval(), target="tvm-cpu", example_inputs=tuple(inputs), level=level)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.double(), ref.double()
    return ((g - r).norm() / (r.norm() or 1.0)).item()


def _same_values(got, ref) -> bool:
    """Equal values, NaN where NaN and infinities of the same sign."""
    if not isinstance(ref, torch.Tensor):
        return got == ref
    return (got.shape == ref.shape and got.dtype == ref.dtype
            and torch.equal(torch.isnan(got), torch.isnan(ref))
            and torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0)))


def _line_of(fn, marker: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if marker in line)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


# --- 1. row reductions (cpu_schedules.RowReductions) ------------------------------------

def _reductions(x):
    return (x.mean(-1), x.sum(-1), x.amax(-1), x.amin(-1), x.var(-1), x.std(-1, keepdim=True),
            x.mean(-1, keepdim=True), x.softmax(-1), torch.log_softmax(x, -1),
            torch.nn.functional.layer_norm(x, x.shape[-1:]), x - x.mean(-1, keepdim=True))


REDUCTION_SHAPES = [(4, 8), (4, 16), (3, 24), (2, 33), (5, 63), (1, 64), (17, 7), (6, 97), (2, 3, 40), (3, 2048)]


@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=["x".join(map(str, s)) for s in REDUCTION_SHAPES])
def test_row_reductions_match_eager_for_every_row(shape):
    """x.mean(-1) gave the last row's value for every row when the last dim was 8, 16, 24,
    33 or 63: the row loop of a one-value-per-row block was vectorized."""
    torch.manual_seed(sum(shape))
    model = Fn(_reductions)
    cm = _compile(model, (torch.randn(shape),))
    for _ in range(3):
        x = torch.randn(shape) * 3 + 1
        got, ref = cm(x), model(x)
        for i, (g, r) in enumerate(zip(got, ref)):
            if shape[-1] == 1 and i in (4, 5):  # variance of one element: NaN in both
                assert torch.isnan(g).all() and torch.isnan(r).all()
                continue
            assert g.shape == r.shape and _rel(g, r) < 2e-6, (i, _rel(g, r))


@pytest.mark.parametrize("shape,size", [((1, 512, 7, 7), 1), ((2, 64, 7, 7), (3, 3)), ((1, 8, 5, 9), (2, 4))])
def test_adaptive_avg_pool_matches_eager(shape, size):
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(size), torch.nn.Flatten(1))
    cm = _compile(model, (torch.randn(shape),))
    for _ in range(3):
        x = torch.randn(shape)
        assert _rel(cm(x), model(x)) < 1e-6


# --- 2. casts and float semantics (float_semantics.py, aten_ops) -------------------------

def _casts(x, y):
    return (x.to(torch.bfloat16).float(), x.half().float(), x.double().bfloat16().float(),
            (x.bfloat16() * y.bfloat16()).float(), (x.bfloat16() + y.bfloat16()).float(),
            (x.bfloat16() / 3).float(), x.to(torch.bfloat16), x.half(), (x.half() * y.half() + 1).float())


def test_casts_to_bfloat16_and_float16_round_like_eager():
    """x.to(bfloat16).float() came back unrounded once the two casts were fused."""
    model = Fn(_casts)
    cm = _compile(model, (torch.randn(4, 37), torch.randn(4, 37)))
    for _ in range(3):
        x, y = torch.randn(4, 37) * 100, torch.randn(4, 37)
        x[0, :6] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -7 + 2 ** -9, 3.4e38, float("inf"), float("nan")])
        for i, (g, r) in enumerate(zip(cm(x, y), model(x, y))):
            assert _same_values(g, r), i


def test_bfloat16_reductions_accumulate_in_float32():
    """PyTorch sums bfloat16 in float32 and rounds once; the frontend summed in bfloat16 (2.6% off)."""
    model = Fn(lambda x: (x.bfloat16().sum(-1), x.bfloat16().mean(-1), x.bfloat16().softmax(-1)))
    cm = _compile(model, (torch.randn(4, 512),))
    for _ in range(3):
        x = torch.randn(4, 512)
        for g, r in zip(cm(x), model(x)):
            assert g.dtype == torch.bfloat16 and _rel(g, r) < 5e-3


def test_nan_and_inf_keep_their_ieee_meaning():
    """TIR folded x * 0 to 0 and x - x to 0, dropped NaN in clamp/relu/maximum, and aborted
    the process on 1 / (x * 0.0)."""
    model = Fn(lambda x, y: (1 / (x * 0.0), x * 0, x - x, x == x, x != x, x / 0, x + float("inf"),
                             torch.relu(x), x.clamp(-1, 1), torch.nn.functional.hardtanh(x),
                             torch.maximum(x, y), torch.minimum(y, x), x.amax(-1), x.max(-1).values))
    cm = _compile(model, (torch.randn(3, 8), torch.randn(3, 8)))
    for _ in range(3):
        x, y = torch.randn(3, 8), torch.randn(3, 8)
        x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[1, 3] = -0.0
        y[2, 4] = float("nan")
        for i, (g, r) in enumerate(zip(cm(x, y), model(x, y))):
            assert _same_values(g, r), i


def test_true_division_of_integers_is_float_division():
    """int32 / int32 (and / a Python int) is PyTorch's float quotient; TVM's frontend divided as
    integers and cast the result (found by the differential fuzzer, seed 50217)."""
    model = Fn(lambda a, b: (a / b, a / 3, a // b))
    make = lambda: (torch.randint(-20, 21, (3, 4), dtype=torch.int32),
                    torch.randint(1, 6, (3, 4), dtype=torch.int32) * (torch.randint(0, 2, (3, 4)) * 2 - 1).int())
    cm = _compile(model, make(), level=2)
    for _ in range(2):
        a, b = make()
        for g, r in zip(cm(a, b), model(a, b)):
            assert g.dtype == r.dtype and torch.equal(g, r)


@pytest.mark.parametrize("level", [0, 2])
def test_attention_mask_filled_with_minus_infinity(level):
    """masked_fill(scores, causal_mask, -inf), as hand-written attention writes it (the frontend's
    fill of -inf failed to build; fuzz: 61 cases); NaN fills too."""
    def scores(x):
        s = (x @ x.transpose(-1, -2)).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1), x.masked_fill(x > 1, float("nan"))
    model = Fn(scores)
    cm = _compile(model, (torch.randn(2, 8, 8),), level=level)
    for _ in range(2):
        x = torch.randn(2, 8, 8)
        got, want = cm(x), model(x)
        assert _rel(got[0], want[0]) < 1e-6 and _same_values(got[1], want[1])


@pytest.mark.parametrize("level", [0, 2])
def test_tensors_filled_with_infinity_or_nan(level):
    """full_like / new_full / full with -inf, inf or NaN, as masks and running maxima start (TVM's
    legalization of a non-finite fill failed to build); a finite fill is unchanged."""
    def fills(x):
        low = torch.full_like(x, float("-inf"))
        return (torch.maximum(x, low), torch.where(x > 0, x, low), x.new_full((2, 3), float("nan")),
                x[0] + torch.full((4,), float("inf")), x + torch.full_like(x, 0.5))
    model = Fn(fills)
    cm = _compile(model, (torch.randn(3, 4),), level=level)
    for _ in range(2):
        x = torch.randn(3, 4)
        for g, r in zip(cm(x), model(x)):
            assert _same_values(g, r)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_instance_norm_keeps_precision_far_from_zero(offset):
    """InstanceNorm over inputs near 1000 (the frontend's E[x^2] - E[x]^2 was 0.3 off there), with and
    without affine weights, and with running statistics in eval mode; against float64."""
    torch.manual_seed(int(offset))
    tracked = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval()
    tracked.running_mean.uniform_(-1, 1)
    tracked.running_var.uniform_(0.5, 2.0)
    for model, shape in ((torch.nn.InstanceNorm1d(6), (2, 6, 16)), (torch.nn.InstanceNorm1d(6, affine=True), (2, 6, 16)),
                         (tracked, (2, 3, 4, 4))):
        model = model.eval()
        cm = _compile(model, (torch.randn(shape),))
        x = torch.randn(shape) + offset
        with torch.no_grad():
            ref = model.double()(x.double())
            eager = model.float()(x)
        assert (cm(x).double() - ref).abs().max() <= 4 * (eager.double() - ref).abs().max() + 1e-6


def test_arithmetic_promotes_integer_and_bool_operands_as_pytorch():
    """int tensor + 2.5 and * 0.5 are float, bool + 1 is int64, int32 + int64 is int64 (the frontend
    added 2 instead of 2.5 and failed to build bool + 1; fuzz: dtype_casts, integer_ops)."""
    model = Fn(lambda a, x: (a + 2.5, a * 0.5, a.int() - 1.25, (x > 0) + 1, a.int() + a, a / 4, (x > 0) * 2.5,
                             2.5 - a, x.half() * x))
    make = lambda: (torch.randint(-20, 21, (2, 8)), torch.randn(2, 8))
    for level in (0, 2):
        cm = _compile(model, make(), level=level)
        inputs = make()
        for g, r in zip(cm(*inputs), model(*inputs)):
            assert _same_values(g, r)


def test_alpha_scales_the_second_operand():
    """torch.add / sub / rsub with alpha (keyword, or positional in the Scalar overloads): the frontend dropped
    it (a + 0.75 * b came out a + b). Built without the compile-time check, which would catch it."""
    model = Fn(lambda a, b, i: (torch.add(a, b, alpha=0.75), torch.sub(a, b, alpha=2), torch.rsub(a, b, alpha=3),
                                torch.rsub(a, 2.0, alpha=3), torch.add(i, i, alpha=3), torch.sub(i, 2, alpha=-2),
                                torch.add(a, 2, alpha=0.5)))
    args = (torch.randn(5), torch.randn(5), torch.randint(-9, 9, (5,)))
    cm = flashc.compile(model, target="tvm-cpu", example_inputs=args, level=0, verify=False)
    args = (torch.randn(5), torch.randn(5), torch.randint(-9, 9, (5,)))
    for g, r in zip(cm(*args), model(*args)):
        assert g.dtype == r.dtype and _rel(g, r) < 1e-6


def test_comparisons_reversed_subtraction_and_fills_as_pytorch():
    """Comparisons with a bool tensor (the build failed: LLVM compared the bits as floats), an int tensor
    against a float number (compared as ints: a < 2.5 was a < 2), `1 - x` of a float tensor (the frontend's
    int32 1 minus a float tensor failed), new_full (no converter; lerp's decomposition makes one), and
    meshgrid (indexing='xy' came out transposed) and movedim (no converter), through PyTorch's own
    decompositions of them (fuzz: elementwise, shapes)."""
    model = Fn(lambda a, x: ((x > 0) == True, (x > 0) != 0, (x > 0) == (a > 0), (x > 0) < (a > 2), (x > 0) == x,  # noqa: E712
                             a < 2.5, a == 2.0, a >= x, 1 - x, 1 - x.sum(), x.new_full((3,), 2),
                             x.new_full((2, 2), True), torch.lerp(x, x * 2, 0.25),
                             *torch.meshgrid(x[0], a[1].float(), indexing="xy"), torch.movedim(x.view(2, 2, 4), 0, -1)))
    make = lambda: (torch.randint(-3, 4, (2, 8)), torch.randn(2, 8).round())
    for level in (0, 2):
        cm = _compile(model, make(), level=level)
        inputs = make()
        for g, r in zip(cm(*inputs), model(*inputs), strict=True):
            assert _same_values(g, r)


def test_adding_a_zero_keeps_the_sign_pytorch_gives():
    """-0.0 + 0.0 is +0.0: TVM's simplifier folded x + 0.0 to x (1 / (x * 0 + 0.0) was -inf for negative x;
    fuzz: cse_traps zero_sign); x - (-0.0) likewise; x - 0.0 and x + -0.0 are x, sign included."""
    model = Fn(lambda x: (1 / (x * 0 + 0.0), 1 / (x + 0.0), 1 / (x * 0 - -0.0), 1 / (x * 0 - 0.0), 1 / (x * 0 + -0.0)))
    make = lambda: (torch.cat([torch.tensor([-0.0, 0.0, -1.0, 2.0]), torch.randn(8)]),)
    for level in (0, 2):
        cm = _compile(model, make(), level=level)
        x = make()
        for g, r in zip(cm(*x), model(*x), strict=True):
            assert torch.equal(g, r)


def test_masked_scatter_as_pytorch_and_a_short_source_is_an_error():
    """masked_scatter (vision-language models merge image features into text embeddings so; TVM has no
    converter) through flashc's decomposition: masked positions in row-major order take the source's elements
    in turn, a broadcast mask too; a source with fewer elements than the mask selects raises, as in eager."""
    model = Fn(lambda x, m, rows, s: (x.masked_scatter(m, s) * 2, x.masked_scatter(rows, s)))

    def make():
        m = torch.zeros(12, dtype=torch.bool)
        m[torch.randperm(12)[:5]] = True  # 5 of 12 selected; one row of 4 by the [3, 1] mask
        return torch.randn(3, 4), m.view(3, 4), torch.arange(3).view(3, 1) == torch.randint(0, 3, ()), torch.randn(6)

    cm = _compile(model, make(), level=2)
    for _ in range(3):
        inputs = make()
        for g, r in zip(cm(*inputs), model(*inputs), strict=True):
            assert torch.equal(g, r)
    x, _, rows, s = make()
    with pytest.raises(InputError):  # 12 positions, 6 source elements
        cm(x, torch.ones(3, 4, dtype=torch.bool), rows, s)


def test_max_and_min_along_a_dim_keep_nan_and_its_index():
    """x.max(dim) / x.min(dim), argmax / argmin, amax / amin with NaN in some rows and rows of -inf or
    +inf: NaN and the first NaN's index, the first index of the extreme, infinities kept, as PyTorch
    (TVM's max and argmax passed over NaN, and a row of -inf came out as the lowest finite float;
    fuzz: reductions); ties and integer tensors as before."""
    model = Fn(lambda x: (x.max(-1), x.min(1, keepdim=True), x.max(0)[1], x.argmax(-1), x.argmin(1, keepdim=True),
                          x.argmax(), x.amax(-1), x.amin(-1), x.nan_to_num(0.0, 9.0, -9.0).round().int().max(-1)))

    def make():
        x = torch.randn(2, 3, 16)
        x.view(-1)[[5, 40, 41]] = float("nan")
        x[1, 2, 3] = x[1, 2, 9] = 50.0
        x[1, 0] = float("-inf")  # a row of -inf: TVM's max starts at the lowest finite float
        x[1, 1, :] = float("inf")
        return (x,)
    cm = _compile(model, make())
    for _ in range(2):
        inputs = make()
        for g, r in zip(cm(*inputs), model(*inputs)):
            for gi, ri in zip(g, r) if isinstance(r, tuple) else ((g, r),):
                assert _same_values(gi, ri)


def test_prod_over_all_or_one_dim_in_the_result_dtype():
    """prod (no converter: was refused): floats with NaN, inf and 0 among them, integers and bools
    multiplied in int64 as PyTorch, bfloat16 through float32."""
    model = Fn(lambda x, i: (x.prod(), x.prod(-1), x.prod(1, keepdim=True), i.prod(0), (i > 0).prod(-1),
                             x.bfloat16().prod(-1), i.int().prod(-1)))

    def make():
        x = torch.randn(3, 4, 5)
        x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = float("nan"), float("inf"), 0.0
        return x, torch.randint(-3, 4, (3, 4))
    cm = _compile(model, make())
    inputs = make()
    for g, r in zip(cm(*inputs), model(*inputs)):
        tol = 1e-2 if r.dtype == torch.bfloat16 else 1e-6
        assert g.dtype == r.dtype and torch.equal(torch.isnan(g), torch.isnan(r))
        assert _rel(g.nan_to_num(0.0, 1e30, -1e30), r.nan_to_num(0.0, 1e30, -1e30)) < tol


def test_where_between_two_numbers():
    """where(cond, 1.0, 0.0) and where(cond, 2, -1): the result's dtype, inf and NaN kept (fuzz: 40 refusals)."""
    model = Fn(lambda x: (torch.where(x > 0, 1.0, 0.0), torch.where(x > 0, 2, -1),
                          torch.where(x > 0, float("inf"), float("nan"))))
    cm = _compile(model, (torch.randn(3, 4),))
    x = torch.randn(3, 4)
    for g, r in zip(cm(x), model(x)):
        assert _same_values(g, r)


def test_integer_division_by_a_number_with_rounding_modes():
    """int64 // a Python int, floor and trunc, both signs (the frontend's int32 constant was refused)."""
    model = Fn(lambda i: (torch.div(i, 4, rounding_mode="floor"), torch.div(i, 3, rounding_mode="trunc"),
                          torch.div(i, -3, rounding_mode="trunc"), torch.div(i, -4, rounding_mode="floor"),
                          torch.div(i.int(), 5, rounding_mode="trunc")))
    make = lambda: (torch.randint(-20, 20, (3, 5)),)
    cm = _compile(model, make())
    for _ in range(2):
        (i,) = make()
        for g, r in zip(cm(i), model(i)):
            assert g.dtype == r.dtype and torch.equal(g, r)


def test_scatter_add_accumulates_repeated_indices_and_checks_their_range():
    """scatter_add (no converter in TVM's frontend): repeated indices add up, as in PyTorch; an
    index out of range is an InputError naming the input, as PyTorch raises."""
    from flashc.errors import InputError

    model = Fn(lambda x, i: x.scatter_add(1, i, x[:, :3] * 2))
    make = lambda: (torch.randn(2, 8, 12), torch.randint(0, 8, (2, 3, 12)))
    cm = _compile(model, make())
    for _ in range(2):
        x, i = make()
        assert _rel(cm(x, i), model(x, i)) < 1e-6
    with pytest.raises(InputError, match="input 'input_1'.*outside"):
        cm(x, torch.full((2, 3, 12), 8))


@pytest.mark.parametrize("reduce", ["sum", "prod", "amax", "amin"])
def test_scatter_reduce_with_and_without_self_and_nan(reduce):
    """scatter_reduce (no converter in TVM's frontend): repeated indices reduce together; without
    include_self the written positions forget their value; NaN reaching a position is NaN (amax,
    amin) and -inf an ordinary value, as in PyTorch. mean is refused by name."""
    model = Fn(lambda x, i, u: (x.scatter_reduce(1, i, u, reduce),
                                x.scatter_reduce(1, i, u, reduce, include_self=False)))
    make = lambda: (torch.randn(3, 6), torch.randint(0, 6, (3, 4)), torch.randn(3, 4))
    cm = _compile(model, make())
    for k in range(3):
        x, i, u = make()
        if k:
            u[0, 1], u[2, 0], x[1, 2] = float("nan"), float("-inf"), float("nan")
        for g, r in zip(cm(x, i, u), model(x, i, u)):
            assert torch.equal(g.isnan(), r.isnan()) and torch.allclose(g.nan_to_num(), r.nan_to_num())
    with pytest.raises(UnsupportedOpError, match="scatter_reduce with reduce='mean'"):
        _compile(Fn(lambda x, i, u: x.scatter_reduce(1, i, u, "mean")), make())


def test_max_pool_with_the_default_stride_and_ceil_mode():
    """F.max_pool2d(x, 2, ceil_mode=True) records stride [] (the kernel size), which TVM's frontend
    indexed; a partial last window (ceil_mode) reads only what is there."""
    model = Fn(lambda x, y: (torch.nn.functional.max_pool2d(x, 2, ceil_mode=True),
                             torch.nn.functional.max_pool1d(y, 3, ceil_mode=True)))
    make = lambda: (torch.randn(1, 2, 7, 7), torch.randn(1, 2, 8))
    cm = _compile(model, make())
    for _ in range(2):
        inputs = make()
        for g, r in zip(cm(*inputs), model(*inputs)):
            assert torch.equal(g, r)


def test_a_mismatch_whose_replay_cannot_run_is_still_a_verification_error(monkeypatch):
    """The pass replay that names the pass at fault runs on random inputs; where the model cannot
    take them (an integer division by zero) the mismatch is still reported as what it is."""
    from flashc import api
    from flashc.errors import VerificationError

    monkeypatch.setattr(api, "PassManager", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ZeroDivisionError")))
    captured = api.capture_program(Fn(lambda a: a + 1), (torch.ones(2),))
    with pytest.raises(VerificationError, match="ZeroDivisionError"):
        api.check_end_to_end(captured, captured, lambda a: [a], (torch.ones(2),), [], None, "tvm-cpu")


def test_division_by_a_constant_zero_builds_and_runs():
    """A zero tensor inlined under a division: TVM cannot fold the constant 1.0 / 0.0 and
    used to abort the process; the function is now left unscheduled and still right."""
    code = ("import torch, flashc\n"
            "class M(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        return (1.0 / torch.zeros_like(x)) * x, x / torch.zeros(3, 4)\n"
            "x = torch.randn(3, 4)\n"
            "cm = flashc.compile(M(), target='tvm-cpu', example_inputs=(x,), level=0)\n"
            "x = torch.randn(3, 4)\n"
            "for g, r in zip(cm(x), M()(x)):\n"
            "    assert torch.equal(g, r), (g, r)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# --- 3 and 4. indices (indexing.py) -----------------------------------------------------

class _Indexing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.register_buffer("picked", torch.tensor([-1, 0, -3]))

    def forward(self, ids, x, j):
        written = x * 1
        written[:, j - 3] = 7.0  # index_put_ with a negative index, into a tensor of the graph's own
        return (self.emb(ids), x[:, :, [-2], :], x[:, :, -1], x[..., -3:-1], x.narrow(3, -2, 2), x[:, :, 1:-1:2],
                torch.index_select(x, 1, j), torch.gather(x, 3, j.view(1, 1, 1, -1).expand(2, 3, 6, 2)),
                x[:, self.picked], x[:, j - 3], written)


def _indexing_inputs():
    return torch.randint(0, 10, (2, 5)), torch.randn(2, 3, 6, 4), torch.randint(0, 3, (2,))


@pytest.mark.parametrize("level", [0, 3])
def test_negative_indices_count_from_the_end(level):
    """x[:, :, [-2], :] (Falcon's attention) was read as row 4 of 6."""
    model = _Indexing()
    cm = _compile(model, _indexing_inputs(), level)
    for _ in range(3):
        inputs = _indexing_inputs()
        for i, (g, r) in enumerate(zip(cm(*inputs), model(*inputs))):
            assert torch.equal(g, r), i


def test_several_index_tensors_index_together_as_in_pytorch():
    """x[:, i, j] zips i and j ([B, n]; TVM's frontend took them one after the other: [B, n, n]);
    apart (x[i, :, j]) their dims come first; they broadcast ([3, 1] with [4]); unfold's im2col
    indexes two dims after two whole ones. Negative indices count from the end, out of range is
    an InputError."""
    model = Fn(lambda x, i, j: (x[:, i, j], x[i, :, j], x[:, :, i.view(-1, 1), j.view(1, -1)],
                                torch.nn.functional.unfold(x, 2)))
    make = lambda: (torch.randn(5, 5, 6, 6), torch.randint(-5, 5, (3,)), torch.randint(-6, 6, (3,)))
    cm = _compile(model, make())
    for _ in range(2):
        inputs = make()
        for k, (g, r) in enumerate(zip(cm(*inputs), model(*inputs))):
            assert g.shape == r.shape and torch.equal(g, r), k
    with pytest.raises(InputError, match=r"input 'input_2': indices 0\.\.6 are outside \[-6, 6\)"):
        cm(make()[0], torch.zeros(3, dtype=torch.long), torch.tensor([0, 6, 1]))


def test_tensor_unfold_windows_every_dim_size_and_step():
    """Tensor.unfold (a view in PyTorch: sliding windows as a new last dim), on a first, middle and last dim,
    windows that overlap, touch or leave a remainder, then used in arithmetic; its output is a fresh tensor."""
    model = Fn(lambda x: (x.unfold(0, 2, 1), x.unfold(1, 3, 2) * 2, x.unfold(-1, 4, 3) + 1, x.unfold(2, 7, 1),
                          x.unfold(1, 1, 5)))
    cm = _compile(model, (torch.randn(3, 5, 7),))
    for _ in range(2):
        x = torch.randn(3, 5, 7)
        for k, (g, r) in enumerate(zip(cm(x), model(x))):
            assert g.shape == r.shape and torch.equal(g, r), k


@pytest.mark.parametrize("ids,j,message", [
    (torch.full((2, 5), 10), torch.tensor([0, 1]), r"input 'ids': indices 10\.\.10 are outside \[0, 10\).*embedding"),
    (torch.full((2, 5), -1), torch.tensor([0, 1]), r"input 'ids': indices -1\.\.-1 are outside \[0, 10\)"),
    (torch.zeros(2, 5, dtype=torch.long), torch.tensor([3, 0]), r"input 'j': indices 0\.\.3 .*index_select"),
])
def test_out_of_range_indices_raise_input_error(ids, j, message):
    """Token ids past the vocabulary returned logits; eager raises IndexError."""
    model = _Indexing()
    cm = _compile(model, _indexing_inputs())
    with pytest.raises(InputError, match=message):
        cm(ids, torch.randn(2, 3, 6, 4), j)
    ok = _indexing_inputs()
    assert torch.equal(cm(*ok)[0], model(*ok)[0])  # the model still works after the error


def test_index_checks_survive_export_and_runtime_only_load(tmp_path):
    from flashc.backends.tvm import build_tvm, load_tvm_artifact
    from flashc.capture import capture

    model = torch.nn.Embedding(10, 4)
    build_tvm(capture(model, (torch.zeros(1, 3, dtype=torch.long),)), "llvm").export(tmp_path / "art")
    loaded = load_tvm_artifact(tmp_path / "art")
    ids = torch.tensor([[1, 9, 0]])
    assert torch.equal(loaded(ids)[0], model(ids))
    with pytest.raises(InputError, match="below the vocabulary size, 10"):
        loaded(torch.tensor([[1, 12, 0]]))


def test_constant_index_out_of_range_is_refused_at_compile_time():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rows", torch.tensor([0, 5]))

        def forward(self, x):
            return torch.index_select(x, 0, self.rows)

    with pytest.raises(UnsupportedOpError, match=r"aten.index_select.*constant indices 0\.\.5 are outside \[0, 3\)"):
        _compile(M(), (torch.randn(3, 4),))


# --- 5. batch norm and pooling (aten_ops) ------------------------------------------------

class _ConvBlock(torch.nn.Module):
    """A ResNet stem in miniature: conv, BatchNorm2d (eval), ReLU, max pool, adaptive pool, fc."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        return self.fc(torch.flatten(self.avg(self.pool(torch.relu(self.bn(self.conv(x))))), 1)), self.bn(self.conv(x))


@pytest.mark.parametrize("level", [0, 1])
def test_batch_norm_in_eval_mode_uses_running_statistics(level):
    """The frontend read batch_norm's `training` flag as the momentum and normalized with the
    batch's statistics (a ResNet-18 was 79% off)."""
    torch.manual_seed(level)
    model = _ConvBlock().eval()
    cm = _compile(model, (torch.randn(2, 3, 12, 12),), level)
    for _ in range(3):
        x = torch.randn(2, 3, 12, 12)
        for g, r in zip(cm(x), model(x)):
            assert _rel(g, r) < 1e-5


def test_normalization_without_weight_or_bias_matches_eager():
    """The frontend's layer_norm and group_norm converters failed (KeyError: None) without affine."""
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 4, affine=False), torch.nn.LayerNorm(5, elementwise_affine=False),
                                torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(5, bias=False))
    cm = _compile(model, (torch.randn(2, 4, 5),))
    for _ in range(3):
        x = torch.randn(2, 4, 5) * 2 + 1
        assert _rel(cm(x), model(x)) < 1e-6


def test_batch_norm_in_training_mode_is_refused():
    """Capture puts models in eval mode; a graph with training-mode batch norm (it would update
    the running statistics in place) is refused rather than run without the update."""
    from flashc.backends.tvm import build_tvm
    from flashc.capture import capture

    program = capture(torch.nn.BatchNorm1d(4), (torch.randn(3, 4),))
    node = next(n for n in program.op_nodes() if n.target == torch.ops.aten.batch_norm.default)
    node.update_arg(5, True)
    with pytest.raises(UnsupportedOpError, match=r"aten.batch_norm.*training mode.*model.eval\(\)"):
        build_tvm(program, "llvm")


# --- 6. non-tensor outputs ----------------------------------------------------------------

def test_non_tensor_outputs_come_back_as_they_are(tmp_path):
    """A model returning `x * 2, None, 3` crashed the process in Relax's Tuple."""
    model = Fn(lambda x: (x * 2, None, 3, x.sum(), 0.5))
    cm = _compile(model, (torch.randn(3, 4),))
    for _ in range(3):
        x = torch.randn(3, 4)
        got = cm(x)
        assert got[1] is None and got[2] == 3 and got[4] == 0.5
        assert torch.equal(got[0], x * 2) and _rel(got[3], x.sum()) < 1e-6
    cm.save(tmp_path / "art")
    again = flashc.load(tmp_path / "art")(x)
    assert again[1] is None and again[2] == 3 and torch.equal(again[0], x * 2)


# --- 7. in-place writes (in_place.py) ------------------------------------------------------

class _LocalWrites(torch.nn.Module):
    """In-place writes to tensors the graph allocates, read after the write."""

    def forward(self, x):
        y = x * 2
        y.add_(1)
        z = y.clone()
        z.mul_(x).div_(3)
        m = x.clone()
        m.masked_fill_(x > 0, 0.0)
        total = m.sum()
        m.add_(total)
        return y, z, m, m.reshape(-1)


def test_in_place_writes_to_temporaries_are_carried():
    model = _LocalWrites()
    cm = _compile(model, (torch.randn(3, 4),), level=0)
    for _ in range(3):
        x = torch.randn(3, 4)
        for g, r in zip(cm(x), model(x)):
            assert _rel(g, r) < 1e-6


class _CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(3, 4))

    def forward(self, x):
        before = self.seen.sum(-1)
        self.seen.mul_(0.5).add_(x, alpha=0.75)  # a chain, alpha (the frontend dropped it)
        return self.seen * 1, before


class _ScalesInput(torch.nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class _WritesUnderAView(torch.nn.Module):
    def forward(self, x):
        y = x + 1
        first = y[0]
        y.add_(1)
        return first * 1


class _KvCache(torch.nn.Module):
    """A static cache in a buffer, written as people write it: slice assignment, index_copy_, index_put_,
    a write through a transposed view; read through a view taken before the writes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.zeros(2, 8, 4))

    def forward(self, x, pos):
        window = self.k[:, :4]
        self.k[:, 2:4] = x
        self.k.index_copy_(1, pos, x[:, :1] * 3)
        self.k.index_put_((torch.tensor([1]), pos + 1), x[1, 1:] - 1, accumulate=True)
        self.k.transpose(1, 2)[0, 1].add_(1)
        return self.k.sum(1), window * 1


def _inputs(model):
    if isinstance(model, _KvCache):
        return (torch.randn(2, 2, 4), torch.randint(4, 7, (1,)))
    return (torch.randn(3, 4),)


@pytest.mark.parametrize("model_type", [_CountsCalls, _ScalesInput, _WritesUnderAView, _KvCache])
def test_writes_to_state_inputs_and_through_views_are_carried(model_type, tmp_path):
    """The module returns the final values of the written buffers and inputs; the runtime writes them back
    (the buffer into the compiled program's params, the input into the caller's tensor): over three calls
    on fresh inputs the outputs, the caller's tensors and the state are eager's, and so after save/load."""
    reference, model = model_type(), model_type()
    cm = _compile(model, _inputs(model), level=0)
    buffers = dict(reference.named_buffers())
    for _ in range(3):
        args = _inputs(model)
        mine = tuple(a.clone() for a in args)
        want, got = reference(*args), cm(*mine)
        for g, r in zip(got if isinstance(got, (tuple, list)) else [got], want if isinstance(want, tuple) else [want]):
            assert _rel(g, r) < 1e-6
        assert all(torch.equal(a, b) for a, b in zip(mine, args))  # inputs written as eager writes them
    for name, value in buffers.items():  # the state lives in the compiled program, like the cpu target's
        (stored,) = [t for k, t in cm.program.params.items() if k.endswith(name)]
        assert _rel(stored, value) < 1e-6
    if buffers:
        cm.save(tmp_path / "art")
        loaded = flashc.load(tmp_path / "art")
        args = _inputs(model)
        want, got = reference(*args), loaded(*(a.clone() for a in args))
        assert all(_rel(g, r) < 1e-6 for g, r in zip(got, want))


class _WritesAnExpand(torch.nn.Module):
    def forward(self, x):
        y = x[:1].clone().expand(3, 4)
        y.add_(1)  # WRITES_EXPAND
        return y * 1


def test_a_write_through_overlapping_elements_is_refused_naming_op_and_line():
    """y.expand(...).add_(1) adds once per element of y however many views share it: no scatter says that."""
    with pytest.raises(UnsupportedOpError) as e:
        flashc.compile(_WritesAnExpand(), target="tvm-cpu", example_inputs=(torch.randn(3, 4),), level=0)
    msg = str(e.value)
    assert "aten.add_" in msg and "a view whose elements overlap" in msg and "target 'cpu'" in msg
    assert f"test_tvm_soundness.py:{_line_of(_WritesAnExpand.forward, 'WRITES_EXPAND')}" in msg


# --- 8. raw exceptions become flashc errors -----------------------------------------------

def test_converter_errors_become_unsupported_op_errors_with_the_cause(monkeypatch):
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from flashc.backends.tvm import build_tvm
    from flashc.capture import capture

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x)  # THE_TANH

    original = ExportedProgramImporter.create_convert_map

    def broken(self):
        table = original(self)
        table["tanh.default"] = lambda node: {}[None]
        return table

    monkeypatch.setattr(ExportedProgramImporter, "create_convert_map", broken)
    with pytest.raises(UnsupportedOpError) as e:
        build_tvm(capture(M(), (torch.randn(2, 3),)), "llvm")
    assert "aten.tanh, node tanh" in str(e.value) and "KeyError" in str(e.value)
    assert f"test_tvm_soundness.py:{_line_of(M.forward, 'THE_TANH')}" in str(e.value)
    assert isinstance(e.value.__cause__, KeyError)


def test_tvm_build_errors_become_flashc_errors(monkeypatch):
    import tvm

    from flashc.backends.tvm import build_tvm
    from flashc.capture import capture

    def failing(*_args, **_kwargs):
        raise tvm.error.InternalError("Check failed: something in fused_exp_add")

    monkeypatch.setattr(tvm, "compile", failing)
    with pytest.raises(FlashcError, match=r"TVM failed to build the lowered model in fused_exp_add") as e:
        build_tvm(capture(Fn(lambda x: x.exp() + 1), (torch.randn(2, 3),)), "llvm")
    assert isinstance(e.value.__cause__, tvm.error.InternalError)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch warns about the degrees of freedom
def test_variance_of_fewer_elements_than_the_correction_is_inf_or_nan_as_eager():
    model = Fn(lambda x: (x.var(-1, correction=3), x[:, :1].var(-1), x.std(-1, correction=0)))
    cm = _compile(model, (torch.randn(4, 2),), level=0)
    x = torch.randn(4, 2)
    x[0] = 1.0
    for g, r in zip(cm(x), model(x)):
        assert _same_values(g, r) or (_rel(g[torch.isfinite(r)], r[torch.isfinite(r)]) < 1e-6
                                      and torch.equal(torch.isfinite(g), torch.isfinite(r)))
    assert math.isnan(cm(x)[0][0]) and math.isinf(cm(x)[0][1])


# --- sorting with NaN: PyTorch puts NaN after every number (first when descending) -------

def _with_nan_and_inf(dtype):
    x = torch.randn(6, 9).to(dtype)
    x[0, 3] = float("nan")
    x[1, [1, 4]] = float("inf")
    x[1, 6] = float("nan")  # NaN and +inf in one row: NaN's index after inf's
    x[2] = float("nan")
    x[3, 0] = float("-inf")
    x[4, 2:5] = float("nan")
    return x  # rows 5: numbers only


SORTS = {
    "sort": lambda x: torch.sort(x, -1),
    "sort_descending": lambda x: torch.sort(x, 0, descending=True),
    "topk": lambda x: torch.topk(x, 4, -1),
    "topk_smallest": lambda x: torch.topk(x, 3, -1, largest=False),
    "msort": lambda x: torch.msort(x),
    "median": lambda x: x.median(-1).values,
    "median_all": lambda x: x.median() + x,
    "nanmedian": lambda x: x.nanmedian(0, keepdim=True).values,
    "kthvalue": lambda x: torch.kthvalue(x, 3, -1).values,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(SORTS))
def test_sorting_orders_nan_as_pytorch_does(name, dtype):
    """TVM's sort compared NaN as it came (a row holding one came out in another order, its median a number);
    flashc sorts floats with NaN after every number, and (nan)median and kthvalue decompose into that sort."""
    fn = SORTS[name]
    cm = _compile(Fn(fn), [torch.randn(6, 9).to(dtype)])
    x = _with_nan_and_inf(dtype)
    got, ref = cm(x), fn(x)
    got, ref = (got, ref) if isinstance(ref, torch.Tensor) else (tuple(got), tuple(ref))
    values_got, values_ref = (got[0], ref[0]) if isinstance(ref, tuple) else (got, ref)
    assert _same_values(values_got, values_ref), (values_got, values_ref)
    if isinstance(ref, tuple):  # indices: rows without ties (2 and 4 tie among their NaNs; PyTorch leaves that open)
        rows = [0, 1, 3, 5] if name != "sort_descending" else slice(None)
        i_got, i_ref = got[1], ref[1]
        if name == "sort_descending":  # along dim 0: columns 2-4 hold two NaNs
            i_got, i_ref = i_got[:, [0, 1, 5, 6, 7, 8]], i_ref[:, [0, 1, 5, 6, 7, 8]]
        assert torch.equal(i_got[rows], i_ref[rows]), (i_got, i_ref)


def test_indices_of_a_median_are_refused_rather_than_computed_by_tvms_sort():
    with pytest.raises(UnsupportedOpError, match=r"aten.median.*sorts NaN as a number"):
        _compile(Fn(lambda x: x.median(-1).indices), [torch.randn(4, 5)])
    with pytest.raises(UnsupportedOpError, match=r"aten.sort.*float64"):
        _compile(Fn(lambda x: x.sort(-1).indices), [torch.randn(4, 5, dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("exponent", [0.5, -0.5, 2, 3, -1, 1.5])
def test_powers_of_a_scalar_as_pytorch_computes_them(exponent, dtype):
    """x ** 0.5 is sqrt in PyTorch (NaN at -inf, -0.0 at -0.0) and x ** -0.5 its reciprocal; TVM's power gave inf,
    and failed to build for bfloat16 (now computed in float32 and rounded once)."""
    fn = lambda x: x ** exponent  # noqa: E731
    cm = _compile(Fn(fn), [torch.rand(2, 8).to(dtype) + 0.5])
    x = torch.tensor([[float("-inf"), -0.0, -1.0, float("inf"), 0.0, 4.0, 2.5, float("nan")],
                      [0.3, -2.0, 7.0, 1e-3, 30.0, -0.5, 1.0, 2.0]]).to(dtype)
    assert _same_values(cm(x), fn(x)), (cm(x), fn(x))


@pytest.mark.parametrize("divisor", [0.7, -3, 0.0, -0.0])
def test_floor_division_of_floats_by_a_number(divisor):
    """x // 0.7: TVM's converter gave inf for inf // 0.7 (PyTorch: NaN); flashc's exact decomposition took only a
    tensor divisor, so a number went to that converter. Signs of zero as PyTorch's."""
    fn = lambda x: x // divisor  # noqa: E731
    cm = _compile(Fn(fn), [torch.randn(1, 12)])
    x = torch.tensor([[-1.5, 2.5, 300.7, float("inf"), 0.5, -0.5, 1e10, float("nan"), -0.0, 0.7, -1.4, float("-inf")]])
    got, want = cm(x), fn(x)
    assert _same_values(got, want) and torch.equal(torch.signbit(got), torch.signbit(want)), (got, want)
