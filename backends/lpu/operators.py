"""Measured GPU operator times (an operator table) that the simulator composes into a prefill.

The accepted way to predict an LLM's end-to-end time on a GPU is operator profiling (Vidur:
A. Agrawal et al., "Vidur: A Large-Scale, High-Fidelity Simulation Framework for LLM
Inference", MLSys 2024, arXiv:2405.05187): time every operator shape the model runs, alone,
on the GPU, and let the simulator add them up; the end-to-end runs then check the sum
instead of being fitted. `bench/gpu_op_rates.py` measures the table (the schema is in
`backends/lpu/data/README.md`); a GPU `SystemProfile` names it in its `operators` field
(the built-in profile `<name>` takes `backends/lpu/data/<name>_operators.json` when that
file exists; `flashc simulate --operators FILE` names another).

Which time an op of a prefill phase takes (`OperatorTable.matmul_time`, `attention_time`):

- a matmul of M rows, K inputs, N outputs (its shape on one chip): the table's time at
  exactly (M, K, N) ("measured"); else the entry of the same K and N whose M is nearest (by
  ratio), when within a factor `NEAREST_FACTOR`, its time scaled by the FLOPs ratio M / M'
  ("scaled"); else nothing, and the profile's peak rate applies ("roofline").
- causal attention of S queries after P cached keys, with H query heads, G key/value heads
  and head size D: the table's time at S = the entry's length when P = 0 and one sequence
  ("measured"); else the causal entry with the same H, G, D whose query-key pairs are
  nearest (by ratio), within `NEAREST_FACTOR` squared (a factor in length), its time scaled
  by the pairs ratio ("scaled"); else the roofline.

Decode keeps its own costs (the fused-GEMV fit of `bench/gemv_shapes.py`): the table is
read for prefill phases only. A table time is one kernel's whole time as it runs back to
back with other kernels (launch gap, ramp and tail included), so the simulator adds no
per-kernel latency to an op it times from the table.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from flashc.errors import InputError

DATA_DIR = Path(__file__).resolve().parent / "data"

# How far from a measured shape the table still answers (scaled by FLOPs): a factor 2 in
# rows is the spacing of bench/gpu_op_rates.py's prompt lengths (1024, 2048, 4096). Beyond
# it a GEMM's efficiency changes too much with its shape (tiles, waves over the SMs) to scale.
NEAREST_FACTOR = 2.0

_TOP_REQUIRED = {"device": str, "torch": str, "date": str, "matmul": list, "attention": list,
                 "copy_bandwidth": float}
_TOP_OPTIONAL = {"profile": str, "triton": str, "method": str, "models": list, "prompts": list}
_MATMUL_FIELDS = ("m", "k", "n", "seconds")
_MATMUL_OPTIONAL = ("tflops",)
_ATTENTION_FIELDS = ("s", "heads", "kv_heads", "head_dim", "causal", "seconds")


@dataclass(frozen=True)
class MatmulEntry:
    m: int
    k: int
    n: int
    seconds: float


@dataclass(frozen=True)
class AttentionEntry:
    s: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    seconds: float

    @property
    def pairs(self) -> float:
        """Query-key pairs one head scores (as `costs.Phase.pairs` counts them)."""
        return self.s * (self.s + 1) / 2 if self.causal else float(self.s * self.s)


@dataclass(frozen=True)
class Lookup:
    seconds: float
    source: str  # "measured" (the exact shape) or "scaled" (the nearest shape, scaled by FLOPs)


@dataclass(frozen=True)
class OperatorTable:
    """Operator times measured on one GPU (`bench/gpu_op_rates.py`), read from `path`."""

    path: str
    device: str
    torch: str
    date: str
    copy_bandwidth: float  # bytes/s of a large device copy (read + written), same run
    matmul: tuple[MatmulEntry, ...]
    attention: tuple[AttentionEntry, ...]
    profile: str = ""  # the flashc profile the device maps to, when the file says

    def describe(self) -> str:
        return f"{self.path} ({self.device}, torch {self.torch}, {self.date})"

    def matmul_time(self, m: int, k: int, n: int) -> Lookup | None:
        same = [e for e in self.matmul if e.k == k and e.n == n]
        for e in same:
            if e.m == m:
                return Lookup(e.seconds, "measured")
        near = _nearest(same, m, lambda e: e.m, NEAREST_FACTOR)
        return Lookup(near.seconds * m / near.m, "scaled") if near else None

    def attention_time(self, heads: int, kv_heads: int, head_dim: int, sequences: int, queries: int,
                       prefix: int) -> Lookup | None:
        """Causal attention of `queries` new tokens after `prefix` cached ones, per sequence."""
        same = [e for e in self.attention
                if e.causal and (e.heads, e.kv_heads, e.head_dim) == (heads, kv_heads, head_dim)]
        if sequences == 1 and prefix == 0:
            for e in same:
                if e.s == queries:
                    return Lookup(e.seconds, "measured")
        pairs = sequences * (queries * prefix + queries * (queries + 1) / 2)
        near = _nearest(same, pairs, lambda e: e.pairs, NEAREST_FACTOR ** 2)
        return Lookup(near.seconds * pairs / near.pairs, "scaled") if near else None


def _nearest(entries, value: float, size, factor: float):
    """The entry whose size is nearest `value` by ratio, if within `factor`; else None."""
    if not entries or value <= 0:
        return None
    best = min(entries, key=lambda e: abs(math.log(value / size(e))))
    return best if abs(math.log(value / size(best))) <= math.log(factor) + 1e-12 else None


# ---------------------------------------------------------------------------------------
# Reading and validating a table: InputError names the file and the field.


def operator_table_from_dict(data: Any, where: str) -> OperatorTable:
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: an operator table is a JSON object, got {type(data).__name__}")
    known = sorted({*_TOP_REQUIRED, *_TOP_OPTIONAL})
    for key in data:
        if key not in known:
            raise InputError(f"{where}: unknown field {key!r}; fields: {', '.join(known)}")
    for key, kind in _TOP_REQUIRED.items():
        if key not in data:
            raise InputError(f"{where}: field {key!r} is missing (bench/gpu_op_rates.py writes it)")
        if kind is float:
            _positive(data[key], f"{where}: field {key!r}")
        elif not isinstance(data[key], kind):
            raise InputError(f"{where}: field {key!r} must be a JSON {'string' if kind is str else 'list'}, "
                             f"got {data[key]!r}")
    for key, kind in _TOP_OPTIONAL.items():
        if key in data and not isinstance(data[key], kind):
            raise InputError(f"{where}: field {key!r} must be a JSON {'string' if kind is str else 'list'}, "
                             f"got {data[key]!r}")
    matmul = [MatmulEntry(**_entry(e, f"{where}: matmul[{i}]", _MATMUL_FIELDS, _MATMUL_OPTIONAL))
              for i, e in enumerate(data["matmul"])]
    attention = [AttentionEntry(**_entry(e, f"{where}: attention[{i}]", _ATTENTION_FIELDS, ()))
                 for i, e in enumerate(data["attention"])]
    for i, e in enumerate(attention):
        if e.heads % e.kv_heads:
            raise InputError(f"{where}: attention[{i}]: field 'heads' ({e.heads}) must be a multiple of "
                             f"'kv_heads' ({e.kv_heads})")
    _no_duplicates(matmul, lambda e: (e.m, e.k, e.n), f"{where}: matmul", "m, k, n")
    _no_duplicates(attention, lambda e: (e.s, e.heads, e.kv_heads, e.head_dim, e.causal), f"{where}: attention",
                   "s, heads, kv_heads, head_dim, causal")
    return OperatorTable(where, data["device"], data["torch"], data["date"], float(data["copy_bandwidth"]),
                         tuple(matmul), tuple(attention), data.get("profile", ""))


def _entry(e: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    if not isinstance(e, Mapping):
        raise InputError(f"{where}: an entry is a JSON object of {', '.join(required)}, got {e!r}")
    for key in e:
        if key not in required and key not in optional:
            raise InputError(f"{where}: unknown field {key!r}; fields: {', '.join(required + optional)}")
    out = {}
    for key in required:
        if key not in e:
            raise InputError(f"{where}: field {key!r} is missing")
        value = e[key]
        if key == "seconds":
            out[key] = _positive(value, f"{where}: field 'seconds'")
        elif key == "causal":
            if not isinstance(value, bool):
                raise InputError(f"{where}: field 'causal' must be true or false, got {value!r}")
            out[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
            out[key] = value
    for key in optional:
        if key in e:
            _positive(e[key], f"{where}: field {key!r}")
    return out


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _no_duplicates(entries, key, where: str, fields: str) -> None:
    seen: dict = {}
    for i, e in enumerate(entries):
        if key(e) in seen:
            raise InputError(f"{where}[{i}] repeats the shape of entry {seen[key(e)]} ({fields} = {key(e)}); "
                             "keep one time per shape")
        seen[key(e)] = i


def load_operator_table(path: str | Path) -> OperatorTable:
    """Read and validate an operator table file (cached while the file is unchanged)."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read the operator table ({e.strerror or e}); bench/gpu_op_rates.py "
                         "writes one on a GPU") from None
    return _load(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=32)
def _load(path: str, mtime_ns: int, size: int) -> OperatorTable:
    return operator_table_from_dict(read_json(path, "the operator table"), path)


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's data; InputError naming the file and `what` it was meant to be, or where the JSON breaks."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def builtin_table_path(profile: str) -> Path:
    """Where a built-in GPU profile's measured table lives (used when the file exists)."""
    return DATA_DIR / f"{profile}_operators.json"


def operator_table(profile) -> OperatorTable | None:
    """The operator table a SystemProfile names, or None."""
    return load_operator_table(profile.operators) if getattr(profile, "operators", "") else None


__all__ = ["OperatorTable", "MatmulEntry", "AttentionEntry", "Lookup", "load_operator_table",
           "operator_table_from_dict", "operator_table", "builtin_table_path", "NEAREST_FACTOR", "DATA_DIR"]
