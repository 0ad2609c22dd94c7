"""`flashc compile --signature generate` and `flashc generate`, in-process through cli.main."""

import json

import pytest
import torch
from test_generate import greedy_reference

from flashc import zoo
from flashc.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "llama"
    assert main(["compile", "llama-tiny", "--signature", "generate", "--cache-len", "48", "--prefill-chunk", "8",
                 "--draft-len", "3", "-o", str(out)]) == 0
    return out


def test_generate_prints_greedy_tokens_and_stats(artifact, capsys):
    prompt = [5, 9, 13, 5, 9, 13, 5, 9]
    assert main(["generate", str(artifact), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                 "--speculate", "ngram", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = greedy_reference(zoo.build("llama-tiny", seed=0), torch.tensor([prompt]), 12)
    assert result["ids"] == want.tolist()
    assert result["stats"]["new_tokens"] == 12 and result["stats"]["rounds"] >= 1
    assert main(["generate", str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert "time to first token" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,2", "--speculate", "medusa"], "known are 'ngram'"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt", "hello"], "tokenizer"),
    ([], "--prompt TEXT or --prompt-ids"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "60"], "does not fit the static KV cache of 48"),
    (["--prompt-ids", "1,2", "--speculate", "ngram", "--draft-len", "4"], "draft_len must be in 1..3"),
])
def test_generate_errors_are_one_line(artifact, capsys, args, message):
    assert main(["generate", str(artifact), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compile_generation_options_are_checked(capsys):
    assert main(["compile", "llama-tiny", "--signature", "generate"]) == 2
    assert "--cache-len" in capsys.readouterr().err
    assert main(["compile", "llama-tiny", "--draft-len", "2"]) == 2
    assert "--signature generate" in capsys.readouterr().err
    assert main(["compile", "minilm-l6", "--signature", "generate", "--cache-len", "16"]) == 2
    assert "encoder" in capsys.readouterr().err


def test_ragged_artifact_takes_prompts_of_different_lengths(tmp_path, capsys):
    out = tmp_path / "ragged"
    assert main(["compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--batch", "2",
                 "--ragged", "--prefill-chunk", "4", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", "1,2,3;4,5,6,7,8,9", "--max-new-tokens", "5", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    model = zoo.build("llama-tiny", seed=0)
    assert ids == [greedy_reference(model, torch.tensor([p]), 5)[0].tolist() for p in ([1, 2, 3], [4, 5, 6, 7, 8, 9])]


def test_layerskip_from_the_command_line_is_plain_greedy(artifact, capsys):
    prompt = [7, 8, 9, 10, 7, 8, 9]
    assert main(["generate", str(artifact), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "10",
                 "--speculate", "layerskip:1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = greedy_reference(zoo.build("llama-tiny", seed=0), torch.tensor([prompt]), 10)
    assert result["ids"] == want.tolist()
    assert main(["generate", str(artifact), "--prompt-ids", "1,2", "--speculate", "layerskip:x"]) == 2
    assert "layerskip:E takes the exit layer" in capsys.readouterr().err
    assert main(["generate", str(artifact), "--prompt-ids", "1,2", "--speculate", "layerskip:2"]) == 2
    assert "exit_layer must be in 1..1" in capsys.readouterr().err


def test_compile_exact_verify_for_a_gpu_and_refused_elsewhere(tmp_path, capsys):
    """--exact-verify: the verify entry of a CUDA target's artifact keeps its row-invariant option; a CPU
    target and a single-signature compile refuse it, naming why."""
    out = tmp_path / "exact"
    assert main(["compile", "llama-tiny", "--target", "h100", "--signature", "generate", "--cache-len", "32",
                 "--exact-verify", "-o", str(out)]) == 0
    (options,) = out.rglob("cuda_options.json")
    assert options.parent.parent.name == "verify" and json.loads(options.read_text()) == {"row_invariant": True}
    capsys.readouterr()
    assert main(["compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--exact-verify"]) != 0
    assert "does not run the CUDA backend" in capsys.readouterr().err
    assert main(["compile", "llama-tiny", "--exact-verify"]) != 0
    assert "applies to --signature generate" in capsys.readouterr().err
