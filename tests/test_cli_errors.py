"""Every failure of the command line is one line on stderr, `flashc: error: ...`, exit status 2.

Called in-process through `flashc.cli.main` (torch is imported once); one test runs the
installed entry point as a subprocess to check that no traceback reaches the user.
"""

import subprocess
import sys
import textwrap

import pytest

from flashc import cli
from flashc.errors import FlashcError

NET = '''
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
    def forward(self, x):
        return self.a(x)
'''


def error_line(capsys, *argv: str) -> str:
    """Run flashc with argv; assert it failed with status 2 and one `flashc: error:` line; return that line."""
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("flashc: error: "), err
    return lines[0]


def factory_file(tmp_path, body: str, name: str = "user_model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- a user's path/to/file.py:factory -------------------------------------------------


def test_syntax_error_names_file_and_line(capsys, tmp_path):
    f = factory_file(tmp_path, "import torch\n\ndef make(:\n    pass\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:3: syntax error" in line


def test_import_time_exception_names_file_line_and_exception(capsys, tmp_path):
    f = factory_file(tmp_path, "import torch\nraise RuntimeError('no GPU here')\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:2:" in line and "RuntimeError: no GPU here" in line


def test_missing_import_names_the_module(capsys, tmp_path):
    f = factory_file(tmp_path, "import torch\nimport flashc_no_such_module\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:2:" in line and "no module named 'flashc_no_such_module'" in line


def test_sys_exit_at_import_is_the_users_error(capsys, tmp_path):
    f = factory_file(tmp_path, "import sys\nsys.exit(3)\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:2:" in line and "SystemExit: 3" in line


def test_missing_factory_names_file_and_function(capsys, tmp_path):
    f = factory_file(tmp_path, NET + "def make():\n    return Net()\n")
    line = error_line(capsys, "compile", f"{f}:build")
    assert str(f) in line and "'build'" in line


def test_missing_file_and_missing_factory_name(capsys, tmp_path):
    line = error_line(capsys, "compile", f"{tmp_path / 'absent.py'}:make")
    assert f"{tmp_path / 'absent.py'}: no such file" in line
    f = factory_file(tmp_path, NET)
    line = error_line(capsys, "compile", str(f))
    assert f"{f}:FUNCTION" in line


def test_factory_exception_names_the_users_line(capsys, tmp_path):
    f = factory_file(tmp_path, NET + "def make():\n    size = 4\n    raise ValueError(f'bad size {size}')\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:11 in make:" in line and "ValueError: bad size 4" in line


def test_exception_inside_torch_points_at_the_users_call(capsys, tmp_path):
    f = factory_file(tmp_path, "import torch\ndef make():\n    return torch.nn.Linear('four', 4)\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:3 in make:" in line and "TypeError" in line


@pytest.mark.parametrize("returned, says", [
    ("'a model'", "returned a str"),
    ("None", "returned None"),
    ("(Net(), Net(), Net())", "a tuple of 3 items"),
    ("('model', torch.randn(2, 4))", "a tuple whose first item is a str"),
    ("(Net(), [1, 2])", "example input 0 is a list"),
    ("Net()", "without config.vocab_size"),
])
def test_factory_returning_the_wrong_type(capsys, tmp_path, returned, says):
    f = factory_file(tmp_path, NET + f"def make():\n    return {returned}\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:make" in line and says in line


def test_factory_needing_arguments_names_its_parameters(capsys, tmp_path):
    f = factory_file(tmp_path, NET + "def make(width, depth=2):\n    return Net()\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:9:" in line and "make(width, depth=2) needs arguments" in line and "'width'" in line


def test_forward_failing_at_capture_names_the_users_line(capsys, tmp_path):
    f = factory_file(tmp_path, NET.replace("return self.a(x)", "raise RuntimeError('broken forward')")
                     + "def make():\n    return Net(), (torch.randn(2, 4),)\n")
    line = error_line(capsys, "compile", f"{f}:make")
    assert f"{f}:8 in forward" in line and "broken forward" in line


def test_factory_that_works(capsys, tmp_path):
    f = factory_file(tmp_path, NET + "def make():\n    return Net(), (torch.randn(2, 4),)\n")
    assert cli.main(["compile", f"{f}:make"]) == 0
    assert capsys.readouterr().err == ""


# --- sizes and paths ----------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("--batch", "-1"), ("--batch", "0"), ("--seq-len", "0"),
                                           ("--seq-len", "-2"), ("--batch", "two")])
def test_non_positive_sizes_are_refused(capsys, option, value):
    line = error_line(capsys, "compile", "llama-tiny", option, value)
    assert f"argument {option}: " in line and value in line


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_seq_len_beyond_the_models_positions(capsys, command):
    line = error_line(capsys, command, "llama-tiny", "--seq-len", "513")
    assert "--seq-len 513" in line and "512 positions" in line and "max_position_embeddings" in line


def test_cache_len_beyond_the_models_positions(capsys):
    line = error_line(capsys, "compile", "llama-tiny", "--signature", "decode", "--cache-len", "600")
    assert "--cache-len 600" in line and "512 positions" in line


def test_cache_len_and_decode_go_together(capsys):
    assert "needs --cache-len" in error_line(capsys, "compile", "llama-tiny", "--signature", "decode")
    assert "--cache-len 8: only a --signature decode" in error_line(capsys, "compile", "llama-tiny", "--cache-len", "8")
    line = error_line(capsys, "compile", "llama-tiny", "--signature", "decode", "--cache-len", "0")
    assert "argument --cache-len: 0" in line


def test_empty_output_path(capsys):
    line = error_line(capsys, "compile", "llama-tiny", "-o", "")
    assert "argument -o/--output: empty path" in line


def test_output_path_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    line = error_line(capsys, "compile", "llama-tiny", "-o", f)
    assert f"argument -o/--output: {f}: is a file" in line
    assert f.read_text() == "keep me"


def test_output_path_that_is_a_foreign_directory(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    line = error_line(capsys, "compile", "llama-tiny", "-o", tmp_path)
    assert f"{tmp_path}: exists and is not a flashc artifact" in line


@pytest.mark.parametrize("argv", [["run", "{d}"], ["export", "{d}", "--format", "onnx"], ["eval", "{d}"],
                                  ["inspect", "{d}"]])
def test_missing_artifact_directory(capsys, tmp_path, argv):
    missing = str(tmp_path / "no-artifact")
    line = error_line(capsys, *[a.format(d=missing) for a in argv])
    assert f"{missing}: no such" in line


def test_eval_of_a_factory_says_what_eval_accepts(capsys, tmp_path):
    f = factory_file(tmp_path, NET)
    line = error_line(capsys, "eval", f"{f}:make")
    assert f"{f}:make: a factory is not accepted here" in line and "artifact directory" in line


def test_export_output_path_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "out.onnx"
    f.write_text("")
    line = error_line(capsys, "export", tmp_path / "artifact", "--format", "onnx", "-o", f)
    assert f"{f}: is a file" in line


def test_repeat_and_window_must_be_usable(capsys):
    assert "argument --repeat: 0" in error_line(capsys, "run", "anything", "--repeat", "0")
    assert "argument --window: 1" in error_line(capsys, "eval", "smollm2-135m", "--window", "1")


# --- the decode signature -----------------------------------------------------------------


def test_decode_of_a_plain_module_says_why(capsys, tmp_path):
    f = factory_file(tmp_path, NET + "def make():\n    return Net(), (torch.randn(2, 4),)\n")
    line = error_line(capsys, "compile", f"{f}:make", "--signature", "decode", "--cache-len", "8")
    assert "--signature decode" in line and "Net" in line and "not a causal LM" in line


def test_decode_of_an_encoder_says_why(capsys):
    line = error_line(capsys, "compile", "minilm-l6", "--signature", "decode", "--cache-len", "8")
    assert "minilm-l6 is an encoder" in line and "not a causal LM" in line


def test_decode_of_a_factory_causal_lm_compiles(capsys, tmp_path):
    f = factory_file(tmp_path, "from flashc import zoo\ndef make():\n    return zoo.build('llama-tiny')\n")
    assert cli.main(["compile", f"{f}:make", "--signature", "decode", "--cache-len", "16", "-O", "0"]) == 0
    assert "decode" in capsys.readouterr().out


# --- the boundary: user errors, internal errors, FLASHC_DEBUG -------------------------------


def test_eager_forward_failing_in_run_names_the_users_line(capsys, tmp_path, monkeypatch):
    import tempfile

    f = factory_file(tmp_path, NET.replace(
        "return self.a(x)", "import os\n        if os.environ.get('BREAK_FORWARD'):\n"
                            "            raise RuntimeError('broken at run time')\n        return (self.a(x),)")
        + "def make():\n    return Net(), (torch.randn(2, 4),)\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # an internal error's traceback file
    out = tmp_path / "artifact"
    assert cli.main(["compile", f"{f}:make", "-o", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.setenv("BREAK_FORWARD", "1")
    line = error_line(capsys, "run", out, "--repeat", "1")
    assert f"{f}:10 in forward: the eager model raised RuntimeError: broken at run time" in line


def test_internal_error_is_one_line_with_the_traceback_in_a_file(capsys, tmp_path, monkeypatch):
    import tempfile

    def broken(args):
        return 1 // 0

    monkeypatch.setattr(cli, "cmd_targets", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("FLASHC_DEBUG", raising=False)
    status = cli.main(["targets"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_INTERNAL == 70
    assert len(lines) == 1 and lines[0].startswith("flashc: internal error: ZeroDivisionError")
    kept = list(tmp_path.glob("flashc-traceback-*.txt"))
    assert len(kept) == 1 and str(kept[0]) in lines[0]
    assert "Traceback" in kept[0].read_text() and "1 // 0" in kept[0].read_text()


def test_flashc_debug_raises_with_the_traceback(tmp_path, monkeypatch):
    f = factory_file(tmp_path, NET + "def make():\n    raise ValueError('bad')\n")
    monkeypatch.setenv("FLASHC_DEBUG", "1")
    with pytest.raises(FlashcError, match="ValueError: bad") as info:
        cli.main(["compile", f"{f}:make"])
    assert isinstance(info.value.__cause__, ValueError)


def test_help_documents_exit_status_and_flashc_debug(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "FLASHC_DEBUG=1" in out and "70 an internal error" in out and "2 an error" in out


def test_entry_point_prints_no_traceback(tmp_path):
    f = factory_file(tmp_path, NET + "def make():\n    raise KeyError('weights')\n")
    r = subprocess.run([sys.executable, "-m", "flashc.cli", "compile", f"{f}:make"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"flashc: error: {f}:10 in make: factory make() raised KeyError: 'weights'"]
