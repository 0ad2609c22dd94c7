"""passes/quantize/mixed.py and the 2-bit format (3-bit: test_quantize_int3.py): packing, the 2-bit
linear_wq against float64, the bit allocator against brute force, tiny models compiled under budgets
(bits within the budget, error falling as the budget rises, artifacts), 2-bit on ONNX Runtime, and
bad budgets."""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import fresh_ids, rel_err
from torch import nn

import flashc
from flashc import zoo
from flashc.errors import FlashcError, UnsupportedOpError
from flashc.passes.quantize import QuantConfig
from flashc.passes.quantize.mixed import allocate_bits
from flashc.passes.quantize.rtn import rtn_quantize
from flashc.quantized_ops import dequantize, pack_codes, pack_zero_points, unpack_codes, unpack_zero_points

LINEAR_WQ = torch.ops.flashc.linear_wq.default
MOE_WQ = torch.ops.flashc.moe_wq.default
MOE_WQ_MIXED = torch.ops.flashc.moe_wq_mixed.default


def small(scheme: str, **kwargs) -> QuantConfig:
    """A mixed scheme with calibration and sensitivity budgets that keep the tests fast."""
    return replace(QuantConfig.parse(scheme), **{"min_calibration_tokens": 256, "calibration_tokens": 512,
                                                 "sensitivity_tokens": 256, **kwargs})


def calibration() -> torch.Tensor:
    return torch.randint(0, 512, (2048,))


# ----------------------------------------------------------------------------- the 2-bit format


def test_two_bit_codes_pack_four_a_byte_in_order():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    packed = pack_codes(codes, 2, 8)
    # element 4j in bits 0-1, ..., 4j + 3 in bits 6-7 (MatMulNBits' order)
    assert packed.tolist() == [[[0b11100100, 0b00011011]]]


