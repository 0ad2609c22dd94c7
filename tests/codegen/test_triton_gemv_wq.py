"""flashc.codegen.triton_gemv_wq: decode GEMVs that read int2/int3/int4/int8 packed weights, with folded
norm / input scale / bias / GLU / residual, against a float64 reference of the unfused ops on fresh
random codes, scales and zero points."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc import quantized_ops as qo  # noqa: E402
from flashc.codegen import triton_gemv as tg  # noqa: E402
from flashc.codegen import triton_gemv_wq as gw  # noqa: E402
from flashc_testing import kernel_cases  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
FOLDS = {
    "plain": {},
    "bias": {"bias": True},
    "norm": {"norm": True},
    "input_scale": {"input_scale": True},
    "residual": {"residual": True},
    "norm_swiglu": {"norm": True, "glu": "silu"},
    "geglu_bias": {"glu": "gelu_tanh", "bias": True},
    "everything": {"norm": True, "input_scale": True, "bias": True, "glu": "silu", "residual": True},
}
SMALL = {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 2}
DOT = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "DOT": True}
PREFETCH = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "prefetch": True}  # several steps: the next one loaded ahead


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def packed(device, N, K, group, bits, asym, scale_dtype=torch.float32):
    """A random packed weight: codes, scales around 1/sqrt(K) / 2**(bits-1), zero points if asym."""
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
    scales = (torch.rand(N, K // group) + 0.5) * 2 / (K ** 0.5 * (1 << bits))
    zp = qo.pack_zero_points(torch.randint(0, 1 << bits, (N, K // group), dtype=torch.uint8), bits) if asym else None
    return (qo.pack_codes(codes, bits, group).to(device), scales.to(scale_dtype).to(device),
            None if zp is None else zp.to(device))


def make(device, dtype, lead, K, N, folds, group=32, bits=4, asym=False):
    x = (torch.randn(*lead, K) * 2).to(dtype).to(device)
    qweight, scales, zp = packed(device, N, K, group, bits, asym, dtype)
    glu = folds.get("glu")
    n_out = N // 2 if glu else N
    kw = {"glu": glu, "eps": 1e-5}
    if folds.get("bias"):
        kw["bias"] = torch.randn(N).to(dtype).to(device)
    if folds.get("norm"):
        kw["norm_weight"] = (1 + 0.3 * torch.randn(K)).to(dtype).to(device)
    if folds.get("input_scale"):
        kw["input_scale"] = (0.5 + torch.rand(K)).to(dtype).to(device)
    if folds.get("residual"):
        kw["residual"] = torch.randn(*lead, n_out).to(dtype).to(device)
    return x, (qweight, scales, zp, bits), kw


def truth(x, w, kw):
    qweight, scales, zp, bits = w
    as64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return gw.reference_gemv_wq(x.double().cpu(), qweight.cpu(), scales.double().cpu(),
                                None if zp is None else zp.cpu(), bits, **as64)


CODES = [(4, 32, False), (4, 64, True), (8, 128, True), (8, 32, False), (2, 16, True), (2, 64, False), (3, 32, True),
         (3, 64, False)]
SHAPES = [((1,), 160, 37), ((3, 1), 192, 24), ((8,), 128, 33), ((16,), 128, 16)]
CODE_CONFIGS = {"elementwise": SMALL, "prefetch": PREFETCH, "dot": DOT}


def _runs(config: str, codes: tuple, shape: tuple) -> bool:
    """A case the kernel takes: K a multiple of the group, the elementwise paths up to ELEMENTWISE_ROWS rows."""
    (lead, K, _), (_, group, _) = shape, codes
    return K % group == 0 and (lead[0] <= gw.ELEMENTWISE_ROWS or bool(CODE_CONFIGS[config].get("DOT")))


@pytest.mark.parametrize("config,codes,shape", kernel_cases(_runs, config=sorted(CODE_CONFIGS), codes=CODES,
                                                             shape=SHAPES), ids=str)
def test_codes_groups_and_rows_match_float64(device, config, codes, shape):
    if not _runs(config, codes, shape):  # on a GPU every combination is a case
        pytest.skip(f"not a case the {config} path takes (K a multiple of the group, rows it takes)")
    (lead, K, N), (bits, group, asym), config = shape, codes, CODE_CONFIGS[config]
    x, w, kw = make(device, torch.float32, lead, K, N, {}, group, bits, asym)
    out = gw.gemv_wq(x, *w, **kw, config=config)
    ref = truth(x, w, kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fold", sorted(FOLDS))
def test_folds_match_float64(device, fold, dtype):
    x, w, kw = make(device, dtype, (1,), 96, 38, FOLDS[fold], group=32, bits=4, asym=fold in ("norm", "everything"))
    out = gw.gemv_wq(x, *w, **kw, config=SMALL)
    ref = truth(x, w, kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("rows,fold,group,asym,dtype", [(1, "everything", 32, True, torch.float32),
                                                        (2, "norm_swiglu", 128, False, torch.bfloat16),
                                                        (1, "plain", 64, False, torch.bfloat16)], ids=str)
def test_activations_as_vectors_match_float64(device, rows, fold, group, asym, dtype):
    """xvec: x (and the folded norm weight, input scale) loaded as 8-column vectors a word and split."""
    config = {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 2, "xvec": True, "flat": True}
    x, w, kw = make(device, dtype, (rows,), 256, 32, FOLDS[fold], group=group, bits=4, asym=asym)
    out = gw.gemv_wq(x, *w, **kw, config=config)
    assert rel_err(out.cpu(), truth(x, w, kw)) < TOL[dtype]


@pytest.mark.parametrize("config", [SMALL, DOT], ids=["elementwise", "dot"])
def test_two_bit_codes_with_every_fold(device, config):
    """16 codes a word: codes past bit 19 take the shifted word, zero points are 4 blocks a byte."""
    x, w, kw = make(device, torch.float32, (2,), 224, 38, FOLDS["everything"], group=32, bits=2, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=config).cpu(), truth(x, w, kw)) < 2e-5


@pytest.mark.parametrize("config", [SMALL, DOT], ids=["elementwise", "dot"])
@pytest.mark.parametrize("group", [32, 96])
def test_three_bit_codes_with_every_fold(device, config, group):
    """32 codes in three words: codes 10 and 21 straddle two words, zero points straddle bytes; K not a
    multiple of BLOCK_K leaves a partial last tile."""
    x, w, kw = make(device, torch.float32, (2,), 288, 38, FOLDS["everything"], group=group, bits=3, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=config).cpu(), truth(x, w, kw)) < 2e-5


SPLIT_CONFIGS = {"elementwise": {**SMALL, "BLOCK_K": 32, "SPLIT_K": 3}, "dot": {**DOT, "SPLIT_K": 3}}


def _split_runs(config: str, codes: tuple, rows: int) -> bool:
    """A case the kernel takes: the elementwise path up to ELEMENTWISE_ROWS rows."""
    return rows <= gw.ELEMENTWISE_ROWS or bool(SPLIT_CONFIGS[config].get("DOT"))


@pytest.mark.parametrize("config,codes,rows", kernel_cases(
    _split_runs, config=sorted(SPLIT_CONFIGS), codes=[(4, 32, 448), (8, 64, 320), (3, 32, 544), (2, 32, 512)],
    rows=[1, 3, 16]), ids=str)
def test_split_k_ranges_sum_to_the_product(device, monkeypatch, rows, codes, config):
    """SPLIT_K: K in ranges of whole (widened) BLOCK_K blocks, a short last block where K is not a multiple
    (448 at 4 bits), partials summed and every fold applied by triton_gemv's summing kernel."""
    if not _split_runs(config, codes, rows):  # on a GPU every combination is a case
        pytest.skip("more rows than the elementwise path takes")
    (bits, group, K), config = codes, SPLIT_CONFIGS[config]
    sums = []
    monkeypatch.setattr(gw, "sum_splits", lambda partials, *a: (sums.append(partials.shape[0]),
                                                                tg.sum_splits(partials, *a)))
    x, w, kw = make(device, torch.float32, (rows,), K, 38, FOLDS["everything"], group=group, bits=bits, asym=True)
    out = gw.gemv_wq(x, *w, **kw, config=config)
    assert rel_err(out.cpu(), truth(x, w, kw)) < 2e-5
    assert sums and sums[0] > 1  # the product did run in several ranges


