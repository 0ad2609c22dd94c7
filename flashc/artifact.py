"""Artifacts on disk: a directory with manifest.json, graph.json and safetensors weights.

Loading never unpickles: the graph is JSON (flashc.serialize), weights are safetensors,
the manifest is checked field by field against a schema, every path it names must stay
inside the artifact, and every file's sha256 is checked before it is read. Writes go to
a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written artifact under the requested name, and only a flashc artifact (or an empty
directory) is ever replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import torch

from flashc.errors import ArtifactError

FORMAT_VERSION = 1
READABLE_FORMATS = (1,)
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------
# The manifest's schema: what each field must hold, as data read top to bottom.


class Number:
    """A JSON number: an int or a float, not a bool."""


class AnyJson:
    """Any JSON value (for fields whose content another component owns)."""


@dataclass(frozen=True)
class Nullable:
    spec: Any


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys (strings, or paths when `key` is a RelPath), values of one kind."""

    value: Any
    key: Any = str


@dataclass(frozen=True)
class Record:
    """A JSON object with named fields. `optional` fields may be absent; a field not listed is
    an error unless the record is `open` (objects rebuilt with **kwargs stay closed)."""

    fields: dict[str, Any]
    optional: frozenset[str] = frozenset()
    open: bool = False


@dataclass(frozen=True)
class RelPath:
    """A path inside the artifact directory, relative to its subdirectory `base`."""

    base: str = ""


@dataclass(frozen=True)
class Matches:
    pattern: str
    description: str


SHA256 = Matches(r"[0-9a-f]{64}", "a sha256 hex digest")

# What every artifact's manifest holds; write_artifact fills these in.
ARTIFACT_FIELDS: dict[str, Any] = {
    "format_version": int,
    "flashc_version": str,
    "torch_version": str,
    "created": str,
    "files": MapOf(Record({"sha256": SHA256, "bytes": int}), key=RelPath()),
}
ARTIFACT_MANIFEST = Record(ARTIFACT_FIELDS, optional=frozenset({"flashc_version", "torch_version", "created"}),
                           open=True)

# What CompiledModel.save adds. `source`, `pipeline` and `fallbacks` mirror the dataclasses
# ModelSource, PassRecord and Fallback (tests/test_artifact_schema.py keeps them in step).
COMPILED_MODEL_MANIFEST = Record(
    {
        **ARTIFACT_FIELDS,
        "target": str,
        "profile": str,
        "level": int,
        "inputs": ListOf(Record({"name": str, "shape": ListOf(int), "dtype": str})),
        "out_spec": Nullable(str),  # torch.utils._pytree.treespec_dumps of the output structure
        "out_type": Nullable(str),  # the output's type by qualified name, for the warning when out_spec is None
        "source": Record({"kind": str, "name": str, "dtype": str, "seed": int, "batch": int, "seq_len": int,
                          "signature": str, "cache_len": int},
                         optional=frozenset({"dtype", "seed", "batch", "seq_len", "signature", "cache_len"})),
        "meta": Record({"capture": str, "capture_warning": str, "warnings": ListOf(str), "signature": str,
                        "vocab_size": int, "input_high": MapOf(int), "input_device": str, "profile": str},
                       optional=frozenset({"capture", "capture_warning", "warnings", "signature", "vocab_size",
                                           "input_high", "input_device", "profile"}), open=True),
        "pipeline": ListOf(Record({"name": str, "changed": bool, "stats": MapOf(Number), "seconds": Number,
                                   "nodes_before": int, "nodes_after": int, "max_error": Nullable(Number),
                                   "stage": str, "details": Nullable(ListOf(MapOf(AnyJson)))},
                                  optional=frozenset({"max_error", "stage", "details"}))),
        "fallbacks": ListOf(Record({"op": str, "count": int, "where": str})),
        "timings": MapOf(Number),
        "estimate": Record({"profile": str, "seconds": Number, "gflops": Number, "gbytes": Number, "kernels": int},
                           open=True),
        "payload": MapOf(RelPath("payload")),  # backend payload files, relative to payload/
        "external_weights": ListOf(str),  # weights another artifact holds (a generation artifact's decode entry)
    },
    optional=frozenset({"flashc_version", "torch_version", "created", "out_spec", "out_type", "meta", "timings",
                        "estimate", "payload", "external_weights"}),
    open=True,
)


