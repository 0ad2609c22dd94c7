"""flashc.codegen.triton_sparse_gemv: linear(sparsify(x, t), w_t.T, bias) with the weight rows of zeroed
features skipped, against a float64 reference on fresh random inputs (explicit configs: tuning needs a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

import flashc  # noqa: E402,F401  (registers flashc.sparse_gemv)
from flashc.codegen import triton_sparse_gemv as ts  # noqa: E402
from flashc_testing import kernel_cases  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the accumulation is fp32 whatever the dtype: the bound is the output's rounding plus fp32 sums
OUT_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
CONFIGS = {
    "split": {"BLOCK_N": 32, "BLOCK_K": 8, "SPLIT_K": 3, "num_warps": 2},
    "one_split": {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 2},
    "dot": {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 4, "num_warps": 4, "DOT": True},
    "compact": {"BLOCK_N": 32, "BLOCK_K": 8, "SPLIT_K": 3, "num_warps": 2, "COMPACT": True},
    "compact_one_split": {"BLOCK_N": 16, "BLOCK_K": 4, "SPLIT_K": 1, "num_warps": 2, "COMPACT": True},
    "prefetch": {"BLOCK_N": 32, "BLOCK_K": 8, "SPLIT_K": 3, "num_warps": 2, "PREFETCH": True},
    "prefetch_one_split": {"BLOCK_N": 16, "BLOCK_K": 4, "SPLIT_K": 1, "num_warps": 2, "PREFETCH": True},
    "dot_prefetch": {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 4, "num_warps": 4, "DOT": True, "PREFETCH": True},
    "library": {"library": True},
}


def bound(x, t, w_t, out_dtype):
    """Per-element error allowed: fp32 accumulation over K terms plus one rounding to the output dtype."""
    kept = torch.where(x.abs() > t, x, torch.zeros((), dtype=x.dtype))
    mags = kept.abs() @ w_t.abs()
    return mags * (x.shape[-1] * 2.0 ** -23 + OUT_EPS[out_dtype]) + 1e-30


def check(got, x, t, w_t, bias):
    """got against the float64 truth computed from the same (rounded) inputs."""
    x64, t64, w64 = x.double().cpu(), t.double().cpu(), w_t.double().cpu()
    b64 = bias.double().cpu() if bias is not None else None
    want = ts.reference_sparse_gemv(x64, t64, w64, b64)
    allowed = bound(x64, t64, w64, got.dtype) + (b64.abs() * OUT_EPS[got.dtype] if b64 is not None else 0)
    err = (got.double().cpu() - want).abs()
    assert got.shape == want.shape and got.dtype == x.dtype
    assert bool((err <= allowed).all()), f"max error {err.max().item():.3g}, worst allowed {allowed.min().item():.3g}"


def thresholds(x, sparsity, per_feature):
    """A threshold zeroing about `sparsity` of x: 0-d, or per input feature (a spread around that level)."""
    if sparsity == 0.0:
        level = torch.tensor(0.0)  # only exact zeros dropped (there are none)
    elif sparsity == 1.0:
        level = torch.tensor(float("inf"))
    else:
        level = x.abs().double().flatten().quantile(sparsity).float()
    if not per_feature:
        return level.to(x.dtype)
    return (level * (0.5 + torch.rand(x.shape[-1]))).to(x.dtype)


def gap_threshold(x, sparsity):
    """A 0-d threshold of x's dtype zeroing about `sparsity` of x, midway across the widest gap between
    neighbouring magnitudes near that quantile (no entry within a rounding of it)."""
    mags = x.abs().float().flatten().sort().values
    n = mags.numel()
    lo, hi = max(1, int(sparsity * n) - n // 10), min(n - 1, int(sparsity * n) + n // 10)
    j = lo + int((mags[lo:hi + 1] - mags[lo - 1:hi]).argmax())
    return ((mags[j - 1] + mags[j]) / 2).to(x.dtype)


def interpreter_fault(dtype, config, folds: str = "") -> str | None:
    """Why Triton's CPU interpreter cannot check this case (None: it can)."""
    if dtype == torch.bfloat16 and CONFIGS[config].get("DOT"):
        return "Triton's CPU interpreter computes bf16 tl.dot wrongly (DOT configs)"
    if folds and dtype == torch.bfloat16 and FOLDS[folds].get("norm"):  # FOLDS: defined below, used by then
        return ("Triton's CPU interpreter rounds fp32 -> bf16 towards zero (a GPU and torch: to nearest): the "
                "normed values differ from the op's by an ulp each (fp16 runs the same code here)")
    return None


