"""Artifacts on disk: a directory with manifest.json, graph.json and safetensors weights.

Loading never unpickles: the graph is JSON (flashc.serialize), weights are safetensors,
and every file's sha256 is checked against the manifest before it is read. Writes go
to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written artifact under the requested name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from flashc.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors needs contiguous CPU tensors that share no memory."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    save_file(out, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read safetensors weights ({e})") from None


def write_artifact(path: str | os.PathLike, manifest: dict[str, Any],
                   writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write files (name -> writer(path)) and the manifest with their checksums, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, write in writers.items():
            write(tmp / name)
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def swap_file(path: str | os.PathLike, old: str, new: str, data: bytes,
              edit: Callable[[dict], None] | None = None) -> None:
    """Replace file `old` of the artifact at `path` by `data` stored as `new`, crash-safe.

    The new file is written first under its new name, then the manifest (checksums,
    and whatever `edit` changes) is replaced atomically, then the old file goes: at
    every moment the manifest names files that exist with the checksums it lists.
    """
    path = Path(path)
    if old == new:
        raise ValueError("swap_file needs a new name for the new content (the old file stays valid until the swap)")
    manifest = json.loads((path / MANIFEST).read_text())
    target = path / new
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    files = {k: v for k, v in manifest["files"].items() if k != old}
    files[new] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["files"] = files
    if edit is not None:
        edit(manifest)
    mtmp = path / (MANIFEST + ".tmp")
    with open(mtmp, "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(mtmp, path / MANIFEST)
    (path / old).unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest and (by default) every file's checksum."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact (compile one with `flashc compile ... -o {path}`)")
    if not path.is_dir():
        raise ArtifactError(f"{path}: an artifact is a directory, this is a file")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{mpath}: missing; {path} is not a flashc artifact or was not written completely")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt JSON ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest or "files" not in manifest:
        raise ArtifactError(f"{mpath}: not a flashc manifest (no format_version/files)")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format {version} was written by flashc "
                            f"{manifest.get('flashc_version', '?')}; this flashc reads format <= {FORMAT_VERSION}: "
                            "upgrade flashc or recompile")
    written_torch = manifest.get("torch_version", "")
    if written_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(f"{path}: written with torch {written_torch}, running torch {torch.__version__}; "
                      "graph ops are resolved by name and checked on load", stacklevel=2)
    if verify:
        for name, info in manifest["files"].items():
            f = path / name
            if not f.exists():
                raise ArtifactError(f"{f}: missing (listed in the manifest)")
            if f.stat().st_size != info.get("bytes"):
                raise ArtifactError(f"{f}: truncated or altered: {f.stat().st_size} bytes, manifest says {info.get('bytes')}")
            if sha256_file(f) != info.get("sha256"):
                raise ArtifactError(f"{f}: sha256 does not match the manifest: corrupt or tampered with")
    return manifest