@pytest.mark.parametrize("n_blocks", [1, 3, 4, 6])
def test_two_bit_codes_and_zero_points_round_trip(n_blocks):
    codes = torch.randint(0, 4, (2, 5, n_blocks * 32), dtype=torch.uint8)
    qweight = pack_codes(codes, 2, 32)
    assert qweight.shape == (2, 5, n_blocks, 8)
    assert torch.equal(unpack_codes(qweight, 2), codes)
    zp = torch.randint(0, 4, (2, 5, n_blocks), dtype=torch.uint8)
    stored = pack_zero_points(zp, 2)
    assert stored.shape == (2, 5, -(-n_blocks // 4))
    assert torch.equal(unpack_zero_points(stored, 2, n_blocks), zp)


def test_two_bit_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="2-bit codes must be uint8 below 4"):
        pack_codes(torch.full((2, 32), 4, dtype=torch.uint8), 2, 32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_bit_linear_wq_matches_a_float64_dequantized_matmul(symmetric):
    n, k, group = 24, 128, 32
    w = torch.randn(n, k)
    q = rtn_quantize(w, 2, group, symmetric)
    qweight, scales, zp = q.packed()
    codes = q.codes.double().reshape(n, k // group, group)
    zero = torch.full((n, k // group), 2.0, dtype=torch.float64) if symmetric else q.zero_points.double()
    w64 = ((codes - zero[..., None]) * scales.double()[..., None]).reshape(n, k)
    assert torch.equal(dequantize(qweight, scales, zp, 2).double(), w64)
    # 4 levels a group (a symmetric grid uses 3: -s, 0, s around the midpoint code 2): coarse, but the weight's shape
    assert rel_err(w64, w) < (0.7 if symmetric else 0.6)
    x, bias = torch.randn(3, 7, k), torch.randn(n)
    out = torch.ops.flashc.linear_wq(x, qweight, scales, zp, bias, None, 2)
    assert rel_err(out, F.linear(x.double(), w64, bias.double())) < 1e-6


# --------------------------------------------------------------------------------- allocation


def brute_force(costs, sens, budget):
    best = None
    for pick in itertools.product(*(range(len(r)) for r in costs)):
        if sum(costs[i][j] for i, j in enumerate(pick)) <= budget:
            total = sum(sens[i][j] for i, j in enumerate(pick))
            if best is None or total < best[0]:
                best = (total, pick)
    return best


def test_allocator_picks_the_hand_computed_optimum():
    # three layers at 2/4/8 bits of 100 weights; 1100 bits: the second layer is worth 8 bits
    costs = [[200, 400, 800]] * 3
    sens = [[1.0, 0.5, 0.4], [10.0, 3.0, 0.1], [2.0, 0.2, 0.1]]
    assert allocate_bits(costs, sens, 1400) == [0, 2, 1]  # 200 + 800 + 400, total 1.3
    assert allocate_bits(costs, sens, 1000) == [0, 1, 1]  # 200 + 400 + 400, total 4.2


@pytest.mark.parametrize("seed", range(6))
def test_allocator_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 6)
    costs, sens = [], []
    for _ in range(layers):
        size = rng.choice([64, 96, 256, 1000])
        costs.append([size * (b + rng.random() * 0.3) for b in (2, 4, 8)])
        s2 = rng.random() * 10
        sens.append([s2, s2 / rng.uniform(5, 30), s2 / rng.uniform(100, 1000)])
    budget = sum(min(r) for r in costs) + rng.random() * (sum(max(r) for r in costs) - sum(min(r) for r in costs))
    chosen = allocate_bits(costs, sens, budget)
    assert sum(costs[i][j] for i, j in enumerate(chosen)) <= budget
    optimum, _ = brute_force(costs, sens, budget)
    assert sum(sens[i][j] for i, j in enumerate(chosen)) <= optimum * (1 + 1e-9)


def test_allocator_refuses_a_budget_below_the_cheapest_choice():
    with pytest.raises(FlashcError, match="below the cheapest choice"):
        allocate_bits([[200, 400], [200, 400]], [[1, 0], [1, 0]], 399)


# ------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def llama_under_budgets(tiny_models):
    model = tiny_models["llama-tiny"]
    compiled = {b: flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=16),
                                  quantize=small(f"mixed-{b}"), calibration=calibration()) for b in (3.0, 5.0)}
    return model, compiled


def _record(cm):
    return next(r for r in cm.report().records if r.name == "quantize_weights")


def test_budget_holds_and_every_layer_reports_its_width(llama_under_budgets):
    _, compiled = llama_under_budgets
    for budget, cm in compiled.items():
        record = _record(cm)
        rows = [d for d in record.details if d["status"] == "quantized"]
        assert len(rows) == 14 and all(d["bits"] in (2, 3, 4, 8) and d["sensitivity"] >= 0 for d in rows)
        weights = sum(cm.program.params[n.args[1].name].shape[0] * n.args[1].meta["val"].shape[1] *
                      n.args[1].meta["val"].shape[2] * 8 // n.args[-1]
                      for n in cm.program.op_nodes() if n.target is LINEAR_WQ)
        stored = 8 * sum(d["bytes_after"] for d in rows)
        assert record.stats["achieved_bits"] == pytest.approx(stored / weights, abs=1e-4)
        assert stored / weights <= budget
        assert stored / weights > budget - 0.5  # the budget is spent, not left unused
        nodes = [n for n in cm.program.op_nodes() if n.target is LINEAR_WQ]
        assert sorted(n.args[-1] for n in nodes) == sorted(d["bits"] for d in rows)
    bits = {b: sorted(d["bits"] for d in _record(cm).details if d["status"] == "quantized")
            for b, cm in compiled.items()}
    assert sum(bits[5.0]) > sum(bits[3.0])


def test_higher_budget_is_closer_to_float(llama_under_budgets):
    model, compiled = llama_under_budgets
    errors = {b: [] for b in compiled}
    for seed in range(3):
        ids = fresh_ids("llama-tiny")
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
        for b, cm in compiled.items():
            errors[b].append(rel_err(cm(ids).logits, want))
    mean = {b: sum(e) / len(e) for b, e in errors.items()}
    assert mean[5.0] <= mean[3.0]
    assert mean[3.0] < 0.45 and mean[5.0] < 0.1  # measured 0.26 and 0.05 (g128, random tiny weights)


def test_artifact_round_trip_keeps_the_widths(llama_under_budgets, tmp_path):
    _, compiled = llama_under_budgets
    cm = compiled[3.0]
    cm.save(tmp_path / "mixed")
    loaded = flashc.load(tmp_path / "mixed")
    for name, t in cm.program.params.items():
        assert loaded.program.params[name].dtype == t.dtype and torch.equal(loaded.program.params[name], t)
    ids = fresh_ids("llama-tiny")
    assert torch.equal(loaded(ids).logits, cm(ids).logits)
    widths = {n.args[-1] for n in loaded.program.op_nodes() if n.target is LINEAR_WQ}
    assert len(widths) >= 2


@pytest.fixture(scope="module")
def mixtral_under_budget(tiny_models):
    model = tiny_models["mixtral-tiny"]
    torch.manual_seed(0)
    cm = flashc.compile(model, "cpu", zoo.example_inputs("mixtral-tiny", seq_len=16),
                        quantize=small("mixed-3-g64"), calibration=calibration())
    return model, cm


def test_moe_experts_get_widths_of_their_own(mixtral_under_budget):
    model, cm = mixtral_under_budget
    record = _record(cm)
    assert record.stats["achieved_bits"] <= 3.0
    moe_rows = [d for d in record.details if d["op"] == "moe experts"]
    assert len(moe_rows) == 2 and all("experts weighted by routed tokens" in d["note"] for d in moe_rows)
    mixed = [n for n in cm.program.op_nodes() if n.target is MOE_WQ_MIXED]
    uniform = [n for n in cm.program.op_nodes() if n.target is MOE_WQ]
    assert len(mixed) + len(uniform) == 2 and mixed  # at this budget experts take different widths
    for node in mixed:
        assert len(set(node.args[-1])) > 1 and set(node.args[-1]) <= {2, 3, 4, 8}
        row = next(d for d in moe_rows if f"experts' bits {' '.join(map(str, node.args[-1]))};" in d["note"])
        assert min(node.args[-1]) < row["bits"] < max(node.args[-1])  # the experts' mean width
    ids = fresh_ids("mixtral-tiny")
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    assert rel_err(cm(ids).logits, want) < 0.3  # measured 0.15


def test_mixed_experts_survive_an_artifact_round_trip(mixtral_under_budget, tmp_path):
    _, cm = mixtral_under_budget
    cm.save(tmp_path / "moe")
    loaded = flashc.load(tmp_path / "moe")
    assert any(n.target is MOE_WQ_MIXED for n in loaded.program.op_nodes())
    ids = fresh_ids("mixtral-tiny")
    assert torch.equal(loaded(ids).logits, cm(ids).logits)


@pytest.mark.parametrize("symmetric", [True, False])
def test_moe_wq_mixed_is_moe_of_the_dequantized_experts(symmetric):
    e, h, f, t, group = 4, 64, 32, 11, 32
    widths = [2, 8, 4, 2]
    gate_up = [rtn_quantize(torch.randn(2 * f, h), b, group, symmetric) for b in widths]
    down = [rtn_quantize(torch.randn(h, f), b, group, symmetric) for b in widths]
    packed = [[q.packed() for q in qs] for qs in (gate_up, down)]
    args = []
    for part in packed:
        args += [[p[0] for p in part], [p[1] for p in part], [p[2] for p in part]]
    x, logits = torch.randn(t, h), torch.randn(t, e)
    got = torch.ops.flashc.moe_wq_mixed(x, logits, *args, 2, True, widths)
    want = torch.ops.flashc.moe(x.double(), logits.double(), torch.stack([q.dequantize().double() for q in gate_up]),
                                torch.stack([q.dequantize().double() for q in down]), 2, True)
    assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------------------------ targets


class TwoBitLinear(nn.Module):
    def __init__(self, n: int, k: int, group: int, symmetric: bool):
        super().__init__()
        qweight, scales, zero_points = rtn_quantize(torch.randn(n, k), 2, group, symmetric).packed()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("bias", torch.randn(n))

    def forward(self, x):
        return torch.ops.flashc.linear_wq(x, self.qweight, self.scales, self.zero_points, self.bias, None, 2)


@pytest.mark.parametrize("contrib_ops", [True, False], ids=["matmul_nbits", "standard_ops"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_two_bit_linear_on_onnx_runtime(symmetric, contrib_ops):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    module = TwoBitLinear(40, 192, 64, symmetric)
    cm = flashc.compile(module, "onnx-cpu", (torch.randn(2, 192),), level=0, options={"contrib_ops": contrib_ops})
    for _ in range(3):
        x = torch.randn(2, 192)
        with torch.no_grad():
            assert rel_err(cm(x), module(x)) < 1e-5
    ops = [n.op_type for n in onnx.load(str(cm.executable.path), load_external_data=False).graph.node]
    assert ("MatMulNBits" in ops) == contrib_ops


def test_onnx_refuses_experts_of_mixed_widths(tiny_models):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)  # the calibration of mixtral_under_budget: some experts at 2 bits, some at 4
    with pytest.raises(UnsupportedOpError, match="flashc.moe_wq_mixed.*quantize_experts=False"):
        flashc.compile(tiny_models["mixtral-tiny"], "onnx-cpu", zoo.example_inputs("mixtral-tiny", seq_len=16),
                       quantize=small("mixed-3-g64"), calibration=calibration())


def test_two_bit_moe_kernel_refuses_with_what_to_do():
    pytest.importorskip("triton")
    from flashc.codegen import triton_moe_wq

    x = torch.randn(4, 64)
    q = pack_codes(torch.zeros(2, 64, 64, dtype=torch.uint8), 2, 32)
    s = torch.ones(2, 64, 2)
    with pytest.raises(UnsupportedOpError, match="2-bit experts have no kernel.*candidate_bits=\\(4, 8\\)"):
        triton_moe_wq._check_moe_wq(x, torch.randn(4, 2), q, s, None, None, q, s, None, None, 1, 2)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("make,match", [
    (lambda: QuantConfig.parse("mixed-1.5"), "outside what candidate_bits"),
    (lambda: QuantConfig.parse("mixed-9"), "outside what candidate_bits"),
    (lambda: QuantConfig.parse("mixed-3.5-awq"), "a mixed-precision scheme is"),
    (lambda: QuantConfig(method="awq", budget_bits=3.5), "quantizes each layer with rtn or gptq"),
    (lambda: QuantConfig(method="gptq", budget_bits=3.5, candidate_bits=(4,)), "two or more of"),
    (lambda: QuantConfig(method="gptq", budget_bits=3.5, candidate_bits=(3, 5)), "two or more of"),
    (lambda: QuantConfig(method="gptq", budget_bits=3.5, candidate_bits=(4, 3)), "in increasing order"),
    (lambda: QuantConfig.parse("fp8").with_budget(3.5), "weight-only rtn or gptq"),
], ids=["below", "above", "method_name", "awq", "one_candidate", "five_bits", "unordered", "fp8"])
def test_bad_budgets_are_refused(make, match):
    with pytest.raises(FlashcError, match=match):
        make()


def test_budget_below_what_float32_scales_store_is_refused_at_compile(tiny_models):
    # 2.2 bits passes the config's check (16-bit scales: 2.14 at groups of 128); llama-tiny's scales are
    # float32 (2.27 bits a weight at 2 bits), which only the pass knows
    with pytest.raises(FlashcError, match="below what the quantized layers store at their narrowest width"):
        flashc.compile(tiny_models["llama-tiny"], "cpu", zoo.example_inputs("llama-tiny", seq_len=16),
                       quantize=small("mixed-2.2"), calibration=calibration())


def test_cli_budget_bits_next_to_quantize():
    from flashc.cli import _quantize_option

    config = _quantize_option(argparse.Namespace(quantize="int4-rtn", group_size=64, budget_bits=3.5))
    assert config.mixed and config.scheme == "mixed-3.5-rtn-g64-asym"
    with pytest.raises(FlashcError, match="--budget-bits applies to --quantize"):
        _quantize_option(argparse.Namespace(quantize=None, group_size=None, budget_bits=3.5))


def test_tvm_refuses_a_two_bit_linear_naming_the_layer():
    pytest.importorskip("tvm")
    with pytest.raises(UnsupportedOpError, match="flashc.linear_wq, node linear_wq .*test_quantize_mixed.py"):
        flashc.compile(TwoBitLinear(16, 64, 32, False), "tvm-cpu", (torch.randn(2, 64),), level=0)
