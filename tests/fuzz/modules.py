"""A seeded generator of small nn.Modules for differential testing (see harness.py).

Each family writes the Python source of one module (class `Model`) and of its inputs
(`make_inputs(g)`, g a torch.Generator), with sizes, dtypes, constants and spellings drawn
from `random.Random(seed)`. Keeping the case as source makes a failure a standalone
repro: the runner writes it to a file and `run.py --replay FILE` runs it again.

The family of a seed is `FAMILY_NAMES[seed % len(FAMILY_NAMES)]`, so a seed alone names
a case. Families are the behaviours a compiler gets silently wrong: in-place writes
and aliasing, constants that compare equal but are not (True/1, 0.0/-0.0, 2/2.0),
casts, reductions, and the spellings (and look-alikes) of the patterns flashc fuses.
"""

from __future__ import annotations

import random
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

HEADER = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"

# Constants far from 0 and exactly representable in fp16, so a literal never prints as -0.00.
CONSTANTS = [0.5, -1.5, 2.0, 3.25, -0.75, 1.25, -2.5, 0.125, 4.0, -3.0]


@dataclass
class Case:
    """One generated module: its family, seed, spelling variant and source."""

    family: str
    seed: int
    variant: str
    source: str
    _namespace: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def _ns(self) -> dict[str, Any]:
        if self._namespace is None:
            ns: dict[str, Any] = {"__name__": f"fuzz_case_{self.seed}"}
            exec(compile(self.source, f"<fuzz {self.family} seed {self.seed}>", "exec"), ns)
            self._namespace = ns
        return self._namespace

    def build(self) -> torch.nn.Module:
        """A fresh instance; its parameters and buffers depend only on the seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._ns()["Model"]().eval()

    def inputs(self, stream: int) -> tuple:
        """Fresh inputs; stream 0 is the compile's example inputs, 1.. the calls."""
        g = torch.Generator().manual_seed(self.seed * 1009 + stream)
        args = self._ns()["make_inputs"](g)
        return args if isinstance(args, tuple) else (args,)


def _module(init: list[str], args: str, body: list[str], inputs: list[str], helpers: str = "") -> str:
    """Source of class Model (init lines, forward(self, args) body) and make_inputs(g)."""
    init_src = "\n".join(["super().__init__()", *init])
    parts = [HEADER]
    if helpers:
        parts.append(textwrap.dedent(helpers).strip() + "\n")
    parts.append("class Model(nn.Module):\n"
                 "    def __init__(self):\n" + textwrap.indent(init_src, " " * 8) + "\n\n"
                 f"    def forward(self, {args}):\n" + textwrap.indent("\n".join(body), " " * 8) + "\n")
    parts.append("def make_inputs(g):\n" + textwrap.indent("\n".join(inputs), " " * 4) + "\n")
    return "\n\n".join(parts)


def _const(r: random.Random) -> str:
    return repr(r.choice(CONSTANTS))


def _randn(shape) -> str:
    return f"torch.randn({', '.join(map(str, shape))}, generator=g)"


def _sample(r: random.Random, n: int, k: int) -> list[int]:
    return sorted(r.sample(range(n), k))


# ---------------------------------------------------------------------------------------
# A little program of in-place writes and reads on a float tensor `t` of shape [R, C]
# (R >= 2, C >= 3), shared by the families that differ in where `t` comes from.

def _write(r: random.Random, t: str, R: int, C: int, src: str | None) -> str:
    i, j = r.randrange(R), r.randrange(C)
    a = r.randrange(C - 1)
    b = r.randint(a + 1, C)
    c, c2 = _const(r), _const(r)
    rows = _sample(r, R, r.randint(1, R))
    cols = _sample(r, C, r.randint(1, min(C, 3)))
    ops = [
        f"{t}[:, {a}:{b}] = {c}",
        f"{t}[{i}] = {c}",
        f"{t}[{i}, {j}] = {c}",
        f"{t}[{i}].masked_fill_({t}[{i}] > 0, {c})",
        f"{t}[:, {j}].masked_fill_({t}[:, {j}] < 0, {c})",
        f"{t}[:, {a}:{b}].add_({c})",
        f"{t}.narrow(1, {a}, {b - a}).mul_({c})",
        f"{t}.reshape(-1)[{a}::3].sub_({c})",
        f"{t}.unsqueeze(0)[0, {i}].zero_()",
        f"{t}.t()[{j}].fill_({c})",
        f"{t}.add_({c})",
        f"{t}.clamp_(min={c})",
        f"{t}.index_put_((torch.tensor({rows}),), torch.tensor({c}), accumulate={r.choice([True, False])})",
        f"{t}.index_fill_(1, torch.tensor({cols}), {c})",
        f"{t}.masked_fill_({t} > {c}, {c2})",
    ]
    if src:
        ops += [
            f"{t}[:, {a}:{b}] = {src}[:, {a}:{b}]",
            f"{t}.index_copy_(1, torch.tensor({cols}), {src}[:, :{len(cols)}])",
            f"{t}[:, {a}:{b}].copy_({src}[:, {a}:{b}])",
            f"{t}.t()[{j}].add_({src}[:, {j}])",
            f"{t}.mul_({src})",
            f"{t}[{i}] += {src}[{(i + 1) % R}]",
        ]
    return r.choice(ops)


def _read(r: random.Random, t: str, k: int, R: int, C: int) -> tuple[str, str]:
    """(line, output expression): a value read from t, some as views that see later writes."""
    i, j = r.randrange(R), r.randrange(C)
    c = _const(r)
    name = f"r{k}"
    line = r.choice([
        f"{name} = {t}.sum(-1)",
        f"{name} = {t}[:, {j}]",
        f"{name} = {t}[:, {j}].clone()",
        f"{name} = {t}.amax(-1)",
        f"{name} = {t}[{i}]",
        f"{name} = {t} * {c}",
        f"{name} = {t}.t()",
    ])
    return line, f"{name} + 1"


def _program(r: random.Random, t: str, R: int, C: int, src: str | None, steps: int) -> tuple[list[str], list[str]]:
    """Lines that read and write t (at least one write), and output expressions."""
    lines, outs = [], []
    wrote = False
    for k in range(steps):
        if k == steps - 1 and not wrote or r.random() < 0.55:
            lines.append(_write(r, t, R, C, src))
            wrote = True
        else:
            line, out = _read(r, t, k, R, C)
            lines.append(line)
            outs.append(out)
    return lines, [f"{t} * 2", *outs]


def _ret(outs: list[str]) -> str:
    return f"return {outs[0]}" if len(outs) == 1 else f"return ({', '.join(outs)})"


# ---------------------------------------------------------------------------------------
# Families. Each takes a Random and returns (variant, source).

def inplace_input(r: random.Random) -> tuple[str, str]:
    """In-place writes on the caller's inputs (slices, index_put_, index_copy_, views)."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    variant = r.choice(["program", "program_from_other", "index_copy_input_index", "index_put_input_index"])
    inputs = [f"x = {_randn((R, C))}"]
    if variant == "program":
        lines, outs = _program(r, "x", R, C, None, r.randint(1, 4))
        return variant, _module([], "x", [*lines, _ret(outs)], [*inputs, "return (x,)"])
    if variant == "program_from_other":
        lines, outs = _program(r, "x", R, C, "y", r.randint(1, 4))
        inputs.append(f"y = {_randn((R, C))}")
        body = [*lines, f"y.mul_({_const(r)})", _ret([*outs, "y + x"])]
        return variant, _module([], "x, y", body, [*inputs, "return (x, y)"])
    k = r.randint(1, R)
    inputs += [f"idx = torch.randperm({R}, generator=g)[:{k}]", f"v = {_randn((k, C))}"]
    if variant == "index_copy_input_index":
        body = ["s = x.sum(-1)", "x.index_copy_(0, idx, v)", "return x + s[:, None], s"]
    else:
        acc = r.choice([True, False])
        body = ["s = x.sum(-1)", f"x.index_put_((idx,), v, accumulate={acc})", "return x + s[:, None], s"]
    return variant, _module([], "x, idx, v", body, [*inputs, "return (x, idx, v)"])


def inplace_buffer(r: random.Random) -> tuple[str, str]:
    """In-place writes on buffers (persistent or not), read before and after the write."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    persistent = r.choice([True, False])
    variant = r.choice(["program", "ema", "counter"]) + ("" if persistent else "_nonpersistent")
    init = [f"self.register_buffer('buf', torch.randn({R}, {C}), persistent={persistent})"]
    inputs = [f"x = {_randn((R, C))}", "return (x,)"]
    if variant.startswith("program"):
        lines, outs = _program(r, "self.buf", R, C, "x", r.randint(1, 4))
        body = ["y = self.buf * x", *lines, _ret(["y", *[o.replace("self.buf * 2", "self.buf * 2 + x")
                                                          for o in outs]])]
    elif variant.startswith("ema"):
        m = r.choice([0.5, 0.9, 0.25])
        body = ["before = self.buf.sum(-1)", f"self.buf.mul_({m}).add_(x, alpha={1 - m})",
                "return self.buf.sum(-1) - before, x * self.buf"]
    else:
        init.append(f"self.register_buffer('steps', torch.zeros((), dtype=torch.int64), persistent={persistent})")
        body = ["y = x * self.steps", "self.steps += 1", "self.buf[:, 0] = self.steps", "return y + self.buf"]
    return variant, _module(init, "x", body, inputs)


