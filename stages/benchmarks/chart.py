"""The run report's benchmark figure: accuracy per instruction type, one bar per model (start vs trained).

Reads only flat metrics (`eval/NAME/strict/ID`, as stages/benchmarks/scores.py names them), so it draws
from a run's summary.json without the checker packages. matplotlib's Figure without pyplot, like
stages/report/.
"""

from __future__ import annotations

from typing import Any

MODES = ("strict", "loose")


def benchmark_names(metrics: dict[str, Any]) -> list[str]:
    """The benchmarks whose per-type accuracies `metrics` holds (`eval/NAME/strict/ID`)."""
    return sorted({key.split("/")[1] for key in metrics if key.startswith("eval/") and key.count("/") >= 3 and key.split("/")[2] == "strict"})


def per_type(metrics: dict[str, Any], name: str, mode: str = "strict") -> dict[str, float]:
    """Instruction id -> accuracy of benchmark `name` in `mode`."""
    prefix = f"eval/{name}/{mode}/"
    return {key[len(prefix):]: float(value) for key, value in metrics.items() if key.startswith(prefix)}


def per_type_figure(name: str, models: list[tuple[str, dict[str, float]]], mode: str = "strict") -> Any:
    """Horizontal bars: for every instruction type any model was scored on, one bar per (label, accuracies)."""
    from matplotlib.figure import Figure

    types = sorted({instruction_id for _, accuracies in models for instruction_id in accuracies}, reverse=True)
    height = max(3.0, 0.16 * len(types) * max(1, len(models)) + 1.2)
    figure = Figure(figsize=(7.0, height), layout="constrained")
    axes = figure.add_subplot()
    bar = 0.8 / max(1, len(models))
    for index, (label, accuracies) in enumerate(models):
        positions = [row + (index - (len(models) - 1) / 2) * bar for row in range(len(types))]
        axes.barh(positions, [accuracies.get(t, 0.0) for t in types], height=bar, color=f"C{index}", label=label)
    axes.set_yticks(range(len(types)), types, fontsize=7)
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"{mode} accuracy (share of instructions of the type followed)")
    axes.set_title(f"{name}: {mode} accuracy per instruction type")
    axes.grid(alpha=0.3, axis="x")
    axes.legend(fontsize=8, loc="lower right")
    return figure
