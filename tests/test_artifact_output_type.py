"""Loading gives back the model's own output type, in a fresh process too, importing an
output type's module only from the known packages; anything else falls back to a flat
tuple with a warning that names the manifest field."""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import flashc
from flashc.errors import ArtifactError
from flashc.zoo import build, example_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cm = flashc.compile(build("llama-tiny"), "cpu", example_inputs("llama-tiny", batch=1, seq_len=8))
    path = tmp_path_factory.mktemp("out") / "llama"
    cm.save(path)
    return cm, path


@pytest.fixture
def art(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "art")


def _set_out_spec(path, change):
    m = json.loads((path / "manifest.json").read_text())
    protocol, root = json.loads(m["out_spec"])
    change(root)
    m["out_spec"] = json.dumps([protocol, root])
    (path / "manifest.json").write_text(json.dumps(m))


def test_fresh_process_gets_the_model_output_type(saved, tmp_path):
    """transformers is not imported before load: load imports the output type's module."""
    cm, path = saved
    ids = example_inputs("llama-tiny", batch=1, seq_len=8)[0]
    out_file = tmp_path / "logits.safetensors"
    script = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("error")  # a fallback warning would fail here
        import flashc, torch
        from safetensors.torch import save_file
        assert "transformers.modeling_outputs" not in sys.modules
        cm = flashc.load({str(path)!r})
        ids = torch.tensor({ids.tolist()!r})
        out = cm(ids)
        save_file({{"logits": out.logits.contiguous()}}, {str(out_file)!r})
        print(type(out).__module__, type(out).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["transformers.modeling_outputs", "CausalLMOutputWithPast"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out_file))["logits"], cm(ids).logits)


def test_in_process_load_matches_exactly(saved):
    cm, path = saved
    ids = example_inputs("llama-tiny", batch=1, seq_len=8, seed=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = flashc.load(path)(ids)
    assert type(out) is type(cm(ids)) and torch.equal(out.logits, cm(ids).logits)


def _load_with_fallback(path, says):
    with pytest.warns(UserWarning) as caught:
        loaded = flashc.load(path)
    msgs = [str(w.message) for w in caught if "output type" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith(f"{path / 'manifest.json'}: field 'out_spec': "), msgs
    assert says in msgs[0] and "flat tuple" in msgs[0]
    return loaded


def test_type_from_another_package_is_never_imported(saved, art, tmp_path, monkeypatch):
    cm, _ = saved
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "flashc_probe_outputs.py").write_text("raise SystemExit('imported by load')\n")
    monkeypatch.syspath_prepend(str(probe))
    _set_out_spec(art, lambda root: root.update(type="flashc_probe_outputs.Output"))
    loaded = _load_with_fallback(art, "flashc_probe_outputs.Output is not from a package flashc imports from")
    assert "flashc_probe_outputs" not in sys.modules
    ids = example_inputs("llama-tiny", batch=1, seq_len=8, seed=6)[0]
    assert torch.equal(loaded(ids), cm(ids).logits)  # one output: a bare tensor


def test_enum_from_another_package_is_never_imported(art, tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "flashc_probe_enum.py").write_text("raise SystemExit('imported by load')\n")
    monkeypatch.syspath_prepend(str(probe))
    context = json.dumps([{"__enum__": True, "fqn": "flashc_probe_enum:Kind", "name": "A"}])
    _set_out_spec(art, lambda root: root.update(context=context))
    _load_with_fallback(art, "an Enum in it comes from 'flashc_probe_enum'")
    assert "flashc_probe_enum" not in sys.modules


def test_missing_type_in_a_known_package(art):
    _set_out_spec(art, lambda root: root.update(type="transformers.modeling_outputs.NoSuchOutput"))
    _load_with_fallback(art, "transformers.modeling_outputs.NoSuchOutput is not importable here")


@pytest.mark.parametrize("text", ["not json", "[2, {}]", '[1, {"type": 3}]', "[1, []]"])
def test_malformed_out_spec(art, text):
    m = json.loads((art / "manifest.json").read_text())
    m["out_spec"] = text
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as err:
        flashc.load(art)
    assert str(err.value).startswith(f"{art / 'manifest.json'}: field 'out_spec' is not a pytree spec")


class Unnamed:
    """An output type registered with torch's pytree but without a serialized name."""

    def __init__(self, logits):
        self.logits = logits


pytree.register_pytree_node(Unnamed, lambda o: ([o.logits], None), lambda xs, _: Unnamed(xs[0]))


def test_unstorable_type_warns_at_save_and_load(saved, tmp_path):
    cm, _ = saved
    program = dataclasses.replace(cm.program, out_spec=pytree.tree_structure(Unnamed(torch.zeros(1))))
    odd = dataclasses.replace(cm, program=program)
    with pytest.warns(UserWarning, match=rf"output type {__name__}.Unnamed cannot be stored"):
        odd.save(tmp_path / "art")
    with pytest.warns(UserWarning, match=rf"the model returned {__name__}.Unnamed, which could not be stored"):
        loaded = flashc.load(tmp_path / "art")
    ids = example_inputs("llama-tiny", batch=1, seq_len=8, seed=7)[0]
    assert torch.equal(loaded(ids), cm(ids).logits)



class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.proj(x)
        return {"scores": y, "pair": (y.relu(), y.sum(-1))}


class OneHead(TwoHeads):
    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("model_cls", [TwoHeads, OneHead])
def test_plain_output_structures_round_trip(model_cls, tmp_path):
    """A dict of a tensor and a tuple, and a bare tensor, come back as they were, without warnings."""
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    cm = flashc.compile(model_cls().eval(), "cpu", (x,), level=1)
    cm.save(tmp_path / "art")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = flashc.load(tmp_path / "art")
    got, want = loaded(x), cm(x)
    assert pytree.tree_structure(got) == pytree.tree_structure(want)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)))
