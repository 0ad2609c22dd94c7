"""flashc.codegen.int8_matmul: the W8A8 int8 GEMM with the dequantization epilogue fused, against the
exact integer product (int64) followed by the ops' own epilogue (`_finish`), bit for bit, and against
`torch._int_mm` where it runs; every output dtype, bias or none, sizes off the tiles, every candidate
tile; the tuner's candidates, choice and cache; the routing of `quantized_matmul.linear_w8a8`. On a
CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import _triton_common, tuning  # noqa: E402
from flashc.codegen import int8_matmul as im  # noqa: E402
from flashc.codegen import quantize_rows as qr  # noqa: E402
from flashc.quantized_ops import _finish  # noqa: E402

if not torch.cuda.is_available() and not _triton_common.is_interpreted(im._int8_matmul_kernel):
    qr = importlib.reload(qr)  # imported before tests/codegen/conftest.py chose the interpreter
    im = importlib.reload(im)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def seed(*args) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(args).encode()))


def operands(m, n, k, g, device, bias_dtype=None, low=-128):
    """int8 codes over the whole range, per-row and per-column scales spread over decades."""
    xq = torch.randint(low, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(low, 128, (n, k), generator=g, dtype=torch.int8)
    x_scale = torch.rand(m, 1, generator=g) * 10.0 ** torch.randint(-5, 0, (m, 1), generator=g)
    w_scale = torch.rand(n, generator=g) * 10.0 ** torch.randint(-4, 1, (n,), generator=g)
    bias = None if bias_dtype is None else (torch.randn(n, generator=g) * 3).to(bias_dtype)
    to = (lambda t: None if t is None else t.to(device))
    return to(xq), to(w), to(x_scale), to(w_scale), to(bias)


def exact(xq, w, x_scale, w_scale, bias, out_dtype):
    """The integer product in int64 (exact), then the op's epilogue `_finish`."""
    acc = (xq.cpu().long() @ w.cpu().long().t()).float()
    x = torch.empty(xq.shape[0], 1, dtype=out_dtype)  # _finish reads x's dtype and leading shape
    return _finish(acc, x_scale.cpu(), w_scale.cpu(), None if bias is None else bias.cpu(), x)


def test_kernel_runs_here():
    """On a CPU the tests below must exercise the interpreted kernel, not something else."""
    assert torch.cuda.is_available() or _triton_common.is_interpreted(im._int8_matmul_kernel)


