"""The compile report: tables a person reads after a compile (rendered with rich), and the
same facts as data (`CompileReport.to_dict`, written by `flashc compile --report-json`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flashc.cost_model import Estimate, human_bytes, human_seconds
from flashc.profiles import HardwareProfile

#: Version of the dict `CompileReport.to_dict` returns; raise it when a key changes meaning
#: or goes away (adding a key does not).
REPORT_SCHEMA = 1


@dataclass
class CompileReport:
    model: str
    target: str
    profile: HardwareProfile
    level: int
    capture: str
    warnings: list[str]
    records: list
    fallbacks: list
    estimate: Estimate
    timings: dict[str, float]
    weights: int
    weight_bytes: int
    accuracy: list | None = None
    rewrites: dict[str, list[list[str]]] | None = None  # model-level rewrites, a table each

    def fused(self) -> dict[str, int]:
        """Total replacements per rule/pattern across fusion passes (merges and the decode-attention
        rewrite included)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.name.startswith(("fuse", "merge")) or r.name == "decode_attention":
                for k, v in r.stats.items():
                    out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything the rendered report shows, as JSON-serializable data (see REPORT_SCHEMA).

        `passes` has one row per pass record, in the order they ran, with its `stage`
        ("pipeline": the level's passes). Times are seconds, sizes bytes; a non-finite
        float (a NaN error) is written as the string "nan" or "inf", never as invalid JSON.
        """
        est = self.estimate
        return json_safe({
            "schema": REPORT_SCHEMA, "kind": "compile",
            "model": self.model, "target": self.target, "profile": self.profile.name, "level": self.level,
            "capture": self.capture, "warnings": list(self.warnings),
            "passes": [_pass_row(r) for r in self.records],
            "fusions": self.fused(),
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "estimate": {**est.summary(), "bytes": est.bytes, "flops": est.flops,
                         "top": [{"node": n.node, "op": n.op, "layer": n.layer, "shape": list(n.shape),
                                  "dtype": n.dtype, "seconds": n.seconds, "bound": n.bound} for n in est.top(5)]},
            "timings": dict(self.timings),
            "weights": {"tensors": self.weights, "bytes": self.weight_bytes},
            "accuracy": None if self.accuracy is None else [_accuracy_row(r) for r in self.accuracy],
            "rewrites": {k: [list(r) for r in rows] for k, rows in (self.rewrites or {}).items()},
        })

    def render(self, width: int = 110) -> str:
        from rich.console import Console
        from rich.table import Table

        console = Console(record=True, width=width, file=_Null(), force_terminal=False, color_system=None)
        console.print(f"[bold]flashc compile report[/]  model={self.model}  target={self.target}  "
                      f"profile={self.profile.name}  -O{self.level}")
        console.print(f"capture: {self.capture}   weights: {self.weights} tensors, {human_bytes(self.weight_bytes)}   "
                      + "   ".join(f"{k}: {human_seconds(v)}" for k, v in self.timings.items()))
        for w in self.warnings:
            console.print(f"warning: {w}")
        passes = Table(title="passes", title_justify="left")
        for col in ("pass", "changed", "what it did", "nodes", "time", "max rel. error"):
            passes.add_column(col)
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v) or "-"
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            passes.add_row(r.name, "yes" if r.changed else "no", stats, f"{r.nodes_before}->{r.nodes_after}",
                           human_seconds(r.seconds), err)
        console.print(passes)
        fused = {k: v for k, v in self.fused().items() if v}
        if fused:
            console.print("fused: " + ", ".join(f"{k} x{v}" for k, v in fused.items()))
        for r in self.records:
            if getattr(r, "details", None):
                console.print(_details_table(r))
        if self.fallbacks:
            fb = Table(title="ops left to the reference implementation (PyTorch)", title_justify="left")
            for col in ("op", "count", "first seen at"):
                fb.add_column(col)
            for f in self.fallbacks:
                fb.add_row(f.op, str(f.count), f.where)
            console.print(fb)
        else:
            console.print("fallbacks: none (the backend runs every op of the graph)")
        est = self.estimate
        console.print(f"cost model on {self.profile.name}: {human_seconds(est.seconds)} per forward, "
                      f"{est.flops / 1e9:.2f} GFLOP, {human_bytes(est.bytes)} moved, {est.kernels} kernels")
        top = Table(title="top time sinks (estimated)", title_justify="left")
        for col in ("op", "layer", "shape", "time", "bound"):
            top.add_column(col)
        for n in est.top(5):
            top.add_row(n.op, n.layer, str(list(n.shape)), human_seconds(n.seconds), n.bound)
        console.print(top)
        for title, rows in (self.rewrites or {}).items():
            rw = Table(title=title, title_justify="left")
            rw.add_column("what")
            rw.add_column("value")
            for row in rows:
                rw.add_row(*row)
            console.print(rw)
        if self.accuracy:
            acc = Table(title="accuracy vs the float model", title_justify="left")
            for col in ("metric", "baseline", "compiled", "change"):
                acc.add_column(col)
            for row in self.accuracy:
                acc.add_row(*(row.cells() if hasattr(row, "cells") else [str(c) for c in row]))
            console.print(acc)
        return console.export_text()

    def __str__(self) -> str:
        return self.render()


PRUNE_PASSES = ("prune_weights", "sparsify_activations", "predict_mlp_sparsity", "prune_ffn_channels")


def _details_table(record):
    """A pass's per-item rows (e.g. each quantized layer: scheme, bits, bytes before and after)."""
    from rich.table import Table

    if record.name in PRUNE_PASSES:
        return _prune_table(record)
    title = "quantization" if record.name.startswith("quantize") else record.name
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold")
    for col in ("op", "scheme", "bytes", "rel. output error"):
        table.add_column(col, no_wrap=True)
    table.add_column("note", overflow="fold")
    before = after = 0
    for d in _merge_skipped(record.details):
        scheme = str(d.get("status", "-"))
        if scheme == "quantized" and d.get("scheme"):  # weights and activations: 'w8a8-smoothquant', 'fp8'
            scheme = str(d["scheme"])
        elif scheme == "quantized":
            group = d.get("group_size")
            scheme = (f"int{d.get('bits')} {d.get('method')} " + (f"g{group}" if group != "channel" else "per-ch")
                      + (" sym" if d.get("symmetric") else ""))
        elif scheme == "skipped":
            scheme = "float (skipped)"
        error = d.get("rel_error")
        b, a = d.get("bytes_before"), d.get("bytes_after")
        before += b or 0
        after += a or 0
        size = "-" if b is None else f"{human_bytes(b)} -> {human_bytes(a)}"
        table.add_row(str(d.get("layer", "-")), str(d.get("op", "-")), scheme, size,
                      "-" if error is None else f"{error:.2e}", str(d.get("note", "")))
    table.add_row("all listed", "", "", f"{human_bytes(before)} -> {human_bytes(after)}", "", "")
    return table


def _prune_table(record):
    """A pruning pass's rows: per layer (or per sparsified input, or per MLP) the pattern, the
    sparsity reached and the parameters before and after (nonzero ones; for online sparsity the
    weights a token reads through the input, at the sparsity measured on held-out rows; for Deja
    Vu's predictors those it reads through the MLP, the predictor's own included)."""
    from rich.table import Table

    online = record.name in ("sparsify_activations", "predict_mlp_sparsity")
    method = next((d["method"] for d in record.details if d.get("method")), None)
    title = {"online": "online activations", "dejavu": "Deja Vu predictors", "ffn": "ffn channels"}.get(method, method)
    table = Table(title="pruning" + (f" ({title})" if title else ""), title_justify="left")
    table.add_column("layer", overflow="fold", ratio=3)
    table.add_column("pattern", overflow="fold", ratio=1)
    for col in ("sparsity", "reads/token" if online else "nonzero params", "rel. error"):
        table.add_column(col, no_wrap=True)
    table.add_column("note", overflow="fold", ratio=3)
    before = after = 0
    for d in _merge_skipped(record.details):
        status = d.get("status")
        pattern = {"skipped": "dense (skipped)", "dense": "dense", "warning": "-"}.get(status, d.get("pattern"))
        b, a = d.get("params_before"), d.get("params_after")
        before += b or 0
        after += a or 0
        sparsity = d.get("sparsity")
        error = d.get("rel_error")
        op = str(d.get("op", "linear"))
        layer = str(d.get("layer", "-")) + ("" if op == "linear" else f" ({op})")
        table.add_row(layer, pattern,
                      "-" if sparsity is None else f"{sparsity:.1%}",
                      "-" if b is None else f"{_count(b)} -> {_count(a)}",
                      "-" if error is None else f"{error:.2e}", str(d.get("note", "")))
    table.add_row("all listed", "", f"{1 - after / before:.1%}" if before else "-",
                  f"{_count(before)} -> {_count(after)}", "", "")
    return table


def _count(n: float) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _merge_skipped(details: list[dict]) -> list[dict]:
    """Skipped items with the same note as one row ('model.layers.0.mlp.gate and 7 more')."""
    merged: dict[tuple, dict] = {}
    out = []
    for d in details:
        if d.get("status") != "skipped":
            out.append(d)
            continue
        key = (d.get("op"), d.get("note"))
        if key not in merged:
            merged[key] = dict(d, count=1)
            out.append(merged[key])
        else:
            m = merged[key]
            m["count"] += 1
            for total in ("bytes_before", "bytes_after", "params_before", "params_after"):
                if total in d:
                    m[total] = (m.get(total) or 0) + (d.get(total) or 0)
    for m in merged.values():
        if m["count"] > 1:
            m["layer"] = f"{m['layer']} and {m['count'] - 1} more"
    return out


def _pass_row(record) -> dict[str, Any]:
    row = asdict(record)
    row.setdefault("stage", "pipeline")  # records that do not say ran in the level's pipeline
    return row


def _accuracy_row(row) -> dict[str, Any]:
    """An accuracy row as data: an AccuracyRow's own dict, or the four printed cells of one
    (metric, baseline, compiled, change) with the numbers read back, rounded as printed."""
    if hasattr(row, "to_dict"):
        return row.to_dict()
    metric, baseline, value, change = (str(c) for c in row)
    percent = _number(change.removesuffix("%"))
    return {"metric": metric, "baseline": _number(baseline), "model": _number(value),
            "relative_change": None if percent is None else percent / 100, "cells": [metric, baseline, value, change]}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "-" or a note ("not measured")


def json_safe(value):
    """`value` with tuples as lists and non-finite floats as strings ("nan", "inf"), so
    json.dumps(..., allow_nan=False) accepts it; anything else JSON cannot hold is an error
    here, not later."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"compile report: {type(value).__name__} {value!r} is not JSON data")


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as JSON to `path` atomically: a temporary file in the same directory,
    flushed to disk, then renamed over `path`, so a reader never sees half a file.
    Non-finite floats are written as strings (see `json_safe`)."""
    from flashc.errors import FlashcError

    path = Path(path)
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    tmp = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False, encoding="utf-8") as f:
            tmp = Path(f.name)
            os.chmod(tmp, 0o644)  # a report is for reading; mkstemp's 0600 would hide it from others
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise FlashcError(f"{path}: cannot write the report ({e.strerror or e}); choose another path") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass
