"""Elementwise math written in simpler ATen ops with PyTorch's answers at the edges.

A backend's converter for these ops is missing or gives another answer than PyTorch where the
inputs are special (found by the differential fuzzer's `elementwise` family):
  * logaddexp(inf, inf) was NaN (ONNX and TVM: inf - inf inside), PyTorch inf;
  * log_sigmoid of a large negative x was -inf on ONNX (log of an underflowed sigmoid), PyTorch x;
  * atan2 of two zeros or two infinities was NaN on ONNX (atan(y / x)), PyTorch 0, pi, pi/4, ...;
  * heaviside was off on ONNX (0.27 relative error) and refused by TVM;
  * celu was 1.2% off on TVM (its converter has exp(x) / alpha - 1 for exp(x / alpha) - 1), and
    softshrink(+-inf) NaN (it masks by multiplying, and inf * 0 is NaN);
  * sinh and cosh failed TVM's build (no LLVM intrinsic); floor division of floats on TVM gave
    inf where PyTorch, dividing as fmod does, gives NaN (inf // 2);
  * hypot, fmax, fmin, exp2 and cdist have no converter on one of them, logit's torchlib function fails.
The backends name the ops they leave to these (`REFUSED` in the ONNX table, `FRONTEND_BROKEN` in
the TVM backend); `passes/decompose.py` splices them in where a node's op is not lowered. Each
takes the op's arguments and returns its result; float16 and bfloat16 are computed in float32 and
rounded once, as PyTorch's CPU kernels do. Each formula is PyTorch's own kernel (c10 / ATen's
CPU loops), including how NaN, the infinities and signed zeros pass through it.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable

import numpy
import torch

aten = torch.ops.aten
LN2 = math.log(2.0)


def _float32(fn: Callable) -> Callable:
    """fn computed in float32 for half-precision tensors, its result rounded back to their dtype."""

    def wrapped(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        dtype = torch.result_type(*tensors) if len(tensors) > 1 else tensors[0].dtype
        if dtype in (torch.float16, torch.bfloat16):
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            return fn(*args, **kwargs).to(dtype)
        return fn(*args, **kwargs)

    return wrapped


def _negative(x: torch.Tensor) -> torch.Tensor:
    """x < 0, -0.0 included (1 / -0.0 is -inf); NaN is not negative."""
    return (x < 0) | ((x == 0) & (1 / x < 0))


@_float32
def sinh(x):
    """Small |x|: (expm1(x) - expm1(-x)) / 2 (no cancellation, sign of zero kept); else
    e^(|x| - ln 2) - e^(-|x| - ln 2) with x's sign: finite up to |x| = 89.4 in float32, as C's sinh and
    PyTorch's scalar loop (its vectorized loop overflows from 88.7, where e^x does: PyTorch itself answers
    either way between the two, by the tensor's length)."""
    a = x.abs()
    small = (torch.expm1(x) - torch.expm1(-x)) / 2
    big = torch.exp(a - LN2) - torch.exp(-a - LN2)
    return torch.where(a < 1, small, torch.where(x < 0, -big, big))


@_float32
def cosh(x):
    a = x.abs()
    return torch.exp(a - LN2) + torch.exp(-a - LN2)


@_float32
def logaddexp(a, b):
    """max + log1p(exp(-|a - b|)); two equal infinities are themselves (inf - inf is NaN)."""
    m = torch.maximum(a, b)
    out = m + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.where(torch.isinf(a) & (a == b), a, out)


@_float32
def log_sigmoid(x):
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


@_float32
def atan2(y, x):
    """atan(y / x), moved by pi into the left half-plane; two zeros and two infinities, where y / x is
    NaN, as C's atan2: +-0 or +-pi, +-pi/4 or +-3pi/4, by the signs (signed zeros included)."""
    y_neg, x_neg = _negative(y), _negative(x)
    t = torch.atan(y / x)
    sign = torch.where(y_neg, -1.0, 1.0).to(t.dtype)  # (a where of two numbers is float32: pi would be too)
    t = torch.where(x_neg, t + sign * math.pi, t)
    zeros = torch.where(x_neg, sign * math.pi, sign * 0.0)
    infs = torch.where(x_neg, sign * (3 * math.pi / 4), sign * (math.pi / 4))
    t = torch.where((y == 0) & (x == 0), zeros, t)
    return torch.where(torch.isinf(y) & torch.isinf(x), infs, t)


def heaviside(x, values):
    dtype = torch.result_type(x, values)
    return torch.where(x == 0, values.to(dtype), (x > 0).to(dtype))


@_float32
def hypot(x, y):
    """max * sqrt(1 + (min / max)^2): no overflow of the squares; an infinity wins over NaN."""
    a, b = x.abs(), y.abs()
    big, small = torch.maximum(a, b), torch.minimum(a, b)
    h = big * torch.sqrt(1 + (small / big) ** 2)
    h = torch.where(big == 0, 0.0, h)
    return torch.where(torch.isinf(a) | torch.isinf(b), math.inf, h)


