"""flashc.codegen.triton_sparse_gemv_wq: linear_wq(sparsify(x, t), ...) on codes packed K-major, the weight rows of
zeroed features skipped, against a float64 reference on fresh random inputs (explicit configs: tuning needs a GPU);
and flashc.sparse_ops.to_kmajor, the conversion from linear_wq's layout, exact."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

import flashc  # noqa: E402,F401  (registers flashc.sparse_gemv_wq)
from flashc import quantized_ops as qo  # noqa: E402
from flashc import sparse_ops as so  # noqa: E402
from flashc.codegen import triton_sparse_gemv_wq as sw  # noqa: E402
from flashc.errors import FlashcError, InputError  # noqa: E402
from flashc_testing import kernel_cases  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the sums are fp32 whatever the dtype: the bound is fp32 sums over K terms plus one rounding to the output dtype
# (which also covers a DOT config's weight, rounded to x's dtype as the op rounds it)
OUT_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# small tiles so that the test shapes span several column blocks (a partial last one) and K ranges
CONFIGS = {
    "elementwise": {"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1},
    "one_split": {"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 1},
    "prefetch": {"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1, "PREFETCH": True},
    "skip": {"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1, "SKIP": True},
    "dot": {"BLOCK_N": 128, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4, "DOT": True},
    "dot_prefetch": {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "DOT": True, "PREFETCH": True},
    "library": {"library": True},
}
SPARSITIES = (0.0, 0.5, 0.9)


def packed(N, K, group, bits=4, asym=False, scale_dtype=torch.float32, device="cpu"):
    """A random weight in linear_wq's layout (codes, scales around 1/sqrt(K) / 2**(bits-1), zero points if asym)
    and the same K-major: ((qweight, scales, zero_points), (qweight_t, scales_t, zero_points_t))."""
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
    scales = ((torch.rand(N, K // group) + 0.5) * 2 / (K ** 0.5 * (1 << bits))).to(scale_dtype)
    zp = qo.pack_zero_points(torch.randint(0, 1 << bits, (N, K // group), dtype=torch.uint8), bits) if asym else None
    packed_nk = (qo.pack_codes(codes, bits, group), scales, zp)
    kmajor = so.to_kmajor(*packed_nk, bits)
    return packed_nk, tuple(None if t is None else t.to(device) for t in kmajor)


def threshold(x, sparsity):
    """A 0-d threshold of x's dtype zeroing about `sparsity` of x, midway across the widest gap between neighbouring
    magnitudes near that quantile: no entry within a rounding of it, so the kernel and a float64 truth (whose
    RMSNorm rounds otherwise) drop the same entries."""
    if sparsity == 0.0:
        return torch.zeros((), dtype=x.dtype)
    mags = x.abs().float().flatten().sort().values
    n = mags.numel()
    lo, hi = max(1, int(sparsity * n) - n // 40), min(n - 1, int(sparsity * n) + n // 40)
    j = lo + int((mags[lo:hi + 1] - mags[lo - 1:hi]).argmax())
    return ((mags[j - 1] + mags[j]) / 2).to(x.dtype)


def inputs(rows, K, N, dtype, folds, device):
    """x, and the keyword arguments of the folds asked for (bias, norm, input_scale, glu, residual)."""
    x = (torch.randn(rows, K) * 2).to(dtype)
    n_out = N // 2 if folds.get("glu") else N
    kw = {"glu": folds.get("glu"), "eps": 1e-5}
    if folds.get("bias"):
        kw["bias"] = torch.randn(N).to(dtype)
    if folds.get("norm"):
        kw["norm_weight"] = (1 + 0.3 * torch.randn(K)).to(dtype)
    if folds.get("input_scale"):
        kw["input_scale"] = (0.5 + torch.rand(K)).to(dtype)
    if folds.get("residual"):
        kw["residual"] = torch.randn(rows, n_out).to(dtype)
    return x, kw


def normed(x, kw):
    """What the threshold is compared with: x, RMSNormed as the op norms it when a norm is folded in."""
    g = kw.get("norm_weight")
    return x if g is None else torch.ops.flashc.rms_norm(x, g, kw["eps"])


def check(got, x, t, kmajor, bits, kw):
    """got against the float64 truth from the same (rounded) inputs, element by element: fp32 sums over K terms
    of magnitude |x| s (q + zp) (the group-sum form subtracts s zp sum(x) from s sum(q x)), one output rounding."""
    qweight_t, scales_t, zero_points_t = (None if a is None else a.cpu() for a in kmajor)
    as64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want = sw.reference_sparse_gemv_wq(x.double().cpu(), t.double().cpu(), qweight_t, scales_t.double(), zero_points_t,
                                       bits, **as64)
    h = normed(x.double().cpu(), as64)
    kept = torch.where(h.abs() > t.double().cpu(), h, torch.zeros((), dtype=torch.float64))
    if as64.get("input_scale") is not None:
        kept = kept * as64["input_scale"]
    group = qweight_t.shape[0] // scales_t.shape[0]
    s_full = scales_t.double().abs().repeat_interleave(group, dim=0)
    mags = kept.abs() @ (s_full * 2.0 ** (bits + 1))
    if kw.get("glu"):  # act(gate) * up: both factors' errors through the product (|act(g)| <= |g|, |act'| <= 1.1)
        half = mags.shape[-1] // 2
        ref = sw.reference_sparse_gemv_wq(x.double().cpu(), t.double().cpu(), qweight_t, scales_t.double(),
                                          zero_points_t, bits, **{**as64, "glu": None})
        gate, up = ref[..., :half].abs(), ref[..., half:].abs()
        mags = 1.1 * (mags[..., :half] * up + mags[..., half:] * gate + mags[..., :half] * mags[..., half:])
    allowed = mags * (x.shape[-1] * 2.0 ** -23 + OUT_EPS[got.dtype]) + want.abs() * OUT_EPS[got.dtype] + 1e-30
    if kw.get("glu"):  # the activation evaluated in fp32 (an exp, a division, two products): a few ulps of its own
        allowed += want.abs() * 2.0 ** -20
    err = (got.double().cpu() - want).abs()
    assert got.shape == want.shape and got.dtype == x.dtype
    assert bool((err <= allowed).all()), f"max error {err.max().item():.3g}, at {int(err.argmax())}"


def run(x, t, kmajor, bits, kw, config, device):
    on = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return sw.sparse_gemv_wq(x.to(device), t.to(device), *kmajor, bits, **on, config=config)


def interpreter_fault(dtype, config, folds=None) -> str | None:
    """Why Triton's CPU interpreter cannot check this case (None: it can)."""
    if dtype == torch.bfloat16 and config.get("DOT"):
        return "Triton's CPU interpreter computes bf16 tl.dot wrongly (DOT configs)"
    if dtype == torch.bfloat16 and (folds or {}).get("norm"):
        return ("Triton's CPU interpreter rounds fp32 -> bf16 towards zero (a GPU and torch: to nearest): the "
                "normed values differ from the op's by an ulp each")
    return None


