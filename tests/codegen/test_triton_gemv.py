"""flashc.codegen.triton_gemv: decode matrix-vector products with folded norm / bias / GLU / residual,
against a float64 reference of the unfused ops, on fresh random inputs."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_gemv as tg  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
FOLDS = {
    "plain": {},
    "bias": {"bias": True},
    "norm": {"norm": True},
    "norm_bias": {"norm": True, "bias": True},
    "residual": {"residual": True},
    "norm_swiglu": {"norm": True, "glu": "silu"},
    "geglu_bias": {"glu": "gelu_tanh", "bias": True},
    "everything": {"norm": True, "bias": True, "glu": "silu", "residual": True},
}
SMALL = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2}
DOT = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "DOT": True}
ROWLOOP = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "ROWLOOP": True}
SPLIT_DOT = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "DOT": True, "SPLIT_K": 3}
SPLIT_SMALL = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "SPLIT_K": 2}


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make(device, dtype, lead, K, N, folds):
    x = (torch.randn(*lead, K) * 2).to(dtype).to(device)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype).to(device)
    glu = folds.get("glu")
    n_out = N // 2 if glu else N
    kw = {"glu": glu, "eps": 1e-5}
    if folds.get("bias"):
        kw["bias"] = torch.randn(N).to(dtype).to(device)
    if folds.get("norm"):
        kw["norm_weight"] = (1 + 0.3 * torch.randn(K)).to(dtype).to(device)
    if folds.get("residual"):
        kw["residual"] = torch.randn(*lead, n_out).to(dtype).to(device)
    return x, w, kw


def truth(x, w, kw):
    as64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return tg.reference_gemv(x.double().cpu(), w.double().cpu(), **as64)


@pytest.mark.parametrize("config", [None, SMALL, DOT, ROWLOOP], ids=["default", "small_tiles", "dot", "rowloop"])
@pytest.mark.parametrize("lead,K,N", [((1,), 128, 64), ((1, 1), 100, 38), ((3, 1), 96, 64), ((8,), 70, 34)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fold", sorted(FOLDS))
def test_gemv_matches_float64_reference(device, fold, dtype, lead, K, N, config):
    rows = lead[0]
    if INTERPRETED and dtype == torch.bfloat16 and (config == DOT or (config is None and rows > 1)):
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly (DOT configs; the default for rows > 1)")
    x, w, kw = make(device, dtype, lead, K, N, FOLDS[fold])
    out = tg.gemv(x, w, **kw, config=config)
    ref = truth(x, w, kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("fold", ["plain", "everything"])
def test_library_candidate_computes_the_same(device, fold):
    x, w, kw = make(device, torch.float32, (2, 1), 64, 48, FOLDS[fold])
    fused = tg.gemv(x, w, **kw, config=SMALL)
    library = tg.gemv(x, w, **kw, config={"library": True})
    assert rel_err(library.cpu(), truth(x, w, kw)) < 2e-5
    assert rel_err(fused.cpu(), library.cpu()) < 2e-5


@pytest.mark.parametrize("fold", ["plain", "everything"])
def test_rowloop_takes_up_to_sixteen_rows(device, fold):
    """ROWLOOP multiplies its rows one by one: more rows than the elementwise path holds (8), odd sizes."""
    x, w, kw = make(device, torch.float32, (12,), 70, 34, FOLDS[fold])
    out = tg.gemv(x, w, **kw, config=ROWLOOP)
    assert rel_err(out.cpu(), truth(x, w, kw)) < TOL[torch.float32]
    assert {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "ROWLOOP": True} in \
        tg.tuning.candidates("gemv_rows", "h100")


@pytest.mark.parametrize("config", [SPLIT_SMALL, SPLIT_DOT], ids=["elementwise", "dot"])
@pytest.mark.parametrize("lead,K", [((1,), 128), ((3, 1), 100), ((16,), 70), ((5,), 20)], ids=str)
@pytest.mark.parametrize("fold", sorted(FOLDS))
def test_split_k_sums_its_ranges_then_applies_the_folds(device, fold, lead, K, config):
    """SPLIT_K: K in ranges of whole BLOCK_K blocks (128 -> 2 ranges, 100 -> 2 with a short last one, 70 -> 3, 20
    -> 1: no empty range), fp32 partials summed by a second kernel that applies the norm's rstd (from the ranges'
    sums of squares), bias, gated activation and residual."""
    if config is SPLIT_SMALL and lead[0] > tg.ELEMENTWISE_ROWS:
        pytest.skip("elementwise tiles take at most 8 rows")
    x, w, kw = make(device, torch.float32, lead, K, 48, FOLDS[fold])
    out = tg.gemv(x, w, **kw, config=config)
    ref = truth(x, w, kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) < TOL[torch.float32]
    if not INTERPRETED:  # bf16 too where tl.dot is computed right
        xb, wb, kwb = make(device, torch.bfloat16, lead, K, 48, FOLDS[fold])
        assert rel_err(tg.gemv(xb, wb, **kwb, config=config).cpu(), truth(xb, wb, kwb)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name,config",
                         [(n, c) for n in ("gemv", "gemv_rows") for c in tg.tuning.candidates(n, "h100")],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_h100_candidate(device, name, config):
    """Each tile the tuner may pick computes the fused product (K of 3 blocks of the largest tile, so split-K
    tiles run several ranges; a short last one)."""
    rows = 1 if name == "gemv" else 3
    x, w, kw = make(device, torch.float32, (rows,), 2600, 40, FOLDS["everything"])
    assert rel_err(tg.gemv(x, w, **kw, config=config).cpu(), truth(x, w, kw)) < TOL[torch.float32]


def test_split_k_is_not_for_rowwise_or_rowloop(device):
    x, w = torch.randn(2, 64, device=device), torch.randn(16, 64, device=device)
    with pytest.raises(ValueError, match="SPLIT_K is for DOT and elementwise"):
        tg.gemv(x, w, config={**ROWLOOP, "SPLIT_K": 2})


def test_sixteen_rows_take_a_dot_config_untuned(device):
    x, w = torch.randn(16, 48, device=device), torch.randn(40, 48, device=device)
    assert rel_err(tg.gemv(x, w).cpu(), truth(x, w, {})) < 2e-5


def test_rows_of_a_strided_view(device):
    base = torch.randn(4, 2, 80, device=device)
    x = base[:, 1]  # rows 160 elements apart
    w = torch.randn(24, 80, device=device)
    assert rel_err(tg.gemv(x, w, config=SMALL).cpu(), truth(x, w, {})) < 2e-5


@pytest.mark.parametrize("one_row", [SMALL, {"library": True}], ids=["kernel", "library"])
@pytest.mark.parametrize("rows", [6, 12])
@pytest.mark.parametrize("fold", ["plain", "norm_swiglu", "everything"])
def test_rowwise_rows_equal_one_row_products_bit_for_bit(device, monkeypatch, fold, rows, one_row):
    """A ROWWISE config runs each row as a one-row product of the shape runs (whatever the one-row config
    is, the kernel's or the library's): equal bit for bit to row-by-row calls, 12 rows (past the
    elementwise limit) included, in one launch for the kernel."""
    picked = []

    def one_row_config(*args):
        picked.append(True)
        return dict(one_row)

    monkeypatch.setattr(tg, "_one_row_config", one_row_config)
    x, w, kw = make(device, torch.float32, (rows, 1), 96, 40, FOLDS[fold])
    out = tg.gemv(x, w, **kw, config={"ROWWISE": True})
    by_row = torch.cat([tg.gemv(x[i], w, **{k: (v[i] if k == "residual" else v) for k, v in kw.items()},
                                config=one_row) for i in range(rows)])
    assert picked and out.shape == (rows, 1, by_row.shape[-1])
    assert torch.equal(out.reshape(by_row.shape), by_row)
    assert rel_err(out.cpu(), truth(x, w, kw)) < 2e-5


@pytest.mark.parametrize("fold", ["norm_swiglu", "everything"])
def test_row_invariant_context_computes_rows_as_one_row_calls(device, fold):
    """codegen.tuning.row_invariant (a CUDA verify entry compiled with exact_verify): untuned-config calls of
    several rows equal the one-row calls bit for bit."""
    x, w, kw = make(device, torch.float32, (6, 1), 96, 40, FOLDS[fold])
    with tg.tuning.row_invariant():
        together = tg.gemv(x, w, **kw)
    alone = torch.cat([tg.gemv(x[i], w, **{k: (v[i] if k == "residual" else v) for k, v in kw.items()})
                       for i in range(6)])
    assert torch.equal(together.reshape(alone.shape), alone)


def test_rows_tuning_offers_rowwise(device):
    assert {"ROWWISE": True} in tg.tuning.candidates("gemv_rows", "h100")
    x, w, kw = make(device, torch.float32, (6,), 64, 32, FOLDS["residual"])
    rowwise = tg.gemv(x, w, **kw, config={"ROWWISE": True})  # untuned: the one-row list's first candidate
    assert rel_err(rowwise.cpu(), truth(x, w, kw)) < 2e-5


def test_tuning_includes_the_library_path(device):
    x, w, kw = make(device, torch.float32, (1,), 64, 32, FOLDS["norm"])
    cfg = tg.tune_gemv(x, w, **kw)
    assert cfg.get("library") or {"BLOCK_N", "BLOCK_K"} <= set(cfg)
    assert {"library": True} in tg.tuning.candidates("gemv", "h100")


@pytest.mark.parametrize("bad,match", [
    (lambda x, w: tg.gemv(torch.randn(17, 32, device=x.device), w), "at most 16"),
    (lambda x, w: tg.gemv(torch.randn(9, 32, device=x.device), w, config=SMALL), "use a DOT config"),
    (lambda x, w: tg.gemv(x, torch.randn(8, 31, device=x.device)), "match x's last dim"),
    (lambda x, w: tg.gemv(x, w.half()), "share a dtype"),
    (lambda x, w: tg.gemv(x, torch.randn(7, 32, device=x.device), glu="silu"), "gate\\|up halves"),
    (lambda x, w: tg.gemv(x, w, glu="relu"), "glu must be"),
    (lambda x, w: tg.gemv(x, w, residual=torch.randn(2, 9, device=x.device)), "residual must have shape"),
    (lambda x, w: tg.gemv(x, w, norm_weight=torch.randn(31, device=x.device)), "norm_weight must be"),
], ids=["rows", "elementwise_rows", "K", "dtype", "glu_rows", "act", "residual", "norm"])
def test_bad_input_names_what_is_wrong(device, bad, match):
    x, w = torch.randn(2, 32, device=device), torch.randn(8, 32, device=device)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, w)