def test_three_bit_group_of_sixteen_is_refused(device):
    x, w, kw = make(device, torch.float32, (1,), 64, 8, {}, group=16, bits=3)
    with pytest.raises(ValueError, match="3-bit group must be a multiple of 32"):
        gw.gemv_wq(x, *w, **kw)


@pytest.mark.parametrize("fold", ["plain", "everything"])
def test_folds_on_the_dot_path_with_several_rows(device, fold):
    x, w, kw = make(device, torch.float32, (5, 1), 128, 34, FOLDS[fold], group=64, bits=8, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=DOT).cpu(), truth(x, w, kw)) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 9, 16])
def test_dot_path_in_half_precision(device, rows, dtype):
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly")
    x, w, kw = make(device, dtype, (rows,), 256, 40, FOLDS["everything"], group=64, bits=4, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=DOT).cpu(), truth(x, w, kw)) < 2e-2


def test_dot_config_with_a_short_block_k_is_widened(device):
    x, w, kw = make(device, torch.float32, (4,), 256, 20, {}, group=32, bits=4)
    out = gw.gemv_wq(x, *w, **kw, config={"BLOCK_N": 16, "BLOCK_K": 32, "DOT": True})
    assert rel_err(out.cpu(), truth(x, w, kw)) < 2e-5