@pytest.mark.parametrize("shape", [(70, 48, 80), (130, 200, 37), (5, 33, 100), (64, 96, 256)], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_equals_the_exact_product_and_finish(device, out_dtype, bias_dtype, shape):
    m, n, k = shape
    g = seed(shape, bias_dtype, out_dtype)
    bias_dtype = out_dtype if bias_dtype == "same" else bias_dtype
    args = operands(m, n, k, g, device, bias_dtype)
    out = im.int8_matmul(*args, out_dtype, config=SMALL)  # several tiles each way, a partial group
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert torch.equal(out.cpu(), exact(*args, out_dtype))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_sums_beyond_fp32_integers_round_once_as_the_library(device, out_dtype):
    """K = 1152 codes near 127: sums past 2^24, where int32 -> fp32 rounds, as torch._int_mm + _finish do."""
    g = seed("big", out_dtype)
    xq, w, x_scale, w_scale, bias = operands(48, 32, 1152, g, device, torch.float32, low=120)
    x_scale = x_scale * 1e-5  # results within fp16's range
    acc = im.int_mm(xq, w)
    assert int(acc.abs().max()) > 2 ** 24 and acc.dtype == torch.int32
    want = _finish(acc.float(), x_scale, w_scale, bias, torch.empty(48, 1, dtype=out_dtype, device=device))
    assert torch.equal(im.int8_matmul(xq, w, x_scale, w_scale, bias, out_dtype, config=SMALL), want)
    assert torch.equal(im.int8_matmul(xq, w, x_scale, w_scale, bias, out_dtype, config=im.LIBRARY), want)


def _tiles() -> list[dict]:
    seen = []
    for profile in tuning.PROFILES:
        for cfg in tuning.candidates(im.KERNEL, profile):
            if not cfg.get("library") and cfg not in seen:
                seen.append(cfg)
    return seen


@pytest.mark.parametrize("cfg", _tiles(), ids="{BLOCK_M}x{BLOCK_N}x{BLOCK_K}w{num_warps}s{num_stages}".format_map)
def test_every_candidate_tile_is_exact(device, cfg):
    g = seed("tile", sorted(cfg.items()))
    args = operands(70, 136, 272, g, device, torch.bfloat16)  # edges in M and N, a partial K step at 64/128
    out = im.int8_matmul(*args, torch.bfloat16, config=cfg)
    assert torch.equal(out.cpu(), exact(*args, torch.bfloat16))


def test_broadcast_scales_strided_operands_and_empty(device):
    g = seed("broadcast")
    xq, w, _, _, _ = operands(40, 64, 96, g, device)
    x_scale, w_scale = torch.tensor([3e-4], device=device), torch.tensor([[7e-3]], device=device)
    want = exact(xq, w, x_scale, w_scale, None, torch.float16)
    assert torch.equal(im.int8_matmul(xq, w, x_scale, w_scale, None, torch.float16, config=SMALL).cpu(), want)
    # rows of a wider buffer (row stride 160) and a weight sliced from a longer one
    wide = torch.zeros(40, 160, dtype=torch.int8, device=device)
    wide[:, 32:128] = xq
    wbig = torch.zeros(64, 200, dtype=torch.int8, device=device)
    wbig[:, :96] = w
    assert torch.equal(im.int8_matmul(wide[:, 32:128], wbig[:, :96], x_scale, w_scale, None, torch.float16,
                                      config=SMALL).cpu(), want)
    empty = im.int8_matmul(xq[:0], w, x_scale, w_scale, None, torch.bfloat16, config=SMALL)
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16


def test_untuned_choice_is_the_library_where_it_fits(device, monkeypatch):
    """Nothing measured: the library path runs (it was the only path before); where it cannot take the
    shape, the first tile that fits."""
    calls, real = [], im.int_mm
    monkeypatch.setattr(im, "int_mm", lambda *a: calls.append(1) or real(*a))
    g = seed("untuned")
    args = operands(64, 48, 64, g, device)
    assert torch.equal(im.int8_matmul(*args, torch.float32).cpu(), exact(*args, torch.float32))
    assert len(calls) == 1
    args = operands(64, 40, 72, g, device)  # K, N not multiples of 16: no library
    assert torch.equal(im.int8_matmul(*args, torch.float32).cpu(), exact(*args, torch.float32))
    assert len(calls) == 1


def test_every_profile_offers_the_library_path():
    for profile in tuning.PROFILES:
        cands = tuning.candidates(im.KERNEL, profile)
        assert im.LIBRARY in cands and len(cands) >= 4


@pytest.fixture
def timed(monkeypatch):
    """Pretend to time on a GPU: each candidate 'takes' the time the test sets for it (after running it)."""
    times: dict = {}

    def bench(fn, calls=1):
        fn()
        return times.get("next", [1.0]).pop(0) if times.get("next") else 1.0

    monkeypatch.setattr(tuning, "graph_bench_for", lambda t: bench)
    return times


def test_tuning_measures_tiles_and_library_and_caches_the_fastest(device, timed, monkeypatch):
    g = seed("tune")
    args = operands(96, 64, 128, g, device, torch.float16)
    profile = tuning.detect_profile(device)
    cands = tuning.candidates(im.KERNEL, profile)
    winner = next(c for c in cands if not c.get("library"))
    timed["next"] = [3.0 if c != winner else 0.5 for c in cands]
    best = im.tune_int8_matmul(*args, torch.float16)
    assert best == winner
    key = im._tuning_key(96, 64, 128, args[4], torch.float16)
    assert tuning.cached_config(im.KERNEL, key, profile) == winner
    # rows are bucketed: 70 rows share the 128-row bucket of 96
    assert tuning.cached_config(im.KERNEL, im._tuning_key(70, 64, 128, args[4], torch.float16), profile) == winner
    # and the launcher runs the tuned tile, not the library
    monkeypatch.setattr(im, "int_mm", lambda *a: pytest.fail("the library ran, the tuned tile was expected"))
    assert torch.equal(im.int8_matmul(*args, torch.float16).cpu(), exact(*args, torch.float16))


def test_tuning_drops_a_tile_that_fails_and_keeps_the_library(device, timed, monkeypatch):
    broken = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 24, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}  # K not 2^n
    real = tuning.candidates
    monkeypatch.setattr(tuning, "candidates", lambda name, profile="default": (
        [im.LIBRARY, broken] if name == im.KERNEL else real(name, profile)))
    g = seed("broken")
    args = operands(64, 32, 64, g, device)
    timed["next"] = [2.0]
    with pytest.warns(UserWarning, match="is not used"):
        best = im.tune_int8_matmul(*args, torch.bfloat16)
    assert best == im.LIBRARY
    entry = next(iter(tuning.export_tuning()["entries"].values()))
    assert [t["config"] for t in entry["timings"]] == [im.LIBRARY]


def test_tuning_without_a_gpu_times_nothing(device):
    if device.type == "cuda":
        pytest.skip("on a GPU the tuner times")
    g = seed("cpu-tune")
    args = operands(64, 32, 64, g, device)
    assert im.tune_int8_matmul(*args, torch.float32) == im.LIBRARY
    assert tuning.export_tuning()["entries"] == {}


# ------------------------------------------------------------------ quantized_matmul.linear_w8a8 routing
@pytest.fixture
def w8a8(device, monkeypatch):
    """codegen/quantized_matmul.py pointed at this file's (possibly reloaded) modules; on a CPU told to
    take the CUDA path, where the interpreted kernels run. Counts int8_matmul calls."""
    from flashc.codegen import quantized_matmul as qm

    calls = []
    monkeypatch.setattr(qm, "int8", im)
    monkeypatch.setattr(qm, "quantize_rows", qr.quantize_rows)
    monkeypatch.setattr(qm, "dequantize_int32", qr.dequantize_int32)
    real = im.int8_matmul
    monkeypatch.setattr(im, "int8_matmul", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    if device.type != "cuda":
        floats = _triton_common.FLOAT_DTYPES
        monkeypatch.setattr(qm, "_fused", lambda *t: all(u.dtype in floats for u in t if u is not None))
    return qm, calls


@pytest.mark.parametrize("rows", [5, im.MIN_ROWS + 6])
def test_linear_w8a8_routes_prefill_to_the_tuned_gemm(device, w8a8, timed, rows):
    from flashc.passes.quantize.smoothquant import quantize_weight_int8

    qm, calls = w8a8
    g = seed("route", rows)
    k, n = 64, 48
    x = (torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)).to(torch.bfloat16).to(device)
    q, scales = quantize_weight_int8(torch.randn(n, k, generator=g))
    q, scales = q.to(device), scales.to(device)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16).to(device)
    profile = tuning.detect_profile(device)
    tile = next(c for c in tuning.candidates(im.KERNEL, profile) if not c.get("library"))
    timed["next"] = [0.1 if c == tile else 1.0 for c in tuning.candidates(im.KERNEL, profile)]
    tuned = qm.tune_linear_w8a8(x.reshape(1, rows, k), q, scales, bias, smooth)
    out = qm.linear_w8a8(x.reshape(1, rows, k), q, scales, bias, smooth)
    assert out.shape == (1, rows, n)
    # the integer product is exact in every path, and each computes the op's epilogue bit for bit
    assert torch.equal(out, torch.ops.flashc.linear_w8a8.default(x.reshape(1, rows, k), q, scales, bias, smooth))
    if rows >= im.MIN_ROWS:
        assert tuned == tile and calls == [rows]
    else:  # decode-sized: the library GEMM and the epilogue kernel, nothing tuned
        assert tuned is None and calls == []


@pytest.mark.parametrize("rows", [5, im.MIN_ROWS + 6])
def test_linear_w8a8_q_routes_prefill_to_the_tuned_gemm(device, w8a8, timed, rows):
    """The product on codes a norm or GLU quantized (flashc.linear_w8a8_q) is tuned like linear_w8a8's:
    before, nothing tuned it and prefill's fused-input linears always ran the library path."""
    from flashc.passes.quantize.smoothquant import quantize_weight_int8
    from flashc.quantized_ops import quantize_rows_int8

    qm, calls = w8a8
    g = seed("route_q", rows)
    k, n = 64, 48
    x = (torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)).to(torch.bfloat16)
    codes, row_scales = (t.to(device) for t in quantize_rows_int8(x))
    q, scales = quantize_weight_int8(torch.randn(n, k, generator=g))
    q, scales = q.to(device), scales.to(device)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    profile = tuning.detect_profile(device)
    tile = next(c for c in tuning.candidates(im.KERNEL, profile) if not c.get("library"))
    timed["next"] = [0.1 if c == tile else 1.0 for c in tuning.candidates(im.KERNEL, profile)]
    args = (codes.reshape(1, rows, k), row_scales, q, scales, bias, torch.bfloat16)
    tuned = qm.tune_linear_w8a8_q(*args)
    out = qm.linear_w8a8_q(*args)
    assert out.shape == (1, rows, n) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.ops.flashc.linear_w8a8_q.default(*args))
    if rows >= im.MIN_ROWS:
        assert tuned == tile and calls == [rows]
    else:
        assert tuned is None and calls == []


@pytest.mark.parametrize("op", ["flashc.linear_w8a8", "flashc.linear_w8a8_q"])
def test_cuda_backend_tunes_the_w8a8_products(op):
    from flashc.backends.cuda import KERNELS

    assert KERNELS[op].tune is not None


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad,err,match", [
    (lambda a: (a[0].float(), *a[1:]), TypeError, "xq must have dtype"),
    (lambda a: (a[0], a[1].int(), *a[2:]), TypeError, "w must have dtype"),
    (lambda a: (a[0], a[1][:, :31], *a[2:]), ValueError, r"w must be \[N, 32\]"),
    (lambda a: (a[0], a[1], a[2].half(), *a[3:]), TypeError, "x_scale must have dtype"),
    (lambda a: (a[0], a[1], a[2][:3], *a[3:]), ValueError, "x_scale must hold one fp32 scale per row"),
    (lambda a: (a[0], a[1], a[2], a[3][:5], a[4]), ValueError, "w_scale must hold one scale per row of w"),
    (lambda a: (*a[:4], a[4][:7]), ValueError, "bias must have 16 elements"),
    (lambda a: (a[0][0], *a[1:]), ValueError, "xq must have 2 dims"),
], ids=["xq_dtype", "w_dtype", "K", "x_scale_dtype", "x_scale_rows", "w_scale_rows", "bias", "xq_dims"])
def test_bad_input_names_what_is_wrong(device, bad, err, match):
    args = operands(8, 16, 32, seed("bad"), device, torch.float32)
    with pytest.raises(err, match=match):
        im.int8_matmul(*bad(args), torch.float16, config=SMALL)


def test_bad_output_dtype_depth_and_library_shape(device):
    args = operands(8, 16, 32, seed("bad2"), device)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        im.int8_matmul(*args, torch.int8, config=SMALL)
    deep = torch.zeros(1, im.MAX_K + 1, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="int32 sums of int8 products may overflow"):
        im.int8_matmul(deep, deep, torch.ones(1, device=device), torch.ones(1, device=device), None, torch.float32)
    odd = operands(8, 24, 40, seed("odd"), device)
    with pytest.raises(ValueError, match="the library path .* needs K and N multiples of 16"):
        im.int8_matmul(*odd, torch.float32, config=im.LIBRARY)
