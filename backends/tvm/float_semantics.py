"""TIR passes that keep PyTorch's floating-point answers where TVM's own lowering does not.

bfloat16_rounding: bfloat16 that rounds like PyTorch, whatever TVM then does with it.
TVM's llvm pipeline computes bfloat16 in float32 and folds `float32(bfloat16(x))` to
`x` once the two casts meet in one kernel: a fused `x.to(torch.bfloat16).float()` came
back unrounded, and a chain of bfloat16 ops rounded only where it was stored. PyTorch
rounds after every cast and every op. This pass makes that explicit before TVM's own
bfloat16 legalization: each cast to bfloat16 and each bfloat16 arithmetic result is
computed in float32 and rounded there to the nearest bfloat16 (ties to even), so the
cast that follows is exact and folding it changes nothing.

nan_propagating_min_max: TIR's max(a, b) is `a > b ? a : b`, which drops a NaN in `a`:
relu, clamp and hardtanh of NaN gave a number, torch.maximum(NaN, 1) gave 1, and a max
reduction forgot a NaN once a later element came. PyTorch propagates NaN from either
operand; the pass makes every float max/min return `a` when `a` is NaN (b's NaN already
comes through). Applied after scheduling, on llvm: CUDA's cross-thread reductions match
the reducer's exact form.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx
from tvm.ir import Op
from tvm.ir.expr import Call
from tvm.tirx import Add, Cast, Div, Max, Min, Mul, Sub

BF16, F32 = "bfloat16", "float32"
# bfloat16 Calls computed in float32 and rounded: math intrinsics (exp, sqrt, tanh, ...);
# these only move bits and stay as they are
_BIT_CALLS = {"tirx.reinterpret", "tirx.if_then_else", "tirx.likely"}


def round_to_bfloat16(x):
    """The float32 TIR expression x rounded to the nearest bfloat16 (ties to even), kept in
    float32; NaN stays NaN and values past bfloat16's range become +-inf, as in PyTorch."""
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
    bits = tirx.reinterpret("uint32", x)
    lsb = tirx.bitwise_and(tirx.shift_right(bits, u32(16)), u32(1))
    rounded = tirx.bitwise_and(bits + u32(0x7FFF) + lsb, u32(0xFFFF0000))
    return tirx.Select(tirx.isnan(x), x, tirx.reinterpret("float32", rounded))


def float64_to_float32_odd(x):
    """float64 x as float32 rounded to odd (truncated, lowest bit set when inexact): rounding
    that to bfloat16 then gives the correctly rounded bfloat16 of x (no double rounding)."""
    f = tirx.Cast(F32, x)
    bits = tirx.reinterpret("uint32", f)
    one = tirx.const(1, "uint32")
    # RNE rounded away from zero: step one float32 back towards zero (same sign, |f| > 0)
    away = tirx.abs(tirx.Cast("float64", f)) > tirx.abs(x)
    truncated = tirx.Select(away, bits - one, bits)
    inexact = tirx.Cast("float64", tirx.reinterpret(F32, truncated)) != x
    odd = tirx.Select(inexact, tirx.bitwise_or(truncated, one), truncated)
    # NaN, and values past float32's range (bfloat16 infinity either way), as the plain cast
    beyond = tirx.isnan(x) | (tirx.abs(x) > tirx.const(3.4028234663852886e38, "float64"))
    return tirx.Select(beyond, f, tirx.reinterpret(F32, odd))


def _as_float32(x):
    dtype = str(x.ty)
    if dtype == F32:
        return x
    if dtype == "float64":
        return float64_to_float32_odd(x)
    return Cast(F32, x)


def _rounded(value_f32):
    return Cast(BF16, round_to_bfloat16(value_f32))


def _rewrite_cast(cast):
    if str(cast.ty) != BF16 or str(cast.value.ty) not in (F32, "float16", "float64"):
        return cast
    return _rounded(_as_float32(cast.value))


def _rewrite_binary(make):
    def rewrite(e):
        if str(e.ty) != BF16:
            return e
        return _rounded(make(_as_float32(e.a), _as_float32(e.b)))

    return rewrite


def _rewrite_call(call):
    if (str(call.ty) != BF16 or not isinstance(call.op, Op) or call.op.name in _BIT_CALLS
            or not all(str(a.ty) == BF16 for a in call.args)):
        return call
    return _rounded(tirx.call_intrin(F32, call.op.name, *[Cast(F32, a) for a in call.args]))


def bfloat16_rounding():
    """A pass rounding every cast to bfloat16 and every bfloat16 +, -, *, / and math call as
    PyTorch does (computed in float32, rounded to nearest even)."""
    rules = [(Cast, _rewrite_cast), (Add, _rewrite_binary(lambda a, b: a + b)),
             (Sub, _rewrite_binary(lambda a, b: a - b)), (Mul, _rewrite_binary(lambda a, b: a * b)),
             (Div, _rewrite_binary(lambda a, b: a / b)), (Call, _rewrite_call)]

    @tirx.transform.prim_func_pass(opt_level=0, name="flashc.Bfloat16Rounding")
    def bfloat16_rounding_pass(func, _mod, _ctx):
        return tvm_ffi.structural_map(func, rules, order="post")

    return bfloat16_rounding_pass


def nan_propagating_min_max():
    """A pass making every float max/min propagate a NaN in either operand, as PyTorch."""

    def rewrite(e):
        if not str(e.ty).startswith(("float", "bfloat")):
            return e
        return tirx.Select(tirx.isnan(e.a), e.a, e)

    @tirx.transform.prim_func_pass(opt_level=0, name="flashc.NanPropagatingMinMax")
    def nan_propagating_pass(func, _mod, _ctx):
        return tvm_ffi.structural_map(func, [(Max, rewrite), (Min, rewrite)], order="post")

    return nan_propagating_pass
