"""The manifest's schema at load: every field's type, the format version, and paths kept
inside the artifact. Each damaged manifest is an ArtifactError naming the file and field."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

import flashc
from flashc.artifact import COMPILED_MODEL_MANIFEST, check_fields, read_manifest, sha256_file
from flashc.lowering import Fallback
from flashc.compiled import ModelSource
from flashc.errors import ArtifactError
from flashc.pass_manager import PassRecord
from flashc.zoo import example_inputs


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", example_inputs("llama-tiny", seq_len=8), level=0)
    path = tmp_path_factory.mktemp("schema") / "llama"
    cm.save(path)
    return cm, path


@pytest.fixture
def art(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "art")


def _edit(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return change


def _drop(key):
    return lambda m: m.pop(key)


# (what is changed, the field the error must name, what it must say)
DAMAGE = [
    (_set("level", "2"), "level", "must be an integer, found a string"),
    (_set("level", True), "level", "must be an integer, found a bool"),
    (_drop("target"), "target", "is missing"),
    (_set("inputs", {"input_ids": 1}), "inputs", "must be a list"),
    (_set("inputs", 0, "shape", 1, "8"), "inputs[0].shape[1]", "must be an integer"),
    (_set("inputs", 0, "dtype", None), "inputs[0].dtype", "must be a string, found null"),
    (_set("inputs", 0, "dtype", "float99"), "inputs[0].dtype", "not a torch dtype"),
    (_set("source", "evil", "x"), "source.evil", "is not a known field"),
    (_set("source", "seed", 1.5), "source.seed", "must be an integer"),
    (_set("pipeline", [{"name": "dce", "changed": "yes", "stats": {}, "seconds": 0.1, "nodes_before": 3,
                        "nodes_after": 2}]), "pipeline[0].changed", "must be true or false"),
    (_set("fallbacks", [{"op": "x", "count": "1", "where": ""}]), "fallbacks[0].count", "must be an integer"),
    (_set("files", "graph.json", "sha256", 5), 'files["graph.json"].sha256', "must be a sha256 hex digest"),
    (_set("files", "graph.json", "bytes", "11"), 'files["graph.json"].bytes', "must be an integer"),
    (_set("files", []), "files", "must be an object"),
    (_set("out_spec", 5), "out_spec", "must be a string or null"),
    (_set("meta", "input_high", [1]), "meta.input_high", "must be an object"),
    (_set("meta", "signature", "train"), "meta.signature", "expected one of prefill, decode"),
    (_set("meta", "input_high", {"cache_position": 0}), "meta.input_high.cache_position", "a positive integer"),
    (_set("meta", "vocab_size", -5), "meta.vocab_size", "a positive integer"),
    (_set("payload", {"model": 3}), 'payload["model"]', "must be a relative path"),
    (_set("timings", "total", "fast"), 'timings["total"]', "must be a number"),
    (_set("profile", "h999"), "profile", "unknown hardware profile 'h999'"),
    (_set("target", "tpu"), "target", "unknown target 'tpu'"),
    (_set("format_version", "1"), "format_version", "must be an integer"),
    (_set("format_version", 0), "format_version", "unknown artifact format 0"),
]


@pytest.mark.parametrize("change,field,says", DAMAGE, ids=[f"{d[1]}:{d[2][:20]}" for d in DAMAGE])
def test_damaged_field_is_named(art, change, field, says):
    _edit(art, change)
    with pytest.raises(ArtifactError) as err:
        flashc.load(art)
    msg = str(err.value)
    assert msg.startswith(f"{art / 'manifest.json'}: field '{field}'"), msg
    assert says in msg and "\n" not in msg


def test_unknown_top_level_field_is_ignored(saved, art):
    cm, _ = saved
    _edit(art, _set("written_by_a_newer_minor", {"x": 1}))
    ids = example_inputs("llama-tiny", seq_len=8, seed=3)[0]
    assert torch.equal(flashc.load(art)(ids).logits, cm(ids).logits)


def test_manifest_that_is_not_an_object(art):
    (art / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"manifest.json: not a flashc manifest"):
        flashc.load(art)


def test_listing_without_graph_is_incomplete(art):
    _edit(art, lambda m: m["files"].pop("graph.json"))
    with pytest.raises(ArtifactError) as err:
        flashc.load(art)
    assert str(err.value) == (f"{art / 'manifest.json'}: field 'files' does not list graph.json; "
                              "the artifact is incomplete: recompile")


def _list_file(m, name, path):
    m["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@pytest.mark.parametrize("name", ["../outside.bin", "/tmp/outside.bin", "payload/../../outside.bin",
                                  "..\\outside.bin"])
def test_manifest_path_outside_the_artifact(art, tmp_path, name):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    _edit(art, lambda m: _list_file(m, name, outside))
    with pytest.raises(ArtifactError) as err:
        flashc.load(art)
    msg = str(err.value)
    assert msg.startswith(f"{art / 'manifest.json'}: field 'files[{json.dumps(name)}]' names {name!r}")
    assert "not a relative path inside the artifact" in msg


def test_payload_path_outside_the_artifact(art):
    _edit(art, _set("payload", {"model": "../../model.onnx"}))
    with pytest.raises(ArtifactError, match=r"manifest.json: field 'payload\[\"model\"\]' names '../../model.onnx'"):
        flashc.load(art)


def test_listed_file_linked_out_of_the_artifact(art, tmp_path):
    """Same bytes, so every checksum passes: only the link check stops it."""
    outside = tmp_path / "weights-elsewhere.safetensors"
    shutil.move(art / "weights.safetensors", outside)
    os.symlink(outside, art / "weights.safetensors")
    with pytest.raises(ArtifactError) as err:
        flashc.load(art)
    assert str(err.value).startswith(f"{art / 'weights.safetensors'}: a symbolic link pointing out of the artifact")


def test_unlisted_link_out_of_the_artifact(art, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", art / "payload" / "tvm")
    with pytest.raises(ArtifactError, match=r"payload/tvm: a symbolic link pointing out of the artifact"):
        flashc.load(art)


def test_link_loop_is_refused(art):
    os.symlink("loop", art / "loop")
    with pytest.raises(ArtifactError, match=r"/loop: a symbolic link pointing out of the artifact \(to a loop\)"):
        flashc.load(art)


def test_link_inside_the_artifact_is_fine(saved, art):
    cm, _ = saved
    os.symlink("graph.json", art / "graph-alias.json")
    ids = example_inputs("llama-tiny", seq_len=8, seed=4)[0]
    assert torch.equal(flashc.load(art)(ids).logits, cm(ids).logits)


def test_listed_directory_is_not_a_file(art):
    (art / "extra").mkdir()
    _edit(art, lambda m: m["files"].update(extra={"sha256": "0" * 64, "bytes": 0}))
    with pytest.raises(ArtifactError, match=r"/extra: not a regular file"):
        flashc.load(art)


def test_unlisted_reference_weights_are_not_read(saved, art):
    """A file the manifest does not list has no checksum: load leaves it alone."""
    cm, _ = saved
    shutil.copy(art / "weights.safetensors", art / "reference.safetensors")
    assert cm.reference_weights is None and flashc.load(art).reference_weights is None


def test_saved_manifest_passes_the_schema(saved):
    _, path = saved
    m = read_manifest(path, schema=COMPILED_MODEL_MANIFEST)
    paths = check_fields(m, COMPILED_MODEL_MANIFEST)
    assert sorted(p[2] for p in paths) == ["graph.json", "weights.safetensors"]
    assert m["out_type"] == "transformers.modeling_outputs.CausalLMOutputWithPast"


@pytest.mark.parametrize("field,cls", [("source", ModelSource), ("fallbacks", Fallback), ("pipeline", PassRecord)])
def test_schema_follows_the_dataclasses(field, cls):
    """load rebuilds these with cls(**fields): the schema must list exactly the dataclass's fields."""
    spec = COMPILED_MODEL_MANIFEST.fields[field]
    record = getattr(spec, "item", spec)
    fields = dataclasses.fields(cls)
    assert set(record.fields) == {f.name for f in fields}
    with_defaults = {f.name for f in fields if f.default is not dataclasses.MISSING}
    assert record.optional == with_defaults


def test_an_older_artifacts_capture_warning_becomes_a_warning(art):
    """Artifacts written before ProgramMeta stored the fallback capture's warning on its own."""
    _edit(art, _set("meta", "capture_warning", "torch.export failed (X); the fallback specialises"))
    loaded = flashc.load(art)
    assert loaded.program.meta.warnings[-1].startswith("torch.export failed (X)")
    assert "torch.export failed (X)" in loaded.report().render()