def test_sixteen_rows_take_a_dot_config_untuned(device):
    x, w, kw = make(device, torch.float32, (16,), 64, 20, {}, group=32, bits=4)
    assert rel_err(gw.gemv_wq(x, *w, **kw).cpu(), truth(x, w, kw)) < 2e-5


def test_per_channel_scales(device):
    """group_size = K (one scale a row), K not a power of two."""
    x, w, kw = make(device, torch.float32, (2,), 96, 24, {}, group=96, bits=4, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=SMALL).cpu(), truth(x, w, kw)) < 2e-5


def test_float32_scales_with_bfloat16_activations(device):
    x, (q, s, zp, bits), kw = make(device, torch.bfloat16, (1,), 64, 16, {}, group=32, bits=4)
    w = (q, s.float(), zp, bits)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=SMALL).cpu(), truth(x, w, kw)) < 2e-2


def test_strided_views(device):
    x, (q, s, zp, bits), _ = make(device, torch.float32, (4, 2), 64, 16, {}, group=32, bits=8)
    view = x[:, 1]  # rows 128 elements apart
    s_t = s.t().contiguous().t()  # scales [N, K / G] stored column-major
    norm_weight = torch.randn(128, device=device)[::2]
    kw = {"norm_weight": norm_weight}
    out = gw.gemv_wq(view, q, s_t, zp, bits, **kw, config=SMALL)
    assert rel_err(out.cpu(), truth(view, (q, s, zp, bits), kw)) < 2e-5


