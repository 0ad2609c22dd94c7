"""The compile report: tables a person reads after a compile (rendered with rich)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashc.cost_model import Estimate, human_bytes, human_seconds
from flashc.profiles import HardwareProfile


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

    def fused(self) -> dict[str, int]:
        """Total replacements per rule/pattern across fusion passes."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.name.startswith(("fuse", "merge")):
                for k, v in r.stats.items():
                    out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "profile": self.profile.name, "level": self.level,
                "fused": self.fused(), "estimate": self.estimate.summary(), "timings": self.timings,
                "fallbacks": [f.__dict__ for f in self.fallbacks]}

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
        if self.accuracy:
            acc = Table(title="accuracy vs the float model", title_justify="left")
            for col in ("metric", "baseline", "compiled", "change"):
                acc.add_column(col)
            for row in self.accuracy:
                acc.add_row(*[str(c) for c in row])
            console.print(acc)
        return console.export_text()

    def __str__(self) -> str:
        return self.render()


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass
