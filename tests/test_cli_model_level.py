"""The model-level options of `flashc compile` (--ssm, --recover-steps), run as a user runs them."""

import json

from flashc_testing import run_cli as flashc


def test_ssm_compile_generate_and_run(tmp_path):
    out = tmp_path / "gen"
    r = flashc("compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--prefill-chunk", "8",
               "--draft-len", "0", "--ssm", "1", "--align-steps", "2", "--distill-steps", "1",
               "--ssm-checkpoint", str(tmp_path / "ckpt"), "--ssm-plot", str(tmp_path / "loss.png"),
               "--ssm-train", "blocks", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention -> SSM" in r.stdout and "1 of 2: [1]" in r.stdout
    assert "the new layers' decoder blocks" in r.stdout
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "ckpt" / "align" / "checkpoint.json").exists()
    g = flashc("generate", str(out), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "4", "--json")
    assert g.returncode == 0, g.stderr[-2000:]
    assert len(json.loads(g.stdout)["ids"][0]) == 9
    s = flashc("generate", str(out), "--prompt-ids", "1,2,3", "--speculate", "ngram")
    assert s.returncode != 0 and "state-space layers" in s.stderr


def test_model_level_options_are_checked_before_work():
    r = flashc("compile", "llama-tiny", "--align-steps", "3")
    assert r.returncode != 0 and "apply to --ssm" in r.stderr
    r = flashc("compile", "llama-tiny", "--ssm-train", "all")
    assert r.returncode != 0 and "--ssm-train apply to --ssm" in r.stderr
    r = flashc("compile", "llama-tiny", "--ssm", "most")
    assert r.returncode != 0 and "not a layer choice" in r.stderr
    r = flashc("compile", "llama-tiny", "--recover-steps", "3")
    assert r.returncode != 0 and "add --prune" in r.stderr
    r = flashc("compile", "llama-tiny", "--prune", "online-40%", "--recover-steps", "3")
    assert r.returncode != 0 and "recovery distillation is built for" in r.stderr


def test_recover_steps_reports_the_recovery():
    r = flashc("compile", "llama-tiny", "--prune", "magnitude-50%", "--recover-steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(recovery)" in r.stdout and "held-out" in r.stdout and "recovered" in r.stdout