def kv_cache(r: random.Random) -> tuple[str, str]:
    """A KV cache written at a position input, then attended over (decode step)."""
    B, H, T, D = r.randint(1, 2), r.randint(1, 3), r.randint(3, 8), r.choice([2, 4, 8])
    Dv = r.choice([D, D * 2])
    write = r.choice(["index_assign", "index_copy", "index_put", "const_slice"])
    where = r.choice(["buffer", "buffer", "input"])
    attend = r.choice(["manual", "sdpa"])
    variant = f"{where}_{write}_{attend}"
    init: list[str] = []
    if where == "buffer":
        init = [f"self.register_buffer('k_cache', torch.zeros({B}, {H}, {T}, {D}))",
                f"self.register_buffer('v_cache', torch.randn({B}, {H}, {T}, {Dv}), "
                f"persistent={r.choice([True, False])})"]
        kc, vc, args = "self.k_cache", "self.v_cache", "q, k, v, pos"
    else:
        kc, vc, args = "k_cache", "v_cache", "q, k, v, pos, k_cache, v_cache"
    body = []
    for cache, new in ((kc, "k"), (vc, "v")):
        if write == "index_assign":
            body.append(f"{cache}[:, :, pos] = {new}")
        elif write == "index_copy":
            body.append(f"{cache}.index_copy_(2, pos, {new})")
        elif write == "index_put":
            body.append(f"{cache}.index_put_((torch.arange({B})[:, None, None], torch.arange({H})[None, :, None], "
                        f"pos[None, None, :]), {new})")
        else:
            p = r.randrange(T)
            body.append(f"{cache}[:, :, {p}:{p + 1}] = {new}")
    body.append(f"mask = (torch.arange({T}) <= pos)[None, :]")
    if attend == "sdpa":
        body.append(f"out = F.scaled_dot_product_attention(q, {kc}, {vc}, attn_mask=mask)")
    else:
        body += [f"s = q @ {kc}.transpose(-1, -2) * {D ** -0.5!r}",
                 "s = s.masked_fill(~mask, float('-inf'))", f"out = s.softmax(-1) @ {vc}"]
    outs = ["out"]
    if r.random() < 0.3:
        outs.append(f"{vc}[:, :, :2] * 1")
    body.append(_ret(outs))
    inputs = [f"q = {_randn((B, H, 1, D))}", f"k = {_randn((B, H, 1, D))}", f"v = {_randn((B, H, 1, Dv))}",
              f"pos = torch.randint(0, {T}, (1,), generator=g)"]
    ret = "return (q, k, v, pos)"
    if where == "input":
        inputs += [f"k_cache = {_randn((B, H, T, D))}", f"v_cache = {_randn((B, H, T, Dv))}"]
        ret = "return (q, k, v, pos, k_cache, v_cache)"
    return variant, _module(init, args, body, [*inputs, ret])


def scratch(r: random.Random) -> tuple[str, str]:
    """Tensors made in forward (zeros, full, arange) and then written in place."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    variant = r.choice(["program", "twin_constants", "arange", "twin_arange"])
    inputs = [f"x = {_randn((R, C))}", "return (x,)"]
    if variant == "program":
        make = r.choice([f"torch.zeros({R}, {C})", f"torch.ones({R}, {C})", f"torch.full(({R}, {C}), {_const(r)})",
                         f"torch.empty({R}, {C}).fill_({_const(r)})", f"x.new_zeros({R}, {C})", "torch.zeros_like(x)"])
        lines, outs = _program(r, "t", R, C, "x", r.randint(1, 4))
        body = [f"t = {make}", *lines, _ret([o if o != "t * 2" else "x + t" for o in outs])]
    elif variant == "twin_constants":
        make = r.choice(["torch.zeros({C})", "torch.ones({C})", "torch.full(({C},), 2.0)"]).format(C=C)
        i, j = r.randrange(C), r.randrange(C)
        body = [f"a = {make}", f"b = {make}", f"a[{i}] = {_const(r)}", f"b[{j}] += {_const(r)}",
                "return x * a + b, a, b"]
    elif variant == "arange":
        n = r.randint(2, (C + 1) // 2)  # the largest index written below, 2n - 2, stays < C
        op = r.choice(["pos += 1", "pos.mul_(2)", f"pos[0] = {n}", "pos.add_(1)"])
        body = [f"pos = torch.arange({n})", op, f"return x[..., pos], x[..., :{n}] * pos"]
    else:
        body = [f"p = torch.arange({C})", f"q = torch.arange({C})", "q += 1", "return x * p + q, p, q"]
    return variant, _module([], "x", body, inputs)


COPIES = {  # spelling -> whether, for a contiguous float32 x, it makes a new tensor
    "x.clone()": True, "x.contiguous()": False, "x.to(copy=True)": True, "x * 1": True, "x + 0": True,
    "x.float()": False, "x.to(torch.float32)": False, "x.reshape(x.shape)": False, "x.detach()": False,
    "x[:]": False, "x.t().contiguous().t()": True, "torch.clone(x)": True, "x.mul(1)": True, "x + 0.0": True,
    "x - 0": True, "x / 1": True, "x.clone().detach()": True, "x.view_as(x)": False, "x * True": True,
    "x.clone(memory_format=torch.contiguous_format)": True, "torch.positive(x)": False,
}


def copy_then_write(r: random.Random) -> tuple[str, str]:
    """A copy (or an alias that looks like one) of the input, then written in place."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    spelling = r.choice(sorted(COPIES))
    lines, outs = _program(r, "y", R, C, None, r.randint(1, 3))
    body = [f"y = {spelling}", *lines, _ret([*outs, "x.sum(-1)"])]
    return spelling, _module([], "x", body, [f"x = {_randn((R, C))}", "return (x,)"])


