"""The report's figures: training curves per stage, PPO's time split and the over-optimisation plot, drawn from the
histories a run leaves on disk (stages/report/__init__.py reads them). Matplotlib without pyplot: no global state,
no display.

May import: the standard library and matplotlib (lazily); the records it draws come from the package.
"""

from __future__ import annotations

import fnmatch
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.report import RunRecord

STAGE_TITLES = {"sft": "SFT", "reward": "Reward model", "policy": "Policy"}


@dataclass(frozen=True)
class Panel:
    """One figure: a metric of one stage over training steps."""

    stage: str
    title: str
    keys: tuple[str, ...]  # the first key a history holds wins: TRL's trainers and our PPO name metrics differently
    algorithm: str | tuple[str, ...] | None = None  # a panel of these policy algorithms only: not listed as missing for others

    def applies_to(self, algorithms: set[str | None]) -> bool:
        wanted = (self.algorithm,) if isinstance(self.algorithm, str) else self.algorithm
        return wanted is None or bool(set(wanted) & algorithms)


PANELS = (
    Panel("sft", "SFT training loss", ("loss",)),
    Panel("reward", "Reward model training loss", ("loss",)),
    Panel("reward", "Reward model pairwise accuracy", ("accuracy",)),
    Panel("reward", "Reward model reward margin", ("margin",)),
    Panel("policy", "Policy training loss", ("loss", "ppo/policy_loss")),
    Panel("policy", "Policy reward", ("ppo/reward_raw", "reward")),
    Panel("policy", "Policy KL to reference", ("ppo/kl", "kl")),
    Panel("policy", "Policy entropy", ("ppo/entropy", "entropy")),
    Panel("policy", "Policy response length", ("ppo/response_length", "completions/mean_length")),
    # DPO has no sampled reward or KL while training; its implicit reward is what it logs.
    Panel("policy", "DPO preference accuracy", ("rewards/accuracies",), algorithm="dpo"),
    Panel("policy", "DPO implicit reward margin", ("rewards/margins",), algorithm="dpo"),
)
TIME_SPLIT = Panel("policy", "PPO time per phase", ("time/generation", "time/scoring", "time/training"), algorithm="ppo")
# Proxy (reward model) and gold (verifier) reward against KL to the reference, after Gao et al. 2022: where the
# proxy still climbs and the gold reward turns down, the policy is exploiting the reward model. Keys: x, proxy, gold.
OVEROPTIMISATION = Panel(
    "policy", "Over-optimisation: proxy and gold reward against KL",
    ("ppo/kl|kl", "ppo/proxy_reward|rewards/*/mean", "ppo/gold_reward|rewards/exact_answer_reward/mean"),
    algorithm=("ppo", "grpo", "rloo"),
)


# -- figures -------------------------------------------------------------------------------------