# What GenerationModel.save adds: entry name -> its CompiledModel artifact's directory.
GENERATION_MANIFEST = Record(
    {**ARTIFACT_FIELDS, "kind": str, "entries": MapOf(RelPath()), "tokenizer": Nullable(str), "batch": int,
     "cache_len": int},
    optional=frozenset({"flashc_version", "torch_version", "created"}),
)


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}' {message}")


def _kind(spec: Any) -> str:
    if isinstance(spec, Nullable):
        return f"{_kind(spec.spec)} or null"
    if isinstance(spec, ListOf):
        return "a list"
    if isinstance(spec, (MapOf, Record)):
        return "an object"
    if isinstance(spec, RelPath):
        return "a relative path"
    if isinstance(spec, Matches):
        return spec.description
    return {int: "an integer", str: "a string", bool: "true or false", Number: "a number"}.get(spec, str(spec))


def _found(value: Any) -> str:
    name = {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{name} ({text[:40]}{'...' if len(text) > 40 else ''})"


_SCALAR_CHECKS = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    Number: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
}


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def check_fields(value: Any, spec: Any, field: str = "", paths: list | None = None) -> list[tuple[str, str, str]]:
    """Check `value` against `spec`; return the paths it names as (field, base, path).

    Raises _FieldError naming the first field that is missing, unknown or of the wrong type.
    """
    paths = [] if paths is None else paths
    if spec is AnyJson:
        return paths
    if isinstance(spec, Nullable):
        if value is None:
            return paths
        if isinstance(spec.spec, type) and not _SCALAR_CHECKS[spec.spec](value):
            raise _FieldError(field, f"must be {_kind(spec)}, found {_found(value)}")
        return check_fields(value, spec.spec, field, paths)
    if isinstance(spec, type):  # a scalar: int, str, bool or Number
        if not _SCALAR_CHECKS[spec](value):
            raise _FieldError(field, f"must be {_kind(spec)}, found {_found(value)}")
        return paths
    if isinstance(spec, Matches):
        if not isinstance(value, str) or not re.fullmatch(spec.pattern, value):
            raise _FieldError(field, f"must be {spec.description}, found {_found(value)}")
    elif isinstance(spec, RelPath):
        if not isinstance(value, str) or not value:
            raise _FieldError(field, f"must be a relative path, found {_found(value)}")
        paths.append((field, spec.base, value))
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _FieldError(field, f"must be a list, found {_found(value)}")
        for i, item in enumerate(value):
            check_fields(item, spec.item, f"{field}[{i}]", paths)
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise _FieldError(field, f"must be an object, found {_found(value)}")
        for key, item in value.items():
            sub = f"{field}[{json.dumps(key)}]"
            if isinstance(spec.key, RelPath):
                check_fields(key, spec.key, sub, paths)
            check_fields(item, spec.value, sub, paths)
    elif isinstance(spec, Record):
        if not isinstance(value, dict):
            raise _FieldError(field, f"must be an object, found {_found(value)}")
        for key in spec.fields:
            if key not in value and key not in spec.optional:
                raise _FieldError(_join(field, key), "is missing")
        if not spec.open:
            for key in value:
                if key not in spec.fields:
                    raise _FieldError(_join(field, key), f"is not a known field (known: {', '.join(spec.fields)})")
        for key, sub in spec.fields.items():
            if key in value:
                check_fields(value[key], sub, _join(field, key), paths)
    else:
        raise TypeError(f"not a schema spec: {spec!r}")
    return paths