def read_around_write(r: random.Random) -> tuple[str, str]:
    """Reads before and after a write through a view of an intermediate (h = x*2; ...)."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    make = r.choice(["x * 2", f"x + {_const(r)}", "torch.tanh(x)", "x.exp()", "x.t().contiguous().t() * 3"])
    j = r.randrange(C)
    variant = r.choice(["sum_around", "program"])
    if variant == "sum_around":
        write = r.choice([f"h[:, {j}] = 0", f"h[:, {j}].zero_()", f"h.select(1, {j}).mul_(2)",
                          f"h.narrow(1, {j}, 1).fill_(1.0)"])
        body = [f"h = {make}", "a = h.sum(-1)", f"v = h[:, {j}]", write, "return a - h.sum(-1), v * 1.5"]
    else:
        lines, outs = _program(r, "h", R, C, "x", r.randint(2, 5))
        body = [f"h = {make}", *lines, _ret(outs)]
    return f"{variant}:{make}", _module([], "x", body, [f"x = {_randn((R, C))}", "return (x,)"])


def cse_traps(r: random.Random) -> tuple[str, str]:
    """Constants equal in Python but not as tensors: True/1, 0.0/-0.0, 2/2.0; unsafe identities."""
    C = r.randint(4, 9)
    variant = r.choice(["bool_vs_int", "zero_sign", "int_vs_float", "identities", "scalar_tensors"])
    specials = [f"x = {_randn((3, C))}", "x[0, :4] = torch.tensor([-0.0, float('inf'), float('-inf'), float('nan')])",
                "x[1, 0] = -0.0", "x[2, 1] = 0.0"]
    if variant == "bool_vs_int":
        body = [f"a = torch.full(({C},), True)", f"b = torch.full(({C},), 1)", "m = x > 0",
                "return ~a, ~b, x + a, x + b, m ^ a, (m.long() + b).sum(-1)"]
        return variant, _module([], "x", body, [*specials, "return (x,)"])
    if variant == "zero_sign":
        body = [f"p = torch.full(({C},), 0.0)", f"n = torch.full(({C},), -0.0)",
                "return 1 / p, 1 / n, 1 / (x * 0 + 0.0), 1 / (x * 0 - 0.0), 1 / (x + 0.0), 1 / x, "
                "1 / torch.where(x > 0, 0.0, -0.0)"]
        return variant, _module([], "x", body, [*specials, "return (x,)"])
    if variant == "int_vs_float":
        body = ["return xi * 2, xi * 2.0, xi // 2, xi / 2, xi // 2.0, torch.full(xi.shape, 3), "
                "torch.full(xi.shape, 3.0), xi + 1, xi + 1.0, xi.to(torch.int32) * 2, xi.to(torch.int32) * 2.0"]
        return variant, _module([], "xi", body, [f"xi = torch.randint(-9, 10, (3, {C}), generator=g)", "return (xi,)"])
    if variant == "scalar_tensors":
        body = ["a = torch.tensor(1)", "b = torch.tensor(1.0)", "c = torch.tensor(True)",
                "return xi + a, xi + b, xi + c, x * a, x * c, a, b, c"]
        return variant, _module([], "x, xi", body, [*specials, f"xi = torch.randint(-9, 10, (3, {C}), generator=g)",
                                                    "return (x, xi)"])
    picks = r.sample(["x - x", "x * 0", "x / x", "x + 0.0", "x * 1", "(x + 1e8) - 1e8", "x * 2 / 2",
                      "x ** 0", "torch.maximum(x, x)", "x.neg().neg()", "torch.exp(torch.log(x))",
                      "x - 0.0", "1 / (1 / x)", "torch.minimum(x, x.new_tensor(float('inf')))", "(x * 3) / 3"], 5)
    body = [_ret([f"1 / ({p})" if "0.0" in p else p for p in picks])]
    return "identities", _module([], "x", body, [*specials, "return (x,)"])


def dtype_casts(r: random.Random) -> tuple[str, str]:
    """fp16/bf16/fp64 round trips, float<->int casts, bool masks and type promotion."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    c = _const(r)
    pool = {
        "x - x.half().float()": "round trip", "x - x.bfloat16().float()": "round trip", "x.half()": "cast",
        "x.to(torch.bfloat16) * 2": "cast", "(x * 1e5).half()": "overflow", "(x * 10).long()": "trunc",
        "(x * 10).to(torch.int32)": "trunc", "(x * 10).round().int()": "round", "x.floor().long()": "floor",
        "(x * 10).clamp(-100, 100).to(torch.int8)": "int8", "xi.float() / 3": "int", "xi.half()": "int",
        "x * (x > 0)": "mask", "(x > 0).float()": "mask", "(x > 0).sum(-1)": "mask", "(x > 0).long().cumsum(-1)": "mask",
        f"torch.where(x > 0, x, {c})": "mask", "(x > 0) & (x < 1)": "mask", "~(x > 0)": "mask",
        "(x > 0).to(x.dtype)": "mask", "(x > 0).any(-1)": "mask", "(x > 0).all(-1)": "mask",
        f"x.masked_fill(x < 0, {c})": "mask", f"x.double() * {c}": "fp64", "x.double().sum(-1)": "fp64",
        "xi + x": "promote", "x.half() + x": "promote", "xi.to(torch.int32) + 1.5": "promote",
        "x.half() * 2.5": "promote", "(x > 0) + 1": "promote", "xi.to(torch.int32) + xi": "promote",
        "x.half() + x.bfloat16()": "promote", "x.bfloat16().float().sum(-1)": "round trip",
    }
    picks = r.sample(sorted(pool), r.randint(2, 4))
    body = [_ret(picks)]
    inputs = [f"x = {_randn((R, C))}", f"xi = torch.randint(-50, 50, ({R}, {C}), generator=g)", "return (x, xi)"]
    return "+".join(sorted({pool[p] for p in picks})), _module([], "x, xi", body, inputs)


def reductions(r: random.Random) -> tuple[str, str]:
    """Reductions over the last dims, sizes 1..70 (var of one element is NaN)."""
    n = r.choice([1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70, r.randint(1, 70)])
    shape = r.choice([(2, n), (2, 3, n), (n,)])
    kd = r.choice([True, False])
    ops = [f"x.sum(-1, keepdim={kd})", f"x.mean(-1, keepdim={kd})", f"x.amax(-1, keepdim={kd})",
           f"x.amin(-1, keepdim={kd})", "x.softmax(-1)", "torch.log_softmax(x, -1)", f"x.var(-1, keepdim={kd})",
           "x.var(-1, correction=0)", "x.std(-1)", "torch.logsumexp(x, -1)", "x.norm(dim=-1)", "x.prod(-1)",
           "x.argmax(-1)", "x.max(-1)", "x.cumsum(-1)", "x.float().softmax(-1).to(x.dtype)",
           "xi.sum(-1)", "xi.amax(-1)", "xi.to(torch.int32).sum(-1)", "(x > 0).sum(-1)",
           # orders: PyTorch puts NaN after every number (2026-12-08: tvm-cpu's sort and median, onnx-cpu's max() and
           # max_pool passed over it)
           "x.sort(-1)", "x.sort(-1, descending=True).values", "torch.topk(x, 1, -1)", "x.median(-1).values",
           "torch.kthvalue(x, 1, -1).values", "x.max()", "x.min()"]
    if len(shape) > 1:
        ops += [f"x.sum((-2, -1), keepdim={kd})", "x.mean((-2, -1))", "x.amax((-2, -1))", "x.var((-2, -1))"]
    picks = r.sample(ops, r.randint(1, 3))
    inputs = [f"x = {_randn(shape)}", f"xi = torch.randint(-100, 100, {shape}, generator=g)", "return (x, xi)"]
    special = r.choice([None, None, None, "-inf", "inf", "nan"])  # a masked score, an overflow, a NaN
    if special:
        inputs.insert(1, f"x.view(-1)[{r.randrange(n)}] = float('{special}')")
    variant = f"n={n}{':' + special if special else ''}:" + ",".join(p.split("(")[0] for p in picks)
    return variant, _module([], "x, xi", [_ret(picks)], inputs)


INDEX_FORMS = {  # expressions of x [A, B, C] and index tensors ia, ib, ic in [-size, size) of their dims, [n] each
    "one": "x[ia]", "second": "x[:, ib]", "last": "x[..., ic]", "zipped": "x[ia, ib]",
    "zipped_after_slice": "x[:, ib, ic]",
    "apart": "x[ia, :, ic]", "apart_ellipsis": "x[ia, ..., ic]", "all_three": "x[ia, ib, ic]",
    "outer": "x[ia.view(-1, 1), ib]", "outer_after_slice": "x[:, ib.view(-1, 1), ic]", "chained": "x[ia][:, ib]",
    "constant_list": "x[[0, -1]]", "constant_pair": "x[:, [0, -1], [-1, 0]]", "new_axis": "x[None][:, ia]",
    "index_select": "torch.index_select(x, 1, ib % {B})", "flat": "x.flatten()[ia * {B} * {C}]",
    "gather": "x.gather(2, (ic % {C}).view(1, 1, -1).expand({A}, {B}, -1))",
    "take_along_dim": "torch.take_along_dim(x, (ic % {C}).view(1, 1, -1).expand({A}, {B}, -1), 2)",
    "embedding": "F.embedding(ia % {A}, x.flatten(1))", "mask": "x[x > 0]", "index_of_index": "x[:, ib[ia % {n}]]",
}