@pytest.mark.parametrize("name,config", [(n, c) for n in ("gemv_wq", "gemv_wq_rows") for c in gw.tuning.candidates(n, "h200")],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_h200_candidate(device, name, config):
    rows = 1 if name == "gemv_wq" else 3 if config.get("DOT") or config.get("library") else 2
    x, w, kw = make(device, torch.float32, (rows,), 256, 24, FOLDS["everything"], group=128, bits=4, asym=True)
    assert rel_err(gw.gemv_wq(x, *w, **kw, config=config).cpu(), truth(x, w, kw)) < 2e-5


@pytest.mark.parametrize("fold", ["plain", "everything"])
def test_library_candidate_computes_the_same(device, fold):
    x, w, kw = make(device, torch.float32, (2, 1), 64, 48, FOLDS[fold], group=32, bits=4, asym=True)
    fused = gw.gemv_wq(x, *w, **kw, config=SMALL)
    library = gw.gemv_wq(x, *w, **kw, config={"library": True})
    assert rel_err(library.cpu(), truth(x, w, kw)) < 2e-5
    assert rel_err(fused.cpu(), library.cpu()) < 2e-5


@pytest.mark.parametrize("rows,elementwise", [(1, True), (2, True), (4, False), (8, False)])
def test_tuner_times_elementwise_configs_for_few_rows_only(device, monkeypatch, rows, elementwise):
    timed = []
    monkeypatch.setattr(gw.tuning, "autotune", lambda name, key, cands, *a, **k: timed.extend(cands) or cands[0])
    x, w, kw = make(device, torch.float32, (rows,), 64, 16, {}, group=32, bits=4)
    gw.tune_gemv_wq(x, *w, **kw)
    assert {"library": True} in timed
    assert any(not c.get("DOT") and not c.get("library") and not c.get("ROWWISE") for c in timed) == elementwise
    assert {"ROWWISE": True} in timed or rows == 1  # several rows: row by row as one row runs, a candidate too


@pytest.mark.parametrize("rows", [6, 12])
@pytest.mark.parametrize("fold", ["plain", "everything"])
def test_rowwise_rows_equal_one_row_products_bit_for_bit(device, monkeypatch, fold, rows):
    """ROWWISE: each row as the one-row product of the shape runs (its config), in one launch: equal bit for
    bit to row-by-row calls, 12 rows (past the elementwise limit) included."""
    name, key = [], []
    real = gw.tuning.get_config
    monkeypatch.setattr(gw.tuning, "get_config", lambda n, k, *a: name.append(n) or key.append(k["M"])
                        or (dict(SMALL) if k["M"] == 1 else real(n, k, *a)))
    x, w, kw = make(device, torch.float32, (rows, 1), 256, 24, FOLDS[fold], group=128, bits=4, asym=True)
    out = gw.gemv_wq(x, *w, **kw, config={"ROWWISE": True})
    assert name == ["gemv_wq"] and key == [1]  # the one-row product's tuned config
    by_row = torch.cat([gw.gemv_wq(x[i], *w, **{k: (v[i] if k == "residual" else v) for k, v in kw.items()},
                                   config=SMALL) for i in range(rows)])
    assert torch.equal(out.reshape(by_row.shape), by_row)
    assert rel_err(out.cpu(), truth(x, w, kw)) < 2e-5


def test_tuning_includes_the_library_path(device):
    x, w, kw = make(device, torch.float32, (1,), 64, 32, FOLDS["norm"], group=32, bits=4)
    cfg = gw.tune_gemv_wq(x, *w, **kw)
    assert cfg.get("library") or {"BLOCK_N", "BLOCK_K"} <= set(cfg)
    for profile in gw.tuning.PROFILES:
        assert {"library": True} in gw.tuning.candidates("gemv_wq", profile)
        assert any(c.get("DOT") for c in gw.tuning.candidates("gemv_wq_rows", profile))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bits,group,asym", [(4, 32, True), (4, 64, False), (8, 32, True), (8, 96, False),
                                             (2, 32, True), (2, 16, False), (3, 32, True), (3, 96, False)],
                         ids=str)
def test_dequantize_weight_is_exact(device, bits, group, asym, dtype):
    # (bfloat16 is left out here: the CPU interpreter rounds float32 -> bfloat16 by truncation)
    qweight, scales, zp = packed(device, 19, 192, group, bits, asym, dtype)
    out = gw.dequantize_weight(qweight, scales, zp, bits, dtype)
    assert out.dtype == dtype and torch.equal(out.cpu(), qo.dequantize(qweight, scales, zp, bits).to(dtype).cpu())