def skip_interpreted(dtype, config, folds=None):
    if INTERPRETED and (why := interpreter_fault(dtype, config, folds)):
        pytest.skip(why)


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (2, 16)], ids=str)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_to_kmajor_keeps_every_code_scale_and_zero_point(bits, group, asym):
    """The K-major weight holds linear_wq's codes, scales and zero points unchanged: unpacked, each equals the
    original transposed, the dequantized weight is dequantize(...).T bit for bit, and the op equals
    linear_wq(sparsify(x, t), ...) bit for bit (the same fp32 weight, the same product)."""
    N, K = 48, 256
    (qweight, scales, zp), (qweight_t, scales_t, zp_t) = packed(N, K, group, bits, asym)
    assert qweight_t.dtype == torch.int32 and tuple(qweight_t.shape) == (K, N * bits // 32)
    assert torch.equal(so.unpack_kmajor_codes(qweight_t, bits), qo.unpack_codes(qweight, bits).t())
    assert torch.equal(scales_t, scales.t()) and scales_t.is_contiguous()
    if asym:
        assert tuple(zp_t.shape) == (K // group, N * bits // 32)
        assert torch.equal(so.unpack_kmajor_codes(zp_t, bits), qo.unpack_zero_points(zp, bits, K // group).t())
    else:
        assert zp_t is None
    dequantized = qo.dequantize(qweight, scales, zp, bits)
    assert torch.equal(so.dequantize_kmajor(qweight_t, scales_t, zp_t, bits), dequantized.t())
    x, t, input_scale = torch.randn(3, K), torch.tensor(0.6), torch.rand(K) + 0.5
    got = torch.ops.flashc.sparse_gemv_wq(x, t, qweight_t, None, None, 1e-6, None, None, scales_t, zp_t,
                                          input_scale, bits)
    want = torch.ops.flashc.linear_wq(torch.ops.flashc.sparsify(x, t), qweight, scales, zp, None, input_scale, bits)
    assert torch.equal(got, want)


def test_to_kmajor_refuses_what_the_layout_cannot_hold():
    (qweight, scales, _), _ = packed(40, 64, 32)
    with pytest.raises(InputError, match="2, 4, 8 bits, got 3"):
        so.to_kmajor(qo.pack_codes(torch.zeros(40, 64, dtype=torch.uint8), 3, 32), scales, None, 3)
    with pytest.raises(InputError, match="12 output rows do not fill whole 32-bit words of 8 4-bit codes"):
        so.to_kmajor(qweight[:12], scales[:12], None, 4)
    with pytest.raises(InputError, match=r"scales must be \[40, 2\]"):
        so.to_kmajor(qweight, scales[:, :1], None, 4)
    with pytest.raises(FlashcError, match="qweight must be uint8"):
        so.to_kmajor(qweight.int(), scales, None, 4)


# ----------------------------------------------------------------------------- the kernel
# groups and zero points in two of their six pairs (test_every_candidate covers them again per tile); in Triton's
# CPU interpreter each tile with one of the two, in turn: the suite's time on the CI machine's two cores is budgeted
GROUPS = [(32, True), (128, False)]
MATCH_CASES = ([(config, *GROUPS[i % 2]) for i, config in enumerate(sorted(CONFIGS))] if INTERPRETED else
               [(config, *group) for config in sorted(CONFIGS) for group in GROUPS])


@pytest.mark.parametrize("config,group,asym", MATCH_CASES, ids=str)
def test_matches_float64_reference(device, config, group, asym):
    """int4 codes, symmetric or with zero points, at sparsities 0, 0.5 and 0.9 (1, 3 and 2 rows), a 0-d or a
    per-feature threshold, bias or none; K in several ranges and N in several column blocks, the last partial."""
    for i, sparsity in enumerate(SPARSITIES):
        rows = (1, 3, 2)[i]
        K, N = 128, (144 if CONFIGS[config].get("DOT") else 72)
        _, kmajor = packed(N, K, group, 4, asym, device=device)
        x, kw = inputs(rows, K, N, torch.float32, {"bias": i != 1}, device)
        t = threshold(x, sparsity)
        if i == 2:  # one threshold a feature, spread around that level
            t = t * (0.5 + torch.rand(K))
        check(run(x, t, kmajor, 4, kw, CONFIGS[config], device), x, t, kmajor, 4, kw)


FOLDS = {"bias": dict(bias=True), "norm": dict(norm=True), "input_scale": dict(input_scale=True),
         "norm+silu": dict(norm=True, glu="silu"), "gelu_tanh+bias": dict(glu="gelu_tanh", bias=True),
         "residual": dict(residual=True), "norm+input_scale+residual": dict(norm=True, input_scale=True, residual=True)}


@pytest.mark.parametrize("dtype,config,folds", kernel_cases(  # one_split: the epilogue in the kernel
    lambda dtype, config, folds: not interpreter_fault(dtype, CONFIGS[config], FOLDS[folds]),
    dtype=[torch.float32, torch.bfloat16], config=["one_split", "prefetch", "dot"], folds=sorted(FOLDS)), ids=str)
def test_folds_match_the_op(device, dtype, config, folds):
    """The RMSNorm before (the threshold sees the normed value), the input scale, the bias, the gated activation of
    the output's halves or the residual after, as flashc.sparse_gemv_wq's reference computes them: 1 row with zero
    points in groups of 32, 4 rows symmetric in one group of 64; half the features dropped."""
    fold = FOLDS[folds]
    skip_interpreted(dtype, CONFIGS[config], fold)
    for rows, asym, group in ((1, True, 32), (4, False, 64)):
        K, N = 64, (160 if CONFIGS[config].get("DOT") else 48)
        _, kmajor = packed(N, K, group, 4, asym, dtype, device)
        x, kw = inputs(rows, K, N, dtype, fold, device)
        t = threshold(normed(x, kw), 0.5)
        check(run(x, t, kmajor, 4, kw, CONFIGS[config], device), x, t, kmajor, 4, kw)


@pytest.mark.parametrize("config", ["prefetch", "dot"])
@pytest.mark.parametrize("bits", [8, 2])
def test_eight_and_two_bit_codes(device, bits, config):
    """4 codes a word (8 bits: codes past bit 19 taken from the word shifted by 16) and 16 (2 bits), with zero
    points and every fold that fits together, 1 and 3 rows."""
    for rows in (1, 3):
        K, N = 128, (256 if CONFIGS[config].get("DOT") else 48)
        _, kmajor = packed(N, K, 64, bits, True, device=device)
        x, kw = inputs(rows, K, N, torch.float32, dict(norm=True, input_scale=True, bias=True, glu="silu"), device)
        t = threshold(normed(x, kw), 0.5)
        check(run(x, t, kmajor, bits, kw, CONFIGS[config], device), x, t, kmajor, bits, kw)


def test_many_rows_on_the_dot_path(device):
    """Up to MAX_ROWS rows: DOT tiles pad them to 16."""
    for rows in (9, sw.MAX_ROWS):
        _, kmajor = packed(160, 128, 32, 4, True, device=device)
        x, kw = inputs(rows, 128, 160, torch.float32, dict(norm=True, residual=True), device)
        t = threshold(normed(x, kw), 0.9)
        check(run(x, t, kmajor, 4, kw, CONFIGS["dot"], device), x, t, kmajor, 4, kw)


@pytest.mark.parametrize("name,config", [(n, c) for n in ("sparse_gemv_wq", "sparse_gemv_wq_rows")
                                         for c in sw.candidates(n)],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_candidate(device, name, config):
    """Each tile the tuner may pick computes the op at sparsity 0, symmetric in groups of 32, and at 0.9 with
    zero points in groups of 128, with the norm, the bias and the gated activation folded in (K of several ranges
    for every SPLIT_K)."""
    # the rows list's elementwise tile at 2 rows, the most the tuner times it for
    rows = 1 if name == "sparse_gemv_wq" else 3 if config.get("DOT") or config.get("library") else 2
    # two cases, not every combination: the suite's time on two CI cores is budgeted
    for sparsity, group, asym in ((0.0, 32, False), (0.9, 128, True)):
        K, N = 256, 272
        _, kmajor = packed(N, K, group, 4, asym, device=device)
        x, kw = inputs(rows, K, N, torch.float32, dict(norm=True, bias=True, glu="silu"), device)
        t = threshold(normed(x, kw), sparsity)
        check(run(x, t, kmajor, 4, kw, config, device), x, t, kmajor, 4, kw)


@pytest.mark.parametrize("config", ["elementwise", "prefetch", "dot"])
def test_edge_thresholds_match_the_op_exactly_in_fp32(device, config):
    """Nothing kept (a threshold of inf or nan, all-zero x): the bias, exactly; a threshold of -inf keeps every
    entry, zeros included; nan in x is dropped, as torch drops it."""
    K, N = 64, (128 if CONFIGS[config].get("DOT") else 40)
    _, kmajor = packed(N, K, 32, 4, True, device=device)
    bias = torch.randn(N)
    x = torch.randn(2, K)
    x_nan = x.clone()
    x_nan[0, 3] = float("nan")
    for xs, t in ((x, torch.tensor(float("inf"))), (x, torch.tensor(float("nan"))),
                  (torch.zeros(2, K), torch.tensor(0.0))):
        got = run(xs, t, kmajor, 4, {"bias": bias}, CONFIGS[config], device)
        assert torch.equal(got.cpu(), bias.expand(2, N))
    for xs, t in ((x, torch.tensor(-float("inf"))), (x_nan, torch.tensor(0.3))):
        got = run(xs, t, kmajor, 4, {"bias": bias}, CONFIGS[config], device).cpu()
        want = sw.reference_sparse_gemv_wq(xs, t, *(None if a is None else a.cpu() for a in kmajor), 4, bias)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_with_a_flashc_error_naming_them(device):
    K, N = 64, 48
    _, (qweight_t, scales_t, zp_t) = packed(N, K, 32, 4, True, device=device)
    x, t = torch.randn(2, K, device=device), torch.tensor(0.1, device=device)
    cases = [
        (dict(qweight_t=qweight_t.view(torch.uint8)), r"qweight_t must have dtype in \['torch.int32'\]"),
        (dict(x=torch.randn(2, 32, device=device)), r"qweight_t must be int32 \[K, N \* 4 / 32\] with K = 32"),
        (dict(bits=3), r"bits must be one of \(2, 4, 8\)"),
        (dict(bits=8), r"scales_t \[K / group_size, N\] has N = 48, but qweight_t's rows hold 24 8-bit codes"),
        (dict(scales_t=scales_t[:, :40]), "has N = 40, but qweight_t's rows hold 48"),
        (dict(scales_t=torch.ones(3, N, device=device)), "scales_t has 3 groups, which do not divide K = 64"),
        (dict(scales_t=torch.ones(8, N, device=device), zero_points_t=None), r"multiple of 16 \(MatMulNBits\), got 8"),
        (dict(scales_t=scales_t.half()), r"scales_t must have x's dtype \(torch.float32\) or float32"),
        (dict(zero_points_t=zp_t[:1]), r"zero_points_t must be int32 \[2, 6\]"),
        (dict(t=torch.rand(2, K, device=device)), "threshold must be 0-d or one per input feature"),
        (dict(t=torch.tensor(1, device=device)), "threshold must be a floating-point tensor"),
        (dict(x=torch.randn(17, K, device=device)), "x has 17 rows; the kernel is for at most 16"),
        (dict(x=torch.randn(9, K, device=device), config=CONFIGS["elementwise"]), "for at most 8 rows"),
        (dict(glu="relu"), "glu must be one of"),
        (dict(glu="silu", residual=torch.randn(2, 24, device=device)), "not both"),
        (dict(bias=torch.randn(N, device=device).half()), "bias must have x's dtype torch.float32"),
        (dict(x=x.half(), norm_weight=torch.ones(K, device=device)), "norm_weight must have x's dtype torch.float16"),
        (dict(input_scale=torch.ones(K + 1, device=device)), r"input_scale must be \[64\]"),
        (dict(residual=torch.randn(2, 24, device=device)), r"residual must be \[2, 48\]"),
    ]
    for change, message in cases:
        args = dict(x=x, t=t, qweight_t=qweight_t, scales_t=scales_t, zero_points_t=zp_t, bits=4)
        args.update(change)
        config = args.pop("config", None)
        call = [args.pop(k) for k in ("x", "t", "qweight_t", "scales_t", "zero_points_t", "bits")]
        with pytest.raises(FlashcError, match=message):
            sw.sparse_gemv_wq(*call, **args, config=config)


def test_untuned_launch_uses_the_first_candidate_that_fits(device):
    """Without a tuning result the launcher takes the first candidate; past the elementwise limit, the first DOT
    one. The default config computes the op."""
    _, kmajor = packed(64, 64, 32, 4, False, device=device)
    x, t = torch.randn(12, 64), torch.tensor(0.6)
    assert sw._config(1, x[:1], t, 64, 32, 4, None, None, sw.NO_FOLDS) == sw.candidates("sparse_gemv_wq")[0]
    cfg = sw._config(12, x, t, 64, 32, 4, None, None, sw.NO_FOLDS)
    assert cfg == sw.candidates("sparse_gemv_wq_rows")[0] and cfg["DOT"]
    for rows in (1, 12):
        check(run(x[:rows], t, kmajor, 4, {}, None, device), x[:rows], t, kmajor, 4, {})