def fmax(a, b):
    return torch.where(torch.isnan(a), b, torch.where(torch.isnan(b), a, torch.maximum(a, b)))


def fmin(a, b):
    return torch.where(torch.isnan(a), b, torch.where(torch.isnan(b), a, torch.minimum(a, b)))


def exp2(x):
    return torch.pow(2.0, x)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """value as the nearest number of dtype (a Python float: no constant tensor in the graph)."""
    if dtype == torch.float64:
        return value
    if dtype == torch.float16:
        return float(numpy.float16(value))
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    if dtype != torch.bfloat16:
        return single
    bits = struct.unpack("<I", struct.pack("<f", single))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest, ties to even
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def logit(x, eps=None):
    """log(z / (1 - z)), z = x clamped to [eps, 1 - eps], both bounds in x's dtype as PyTorch has them
    (in float16 1 - 1e-6 is 1: logit(2.0) is inf); NaN passes through the clamp (it compares false)."""
    dtype = x.dtype
    if eps is not None:
        lo, hi = _rounded(eps, dtype), _rounded(1 - eps, dtype)
        x = torch.where(x < lo, lo, torch.where(x > hi, hi, x))
    return torch.log(x / (1 - x))  # in float16 each step rounds to float16, as PyTorch's kernel


@_float32
def celu(x, alpha=1.0):
    return torch.where(x > 0, x, alpha * torch.expm1(x / alpha))


def softshrink(x, lambd=0.5):
    return torch.where(x > lambd, x - lambd, torch.where(x < -lambd, x + lambd, x * 0))


@_float32
def floor_divide(a, b):
    """c10's div_floor_floating: (a - fmod(a, b)) / b, one less where the remainder's sign is not b's,
    rounded to the nearest integer; a zero quotient with the sign of a / b; a / b where b is 0."""
    q = a / b
    if not isinstance(b, torch.Tensor) and b == 0:  # a number (x // 0.7): decided here, no constant tensor
        return q
    mod = torch.fmod(a, b)
    div = (a - mod) / b
    div = torch.where((mod != 0) & ((mod < 0) != (b < 0)), div - 1, div)
    floor = torch.floor(div)
    floor = torch.where(div - floor > 0.5, floor + 1, floor)
    out = torch.where(div != 0, floor, q * 0)
    return torch.where(b == 0, q, out) if isinstance(b, torch.Tensor) else out


def cdist(x1, x2, p=2.0, compute_mode=None):
    """PyTorch's two ways: for p = 2 with more than 25 rows on a side (or compute_mode 1, use_mm), through a
    matmul (|x|^2 + |y|^2 - 2 x.y, clamped at 0 before the square root: PyTorch's CPU answer for a point and
    itself is 0); else the p-norm of every difference (p = 0 counts the nonzero ones, p = inf takes the
    largest). The matmul way cancels: small distances carry absolute errors of about sqrt(eps) |x| (1e-3 in
    float32) in PyTorch as in any backend, each rounding its own way."""
    rows = max(x1.shape[-2], x2.shape[-2])
    if p == 2 and (compute_mode == 1 or (compute_mode is None and rows > 25)):
        x_norm, y_norm = x1.pow(2).sum(-1, keepdim=True), x2.pow(2).sum(-1, keepdim=True)
        x = torch.cat([x1 * -2, x_norm, torch.ones_like(x_norm)], -1)
        y = torch.cat([x2, torch.ones_like(y_norm), y_norm], -1)
        return (x @ y.transpose(-1, -2)).clamp_min(0).sqrt()
    diff = (x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs()
    if p == 0:
        return (diff != 0).to(diff.dtype).sum(-1)
    if p == math.inf:
        return diff.amax(-1)
    if p == 1:
        return diff.sum(-1)
    if p == 2:
        return diff.pow(2).sum(-1).sqrt()
    return diff.pow(p).sum(-1).pow(1 / p)


EXACT_MATH: dict[Any, Callable] = {
    aten.sinh.default: sinh,
    aten.cosh.default: cosh,
    aten.logaddexp.default: logaddexp,
    aten.log_sigmoid.default: log_sigmoid,
    aten.atan2.default: atan2,
    aten.heaviside.default: heaviside,
    aten.hypot.default: hypot,
    aten.fmax.default: fmax,
    aten.fmin.default: fmin,
    aten.exp2.default: exp2,
    aten.logit.default: logit,
    aten.celu.default: celu,
    aten.softshrink.default: softshrink,
    aten.floor_divide.default: floor_divide,
    aten.cdist.default: cdist,  # for floats: the backends divide integers right
    # `x << y` of two tensors is the bitwise_left_shift kernel under another name (ONNX lowers only that one)
    aten.__lshift__.Tensor: torch.bitwise_left_shift,
    aten.__rshift__.Tensor: torch.bitwise_right_shift,
    aten.bitwise_right_shift.Scalar_Tensor: lambda x, s: torch.bitwise_right_shift(torch.full_like(s, x), s),
}
"""op -> its exact decomposition (see the module docstring)."""
