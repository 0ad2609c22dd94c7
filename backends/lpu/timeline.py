"""A per-chip timeline picture of a schedule (PNG), drawn with matplotlib.

matplotlib is an optional extra (`pip install flashc[plot]`); it is imported only when a
picture is drawn, and a missing install is a FlashcError saying what to install.
"""

from __future__ import annotations

from pathlib import Path

from flashc.backends.lpu.schedule import Schedule
from flashc.errors import FlashcError

INSTALL_PLOT = "pip install 'flashc[plot]' (matplotlib>=3.7)"
COLORS = {"op:matrix": "#1f77b4", "op:vector": "#2ca02c", "reduce": "#17becf", "transfer": "#ff7f0e",
          "collective": "#d62728"}


LANES = ("stream", "matrix", "vector", "links")


def _lane(task) -> str:
    return task.unit if task.unit in LANES else "links"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a FlashcError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashcError(f"drawing a picture needs matplotlib: {INSTALL_PLOT}") from None
    return plt


def draw_timeline(schedule: Schedule, path: str | Path, title: str = "", max_chips: int = 16) -> Path:
    """Draw one row per chip and unit (matrix, vector, its links) and save it as a PNG.

    Large plans show their first `max_chips` chips (the title says so).
    """
    plt = pyplot()
    chips = sorted({t.chip for t in schedule.tasks})
    shown = set(chips[:max_chips])
    rows: dict[tuple[int, str], int] = {}
    for t in schedule.tasks:
        if t.chip in shown:
            rows.setdefault((t.chip, _lane(t)), 0)
    order = sorted(rows, key=lambda k: (k[0], LANES.index(k[1])))
    for i, key in enumerate(order):
        rows[key] = i
    scale = 1e6 / schedule.clock_hz  # cycles -> microseconds
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.28 * len(order) + 1.2)))
    for t in schedule.tasks:
        if t.chip not in shown:
            continue
        color = COLORS.get(f"op:{t.work}" if t.kind == "op" else t.kind, "#7f7f7f")
        width = max(t.end - t.start, 1) * scale
        ax.broken_barh([(t.start * scale, width)], (rows[(t.chip, _lane(t))] - 0.4, 0.8), facecolors=color,
                       edgecolor="white", linewidth=0.2)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"chip {c} {lane}" for c, lane in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (us)")
    more = f" (first {max_chips} of {len(chips)} chips)" if len(chips) > max_chips else ""
    ax.set_title((title or f"schedule on {schedule.profile}") + more, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, ["matrix op", "vector op", "reduction", "transfer", "collective"], fontsize=7,
              loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(parameter: str, values: list, series: dict[str, list[float]], path: str | Path,
               title: str = "") -> Path:
    """A line plot of predicted figures against a swept parameter (one line per series)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4))
    if len(series) == 1:
        axes = [axes]
    for ax, (name, ys) in zip(axes, series.items()):
        ax.plot(values, ys, marker="o")
        ax.set_xlabel(parameter)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["draw_timeline", "plot_sweep", "pyplot", "INSTALL_PLOT"]
