"""Artifacts: round trip, atomic writes, and clear errors for every kind of damage."""

import json

import pytest
import torch
from flashc_testing import fresh_ids, rel_err

import flashc
from flashc.artifact import write_artifact
from flashc.errors import ArtifactError


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", fresh_ids("llama-tiny"))
    path = tmp_path_factory.mktemp("art") / "llama"
    cm.save(path)
    return cm, path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_manifest_contents(saved):
    _, path = saved
    m = json.loads((path / "manifest.json").read_text())
    assert m["flashc_version"] == flashc.__version__ and m["torch_version"] == torch.__version__
    assert m["target"] == "cpu" and m["profile"] == "cpu"
    assert m["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}]
    assert set(m["files"]) == {"graph.json", "weights.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert [p["name"] for p in m["pipeline"]][:2] == ["canonicalize", "fuse_moe"]


def test_roundtrip_never_unpickles(saved, monkeypatch):
    cm, path = saved
    import pickle

    def no_pickle(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = flashc.load(path)
    ids = fresh_ids("llama-tiny")
    assert rel_err(loaded(ids).logits, cm(ids).logits) < 1e-6


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        flashc.load(tmp_path / "nope")


def test_corrupt_manifest(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "a")
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json: corrupt JSON"):
        flashc.load(p)


def test_truncated_weights(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "a")
    w = p / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"weights.safetensors: truncated"):
        flashc.load(p)


def test_tampered_graph(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "a")
    g = p / "graph.json"
    text = g.read_text()
    g.write_text(text.replace("aten.linear.default", "aten.linear.defaulu", 1))  # same size
    with pytest.raises(ArtifactError, match=r"graph.json: sha256 does not match"):
        flashc.load(p)


def test_missing_file(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "a")
    (p / "graph.json").unlink()
    with pytest.raises(ArtifactError, match=r"graph.json: missing"):
        flashc.load(p)


def test_newer_format_version(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "a")
    m = json.loads((p / "manifest.json").read_text())
    m["format_version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as err:
        flashc.load(p)
    assert str(err.value) == (f"{p / 'manifest.json'}: field 'format_version': artifact format 99 was written "
                              f"by flashc {flashc.__version__}; this flashc reads format <= 1: "
                              "upgrade flashc or recompile")


def test_save_never_writes_a_manifest_load_would_refuse(tmp_path):
    from flashc.artifact import COMPILED_MODEL_MANIFEST

    with pytest.raises(ArtifactError) as err:
        write_artifact(tmp_path / "art", {"level": "3"}, {"a.txt": lambda p: p.write_text("ok")},
                       schema=COMPILED_MODEL_MANIFEST)
    assert str(err.value) == (f"{tmp_path / 'art'}: flashc built an invalid manifest.json (field 'target' is "
                              "missing); this is a flashc bug")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    def boom(path):
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "art", {}, {"a.txt": lambda p: p.write_text("ok"), "b.bin": boom})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_artifact(saved, tmp_path):
    cm, _ = saved
    target = tmp_path / "art"
    cm.save(target)
    (target / "stale.txt").write_text("from an older write")
    cm.save(target)
    assert not (target / "stale.txt").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]


def test_swap_file_keeps_the_manifest_valid_at_every_step(tmp_path):
    import json

    from flashc.artifact import read_manifest, swap_file, write_artifact

    def payload(d):
        d.mkdir()
        (d / "tuning.json").write_text('{"entries": {}}')

    art = write_artifact(tmp_path / "art", {"payload": {"tuning": "tuning.json"}}, {"payload": payload})
    data = json.dumps({"entries": {"k": {"config": {"BLOCK_N": 8}}}}).encode()
    swap_file(art, "payload/tuning.json", "payload/tuning-new.json", data,
              lambda m: m["payload"].update(tuning="tuning-new.json"))
    manifest = read_manifest(art)  # verifies every checksum
    assert manifest["payload"]["tuning"] == "tuning-new.json"
    assert (art / "payload" / "tuning-new.json").read_bytes() == data
    assert not (art / "payload" / "tuning.json").exists()
    assert set(manifest["files"]) == {"payload/tuning-new.json"}
