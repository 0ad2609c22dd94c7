"""lpu simulator, measured operator tables: a GPU prefill's matmuls and attention take the
table's times (exact shape, or the nearest shape scaled by FLOPs, else the peak rates), a
malformed table is refused naming its file and field, and decode never changes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashc.backends.lpu.cli import add_simulate_parser
from flashc.backends.lpu.costs import Shard, op_cost, prefill_phase
from flashc.backends.lpu.hardware import get_system, with_changes
from flashc.backends.lpu.operators import load_operator_table
from flashc.backends.lpu.simulate import simulate
from flashc.backends.lpu.workload import Op, Workload, capture_workload
from flashc.errors import InputError

PROMPT = 256


def h100(operators: str = ""):
    """The built-in h100 with the table given (or none, whatever backends/lpu/data holds)."""
    return with_changes(get_system("h100"), operators=operators)


def write_table(path, matmul=(), attention=(), changes: dict | None = None) -> str:
    data = {"device": "NVIDIA H100 80GB HBM3", "profile": "h100", "torch": "2.11.0", "date": "2026-12-06",
            "copy_bandwidth": 2.9e12,
            "matmul": [{"m": m, "k": k, "n": n, "seconds": s} for m, k, n, s in matmul],
            "attention": [{"s": s, "heads": h, "kv_heads": g, "head_dim": d, "causal": True, "seconds": t}
                          for s, h, g, d, t in attention]}
    data.update(changes or {})
    path.write_text(json.dumps(data))
    return str(path)


def single_matmul(k: int, n: int) -> Workload:
    return Workload("matmul", [Op(0, "linear", "aten.linear", "matmul", 0, (), k=k, n=n, out_elements=n,
                                  in_elements=k)], 1, 1)


@pytest.fixture(scope="module")
def llama():
    return capture_workload("llama-tiny")


def shapes(work):
    matmuls = sorted({(o.k, o.n) for o in work.ops if o.kind == "matmul"})
    attention = sorted({(o.heads, o.kv_heads, o.head_dim) for o in work.ops if o.kind == "attention"})
    return matmuls, attention


def test_a_single_matmul_prefill_takes_exactly_the_tables_time(tmp_path):
    k, n = 1024, 4096
    # the roofline: the longer of 2 x 256 x 1024 x 4096 FLOPs at 786 TFLOP/s (2.7 us) and the
    # weights, input and output rows over 2.94 TB/s (3.7 us), plus 3.4 us of launch
    roofline = simulate(single_matmul(k, n), h100(), "bf16", batch=1, context=16, prompt=PROMPT).prediction
    stream = (k * n + PROMPT * (k + n)) * 2 / 2.94e12
    assert roofline.ttft_s == pytest.approx(max(2 * PROMPT * k * n / 786e12, stream) + 3.4e-6, rel=1e-3)
    measured = 41e-6  # a hand-made time, far from the roofline; its launch is inside it
    table = write_table(tmp_path / "t.json", matmul=[(PROMPT, k, n, measured)])
    p = simulate(single_matmul(k, n), h100(table), "bf16", batch=1, context=16, prompt=PROMPT).prediction
    assert p.prefill_chunks == 1 and p.ttft_from == "schedule"
    assert p.ttft_s == pytest.approx(measured, abs=1 / 1.98e9)  # the schedule counts whole cycles
    assert p.operator_sources == {"measured": 1, "scaled": 0, "roofline": 0}
    assert any("1 timed from the measured operator table" in note and table in note for note in p.notes)


def test_prefill_of_a_model_changes_by_the_table_minus_the_rates_it_replaces(tmp_path, llama):
    matmuls, attention = shapes(llama)
    # hand-made times: 10 us per matmul shape (plus 1 us per distinct shape), 30 us per attention
    mm_time = {shape: 10e-6 + i * 1e-6 for i, shape in enumerate(matmuls)}
    table = write_table(tmp_path / "t.json", matmul=[(PROMPT, k, n, t) for (k, n), t in mm_time.items()],
                        attention=[(PROMPT, h, g, d, 30e-6) for h, g, d in attention])
    base, with_table = h100(), h100(table)
    before = simulate(llama, base, "bf16", batch=1, context=PROMPT, prompt=PROMPT).prediction
    after = simulate(llama, with_table, "bf16", batch=1, context=PROMPT, prompt=PROMPT).prediction
    assert before.prefill_chunks == after.prefill_chunks == 1 and before.stages == after.stages == 1
    # what each table op replaces: its roofline time and the launch every roofline kernel pays
    phase = prefill_phase(1, PROMPT, 0)
    delta, counted = 0.0, 0
    for o in llama.ops:
        if o.kind in ("matmul", "attention"):
            table_time = mm_time[(o.k, o.n)] if o.kind == "matmul" else 30e-6
            roofline = op_cost(o, phase, Shard(), base, "bf16").seconds + base.vector_latency_s
            delta += table_time - roofline
            counted += 1
    assert after.operator_sources == {"measured": counted, "scaled": 0, "roofline": 0}
    # one clock cycle of rounding per task at most
    assert after.ttft_s - before.ttft_s == pytest.approx(delta, abs=len(llama.ops) / 1.98e9)


def test_a_near_shape_scales_by_flops_and_a_far_one_keeps_the_rates(tmp_path):
    k, n = 1024, 4096
    phase = prefill_phase(1, PROMPT, 0)
    op = single_matmul(k, n).ops[0]
    # the same K, N measured at twice the rows: half its time (the FLOPs ratio)
    profile = h100(write_table(tmp_path / "near.json", matmul=[(2 * PROMPT, k, n, 80e-6)]))
    cost = op_cost(op, phase, Shard(), profile, "bf16")
    assert (cost.seconds, cost.source) == (pytest.approx(40e-6), "scaled")
    # four times the rows is beyond NEAREST_FACTOR; another K is another shape: the roofline
    roofline = op_cost(op, phase, Shard(), h100(), "bf16")
    for name, entry in (("far", (4 * PROMPT, k, n, 80e-6)), ("other", (PROMPT, 2 * k, n, 80e-6))):
        cost = op_cost(op, phase, Shard(), h100(write_table(tmp_path / f"{name}.json", matmul=[entry])), "bf16")
        assert (cost.seconds, cost.source) == (roofline.seconds, "roofline")
    # a column shard of 4 ways is its own shape: K x N/4
    profile = h100(write_table(tmp_path / "shard.json", matmul=[(PROMPT, k, n // 4, 7e-6)]))
    assert op_cost(op, phase, Shard("column", 4), profile, "bf16").seconds == 7e-6
    # attention: a chunk of 128 queries after 128 cached keys scales the measured causal 256 by its pairs
    attn = Op(1, "attn", "flashc.attention", "attention", 0, (0,), heads=8, kv_heads=2, head_dim=64)
    profile = h100(write_table(tmp_path / "attn.json", attention=[(256, 8, 2, 64, 50e-6)]))
    exact = op_cost(attn, phase, Shard(), profile, "bf16")
    assert (exact.seconds, exact.source) == (50e-6, "measured")
    chunk = op_cost(attn, prefill_phase(1, 128, 128), Shard(), profile, "bf16")
    pairs = 128 * 128 + 128 * 129 / 2
    assert chunk.seconds == pytest.approx(50e-6 * pairs / (256 * 257 / 2)) and chunk.source == "scaled"
    other = h100(write_table(tmp_path / "h.json", attention=[(256, 16, 2, 64, 50e-6)]))
    other_heads = op_cost(attn, phase, Shard(), other, "bf16")
    assert other_heads.source == "roofline"


def test_decode_predictions_do_not_change_with_a_table(tmp_path, llama):
    matmuls, attention = shapes(llama)
    # entries even at decode's own row counts (1 and 8): decode must still not read them
    rows = (1, 8, PROMPT)
    table = write_table(tmp_path / "t.json", matmul=[(m, k, n, 1e-3) for m in rows for k, n in matmuls],
                        attention=[(s, h, g, d, 1e-3) for s in rows for h, g, d in attention])
    for batch in (1, 8):
        before = simulate(llama, h100(), "bf16", batch=batch, context=1024, prompt=PROMPT).prediction
        after = simulate(llama, h100(table), "bf16", batch=batch, context=1024, prompt=PROMPT).prediction
        assert after.decode_ms == before.decode_ms and after.traversal_ms == before.traversal_ms
        assert after.tokens_per_s == before.tokens_per_s
        assert after.ttft_s > before.ttft_s + 1e-3  # the prefill did read the (slow) table


@pytest.mark.parametrize("change, field", [
    ({"copy_bandwidth": -1}, "'copy_bandwidth'"),
    ({"date": None}, "'date'"),
    ({"rates": []}, "unknown field 'rates'"),
    ({"matmul": [{"m": 8, "k": 4, "n": 4}]}, "matmul[0]: field 'seconds' is missing"),
    ({"matmul": [{"m": 8, "k": 4, "n": 4, "seconds": 0}]}, "matmul[0]: field 'seconds'"),
    ({"matmul": [{"m": 8.5, "k": 4, "n": 4, "seconds": 1e-6}]}, "matmul[0]: field 'm'"),
    ({"matmul": [{"m": 8, "k": 4, "n": 4, "seconds": 1e-6, "flops": 3}]}, "matmul[0]: unknown field 'flops'"),
    ({"matmul": [{"m": 8, "k": 4, "n": 4, "seconds": 1e-6}] * 2}, "matmul[1] repeats the shape of entry 0"),
    ({"attention": [{"s": 8, "heads": 6, "kv_heads": 4, "head_dim": 64, "causal": True, "seconds": 1e-6}]},
     "attention[0]: field 'heads' (6) must be a multiple of 'kv_heads' (4)"),
    ({"attention": [{"s": 8, "heads": 8, "kv_heads": 4, "head_dim": 64, "causal": 1, "seconds": 1e-6}]},
     "attention[0]: field 'causal'"),
])
def test_a_malformed_table_names_the_file_and_the_field(tmp_path, change, field):
    path = write_table(tmp_path / "bad.json", changes=change)
    with pytest.raises(InputError) as e:
        h100(path)
    assert path in str(e.value) and field in str(e.value)


def test_a_table_without_a_required_field_names_it(tmp_path):
    data = json.loads(open(write_table(tmp_path / "t.json")).read())
    data.pop("copy_bandwidth")
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="missing.json: field 'copy_bandwidth' is missing"):
        load_operator_table(tmp_path / "missing.json")


def test_unreadable_tables_and_lpu_profiles_are_refused(tmp_path):
    (tmp_path / "broken.json").write_text("{\"device\": ")
    with pytest.raises(InputError, match=r"broken.json: not valid JSON \(line 1"):
        h100(str(tmp_path / "broken.json"))
    with pytest.raises(InputError, match="nothing.json: cannot read the operator table"):
        h100(str(tmp_path / "nothing.json"))
    table = write_table(tmp_path / "t.json")
    with pytest.raises(InputError, match="field 'operators'.*lpu-v1 is an lpu profile"):
        with_changes(get_system("lpu-v1"), operators=table)


def test_simulate_operators_option_reports_where_prefill_times_came_from(tmp_path, capsys, llama):
    matmuls, attention = shapes(llama)
    table = write_table(tmp_path / "t.json", matmul=[(PROMPT, k, n, 20e-6) for k, n in matmuls],
                        attention=[(PROMPT, h, g, d, 20e-6) for h, g, d in attention])
    parser = argparse.ArgumentParser(prog="flashc")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", "llama-tiny", "--profile", "h100", "--prompt", str(PROMPT),
                              "--operators", table, "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    counted = sum(1 for o in llama.ops if o.kind in ("matmul", "attention"))
    assert out["operator_sources"] == {"measured": counted, "scaled": 0, "roofline": 0}


def test_gpu_op_rates_writes_a_table_that_times_every_prefill_op(tmp_path, llama):
    """bench/gpu_op_rates.py's CPU smoke mode: its JSON reads back, and it holds every matmul and
    attention shape of the model's workload, so the simulator times the whole prefill from it."""
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_op_rates.py"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--models", "llama-tiny",
                          "--prompts", "16", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    table = load_operator_table(tmp_path / "gpu_op_rates.json")
    assert table.copy_bandwidth > 0
    for e in table.matmul:
        assert e.seconds > 0
    matmuls, attention = shapes(llama)
    assert {(k, n) for k, n in matmuls} <= {(e.k, e.n) for e in table.matmul if e.m == 16}
    assert {a for a in attention} <= {(e.heads, e.kv_heads, e.head_dim) for e in table.attention if e.s == 16}
    p = simulate(llama, h100(str(tmp_path / "gpu_op_rates.json")), "bf16", batch=1, context=16, prompt=16).prediction
    counted = sum(1 for o in llama.ops if o.kind in ("matmul", "attention"))
    assert p.operator_sources == {"measured": counted, "scaled": 0, "roofline": 0}