def skip_interpreted(dtype, config, folds: str = ""):
    if INTERPRETED and (why := interpreter_fault(dtype, config, folds)):
        pytest.skip(why)


SPARSITIES = [0.0, 0.4, 0.9, 1.0]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype,config,per_feature,sparsity",
                         kernel_cases(lambda dtype, config, *_: not interpreter_fault(dtype, config), dtype=DTYPES,
                                      config=sorted(CONFIGS), per_feature=[False, True], sparsity=SPARSITIES), ids=str)
def test_matches_float64_reference(device, sparsity, per_feature, dtype, config):
    """1 row, 8 rows and one count between (2..7 over the sparsities and threshold kinds), odd K and N,
    bias or none, at the given sparsity and threshold kind."""
    skip_interpreted(dtype, config)
    for rows in (1, 2 + (2 * SPARSITIES.index(sparsity) + per_feature) % 6, 8):
        K, N = (67, 45) if rows % 2 else (96, 40)
        lead = (rows,) if rows % 3 else (rows, 1)  # leading dims are flattened
        x = torch.randn(*lead, K).to(dtype)
        w_t = (torch.randn(K, N) / K ** 0.5).to(dtype)
        bias = torch.randn(N).to(dtype) if rows % 2 else None
        t = thresholds(x, sparsity, per_feature)
        got = ts.sparse_gemv(x.to(device), t.to(device), w_t.to(device), None if bias is None else bias.to(device),
                             config=CONFIGS.get(config))
        check(got, x, t, w_t, bias)


FOLDS = {"norm": dict(norm=True), "norm+silu": dict(norm=True, glu="silu"), "gelu_tanh": dict(glu="gelu_tanh"),
         "residual": dict(residual=True), "norm+residual": dict(norm=True, residual=True)}


@pytest.mark.parametrize("dtype,config,folds", kernel_cases(
    lambda dtype, config, folds: not interpreter_fault(dtype, config, folds), dtype=DTYPES, config=sorted(CONFIGS),
    folds=sorted(FOLDS)), ids=str)
def test_folded_norm_activation_and_residual_match_the_op(device, dtype, config, folds):
    """The RMSNorm before (the threshold sees the normed value), the gated activation of the output's halves
    or the residual after, as flashc.sparse_gemv's reference computes them, 1 and 5 rows, per-feature and
    0-d thresholds, bias or none."""
    skip_interpreted(dtype, config, folds)
    fold = FOLDS[folds]
    for rows, per_feature in ((1, False), (5, True)):
        K, N = (67, 46) if rows == 1 else (96, 40)
        x = (torch.randn(rows, K) * 3).to(dtype)
        w_t = (torch.randn(K, N) / K ** 0.5).to(dtype)
        bias = torch.randn(N).to(dtype) if rows == 1 else None
        g = (1 + torch.rand(K)).to(dtype) if fold.get("norm") else None
        normed = torch.ops.flashc.rms_norm(x, g, 1e-5) if g is not None else x
        # 16-bit: a normed value an ulp off torch's (its fp32 sum of squares in another order) must not cross
        # the threshold: a 0-d one in a wide gap between magnitudes
        t = thresholds(normed, 0.4, per_feature) if dtype == torch.float32 else gap_threshold(normed, 0.4)
        n_out = N // 2 if fold.get("glu") else N
        residual = torch.randn(rows, n_out).to(dtype) if fold.get("residual") else None
        args = (t, w_t, bias, g, 1e-5, residual, fold.get("glu"))
        want = ts.reference_sparse_gemv(x, *args)
        on = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        got = ts.sparse_gemv(x.to(device), *on, config=CONFIGS[config]).cpu()
        scale = float(want.abs().max())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.shape == want.shape == (rows, n_out) and got.dtype == dtype
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * scale), (got - want).abs().max()


