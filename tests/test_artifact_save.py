"""Saving: what save refuses to replace, concurrent saves to one path, and filesystem
failures as one-line ArtifactErrors naming the path and what to do."""

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

import flashc
from flashc import artifact
from flashc.artifact import read_manifest, write_artifact
from flashc.errors import ArtifactError
from flashc.zoo import example_inputs


@pytest.fixture(scope="module")
def cm(tiny_models):
    return flashc.compile(tiny_models["llama-tiny"], "cpu", example_inputs("llama-tiny", seq_len=8), level=0)


def _same_outputs(cm, path, seed=1):
    ids = example_inputs("llama-tiny", seq_len=8, seed=seed)[0]
    return torch.equal(flashc.load(path)(ids).logits, cm(ids).logits)


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_refuses_a_directory_that_is_not_an_artifact(cm, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError) as err:
        cm.save(mine)
    assert str(err.value) == (f"{mine}: exists and is not a flashc artifact (no flashc manifest.json in it); "
                              "flashc will not delete it: choose another path, or empty or remove the directory "
                              "yourself")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path, "mine") == []


def test_refuses_a_directory_with_a_foreign_manifest(cm, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    with pytest.raises(ArtifactError, match="exists and is not a flashc artifact"):
        cm.save(other)
    assert json.loads((other / "manifest.json").read_text()) == {"name": "some other tool"}


def test_refuses_a_plain_file(cm, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"user data")
    with pytest.raises(ArtifactError) as err:
        cm.save(f)
    assert str(err.value).startswith(f"{f}: is a file, not an artifact directory; flashc will not replace it")
    assert f.read_bytes() == b"user data"


def test_refuses_a_symbolic_link(cm, tmp_path):
    real = tmp_path / "real"
    cm.save(real)
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(ArtifactError, match=rf"{link}: is a symbolic link; flashc does not replace links"):
        cm.save(link)
    assert link.is_symlink() and _same_outputs(cm, real)


def test_parent_is_a_file(cm, tmp_path):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "art"
    with pytest.raises(ArtifactError) as err:
        cm.save(path)
    msg = str(err.value)
    assert msg == (f"{path}: cannot save the artifact: checking what is at the path failed (Not a directory); "
                   "a parent of the path is a file, not a directory: choose another path")


def test_saves_into_an_empty_directory(cm, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    assert cm.save(path) == path
    assert _same_outputs(cm, path)
    assert _leftovers(tmp_path, "empty") == []


def test_replaces_an_earlier_artifact(cm, tmp_path):
    path = tmp_path / "art"
    cm.save(path)
    first = read_manifest(path)["created"]
    cm.save(path)
    assert read_manifest(path)["created"] >= first and _same_outputs(cm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_directory_mode_follows_the_umask(cm, tmp_path):
    umask = os.umask(0o022)
    try:
        cm.save(tmp_path / "art")
    finally:
        os.umask(umask)
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o755  # readable by others, like any new directory


def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


# (errno, where it is injected, what the advice says)
FILESYSTEM_FAILURES = [
    (errno.EACCES, "tmpdir", "choose a directory you can write to, or fix its permissions"),
    (errno.EROFS, "tmpdir", "the file system is read-only: save somewhere writable"),
    (errno.ENOSPC, "weights", "free some space on the device or save elsewhere"),
    (errno.EDQUOT, "weights", "free some space within your quota or save elsewhere"),
    (errno.EIO, "weights", "check the path and the file system, then save again"),
]


@pytest.mark.parametrize("code,where,advice", FILESYSTEM_FAILURES,
                         ids=[errno.errorcode[c] for c, _, _ in FILESYSTEM_FAILURES])
def test_filesystem_failure_is_one_line(cm, tmp_path, monkeypatch, code, where, advice):
    import flashc.compiled

    if where == "tmpdir":
        monkeypatch.setattr(artifact, "_sibling_dir", _fail_with(code))
        step = f"creating a temporary directory in {tmp_path}"
    else:
        monkeypatch.setattr(flashc.compiled, "save_tensors", _fail_with(code))
        step = "writing weights.safetensors"
    path = tmp_path / "art"
    with pytest.raises(ArtifactError) as err:
        cm.save(path)
    assert str(err.value) == (f"{path}: cannot save the artifact: {step} failed ({os.strerror(code)}); {advice}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_permission_denied(cm, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ArtifactError, match=rf"{locked / 'art'}: cannot save the artifact: .*Permission denied"):
            cm.save(locked / "art")
    finally:
        locked.chmod(0o700)


def test_failed_save_keeps_the_earlier_artifact(cm, tmp_path, monkeypatch):
    import flashc.compiled

    path = tmp_path / "art"
    cm.save(path)
    before = read_manifest(path)
    monkeypatch.setattr(flashc.compiled, "save_tensors", _fail_with(errno.ENOSPC))
    with pytest.raises(ArtifactError, match="No space left on device"):
        cm.save(path)
    assert read_manifest(path) == before and _same_outputs(cm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_file_size_limit_in_a_real_write(cm, tmp_path):
    """A real EFBIG from the kernel (ulimit -f), met inside safetensors, in its own process."""
    src = tmp_path / "src"
    cm.save(src)
    dst = tmp_path / "dst"
    script = f"""
import resource, signal, sys
import flashc
from flashc.errors import ArtifactError
cm = flashc.load({str(src)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    cm.save({str(dst)!r})
except ArtifactError as e:
    print("ArtifactError:", e)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout.strip()
    assert out.startswith(f"ArtifactError: {dst}: cannot save the artifact: writing ")
    assert "(File too large)" in out and "ulimit -f" in out and "\n" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_concurrent_saves_from_threads(cm, tmp_path):
    path = tmp_path / "art"
    cm.save(path)  # some replace an artifact, as a second round of saves would
    n = 6
    barrier = threading.Barrier(n)
    errors = []

    def save():
        barrier.wait()
        try:
            cm.save(path)
        except BaseException as e:  # noqa: BLE001 - every failure is the test's business
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _same_outputs(cm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _write_in_child(path, i, barrier):
    data = bytes([i]) * (1 << 21)

    def write_data(p):
        p.write_bytes(data)

    barrier.wait()
    try:
        for _ in range(3):
            write_artifact(path, {"writer": i}, {"data.bin": write_data, "id.txt": lambda p: p.write_text(str(i))})
    except BaseException as e:  # noqa: BLE001
        print(f"writer {i}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


def test_concurrent_saves_from_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier = ctx.Barrier(n)
    path = tmp_path / "art"
    procs = [ctx.Process(target=_write_in_child, args=(path, i, barrier)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    manifest = read_manifest(path)  # every checksum verified
    writer = manifest["writer"]
    assert (path / "id.txt").read_text() == str(writer)
    assert (path / "data.bin").read_bytes() == bytes([writer]) * (1 << 21)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_is_artifact(cm, tmp_path):
    cm.save(tmp_path / "art")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "manifest.json").write_text("{}")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "manifest.json")  # must not hang the check
    assert [artifact.is_artifact(tmp_path / n) for n in ("art", "plain", "fifo", "missing")] == [True, False, False, False]


def test_loaded_weights_are_aligned_as_pytorch_allocates(tmp_path):
    """safetensors hands tensors out at the file's offsets; CPU kernels round differently on unaligned data,
    so load_tensors realigns them (values unchanged)."""
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(8)}  # odd sizes: offsets 12 bytes apart
    tensors["half"] = torch.randn(5, dtype=torch.float16)
    artifact.save_tensors(tensors, tmp_path / "w.safetensors")
    loaded = artifact.load_tensors(tmp_path / "w.safetensors")
    assert all(t.data_ptr() % artifact.ALIGNMENT == 0 for t in loaded.values())
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