def indexing(r: random.Random) -> tuple[str, str]:
    """Advanced indexing reads: one index tensor or several (zipped, broadcast, apart with whole dims
    between: their dims first), negative indices, constant lists, gather, embedding, a boolean mask."""
    A, B, C, n = r.randint(2, 5), r.randint(2, 5), r.randint(2, 6), r.randint(1, 4)
    picks = r.sample(sorted(INDEX_FORMS), r.randint(1, 3))
    body = [_ret([INDEX_FORMS[p].format(A=A, B=B, C=C, n=n) + " * 2" for p in picks])]
    inputs = [f"x = {_randn((A, B, C))}"]
    inputs += [f"{name} = torch.randint(-{size}, {size}, ({n},), generator=g)"
               for name, size in (("ia", A), ("ib", B), ("ic", C))]
    inputs.append("return (x, ia, ib, ic)")
    return ",".join(picks), _module([], "x, ia, ib, ic", body, inputs)


def vision(r: random.Random) -> tuple[str, str]:
    """Convolutions (1-D, 2-D, transposed) with random stride, padding, dilation, groups and bias; then
    batch norm, pooling (max, average with ceil_mode and count_include_pad, adaptive) or resizing."""
    N, G = r.randint(1, 2), r.choice([1, 1, 2])
    Cin, Cout = G * r.randint(1, 3), G * r.randint(1, 3)
    k, stride, dil = r.choice([1, 2, 3]), r.choice([1, 1, 2]), r.choice([1, 1, 2])
    two_d = r.random() < 0.6
    H = r.randint(k * dil + 2, 11)
    shape = (N, Cin, H, r.randint(k * dil + 2, 11)) if two_d else (N, Cin, H)
    nd = "2d" if two_d else "1d"
    pad = r.choice(["0", "1", "'same'" if stride == 1 else "1", str(k // 2)])
    bias = r.choice([True, False])
    conv = r.choice(["conv", "conv", "transposed"])
    if conv == "transposed":
        out_pad = r.randrange(max(stride, dil))
        tpad = r.randint(0, (k - 1) * dil // 2)
        init = [f"self.c = nn.ConvTranspose{nd}({Cin}, {Cout}, {k}, stride={stride}, padding={tpad}, "
                f"output_padding={out_pad}, groups={G}, dilation={dil}, bias={bias})"]
    else:
        init = [f"self.c = nn.Conv{nd}({Cin}, {Cout}, {k}, stride={stride}, padding={pad}, dilation={dil}, "
                f"groups={G}, bias={bias})"]
    init.append(f"self.bn = nn.BatchNorm{nd}({Cout})")
    after = {
        "bn_relu": "F.relu(self.bn(y))",
        "max_pool": f"F.max_pool{nd}(y, 2, ceil_mode={r.choice([True, False])})",
        "avg_pool": f"F.avg_pool{nd}(y, 2, stride=1, padding=1, count_include_pad={r.choice([True, False])})",
        "adaptive": f"F.adaptive_avg_pool{nd}(y, {r.randint(1, 3)})",
        "adaptive_max": f"F.adaptive_max_pool{nd}(y, {r.randint(1, 3)})",
        "nearest": "F.interpolate(y, scale_factor=2)",
        "linear_resize": f"F.interpolate(y, size={'(5, 7)' if two_d else '7'}, "
                         f"mode='{'bilinear' if two_d else 'linear'}', align_corners={r.choice([True, False])})",
        "hardswish_mean": f"F.hardswish(y).mean({'(-2, -1)' if two_d else '-1'})",
    }
    tail = r.choice(sorted(after))
    body = ["y = self.c(x)", f"return {after[tail]}"]
    stats = ["self.bn.running_mean.uniform_(-1, 1)", "self.bn.running_var.uniform_(0.5, 2)"]
    inputs = [f"x = {_randn(shape)}", "return (x,)"]
    return f"{conv}{nd}:k{k}s{stride}d{dil}g{G}p{pad}:{tail}", _module(init + stats, "x", body, inputs)


def sequence(r: random.Random) -> tuple[str, str]:
    """Recurrent layers (LSTM, GRU, RNN: layers, directions, batch_first, bias, a given initial state,
    every output read) and normalizations (layer, group, instance, RMS, local response)."""
    B, T, E, H = r.randint(1, 3), r.randint(1, 6), r.randint(2, 6), r.randint(2, 5)
    kind = r.choice(["LSTM", "GRU", "RNN", "norm"])
    if kind == "norm":
        C, L = r.choice([2, 4, 6]), r.randint(2, 7)
        norms = {"layer": f"nn.LayerNorm({L}, elementwise_affine={r.choice([True, False])})",
                 "layer2": f"nn.LayerNorm(({C}, {L}))", "group": f"nn.GroupNorm({r.choice([1, 2])}, {C})",
                 "instance": f"nn.InstanceNorm1d({C}, affine={r.choice([True, False])})",
                 "rms": f"nn.RMSNorm({L}, eps={r.choice([1e-6, 1e-5])})", "lrn": "nn.LocalResponseNorm(2)"}
        form = r.choice(sorted(norms))
        init = [f"self.n = {norms[form]}"]
        body = ["return self.n(x) * 2 + x"]
        return f"norm:{form}", _module(init, "x", body, [f"x = {_randn((B, C, L))}", "return (x,)"])
    layers, bidir, first, bias = r.choice([1, 1, 2]), r.choice([True, False]), r.choice([True, False]), r.random() < 0.8
    extra = f", nonlinearity='{r.choice(['tanh', 'relu'])}'" if kind == "RNN" else ""
    init = [f"self.l = nn.{kind}({E}, {H}, num_layers={layers}, bidirectional={bidir}, batch_first={first}, "
            f"bias={bias}{extra})"]
    x_shape = (B, T, E) if first else (T, B, E)
    state_shape = (layers * (2 if bidir else 1), B, H)
    given = r.choice([True, False])
    if kind == "LSTM":
        call = "self.l(x, (h0, c0))" if given else "self.l(x)"
        body = [f"out, (h, c) = {call}", "return out * 2, h, c"]
    else:
        call = "self.l(x, h0)" if given else "self.l(x)"
        body = [f"out, h = {call}", "return out * 2, h"]
    inputs = [f"x = {_randn(x_shape)}", f"h0 = {_randn(state_shape)}", f"c0 = {_randn(state_shape)}",
              "return (x, h0, c0)"]
    variant = f"{kind}:l{layers}{':bi' if bidir else ''}{':bf' if first else ''}{'' if bias else ':nobias'}"
    return variant + (":h0" if given else ""), _module(init, "x, h0, c0", body, inputs)


def integer_ops(r: random.Random) -> tuple[str, str]:
    """Integer arithmetic with negative operands: floor vs trunc division, remainder, shifts (by amounts past the
    type's width and negative ones too)."""
    R, C = r.randint(2, 4), r.randint(3, 9)
    dtype = r.choice(["torch.int64", "torch.int32"])
    ops = ["a // b", "a % b", "torch.remainder(a, b)", "torch.fmod(a, b)", "torch.div(a, b, rounding_mode='trunc')",
           "torch.div(a, b, rounding_mode='floor')", "a / b", "a & b", "a | b", "a ^ b", "a.abs() << 2", "a >> 1",
           "a * b", "a - b", "a.abs()", "a.clamp(-5, 5)", "torch.maximum(a, b)", "a.sum(-1)", "a.cumsum(-1)",
           "a == b", "a.neg()", "a // 3", "a % 3", "a ** 2", "torch.sign(a)", "a.max(-1).values", "a.float().mean(-1)",
           "a // -3", "a % -3", "~a", "a + 2.5", "a * True", "a << b.abs()", "a >> (b * 7)", "a << (b * 13)",
           "torch.bitwise_right_shift(5, b * 9)"]  # shift amounts past the width and negative ones
    picks = r.sample(ops, r.randint(2, 5))
    inputs = [f"a = torch.randint(-20, 21, ({R}, {C}), generator=g, dtype={dtype})",
              f"b = torch.randint(1, 6, ({R}, {C}), generator=g, dtype={dtype})",
              f"b = b * (torch.randint(0, 2, ({R}, {C}), generator=g, dtype={dtype}) * 2 - 1)", "return (a, b)"]
    return dtype.split(".")[1], _module([], "a, b", [_ret(picks)], inputs)


RMS_FORMS = {  # name -> expression of x (self.w, eps, D); "not_" names are look-alikes, not RMSNorm
    "llama": "self.w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + {eps})).to(x.dtype)",
    "gemma": "(x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + {eps}) "
             "* (1.0 + self.w.float())).to(x.dtype)",
    "div_sqrt": "x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + {eps}) * self.w",
    "mul_self": "x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + {eps}) * self.w",
    "functional": "F.rms_norm(x, ({D},), self.w, {eps})",
    "sum_div": "x * ((x.square().sum(-1, keepdim=True) / {D}) + {eps}).rsqrt() * self.w",
    "no_weight": "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + {eps})",
    "not_eps_outside": "x / (x.pow(2).mean(-1, keepdim=True).sqrt() + {eps}) * self.w",
    "not_wrong_dim": "x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + {eps}) * self.w",
    "not_mean_abs": "x * torch.rsqrt(x.abs().mean(-1, keepdim=True) + {eps}) * self.w",
    "not_sum_not_mean": "x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + {eps}) * self.w",
    "not_centered": "(x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + {eps}) * self.w",
    "not_weight_per_row": "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + {eps}) * self.w_row",
}


def rms_norm(r: random.Random) -> tuple[str, str]:
    """RMSNorm spelled several ways, next to look-alikes that must not become rms_norm."""
    B, S, D = r.randint(1, 2), r.randint(2, 5), r.choice([2, 4, 8, 16, 32, 64, r.randint(2, 64)])
    form = r.choice(sorted(RMS_FORMS))
    expr = RMS_FORMS[form].format(eps=r.choice([1e-6, 1e-5, 1e-3]), D=D)
    dtype = r.choice(["torch.float32", "torch.float32", "torch.float16", "torch.bfloat16"]) \
        if form in ("llama", "gemma") else "torch.float32"
    init = [f"self.w = nn.Parameter((1 + 0.1 * torch.randn({D})).to({dtype}))",
            f"self.w_row = nn.Parameter(torch.randn({S}, 1).to({dtype}))"]
    residual = r.choice([False, True])
    if residual:
        body = ["x = x + r", f"y = {expr}", "return y, x"]
        args, ret = "x, r", "return (x, r)"
    else:
        body = [f"return {expr}"]
        args, ret = "x", "return (x,)"
    inputs = [f"x = torch.randn({B}, {S}, {D}, generator=g).to({dtype})",
              f"r = torch.randn({B}, {S}, {D}, generator=g).to({dtype})", ret]
    return f"{form}{'+residual' if residual else ''}:{dtype.split('.')[1]}", _module(init, args, body, inputs)


ROTARY_HELPERS = '''
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], -1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def negate_first_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., :h], x[..., h:]), -1)


def rotate_half_flipped(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)
'''

ROTARY_FORMS = {  # name -> expression of t (the rotated part), cos, sin; "not_rope" names are look-alikes
    "half_cat": "t * cos + rotate_half(t) * sin",
    "half_chunk": "(t * cos) + (rotate_half_chunk(t) * sin)",
    "half_sin_first": "rotate_half(t) * sin + t * cos",
    "interleaved": "t * cos + rotate_every_two(t) * sin",
    "not_rope_negate_first": "t * cos + negate_first_half(t) * sin",
    "not_rope_flipped": "t * cos + rotate_half_flipped(t) * sin",
    "not_rope_roles_swapped": "t * sin + rotate_half(t) * cos",
    "not_rope_cos_twice": "t * cos + rotate_half(t) * cos",
}


def rotary(r: random.Random) -> tuple[str, str]:
    """Rotary embeddings (rotate-half, interleaved, partial) and rope look-alikes."""
    B, H, S = r.randint(1, 2), r.randint(1, 3), r.randint(1, 6)
    D = r.choice([4, 8, 16])
    rd = r.choice([D, D // 2]) if D >= 8 else D
    form = r.choice(sorted(ROTARY_FORMS))
    source = r.choice(["arange", "positions", "inputs"])
    init = [f"self.register_buffer('inv_freq', 1.0 / ({r.choice([100.0, 10000.0])} ** "
            f"(torch.arange(0, {rd}, 2).float() / {rd})), persistent=False)"]
    rep = "freqs.repeat_interleave(2, -1)" if form == "interleaved" else "torch.cat((freqs, freqs), dim=-1)"
    body = []
    args, inputs = "q, k", [f"q = {_randn((B, H, S, D))}", f"k = {_randn((B, H, S, D))}"]
    if source == "arange":
        body += [f"freqs = torch.outer(torch.arange({S}).float(), self.inv_freq)", f"emb = {rep}"]
    elif source == "positions":
        args += ", pos"
        inputs.append(f"pos = torch.randint(0, 100, ({S},), generator=g)")
        body += ["freqs = pos[:, None].float() * self.inv_freq[None, :]", f"emb = {rep}"]
    if source == "inputs":
        args += ", cos, sin"
        inputs += [f"cos = torch.rand({S}, {rd}, generator=g) * 2 - 1", f"sin = torch.rand({S}, {rd}, generator=g) * 2 - 1"]
        body += ["cos = cos[None, None]", "sin = sin.unsqueeze(0).unsqueeze(0)"]
    else:
        body += ["cos = emb.cos()[None, None]", "sin = emb.sin().unsqueeze(0).unsqueeze(0)"]
    expr = ROTARY_FORMS[form]
    outs = []
    for name in ("q", "k"):
        if rd == D:
            body.append(f"{name}_out = {_sub(expr, name)}")
        else:
            body += [f"{name}_rot, {name}_pass = {name}[..., :{rd}], {name}[..., {rd}:]",
                     f"{name}_out = torch.cat(({_sub(expr, name + '_rot')}, {name}_pass), dim=-1)"]
        outs.append(f"{name}_out")
    if r.random() < 0.4:
        outs = ["q_out @ k_out.transpose(-1, -2)"]
    body.append(_ret(outs))
    return f"{form}:{source}:rd={rd}/{D}", _module(init, args, body, [*inputs, f"return ({args},)"],
                                                   helpers=ROTARY_HELPERS)


def _sub(expr: str, name: str) -> str:
    """expr with the operand `t` replaced by name (t appears as a standalone token)."""
    return re.sub(r"\bt\b", name, expr)


def attention(r: random.Random) -> tuple[str, str]:
    """SDPA and hand-written attention: masks (bool, additive, causal, off-by-one), GQA, Dv != D."""
    B, Hkv, rep = r.randint(1, 3), r.randint(1, 2), r.choice([1, 2, 3])
    Hq = Hkv * rep
    D = r.choice([4, 8, 16])
    Dv = r.choice([D, D, D // 2, D * 2])
    projected = r.random() < 0.35
    Sq = r.randint(1, 9)  # batch x query rows that a CPU matmul tile of 8 straddles (3 x 3, 2 x 9)
    Sk = Sq if projected or r.random() < 0.5 else r.randint(Sq, 10)
    form = r.choice(["sdpa", "manual"])
    gqa = "none" if rep == 1 else r.choice(["repeat_interleave", "expand", "tile"] +
                                           (["enable_gqa"] if form == "sdpa" else []))
    mask = r.choice(["none", "causal", "tril_top_left", "tril_bottom_right", "additive_causal", "additive_off_by_one",
                     "sliding_window", "bool_input", "additive_input"])
    init, body, inputs = [], [], []
    if projected:
        E = r.choice([8, 16])
        bias = r.choice([True, False])
        init = [f"self.q_proj = nn.Linear({E}, {Hq * D}, bias={bias})", f"self.k_proj = nn.Linear({E}, {Hkv * D}, bias={bias})",
                f"self.v_proj = nn.Linear({E}, {Hkv * Dv}, bias={bias})", f"self.o_proj = nn.Linear({Hq * Dv}, {E}, bias=False)"]
        body += [f"q = self.q_proj(x).view({B}, {Sq}, {Hq}, {D}).transpose(1, 2)",
                 f"k = self.k_proj(x).view({B}, {Sq}, {Hkv}, {D}).transpose(1, 2)",
                 f"v = self.v_proj(x).view({B}, {Sq}, {Hkv}, {Dv}).transpose(1, 2)"]
        args, inputs = "x", [f"x = {_randn((B, Sq, E))}"]
    else:
        args = "q, k, v"
        inputs = [f"q = {_randn((B, Hq, Sq, D))}", f"k = {_randn((B, Hkv, Sk, D))}", f"v = {_randn((B, Hkv, Sk, Dv))}"]
    if gqa == "repeat_interleave":
        body += [f"k = k.repeat_interleave({rep}, dim=1)", f"v = torch.repeat_interleave(v, {rep}, 1)"]
    elif gqa == "expand":
        body += [f"k = k[:, :, None].expand({B}, {Hkv}, {rep}, {Sk}, {D}).reshape({B}, {Hq}, {Sk}, {D})",
                 f"v = v[:, :, None].expand({B}, {Hkv}, {rep}, {Sk}, {Dv}).reshape({B}, {Hq}, {Sk}, {Dv})"]
    elif gqa == "tile":  # repeats whole groups: a different head mapping from repeat_kv
        body += [f"k = k.repeat(1, {rep}, 1, 1)", f"v = v.repeat(1, {rep}, 1, 1)"]
    off = Sk - Sq
    is_causal = False
    kind = "none"  # how the mask is applied: none, bool, additive
    if mask == "causal":
        if form == "sdpa":
            is_causal = True  # SDPA aligns is_causal top-left when Sq != Sk
        else:
            body.append(f"m = torch.ones({Sq}, {Sk}, dtype=torch.bool).tril()")
            kind = "bool"
    elif mask == "tril_top_left":
        body.append(f"m = torch.ones({Sq}, {Sk}, dtype=torch.bool).tril()")
        kind = "bool"
    elif mask == "tril_bottom_right":
        body.append(f"m = torch.tril(torch.ones({Sq}, {Sk}, dtype=torch.bool), diagonal={off})")
        kind = "bool"
    elif mask == "additive_causal":
        body.append(f"m = torch.full(({Sq}, {Sk}), float('-inf')).triu(1)")
        kind = "additive"
    elif mask == "additive_off_by_one":
        body.append(f"m = torch.triu(torch.full(({Sq}, {Sk}), float('-inf')), diagonal=2)")
        kind = "additive"
    elif mask == "sliding_window":
        w = r.randint(1, 3)
        body += [f"i = torch.arange({Sq})[:, None] + {off}", f"j = torch.arange({Sk})[None, :]",
                 f"m = (j <= i) & (j > i - {w})"]
        kind = "bool"
    elif mask == "bool_input":
        args += ", m"
        inputs += [f"m = torch.rand({B}, 1, {Sq}, {Sk}, generator=g) > 0.5", "m[..., 0] = True"]
        kind = "bool"
    elif mask == "additive_input":
        args += ", m"
        inputs.append(f"m = torch.randn({B}, {r.choice([1, Hq])}, {Sq}, {Sk}, generator=g)")
        kind = "additive"
    scale = r.choice([None, 0.5, D ** -0.5])
    if form == "sdpa":
        kw = [f"attn_mask=m" if kind != "none" else "", "is_causal=True" if is_causal else "",
              f"scale={scale!r}" if scale is not None else "", "enable_gqa=True" if gqa == "enable_gqa" else ""]
        body.append(f"out = F.scaled_dot_product_attention(q, k, v, {', '.join(a for a in kw if a)})")
    else:
        s = scale if scale is not None else D ** -0.5
        body.append(f"s = (q @ k.transpose(-2, -1)) * {s!r}")
        if kind == "bool":
            body.append("s = s.masked_fill(~m, float('-inf'))")
        elif kind == "additive":
            body.append("s = s + m")
        body.append(r.choice(["p = s.softmax(-1)", "p = torch.softmax(s.float(), dim=-1).to(q.dtype)"]))
        body.append("out = p @ v")
    if projected:
        body.append(f"return self.o_proj(out.transpose(1, 2).reshape({B}, {Sq}, {Hq * Dv}))")
    else:
        body.append("return out")
    variant = f"{form}:{gqa}:{mask}:Sq{Sq}Sk{Sk}:D{D}Dv{Dv}{':projected' if projected else ''}"
    return variant, _module(init, args, body, [*inputs, f"return ({args},)"])


SWIGLU_FORMS = {
    "silu_mul": "F.silu(g) * u",
    "sigmoid_spelled": "g * torch.sigmoid(g) * u",
    "up_first": "u * F.silu(g)",
    "not_glu_sigmoid": "torch.sigmoid(g) * u",
    "not_gelu": "F.gelu(g) * u",
    "not_gelu_tanh": "F.gelu(g, approximate='tanh') * u",
    "not_silu_add": "F.silu(g) + u",
    "not_silu_of_product": "F.silu(g * u)",
    "not_quick_gelu": "g * torch.sigmoid(1.702 * g) * u",
}


def swiglu(r: random.Random) -> tuple[str, str]:
    """SwiGLU MLPs (separate or fused gate/up) and GLU look-alikes (GeLU, sigmoid, add)."""
    B, S, E, Fd = r.randint(1, 2), r.randint(1, 4), r.choice([4, 8, 16]), r.choice([8, 16, 24])
    form = r.choice(sorted(SWIGLU_FORMS))
    bias = r.choice([True, False])
    fused = r.random() < 0.3
    init = [f"self.down = nn.Linear({Fd}, {E}, bias={bias})"]
    if fused:
        init.append(f"self.gate_up = nn.Linear({E}, {2 * Fd}, bias={bias})")
        body = ["g, u = self.gate_up(x).chunk(2, dim=-1)"]
    else:
        init += [f"self.gate = nn.Linear({E}, {Fd}, bias={bias})", f"self.up = nn.Linear({E}, {Fd}, bias={bias})"]
        body = ["g = self.gate(x)", "u = self.up(x)"]
    body.append(f"return self.down({SWIGLU_FORMS[form]})")
    return f"{form}{':fused' if fused else ''}", _module(init, "x", body, [f"x = {_randn((B, S, E))}", "return (x,)"])


def linear_around_write(r: random.Random) -> tuple[str, str]:
    """Linears reading h before and after an in-place write to h (merging them is wrong)."""
    B, E = r.randint(1, 3), r.choice([4, 8])
    O1 = r.choice([4, 8])
    O2 = r.choice([O1, O1, 6])
    make = r.choice(["x * 2", "x + 0", "x", "x.clone()"])
    j = r.randrange(E)
    write = r.choice([f"h[:, {j}] = 0", "h.add_(1)", "h.relu_()", f"h[:, :{j + 1}].mul_(-1)",
                      "h.copy_(h.flip(-1))"])
    variant = r.choice(["two", "gate_up", "qkv"]) if O2 == O1 else "two"
    bias = r.choice([True, False])
    init = [f"self.a = nn.Linear({E}, {O1}, bias={bias})", f"self.b = nn.Linear({E}, {O2}, bias={bias})",
            f"self.c = nn.Linear({E}, {O1}, bias={bias})"]
    if variant == "two":
        body = [f"h = {make}", "a = self.a(h)", write, "b = self.b(h)", "return a, b"]
    elif variant == "gate_up":
        body = [f"h = {make}", "a = self.a(h)", write, "b = self.b(h)", "return F.silu(a) * b"]
    else:
        body = [f"h = {make}", "q = self.a(h)", "k = self.b(h)", write, "v = self.c(h)", "return q * k, v"]
    return f"{variant}:{make}:{write}", _module(init, "x", body, [f"x = {_randn((B, E))}", "return (x,)"])


def aliasing_outputs(r: random.Random) -> tuple[str, str]:
    """Outputs that are buffers, views of buffers or inputs; tuple, list and dict returns."""
    R, C = r.randint(2, 4), r.randint(3, 6)
    update = r.choice(["", "self.buf.mul_(0.5).add_(x)", "self.buf[0] = x[0]"])
    returns = [
        "self.buf", "(x + self.buf, self.buf)", "self.buf[1:]", "self.buf.t()", "{'out': x * 2, 'state': self.buf}",
        "(self.buf, self.buf[0])", "x", "(x, x)", "(x * 2, (x, {'v': x.view(-1)}))", "[x + 1, self.buf]",
        "(y, y)", "x[0]", "(self.w, x * self.w)", "{'b': y, 'a': x, 'c': [y + 1, self.buf]}", "(y, x, y.t())",
    ]
    ret = r.choice(returns)
    init = [f"self.register_buffer('buf', torch.randn({R}, {C}), persistent={r.choice([True, False])})",
            f"self.w = nn.Parameter(torch.randn({C}))"]
    body = [l for l in [update, "y = x * 3", f"return {ret}"] if l]
    return f"{ret}{' after ' + update if update else ''}", _module(init, "x", body,
                                                                   [f"x = {_randn((R, C))}", "return (x,)"])


def shapes(r: random.Random) -> tuple[str, str]:
    """Tensor plumbing of x [A, B, C] (sizes 1..6): concatenation, splits of uneven sizes, transposes,
    repeats, flips and rolls (negative shifts, several dims), triangles with a diagonal offset, padding in
    every mode, narrowing, unfolding, diagonals, batched matmuls with broadcasting, einsum, sort and topk."""
    A, B, C = r.randint(1, 4), r.randint(2, 5), r.randint(2, 6)
    s, k, d = r.randint(1, C), r.randint(1, C), r.randint(-2, 2)
    size = r.randint(1, C - 1) if C > 1 else 1
    p1, p2 = r.randint(0, min(C, B) - 1), r.randint(0, min(C, B) - 1)
    pool = {
        "cat": "torch.cat([x, y * 2], -1)", "cat0": "torch.cat([x, x[:1]], 0)", "stack": "torch.stack([x, y], 1)",
        "split": f"x.split({size}, -1)", "split_sizes": f"x.split([{size}, {C - size}], -1)",
        "chunk": f"x.chunk({r.randint(2, 4)}, -1)", "unbind": "x.unbind(1)",
        "permute": "x.permute(2, 0, 1).contiguous() * 2", "transpose": "x.transpose(0, 2) + 1",
        "movedim": "torch.movedim(x, 0, -1) * 3", "expand": f"x[:, :1].expand({A}, {B}, {C}) + y",
        "repeat": f"x.repeat(1, {r.randint(1, 3)}, {r.randint(1, 2)})",
        "repeat_interleave": f"x.repeat_interleave({r.randint(2, 3)}, dim={r.choice([0, 1, 2, -1])})",
        "flip": f"x.flip({r.choice(['0', '-1', '(0, 2)', '(1, 2)'])})",
        "roll": f"x.roll({r.randint(-C - 1, C + 1)}, {r.choice([0, 1, -1])})",
        "roll_dims": f"x.roll(({r.randint(-3, 3)}, {r.randint(-3, 3)}), (1, 2))", "roll_flat": f"x.roll({d})",
        "tril": f"x.tril({d})", "triu": f"x.triu({d})",
        "pad": f"F.pad(x, ({p1}, {p2}), value={_const(r)})",
        "pad_reflect": f"F.pad(x, ({p1}, {p2}), mode='reflect')",
        "pad_replicate": f"F.pad(x, ({p1}, {p2}, {r.randint(0, 2)}, {r.randint(0, 2)}), mode='replicate')",
        "pad_circular": f"F.pad(x, ({p1}, {p2}), mode='circular')",
        "pad_negative": f"F.pad(x, (-1, {p2}))", "narrow": f"x.narrow(-1, {C - s}, {s})",
        "unfold": f"x.unfold(-1, {s}, {r.randint(1, 2)})", "diagonal": f"x.diagonal({d}, 1, 2)",
        "diag_embed": "torch.diag_embed(x)", "matmul": "x @ y.transpose(-1, -2)",
        "matmul_broadcast": "x @ self.w", "bmm": "torch.bmm(x, y.transpose(1, 2))",
        "einsum": "torch.einsum('abc,adc->abd', x, y)", "outer": "torch.outer(x[0, 0], y[0, 0])",
        "sort": f"x.sort(-1, descending={r.choice([True, False])})", "argsort": "x.argsort(1)",
        "topk": f"x.topk({k}, -1, largest={r.choice([True, False])})", "kthvalue": f"x.kthvalue({k}, -1)",
        "cumprod": "x.cumprod(1)", "cummax": "x.cummax(-1)", "where": "torch.where(x > y, x, y[:, :1])",
        "squeeze": "x[:, :1].squeeze(1) * 2", "view": f"x.reshape(-1, {C}).t() * 2",
        "flatten": "x.flatten(1) + 1", "unflatten": f"x.flatten().unflatten(0, ({A * B}, {C})) * 2",
        "masked_scatter": "x.masked_scatter(x > 0, y * 10)", "clamp_tensor": "x.clamp(min=y, max=y + 1)",
        "tile": f"x.tile(({r.randint(1, 2)}, 1))", "meshgrid": "torch.meshgrid(x[0, 0], y[0, :, 0], indexing='ij')",
    }
    picks = r.sample(sorted(pool), r.randint(1, 3))
    inputs = [f"x = {_randn((A, B, C))}", f"y = {_randn((A, B, C))}", "return (x, y)"]
    init = [f"self.register_buffer('w', torch.randn({C}, {r.randint(1, 4)}))"]
    return ",".join(picks), _module(init, "x, y", [_ret([pool[p] for p in picks])], inputs)


ELEMENTWISE = [  # unary expressions of x; inputs include 0.0, -0.0, +-inf, NaN, and values at the kinks
    "F.gelu(x)", "F.gelu(x, approximate='tanh')", "F.silu(x)", "F.mish(x)", "F.hardswish(x)", "F.hardsigmoid(x)",
    "F.elu(x, alpha={a})", "F.selu(x)", "F.celu(x, alpha={a})", "F.softplus(x, beta={b}, threshold={t})",
    "F.leaky_relu(x, {s})", "F.relu6(x)", "F.hardtanh(x, -{a}, {a})", "F.logsigmoid(x)", "F.softsign(x)",
    "F.tanhshrink(x)", "F.softshrink(x, {a})", "F.hardshrink(x, {a})", "torch.sigmoid(x)", "torch.tanh(x)",
    "torch.erf(x)", "torch.exp2(x)", "torch.expm1(x)", "torch.log1p(x)", "torch.log2(x)", "torch.log10(x)",
    "torch.reciprocal(x)", "torch.rsqrt(x)", "torch.sqrt(x)", "x.pow({p})", "x ** 3", "{a} ** x", "torch.atan2(x, y)",
    "torch.sin(x)", "torch.cos(x)", "torch.tan(x)", "torch.asin(x)", "torch.acos(x)", "torch.atan(x)",
    "torch.sinh(x)", "torch.cosh(x)", "torch.asinh(x)", "torch.acosh(x)", "torch.atanh(x)", "x.floor()", "x.ceil()",
    "x.round()", "x.round(decimals=1)", "x.trunc()", "x.frac()", "torch.sign(x)", "torch.sgn(x)", "x.signbit()",
    "torch.lerp(x, y, {a})", "torch.addcmul(x, x, y, value={a})", "torch.addcdiv(x, x, y, value={a})",
    "torch.hypot(x, y)", "torch.logaddexp(x, y)", "torch.xlogy(x, y)", "torch.nan_to_num(x)",
    "torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)", "x.clamp({lo}, {hi})", "x.clamp(min={lo})",
    "torch.copysign(x, y)", "torch.fmod(x, {a})", "torch.remainder(x, {a})", "x.abs()", "-x", "torch.exp(x)",
    "torch.log(x)", "x.isnan()", "x.isinf()", "x.isfinite()", "torch.maximum(x, y)", "torch.minimum(x, y)",
    "torch.fmax(x, y)", "torch.fmin(x, y)", "x.square()", "F.threshold(x, {s}, {a})", "F.glu(torch.cat([x, y], -1))",
    "torch.heaviside(x, y)", "x.sigmoid() * x", "torch.logit(x.sigmoid(), eps=1e-6)", "torch.special.erfc(x)",
    "torch.special.expit(x)", "torch.sinc(x)", "torch.deg2rad(x)",
    "torch.float_power(x, 2).float()", "torch.true_divide(x, y)", "x / y", "x // y", "torch.ldexp(x, y.round())",
    "torch.add(x, y, alpha={a})", "torch.sub(x, y, alpha={s})", "torch.rsub(x, {a}, alpha={b})",
    "torch.rsub(x, y, alpha={s})",
]


def elementwise(r: random.Random) -> tuple[str, str]:
    """Activations and elementwise math on inputs that hold the special values (0.0, -0.0, +-inf, NaN, the
    kinks of the piecewise activations), float32 or float16 (computed in float32, as the results compare)."""
    R, C = r.randint(1, 3), r.randint(4, 9)
    a, b, t = r.choice([0.5, 1.0, 1.5, 2.0]), r.choice([1.0, 2.0, 0.5]), r.choice([20.0, 1.0, 5.0])
    s, p = r.choice([0.01, 0.2, -0.5]), r.choice([2, 0.5, 1.5, -1, 2.5, 0])
    lo, hi = sorted(r.sample([-2.0, -0.5, 0.0, 0.5, 1.0], 2))
    picks = [e.format(a=a, b=b, t=t, s=s, p=p, lo=lo, hi=hi) for e in r.sample(ELEMENTWISE, r.randint(1, 3))]
    specials = ["0.0", "-0.0", "float('inf')", "float('-inf')", "float('nan')", str(a), str(-a), str(t / b), "3.0",
                "-3.0", "1.0", "-1.0", "100.0", "-100.0"]
    chosen = r.sample(specials, r.randint(0, 4))
    inputs = [f"x = {_randn((R, C))} * {r.choice([1, 3, 10])}", f"y = {_randn((R, C))}"]
    inputs += [f"x.view(-1)[{i}] = {v}" for i, v in zip(r.sample(range(R * C), len(chosen)), chosen)]
    if r.random() < 0.3:
        inputs.append(f"y.view(-1)[{r.randrange(R * C)}] = {r.choice(specials)}")
    half = r.random() < 0.25
    inputs.append("return (x.half(), y.half())" if half else "return (x, y)")
    body = ["x, y = x.float(), y.float()"] if half else []
    body.append(_ret(picks))
    variant = ("fp16:" if half else "") + ",".join(e.split("(")[0] for e in picks) + (":special" if chosen else "")
    return variant, _module([], "x, y", body, inputs)


def heads(r: random.Random) -> tuple[str, str]:
    """What sits on top of an encoder or a classifier: pooling under a padding mask (mean, max, first,
    last), normalized embeddings and their similarities (a zero vector among them), distances, and losses
    with their options (ignore_index, label smoothing, class weights, reductions, log targets)."""
    B, T, D, K = r.randint(1, 3), r.randint(2, 6), r.randint(2, 8), r.randint(2, 6)
    pool = {
        "mean_pool": "(h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)",
        "max_pool": "h.masked_fill(~m.bool()[..., None], float('-inf')).amax(1)",
        "last_token": f"h[torch.arange({B}), (m.sum(1).long() - 1).clamp(min=0)]",
        "first_token": "h[:, 0]", "normalize": f"F.normalize(h, p=2, dim=-1, eps={r.choice([1e-12, 1e-6])})",
        "normalize_l1": "F.normalize(h, p=1, dim=1)", "cosine": "F.cosine_similarity(h[:, :1], h, dim=-1)",
        "cosine_pairs": "F.cosine_similarity(h[0], h[-1], dim=-1, eps=1e-8)",
        "dot_scores": "F.normalize(h[:, 0], dim=-1) @ F.normalize(h[:, -1], dim=-1).t()",
        "cdist": f"torch.cdist(h, h, p={r.choice([1.0, 2.0])})", "pdist": "F.pairwise_distance(h[:, 0], h[:, -1])",
        "cross_entropy": "F.cross_entropy(logits, labels)",
        "cross_entropy_ignore": "F.cross_entropy(logits, labels.masked_fill(labels == 0, -100), ignore_index=-100)",
        "cross_entropy_smooth": f"F.cross_entropy(logits, labels, label_smoothing={r.choice([0.1, 0.25])})",
        "cross_entropy_weight": f"F.cross_entropy(logits, labels, weight=torch.linspace(0.5, 2.0, {K}))",
        "cross_entropy_none": "F.cross_entropy(logits, labels, reduction='none')",
        "cross_entropy_sum": "F.cross_entropy(logits, labels, reduction='sum')",
        "cross_entropy_probs": "F.cross_entropy(logits, probs)",
        "nll": "F.nll_loss(F.log_softmax(logits, -1), labels)", "mse": "F.mse_loss(h[:, 0], h[:, -1])",
        "smooth_l1": f"F.smooth_l1_loss(h[:, 0], h[:, -1], beta={r.choice([0.5, 1.0])})",
        "huber": "F.huber_loss(h[:, 0], h[:, -1], delta=0.5)", "l1": "F.l1_loss(h, h.flip(1), reduction='none')",
        "kl_div": "F.kl_div(F.log_softmax(logits, -1), probs, reduction='batchmean')",
        "kl_div_log": "F.kl_div(F.log_softmax(logits, -1), probs.log(), reduction='sum', log_target=True)",
        "bce_logits": "F.binary_cross_entropy_with_logits(logits, probs)",
        "bce_pos_weight": f"F.binary_cross_entropy_with_logits(logits, probs, pos_weight=torch.full(({K},), 2.0))",
        "bce": "F.binary_cross_entropy(logits.sigmoid(), probs)", "margin": "F.margin_ranking_loss(h[:, 0, 0], "
        "h[:, -1, 0], torch.ones(h.shape[0]))", "log_softmax_dim0": "F.log_softmax(logits, 0)",
        "logsumexp": "torch.logsumexp(logits, -1, keepdim=True)",
    }
    picks = r.sample(sorted(pool), r.randint(1, 3))
    inputs = [f"h = {_randn((B, T, D))}", f"m = (torch.rand({B}, {T}, generator=g) < 0.7).float()", "m[:, 0] = 1",
              f"logits = {_randn((B * T, K))} * 3", f"labels = torch.randint(0, {K}, ({B * T},), generator=g)",
              f"probs = {_randn((B * T, K))}.softmax(-1)"]
    if r.random() < 0.3:
        inputs.append(f"h[0, {r.randrange(T)}] = 0")  # a zero vector: normalize and cosine divide by eps
    inputs.append("return (h, m, logits, labels, probs)")
    return ",".join(picks), _module([], "h, m, logits, labels, probs", [_ret([pool[p] for p in picks])], inputs)


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "inplace_input": inplace_input,
    "inplace_buffer": inplace_buffer,
    "kv_cache": kv_cache,
    "scratch": scratch,
    "copy_then_write": copy_then_write,
    "read_around_write": read_around_write,
    "cse_traps": cse_traps,
    "dtype_casts": dtype_casts,
    "reductions": reductions,
    "integer_ops": integer_ops,
    "indexing": indexing,
    "vision": vision,
    "sequence": sequence,
    "rms_norm": rms_norm,
    "rotary": rotary,
    "attention": attention,
    "swiglu": swiglu,
    "linear_around_write": linear_around_write,
    "aliasing_outputs": aliasing_outputs,
    "shapes": shapes,
    "elementwise": elementwise,
    "heads": heads,
}
FAMILY_NAMES = list(FAMILIES)


def family_of(seed: int) -> str:
    return FAMILY_NAMES[seed % len(FAMILY_NAMES)]


def case_seeds(family: str, count: int, base: int = 0) -> list[int]:
    """`count` seeds of `family` (seeds whose family_of is family), from base on."""
    index = FAMILY_NAMES.index(family)
    first = base + (index - base) % len(FAMILY_NAMES)
    return [first + k * len(FAMILY_NAMES) for k in range(count)]


def generate(seed: int) -> Case:
    """The case of a seed: its family is family_of(seed), the rest drawn from Random(seed)."""
    family = family_of(seed)
    variant, source = FAMILIES[family](random.Random(seed))
    return Case(family, seed, variant, source)