def draw_figures(runs: list[RunRecord], directory: Path) -> str:
    """Draw every panel some run has data for; returns the HTML of the figure sections."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = []
    for stage, stage_title in STAGE_TITLES.items():
        if not any(stage in run.stages for run in runs):
            continue
        figures, missing = [], []
        algorithms = {run.stages[stage].algorithm for run in runs if stage in run.stages}
        for panel in [p for p in (*PANELS, TIME_SPLIT, OVEROPTIMISATION) if p.stage == stage and p.applies_to(algorithms)]:
            special = {TIME_SPLIT.title: _time_split_figure, OVEROPTIMISATION.title: _overoptimisation_figure}.get(panel.title)
            figure = special(runs) if special else _curve_figure(panel, runs)
            if figure is None:
                missing.append(panel.title)
                continue
            filename = f"{re.sub(r'[^a-z0-9]+', '_', panel.title.lower()).strip('_')}.png"
            figure.savefig(directory / filename, dpi=100, metadata={"Title": panel.title})
            figures.append(
                f"<figure><img src='figures/{filename}' alt='{html.escape(panel.title)}' width=560 height=340>"
                f"<figcaption>{html.escape(panel.title)}</figcaption></figure>"
            )
        note = f"<p class=note>Not logged: {html.escape(', '.join(missing))}.</p>" if missing else ""
        if not figures:
            note = ("<p class=note>No training history was kept: it comes from the stage's last checkpoint, "
                    "and a stage run with save_strategy \"no\" saves none.</p>")
        sections.append(f"<h3>{stage_title}</h3><div class=grid>{''.join(figures)}</div>{note}")
    return "\n".join(sections)


def _curve_figure(panel: Panel, runs: list[RunRecord]) -> Any | None:
    lines = []
    for index, run in enumerate(runs):
        stage = run.stages.get(panel.stage)
        found = _series(stage.history, panel.keys) if stage else None
        if found is not None:
            label = run.name + (f" ({stage.algorithm})" if stage.algorithm else "")
            lines.append((index, label, *found))
    if not lines:
        return None
    figure, axes = _figure(panel.title)
    for index, label, key, steps, values in lines:
        # The second run dashed: where two runs share a stage (the same SFT model), both lines stay visible.
        axes.plot(steps, values, color=f"C{index}", linestyle=("-", "--")[index], label=f"{label}: {key}",
                  marker="o" if len(steps) < 30 else None, markersize=3)
    axes.set_xlabel("step")
    axes.legend(fontsize=8)
    return figure


def _time_split_figure(runs: list[RunRecord]) -> Any | None:
    """Seconds spent generating, scoring and training, summed over PPO steps: one stacked bar per run."""
    bars = []
    for run in runs:
        stage = run.stages.get(TIME_SPLIT.stage)
        phases = [_series(stage.history, (key,)) if stage else None for key in TIME_SPLIT.keys]
        totals = [sum(found[2]) if found else 0.0 for found in phases]
        if any(totals):
            bars.append((run.name, totals))
    if not bars:
        return None
    figure, axes = _figure(TIME_SPLIT.title)
    for row, (name, totals) in enumerate(bars):
        left = 0.0
        for phase, (key, seconds) in enumerate(zip(TIME_SPLIT.keys, totals)):
            axes.barh(row, seconds, left=left, color=f"C{phase + 2}", label=key.split("/")[1] if row == 0 else None)
            left += seconds
    axes.set_yticks(range(len(bars)), [name for name, _ in bars])
    axes.set_xlabel("seconds, summed over steps")
    axes.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: bars fill the axes
    return figure


def _overoptimisation_figure(runs: list[RunRecord]) -> Any | None:
    """Proxy reward (left axis, solid) and gold reward (right axis, dashed) at each logged step's KL, one colour per run."""
    curves = []
    for index, run in enumerate(runs):
        stage = run.stages.get(OVEROPTIMISATION.stage)
        if stage is None or not OVEROPTIMISATION.applies_to({stage.algorithm}):
            continue
        kl_keys, proxy_keys, gold_keys = OVEROPTIMISATION.keys
        kl_key, gold_key = _first_logged(stage.history, kl_keys), _first_logged(stage.history, gold_keys)
        proxy_key = _first_logged(stage.history, proxy_keys, exclude=gold_key)
        if kl_key and proxy_key and gold_key:
            logged = [e for e in stage.history if all(_is_number(e.get(k)) for k in (kl_key, proxy_key, gold_key))]
            if logged:
                points = sorted((e[kl_key], e[proxy_key], e[gold_key]) for e in logged)
                curves.append((index, f"{run.name} ({stage.algorithm})", proxy_key, gold_key, points))
    if not curves:
        return None
    figure, proxy_axes = _figure(OVEROPTIMISATION.title)
    gold_axes = proxy_axes.twinx()
    for index, label, proxy_key, gold_key, points in curves:
        kls, proxies, golds = zip(*points)
        # Each step's KL is noisy and not monotone: the steps as faint dots, the lines a running mean over neighbours in KL.
        window = max(1, len(points) // 8)
        proxy_axes.scatter(kls, proxies, color=f"C{index}", s=6, alpha=0.3)
        gold_axes.scatter(kls, golds, color=f"C{index}", s=6, alpha=0.3, marker="s")
        proxy_axes.plot(_running_mean(kls, window), _running_mean(proxies, window), color=f"C{index}", label=f"{label}: proxy {proxy_key}")
        gold_axes.plot(_running_mean(kls, window), _running_mean(golds, window), color=f"C{index}", linestyle="--",
                       label=f"{label}: gold {gold_key}")
    proxy_axes.set_xlabel("KL to the reference (per episode)")
    proxy_axes.set_ylabel("proxy: reward model")
    gold_axes.set_ylabel("gold: exact answer")
    handles = [h for axes in (proxy_axes, gold_axes) for h in axes.get_legend_handles_labels()[0]]
    proxy_axes.legend(handles, [h.get_label() for h in handles], fontsize=7)
    return figure


def _running_mean(values: tuple[float, ...], window: int) -> list[float]:
    """Mean of each run of `window` consecutive values (as many points as values less window - 1)."""
    return [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]


def _first_logged(history: list[dict[str, Any]], alternatives: str, exclude: str | None = None) -> str | None:
    """The first of `a|b|...` (each a key, or a pattern with one `*`) that the history logs a number for."""
    logged = [key for key in dict.fromkeys(k for entry in history for k, v in entry.items() if _is_number(v)) if key != exclude]
    for pattern in alternatives.split("|"):
        for key in logged:
            if fnmatch.fnmatchcase(key, pattern):
                return key
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure(title: str) -> tuple[Any, Any]:
    # Figure without pyplot: no global state and no display backend; savefig picks Agg for PNG.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.4), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return figure, axes


def _series(history: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str, list[float], list[float]] | None:
    """(key, steps, values) of the first key with finite values in the history."""
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in history if _is_number(entry.get(key))]
        if points:
            return key, [step for step, _ in points], [value for _, value in points]
    return None