# ---------------------------------------------------------------------------------------
# Paths named in a manifest stay inside the artifact.


def confine(root: Path, name: str, base: str = "", where: str = "") -> Path:
    """root/base/name, refused when it is absolute, climbs with '..' or resolves (through a
    symbolic link) to somewhere outside root."""
    rel = PurePosixPath(name)
    if (rel.is_absolute() or PureWindowsPath(name).drive or "\\" in name or "\0" in name
            or ".." in rel.parts):
        raise ArtifactError(f"{where}names {name!r}, which is not a relative path inside the artifact "
                            "(absolute paths and '..' are refused): the manifest was altered; recompile")
    full = root / base / rel
    resolved = _resolve(full)
    if resolved is None or not resolved.is_relative_to(root.resolve()):
        raise ArtifactError(f"{where}names {name!r}, which leads out of the artifact through a symbolic link "
                            f"(to {resolved}); copy the file into the artifact or recompile")
    return full


def _resolve(p: Path) -> Path | None:
    """p with every symbolic link followed; None for a link loop."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError on a loop
        return None


def check_links(root: Path) -> None:
    """Refuse any symbolic link under root that points out of it (links inside it are fine)."""
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked directories
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                resolved = _resolve(p)
                if resolved is None or not resolved.is_relative_to(real_root):
                    raise ArtifactError(f"{p}: a symbolic link pointing out of the artifact (to "
                                        f"{resolved or 'a loop'}); flashc reads only files inside the artifact: "
                                        "copy the file in or recompile")


# ---------------------------------------------------------------------------------------
# Files and weights.


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors needs contiguous CPU tensors that share no memory."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    try:
        save_file(out, str(path))
    except SafetensorError as e:
        # safetensors reports I/O failures as "... (os error N)": give them back as the OSError they are
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator gives


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, each at an address aligned as PyTorch allocates. safetensors gives them at
    whatever offset the file's header left (8 bytes apart, say), and CPU matrix kernels take other paths
    on such data: a loaded mixtral-tiny differed from the model it was saved from in the last bits on
    3 inputs in 60."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read safetensors weights ({e})") from None
    for name, t in tensors.items():
        if t.data_ptr() % ALIGNMENT:
            tensors[name] = t.clone()  # one at a time: the unaligned copy is freed before the next
    return tensors


# ---------------------------------------------------------------------------------------
# Saving.

# What to do about the filesystem errors a save meets, by errno.
_SAVE_ADVICE = {
    errno.EACCES: "choose a directory you can write to, or fix its permissions",
    errno.EPERM: "choose a directory you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: save somewhere writable",
    errno.ENOSPC: "free some space on the device or save elsewhere",
    errno.EDQUOT: "free some space within your quota or save elsewhere",
    errno.EFBIG: "a file exceeds the file system's or the process's size limit (ulimit -f): save elsewhere",
    errno.ENOTDIR: "a parent of the path is a file, not a directory: choose another path",
    errno.EEXIST: "a parent of the path is a file, not a directory: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "a parent of the path is a symbolic link loop: choose another path",
}


def _save_error(path: Path, step: str, e: OSError) -> ArtifactError:
    reason = (e.strerror or str(e)).replace("\n", " ")
    advice = _SAVE_ADVICE.get(e.errno, "check the path and the file system, then save again")
    return ArtifactError(f"{path}: cannot save the artifact: {step} failed ({reason}); {advice}")


def _is_manifest(text: str) -> bool:
    try:
        manifest = json.loads(text)
    except ValueError:
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int)
            and isinstance(manifest.get("files"), dict))


def _read_text_at(dir_fd: int, name: str) -> str | None:
    """The text of regular file `name` in the open directory dir_fd, None if there is none."""
    try:  # O_NONBLOCK: a FIFO planted under the name must not hang the check
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read().decode("utf-8", errors="replace")


def is_artifact(path: Path) -> bool:
    """Whether path is a directory holding a flashc manifest (of any format version)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        text = _read_text_at(fd, MANIFEST)
    finally:
        os.close(fd)
    return text is not None and _is_manifest(text)