def test_folds_refused_where_they_do_not_fit(device):
    x, t, w_t = torch.randn(2, 16, device=device), torch.tensor(0.1, device=device), torch.randn(16, 8, device=device)
    with pytest.raises(ValueError, match="glu must be one of"):
        ts.sparse_gemv(x, t, w_t, glu="relu")
    with pytest.raises(ValueError, match="gate\\|up halves"):
        ts.sparse_gemv(x, t, torch.randn(16, 7, device=device), glu="silu")
    with pytest.raises(ValueError, match="not both"):
        ts.sparse_gemv(x, t, w_t, residual=torch.randn(2, 4, device=device), glu="silu")
    with pytest.raises(ValueError, match="norm_weight must be \\[16\\]"):
        ts.sparse_gemv(x, t, w_t, norm_weight=torch.ones(8, device=device))
    with pytest.raises(ValueError, match="residual must be \\[2, 8\\]"):
        ts.sparse_gemv(x, t, w_t, residual=torch.randn(2, 4, device=device))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_edge_thresholds_and_inputs_match_the_reference_exactly_in_fp32(device, config):
    """All-zero x, thresholds 0 / inf / -inf / nan, nan in x: the same entries kept as torch keeps."""
    K, N = 37, 19
    w_t = torch.randn(K, N)
    bias = torch.randn(N)
    x = torch.randn(2, K)
    x_nan = x.clone()
    x_nan[0, 3] = float("nan")
    cases = [(torch.zeros(2, K), torch.tensor(0.5)), (torch.zeros(2, K), torch.tensor(0.0)),
             (x, torch.tensor(0.0)), (x, torch.tensor(float("inf"))), (x, torch.tensor(-float("inf"))),
             (x, torch.tensor(float("nan"))), (x_nan, torch.tensor(0.3)), (x, torch.full((K,), float("nan")))]
    for xs, t in cases:
        got = ts.sparse_gemv(xs.to(device), t.to(device), w_t.to(device), bias.to(device), config=CONFIGS[config])
        want = torch.ops.flashc.sparse_gemv(xs, t, w_t, bias)
        assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5, equal_nan=True), (xs.abs().sum(), t)
    zero = ts.sparse_gemv(torch.zeros(3, K, device=device), torch.tensor(0.0, device=device), w_t.to(device),
                          bias.to(device), config=CONFIGS[config])
    assert torch.equal(zero.cpu(), bias.expand(3, N))  # nothing kept: the bias, exactly


