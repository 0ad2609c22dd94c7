"""lpu backend: lowering computes what the model computes (reference on the CPU) and carries
the plan, schedule and prediction; the artifact payload (schedule JSON, report, timeline PNG)
reads back; the `flashc simulate` command prints JSON, sweeps and refuses bad values."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from flashc_testing import fresh_ids, rel_err

from flashc import lowering, zoo
from flashc.backends.lpu.backend import LpuBackend, LpuOptions
from flashc.backends.lpu.cli import add_simulate_parser, parse_sweep
from flashc.capture import capture
from flashc.errors import FlashcError, InputError
from flashc.options import parse_options
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES


@pytest.fixture(scope="module")
def lowered():
    model = zoo.build("llama-tiny", seed=0)
    program = capture(model, (fresh_ids("llama-tiny", 2, 12, seed=0),), {"use_cache": False})
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["lpu-v1"]))
    options = parse_options(LpuOptions, {"context": 96, "precision": "int8"}, "lpu-v1")
    executable, _, fallbacks = lowering.lower(LpuBackend(), program, PROFILES["lpu-v1"], options)
    return model, program, executable, fallbacks


def test_lowered_model_computes_what_the_model_computes(lowered):
    model, _, executable, fallbacks = lowered
    assert fallbacks == []
    for _ in range(2):
        ids = fresh_ids("llama-tiny", 2, 12)
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
        got = executable(ids)[0]
        assert rel_err(got, want) < 1e-5


def test_lowered_model_carries_plan_schedule_and_prediction(lowered):
    _, program, executable, _ = lowered
    p = executable.prediction
    assert (p.batch, p.prompt, p.context, p.precision, p.profile) == (2, 12, 96, "int8", "lpu-v1")
    assert p.chips == executable.plan.chips >= 1 and p.decode_ms > 0 and p.ttft_s > 0
    assert p.tokens_per_s == pytest.approx(p.batch * p.tokens_per_s_per_user)
    ops = {t.op for t in executable.schedule.tasks if t.kind == "op"}
    assert ops == {o.index for o in executable.plan.workload.ops}  # every op of the program is scheduled


def test_payload_round_trip(lowered, tmp_path):
    _, program, executable, _ = lowered
    backend = LpuBackend()
    info = backend.save_payload(executable, tmp_path)
    data = json.loads((tmp_path / info["schedule"]).read_text())
    assert data["prediction"]["decode_ms"] == executable.prediction.decode_ms
    assert len(data["decode"]["tasks"]) == len(executable.schedule.tasks)
    assert "decode ms/token" in (tmp_path / info["report"]).read_text()
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / info["timeline"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = backend.load_payload(program, tmp_path, info)
    assert again.prediction == executable.prediction
    assert [(t.chip, t.unit, t.start, t.end) for t in again.schedule.tasks] == \
        [(t.chip, t.unit, t.start, t.end) for t in executable.schedule.tasks]
    ids = fresh_ids("llama-tiny", 2, 12)
    assert torch.equal(again(ids)[0], executable(ids)[0])
    (tmp_path / info["schedule"]).write_text("{broken")
    with pytest.raises(FlashcError, match="not a readable lpu schedule"):
        backend.load_payload(program, tmp_path, info)


def test_unknown_option_and_precision_are_refused(lowered):
    _, program, _, _ = lowered
    with pytest.raises(FlashcError, match="has no option 'precison'; did you mean 'precision'"):
        parse_options(LpuOptions, {"precison": "int8"}, "lpu-v1")
    with pytest.raises(InputError, match="unknown precision 'int3'"):
        LpuBackend().lower(program, PROFILES["lpu-v1"], LpuOptions(precision="int3"))


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="flashc")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *argv])
    return args.func(args)


def test_simulate_json_has_the_promised_keys(capsys):
    assert _cli("llama-tiny", "--profile", "h100", "--batch", "2", "--context", "64", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("decode_ms", "ttft_s", "tokens_per_s_per_user", "tokens_per_s", "chips"):
        assert out[key] > 0
    assert out["profile"] == "h100" and out["batch"] == 2


def test_simulate_sweep_prints_a_row_per_value_and_plots(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    assert _cli("llama-tiny", "--sweep", "link-bw=7GB,14GB,28GB", "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in ("7 GB/s", "14 GB/s", "28 GB/s")) and plot.stat().st_size > 1000
    assert _cli("llama-tiny", "--sweep", "sram=110MiB,220MiB", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["value"] for r in rows] == [110 * 2**20, 220 * 2**20]


@pytest.mark.parametrize("text, message", [
    ("chips=0,8", "out of range for chips"),
    ("chips=8,20000", "out of range for chips"),
    ("chips=8.5", "whole numbers"),
    ("sram=0MiB", "out of range for sram"),
    ("link-bw=14Gbps", "not a number"),
    ("link-bw=1e14", "out of range for link-bw"),
    ("chips=64:8:8", "LAST >= FIRST"),
    ("clock=1GHz", "PARAMETER one of"),
    ("chips=", "no values"),
    ("chips=-3", "is negative"),
    ("link-bw=-1GB", "is negative"),
])
def test_sweep_values_out_of_range_are_refused(text, message):
    with pytest.raises(InputError, match=message):
        parse_sweep(text, 10440)


def test_sweep_ranges_and_units():
    assert parse_sweep("chips=8:32:8", 10440).values == (8, 16, 24, 32)
    assert parse_sweep("sram=220MiB", 10440).values == (220 * 2**20,)
    assert parse_sweep("link-bw=14GB/s,1.4e10", 10440).values == (14e9, 1.4e10)


def test_compile_save_load_through_flashc_with_an_lpu_target(monkeypatch, tmp_path):
    """What `flashc compile MODEL --target lpu-v1 -o DIR` does once the target is in flashc.targets."""
    import flashc
    from flashc import targets

    monkeypatch.setitem(targets.TARGETS, "lpu-v1", targets.Target("lpu-v1", LpuBackend, "lpu-v1", "lpu"))
    model = zoo.build("llama-tiny", seed=1)
    ids = fresh_ids("llama-tiny", 1, 16, seed=1)
    cm = flashc.compile(model, "lpu-v1", ids, level=3, options={"precision": "int8", "context": 128})
    assert cm.executable.prediction.context == 128 and cm.executable.prediction.precision == "int8"
    path = cm.save(tmp_path / "art")
    payload = {p.name for p in (path / "payload").iterdir()}
    assert {"schedule.json", "prediction.md"} <= payload
    loaded = flashc.load(path)
    assert loaded.executable.prediction == cm.executable.prediction
    fresh = fresh_ids("llama-tiny", 1, 16)
    with torch.no_grad():
        want = model(fresh, use_cache=False).logits
    assert rel_err(loaded(fresh).logits, want) < 1e-5