def check_save_target(path: Path) -> None:
    """Refuse (ArtifactError) to save over anything but nothing, an empty directory or a flashc artifact.

    The directory is opened once and examined through that handle: a concurrent save may
    rename another directory to path meanwhile, and the answer must be about one of them.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as e:
        if path.is_symlink():
            raise ArtifactError(f"{path}: is a symbolic link; flashc does not replace links: save to the "
                                f"directory it points to ({path.resolve()}) or remove the link") from None
        if e.errno == errno.ENOTDIR and path.exists():
            raise ArtifactError(f"{path}: is a file, not an artifact directory; flashc will not replace it: "
                                "choose another path or remove the file yourself") from None
        raise _save_error(path, "checking what is at the path", e) from None
    try:
        text = _read_text_at(fd, MANIFEST)
        if (text is not None and _is_manifest(text)) or not os.listdir(fd):
            return
    except OSError as e:
        raise _save_error(path, "checking what is at the path", e) from None
    finally:
        os.close(fd)
    raise ArtifactError(f"{path}: exists and is not a flashc artifact (no flashc {MANIFEST} in it); flashc will "
                        "not delete it: choose another path, or empty or remove the directory yourself")


def _sibling_dir(path: Path, kind: str) -> Path:
    """A new, empty, uniquely named hidden directory next to path (made with the umask's mode)."""
    d = path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")
    d.mkdir()
    return d


# A concurrent writer can put its artifact in place between our move-aside and our rename;
# each round moves that one aside too. Rounds are cheap (renames only); this bounds a livelock.
_SWAP_ROUNDS = 1000


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished directory tmp to path, moving an artifact already there aside first."""
    moved_aside: list[Path] = []
    try:
        for _ in range(_SWAP_ROUNDS):
            try:
                os.replace(tmp, path)  # succeeds onto nothing or onto an empty directory
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            check_save_target(path)
            old = _sibling_dir(path, "old")
            moved_aside.append(old)
            try:
                os.replace(path, old)
            except FileNotFoundError:
                pass  # another writer moved it first
        raise ArtifactError(f"{path}: other writers kept replacing the artifact while this save tried "
                            f"{_SWAP_ROUNDS} times to put its own in place; save again when they are done")
    finally:
        for old in moved_aside:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(d: Path) -> None:
    """Make a rename inside d durable; some file systems cannot, which costs only durability."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_artifact(path: str | os.PathLike, manifest: dict[str, Any],
                   writers: dict[str, Callable[[Path], None]], schema: Record = ARTIFACT_MANIFEST) -> Path:
    """Write files (name -> writer(path)) and the manifest with their checksums, atomically.

    Replaces only a flashc artifact or an empty directory at path (ArtifactError otherwise);
    filesystem failures become an ArtifactError naming path and what to do. The manifest
    written is checked against `schema` first, so save never writes what load would refuse.
    """
    from flashc import __version__

    given = Path(path)
    path = Path(os.path.abspath(given))
    check_save_target(path)  # fail before the work, and again at the swap
    step = f"creating {path.parent}"
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        step = f"creating a temporary directory in {path.parent}"
        tmp = _sibling_dir(path, "tmp")
        for name, write in writers.items():
            step = f"writing {name}"
            write(tmp / name)
        step = "computing checksums"
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "flashc_version": __version__,
                    "torch_version": torch.__version__, "files": files,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            check_fields(manifest, schema)
        except _FieldError as e:
            raise ArtifactError(f"{path}: flashc built an invalid {MANIFEST} ({e}); this is a flashc bug") from None
        step = f"writing {MANIFEST}"
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        step = "flushing the files to disk"
        _fsync_tree(tmp)
        step = "renaming the finished artifact into place"
        _move_into_place(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise _save_error(path, step, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return given


def swap_file(path: str | os.PathLike, old: str, new: str, data: bytes,
              edit: Callable[[dict], None] | None = None) -> None:
    """Replace file `old` of the artifact at `path` by `data` stored as `new`, crash-safe.

    The new file is written first under its new name, then the manifest (checksums,
    and whatever `edit` changes) is replaced atomically, then the old file goes: at
    every moment the manifest names files that exist with the checksums it lists.
    Filesystem failures stay OSError (the CUDA backend turns them into a warning).
    """
    path = Path(path)
    if old == new:
        raise ValueError("swap_file needs a new name for the new content (the old file stays valid until the swap)")
    manifest = json.loads((path / MANIFEST).read_text())
    target = confine(path, new, where=f"{path}: swap_file ")
    old_file = confine(path, old, where=f"{path}: swap_file ")
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
    old_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Loading.


def _check_format(mpath: Path, manifest: dict) -> None:
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{mpath}: field 'format_version' must be an integer, found {_found(version)}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: field 'format_version': artifact format {version} was written by flashc "
                            f"{manifest.get('flashc_version', '?')}; this flashc reads format <= {FORMAT_VERSION}: "
                            "upgrade flashc or recompile")
    if version not in READABLE_FORMATS:
        raise ArtifactError(f"{mpath}: field 'format_version': unknown artifact format {version}; this flashc "
                            f"reads formats {', '.join(map(str, READABLE_FORMATS))}: recompile")


def read_manifest(path: str | os.PathLike, verify: bool = True, schema: Record = ARTIFACT_MANIFEST) -> dict[str, Any]:
    """Read an artifact's manifest, check it against `schema` and keep the paths it names inside
    the artifact; by default also check every listed file's size and sha256."""
    path = Path(path)
    try:
        if not path.exists():
            raise ArtifactError(f"{path}: no such artifact (compile one with `flashc compile ... -o {path}`)")
        if not path.is_dir():
            raise ArtifactError(f"{path}: an artifact is a directory, this is a file")
        mpath = path / MANIFEST
        if not mpath.exists() and not mpath.is_symlink():
            raise ArtifactError(f"{mpath}: missing; {path} is not a flashc artifact or was not written completely")
        check_links(path)
        if not mpath.is_file():
            raise ArtifactError(f"{mpath}: not a regular file; {path} is not a flashc artifact")
        text = mpath.read_text()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror or e}); check its permissions") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt JSON ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest or "files" not in manifest:
        raise ArtifactError(f"{mpath}: not a flashc manifest (no format_version/files)")
    _check_format(mpath, manifest)
    try:
        paths = check_fields(manifest, schema)
    except _FieldError as e:
        raise ArtifactError(f"{mpath}: {e}; the manifest is damaged or was edited: recompile") from None
    for field, base, name in paths:
        confine(path, name, base, where=f"{mpath}: field '{field}' ")
    written_torch = manifest.get("torch_version", "")
    if written_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(f"{path}: written with torch {written_torch or '?'}, running torch {torch.__version__}; "
                      "graph ops are resolved by name and checked on load", stacklevel=2)
    if verify:
        for name, info in manifest["files"].items():
            f = path / name
            try:
                if not f.exists():
                    raise ArtifactError(f"{f}: missing (listed in the manifest)")
                if not f.is_file():
                    raise ArtifactError(f"{f}: not a regular file (listed in the manifest as one)")
                size = f.stat().st_size
                if size != info["bytes"]:
                    raise ArtifactError(f"{f}: truncated or altered: {size} bytes, manifest says {info['bytes']}")
                if sha256_file(f) != info["sha256"]:
                    raise ArtifactError(f"{f}: sha256 does not match the manifest: corrupt or tampered with")
            except OSError as e:
                raise ArtifactError(f"{f}: cannot read ({e.strerror or e}); check its permissions") from None
    return manifest