@pytest.mark.parametrize("name,config", [(n, c) for n in ("sparse_gemv", "sparse_gemv_rows") for c in ts.candidates(n)],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_candidate(device, name, config):
    """Each tile the tuner may pick computes the op, with the norm and the gated activation folded in (K of
    several ranges for every SPLIT_K, a short last one)."""
    rows, K, N = (1 if name == "sparse_gemv" else 3), 1100, 24
    x, w_t, bias = torch.randn(rows, K), torch.randn(K, N) / K ** 0.5, torch.randn(N)
    g = 1 + 0.3 * torch.randn(K)
    t = torch.tensor(0.7)
    want = torch.ops.flashc.sparse_gemv(x.double(), t.double(), w_t.double(), bias.double(), g.double(), 1e-5,
                                        None, "silu")
    got = ts.sparse_gemv(x.to(device), t.to(device), w_t.to(device), bias.to(device), g.to(device), 1e-5, None,
                         "silu", config=config)
    assert ((got.cpu().double() - want).norm() / want.norm()).item() < 1e-5


def test_threshold_is_compared_in_the_dtype_torch_compares_in(device):
    """A 0-d fp32 threshold with bf16 x is rounded to bf16 first (torch's type promotion); a float64 one
    per feature with fp32 x is compared exactly. Weights of ones make y count the kept features."""
    K = 48
    v = torch.tensor(1.0078125, dtype=torch.bfloat16)  # bf16(1.005) == v: not above the rounded threshold
    x = v.expand(1, K).clone()
    w = torch.ones(K, 8, dtype=torch.bfloat16)
    t = torch.tensor(1.005)
    assert torch.ops.flashc.sparse_gemv(x, t, w, None).abs().max() == 0
    got = ts.sparse_gemv(x.to(device), t.to(device), w.to(device), config=CONFIGS["split"])
    assert torch.equal(got.cpu(), torch.zeros(1, 8, dtype=torch.bfloat16))

    x32 = torch.rand(1, K) + 0.5
    t64 = x32[0].double() - 1e-12  # just below each x: every feature kept (fp32 nearest rounding would drop all)
    t64[::3] = x32[0, ::3].double() + 1e-12  # just above: dropped
    want = torch.ops.flashc.sparse_gemv(x32, t64, torch.ones(K, 4), None)
    got = ts.sparse_gemv(x32.to(device), t64.to(device), torch.ones(K, 4, device=device), config=CONFIGS["split"])
    assert want[0, 0].item() == pytest.approx(x32[0].sum().item() - x32[0, ::3].sum().item(), rel=1e-6)
    assert torch.allclose(got.cpu(), want, rtol=1e-6)


def test_empty_and_strided_inputs(device):
    w_t, bias = torch.randn(24, 10, device=device), torch.randn(10, device=device)
    t = torch.tensor(0.2, device=device)
    assert ts.sparse_gemv(torch.randn(0, 24, device=device), t, w_t, bias).shape == (0, 10)
    empty_k = ts.sparse_gemv(torch.randn(2, 0, device=device), t, torch.randn(0, 10, device=device), bias)
    assert torch.equal(empty_k, bias.expand(2, 10))
    x = torch.randn(3, 48, device=device)[:, ::2]  # rows with a stride: copied to contiguous rows
    w_strided = torch.randn(10, 24, device=device).t()  # [K, N] as a transposed view
    got = ts.sparse_gemv(x, t, w_strided, bias, config=CONFIGS["split"])
    check(got, x.cpu(), t.cpu(), w_strided.cpu(), bias.cpu())


def test_bad_arguments_are_refused_with_what_was_expected(device):
    x, t = torch.randn(2, 16, device=device), torch.tensor(0.1, device=device)
    with pytest.raises(ValueError, match=r"weight_t must be \[16, N\]"):
        ts.sparse_gemv(x, t, torch.randn(8, 16, device=device))
    with pytest.raises(TypeError, match="share a dtype"):
        ts.sparse_gemv(x, t, torch.randn(16, 8, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="0-d or one per input feature"):
        ts.sparse_gemv(x, torch.rand(2, 16, device=device), torch.randn(16, 8, device=device))
    with pytest.raises(ValueError, match="at most 16"):
        ts.sparse_gemv(torch.randn(17, 16, device=device), t, torch.randn(16, 8, device=device))
    with pytest.raises(ValueError, match="for at most 8 rows"):
        ts.sparse_gemv(torch.randn(9, 16, device=device), t, torch.randn(16, 8, device=device),
                       config=CONFIGS["split"])
    with pytest.raises(ValueError, match="COMPACT lists kept features"):
        ts.sparse_gemv(x, t, torch.randn(16, 8, device=device), config={**CONFIGS["dot"], "COMPACT": True})


def test_untuned_launch_uses_the_first_candidate_that_fits(device):
    """Without a tuning result the launcher takes the first candidate; several rows past the elementwise
    limit only the DOT or library ones. The default config computes the same as the reference."""
    x, t, w_t = torch.randn(12, 32), torch.tensor(0.6), torch.randn(32, 8)
    assert ts._config(1, x[:1], t, w_t, None) == ts.candidates("sparse_gemv")[0]
    cfg = ts._config(12, x, t, w_t, None)
    assert cfg == ts.candidates("sparse_gemv_rows")[0] and cfg["DOT"]
    for rows in (1, 12):
        check(ts.sparse_gemv(x[:rows].to(device), t.to(device), w_t.to(device)), x[:rows], t, w_t, None)