@pytest.mark.skipif(INTERPRETED, reason="the CPU interpreter rounds float32 -> bfloat16 by truncation")
def test_dequantize_weight_is_exact_in_bfloat16(device):
    qweight, scales, zp = packed(device, 40, 256, 128, 4, True, torch.bfloat16)
    out = gw.dequantize_weight(qweight, scales, zp, 4, torch.bfloat16)
    assert torch.equal(out, qo.dequantize(qweight, scales, zp, 4).to(torch.bfloat16))


@pytest.mark.parametrize("rows", [40, 3])
def test_linear_wq_prefill_and_decode(device, rows):
    """Over MAX_ROWS rows: dequantize_weight + a GEMM; at most: the GEMV kernel. Both = flashc.linear_wq."""
    x, (q, s, zp, bits), _ = make(device, torch.float32, (rows,), 64, 24, {}, group=32, bits=4, asym=True)
    bias, input_scale = torch.randn(24, device=device), 0.5 + torch.rand(64, device=device)
    out = gw.linear_wq(x, q, s, zp, bias, input_scale, bits)
    ref = qo.linear_wq(x.double().cpu(), q.cpu(), s.double().cpu(), zp.cpu(), bias.double().cpu(),
                       input_scale.double().cpu(), bits)
    assert out.shape == (rows, 24) and rel_err(out.cpu(), ref) < 2e-5


def test_empty_rows(device):
    x, w, _ = make(device, torch.float32, (0,), 64, 16, {}, group=32, bits=4)
    assert gw.gemv_wq(x, *w, config=SMALL).shape == (0, 16)


@pytest.mark.parametrize("bad,match", [
    (lambda x, q, s: gw.gemv_wq(x, q, s, None, 5), "bits must be one of"),
    (lambda x, q, s: gw.gemv_wq(torch.randn(2, 96, device=x.device), q, s, None, 4), "K = 96"),
    (lambda x, q, s: gw.gemv_wq(x, q.to(torch.int8), s, None, 4), "qweight must have dtype"),
    (lambda x, q, s: gw.gemv_wq(x, q, s[:, :1], None, 4), "scales must be \\[8, 2\\]"),
    (lambda x, q, s: gw.gemv_wq(x, q, s.half(), None, 4), "x's dtype"),
    (lambda x, q, s: gw.gemv_wq(x, q, s, torch.zeros(8, 2, dtype=torch.uint8, device=x.device), 4), "zero_points must be \\[8, 1\\]"),
    (lambda x, q, s: gw.gemv_wq(torch.randn(17, 64, device=x.device), q, s, None, 4), "at most 16"),
    (lambda x, q, s: gw.gemv_wq(torch.randn(9, 64, device=x.device), q, s, None, 4, config=SMALL), "use a DOT config"),
    (lambda x, q, s: gw.gemv_wq(x, q[:7], s[:7], None, 4, glu="silu"), "gate\\|up halves"),
    (lambda x, q, s: gw.gemv_wq(x, q, s, None, 4, input_scale=torch.ones(63, device=x.device)), "input_scale must be \\[64\\]"),
    (lambda x, q, s: gw.gemv_wq(x, q, s, None, 4, residual=torch.randn(2, 9, device=x.device)), "residual must have shape"),
    (lambda x, q, s: gw.dequantize_weight(q, s, None, 4, torch.int32), "dtype must be one of"),
], ids=["bits", "K", "qweight_dtype", "scales_shape", "scales_dtype", "zero_points", "rows", "elementwise_rows",
        "glu_rows", "input_scale", "residual", "dequantize_dtype"])
def test_bad_input_names_what_is_wrong(device, bad, match):
    x = torch.randn(2, 64, device=device)
    q, s, _ = packed(device, 8, 64, 32, 4, False)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, q, s)
