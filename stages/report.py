"""Run reports: one offline HTML page plus PNG figures for a recipe run, or for two runs side by side.

    rlhf report RUN [RUN_B] [--out DIR]     # RUN: a run name under RLHF_HOME, or the run's directory

`rlhf run` writes one at the end (RLHF_HOME/RUN/report/index.html). The report reads only files a run
leaves on disk, so it needs no network and no W&B (online, offline or off):
- RUN/summary.json: the stages, their registry entries and held-out metrics;
- per stage, the training history kept from its last checkpoint: `trainer_state.json` (HF Trainer's
  log_history: SFT, reward, DPO, GRPO, RLOO) or `history.jsonl` (our PPO);
- per stage, samples.json (held-out generations; the policy's also hold the SFT model's answers);
- the registry, for the lineage of the final model.
Two runs share every figure (one colour per run) and one metrics table, e.g. DPO vs PPO from one SFT model.
Figures are matplotlib PNGs linked by relative path, so the output folder can be moved as a whole.
"""

from __future__ import annotations

import fnmatch
import html
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import tasks
from stages.core.errors import UserError
from stages.core.registry import Entry, Registry, RegistryError, rlhf_home

_PER_TYPE = re.compile(r"^eval/[^/]+/(?:strict|loose)/")  # eval.benchmarks' accuracy per instruction type
GENERATOR = "rlhf-stages report"  # marks a folder as a report, so writing it again may replace its figures
STAGE_TITLES = {"sft": "SFT", "reward": "Reward model", "policy": "Policy"}


class ReportError(UserError, RuntimeError):
    """A run that cannot be reported, or an output folder that holds something else."""


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


@dataclass
class StageRecord:
    """What one finished stage left on disk."""

    stage: str
    algorithm: str | None
    registry_ref: str
    seconds: float
    metrics: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per logged step, each with "step"
    samples: list[dict[str, Any]]
    start: dict[str, Any] | None = None  # the SFT stage's score of its base model: {"registry", "metrics"}


@dataclass
class RunRecord:
    name: str
    directory: Path
    stages: dict[str, StageRecord]


def write_report(references: list[str], out: str | Path | None = None) -> Path:
    """Write index.html and figures/*.png for one run (or two, overlaid); returns the page's path."""
    if not 1 <= len(references) <= 2:
        raise ReportError(f"a report shows one run or compares two; got {len(references)}")
    runs = [load_run(reference) for reference in references]
    if out is None:
        out = runs[0].directory / ("report" if len(runs) == 1 else f"report-vs-{runs[1].name}")
    out = Path(out).resolve()
    _claim(out)
    figures = _draw_figures(runs, out / "figures")
    title = " vs ".join(run.name for run in runs)
    body = [
        f"<h1>rlhf report: {html.escape(title)}</h1>",
        f"<p class=meta>Written {time.strftime('%Y-%m-%d %H:%M')} from {', '.join(html.escape(str(r.directory)) for r in runs)}</p>",
        "<h2>Held-out metrics</h2>", _metrics_table(runs),
        *_benchmark_section(runs, out / "figures"),
        "<h2>Training curves</h2>", figures,
        "<h2>Sample generations</h2>", *[_samples_table(run) for run in runs],
        "<h2>Lineage of the final model</h2>", *[_lineage_table(run) for run in runs],
    ]
    page = out / "index.html"
    temporary = page.with_name(f".index.{os.getpid()}.tmp")
    temporary.write_text(_PAGE.format(generator=GENERATOR, title=html.escape(title), body="\n".join(body)), encoding="utf-8")
    os.replace(temporary, page)
    return page


def load_run(reference: str) -> RunRecord:
    """A run by directory or by name under RLHF_HOME."""
    directory = Path(reference).expanduser()
    if not (directory / "summary.json").is_file():
        directory = rlhf_home() / reference
    summary_path = directory / "summary.json"
    if not summary_path.is_file():
        raise ReportError(f"no run {reference!r}: no summary.json in {reference} or {directory} (`rlhf run` writes it)")
    summary = json.loads(summary_path.read_text())
    stages = {}
    for result in summary.get("stages", []):
        # The run's own folder first: a copied or moved run still finds its stages.
        output_dir = directory / result["stage"]
        if not output_dir.is_dir() and result.get("output_dir"):
            output_dir = Path(result["output_dir"])
        stages[result["stage"]] = StageRecord(
            stage=result["stage"],
            algorithm=result.get("algorithm"),
            registry_ref=result["registry"],
            seconds=float(result.get("seconds", 0.0)),
            metrics=result.get("metrics", {}),
            history=_load_history(output_dir),
            samples=_read_json(output_dir / "samples.json", default=[]),
            start=result.get("start"),
        )
    return RunRecord(name=summary.get("run", directory.name), directory=directory.resolve(), stages=stages)


# -- figures -------------------------------------------------------------------------------------

def _draw_figures(runs: list[RunRecord], directory: Path) -> str:
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


# -- tables --------------------------------------------------------------------------------------

def _benchmark_section(runs: list[RunRecord], directory: Path) -> list[str]:
    """eval.benchmarks: per benchmark, accuracy per instruction type of the base (as SFT scored it) and each trained stage."""
    from stages.benchmarks import chart

    sections = []
    for run in runs:
        for name in sorted({n for stage in run.stages.values() for n in chart.benchmark_names(stage.metrics)}):
            models = [(f"{stage.stage} start ({(stage.start or {}).get('registry') or 'base'})", chart.per_type(stage.start["metrics"], name))
                      for stage in run.stages.values() if stage.start and chart.per_type(stage.start.get("metrics", {}), name)]
            models += [(f"{stage.stage}" + (f" ({stage.algorithm})" if stage.algorithm else ""), chart.per_type(stage.metrics, name))
                       for stage in run.stages.values() if chart.per_type(stage.metrics, name)]
            filename = f"benchmark_{re.sub(r'[^a-z0-9]+', '_', (run.name + '_' + name).lower()).strip('_')}.png"
            directory.mkdir(parents=True, exist_ok=True)
            chart.per_type_figure(name, models).savefig(directory / filename, dpi=100)
            sections.append(f"<figure><img src='figures/{filename}' alt='{html.escape(name)} per instruction type'>"
                            f"<figcaption>{html.escape(run.name)}: {html.escape(name)}, strict accuracy per instruction type "
                            "(the four numbers are in the table above; responses and per-prompt results in each stage's benchmarks/ folder)</figcaption></figure>")
    return ["<h2>Instruction-following benchmarks</h2>", *sections] if sections else []


def _metrics_table(runs: list[RunRecord]) -> str:
    """The numbers of summary.json: one row per stage (and run), and first the base model as SFT scored it
    (per-instruction-type benchmark accuracies are drawn instead: _benchmark_section)."""
    keys = list(dict.fromkeys(key for run in runs for stage in run.stages.values() for key in stage.metrics if not _PER_TYPE.search(key)))
    header = (["run"] if len(runs) > 1 else []) + ["stage", "algorithm", "registry", "seconds"] + [key.removeprefix("eval/") for key in keys]
    rows = []
    for run in runs:
        for stage in run.stages.values():
            if stage.start:
                cells = [_cell("base"), _cell(None), _cell(stage.start.get("registry")), _cell("-")]
                cells += [_number(stage.start.get("metrics", {}).get(key)) for key in keys]
                rows.append(([_cell(run.name)] if len(runs) > 1 else []) + cells)
            cells = [_cell(stage.stage), _cell(stage.algorithm), _cell(stage.registry_ref), _cell(f"{stage.seconds:.0f}")]
            cells += [_number(stage.metrics.get(key)) for key in keys]
            rows.append(([_cell(run.name)] if len(runs) > 1 else []) + cells)
    return _table(header, rows, "metrics")


def _samples_table(run: RunRecord) -> str:
    """Held-out prompts with the SFT model's and the policy's answers, and the reward model's score of each."""
    policy, sft = run.stages.get("policy"), run.stages.get("sft")
    sft_answers = {sample["prompt"]: sample for sample in sft.samples} if sft else {}
    heading = f"<h3>{html.escape(run.name)}</h3>"
    if policy is None or not policy.samples:
        if not sft_answers:
            return heading + "<p class=note>No samples were saved.</p>"
        if any("reference_response" in s for s in sft.samples):  # the SFT stage also answered with its base model
            rows = [[_cell(s["prompt"]), _cell(s.get("answer")), _answer(s.get("reference_response"), s.get("answer")),
                     _answer(s["response"], s.get("answer"))] for s in sft.samples]
            return heading + _table(["prompt", "expected", "base answer", "SFT answer"], rows, "samples")
        rows = [[_cell(s["prompt"]), _cell(s.get("answer")), _answer(s["response"], s.get("answer"))] for s in sft.samples]
        return heading + _table(["prompt", "expected", "SFT answer"], rows, "samples")
    rows = []
    for sample in policy.samples:
        # Older policy samples lack the reference's answer: join the SFT stage's samples by prompt instead.
        sft_response = sample.get("reference_response", sft_answers.get(sample["prompt"], {}).get("response"))
        rows.append([
            _cell(sample["prompt"]), _cell(sample.get("answer")),
            _answer(sft_response, sample.get("answer")), _number(sample.get("reference_reward")),
            _answer(sample["response"], sample.get("answer")), _number(sample.get("reward")),
        ])
    algorithm = policy.algorithm or "policy"
    header = ["prompt", "expected", "SFT answer", "SFT reward", f"{algorithm} answer", f"{algorithm} reward"]
    return heading + _table(header, rows, "samples")


def _lineage_table(run: RunRecord) -> str:
    """The final model's registry entry and its parents up to the base model, then the run's reward model:
    the policy's parent is the SFT model, but its reward (and PPO's critic) came from that one."""
    if not run.stages:
        return f"<h3>{html.escape(run.name)}</h3><p class=note>The run finished no stage.</p>"
    registry, rows, seen = Registry(run.directory.parent), [], set()
    ref, role = list(run.stages.values())[-1].registry_ref, "final model"
    while ref and ref not in seen:
        seen.add(ref)
        entry = _registry_entry(registry, ref)
        rows.append(_lineage_row(ref, entry, role))
        ref, role = (entry.parent if entry else None), "parent"
    reward = run.stages.get("reward")
    if "policy" in run.stages and reward and reward.registry_ref not in seen:
        rows.append(_lineage_row(reward.registry_ref, _registry_entry(registry, reward.registry_ref), "reward model of the policy stage"))
    header = ["role", "model", "kind", "status", "created", "held-out metrics", "path", "W&B run"]
    return f"<h3>{html.escape(run.name)}</h3>" + _table(header, rows, "lineage")


def _registry_entry(registry: Registry, ref: str) -> Entry | None:
    try:
        return registry.get(ref)
    except RegistryError:
        return None


def _lineage_row(ref: str, entry: Entry | None, role: str) -> list[str]:
    if entry is None:
        return [_cell(role), _cell(ref), _cell(None), _cell("not in the registry")] + [_cell(None)] * 4
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created)) if entry.created else None
    held_out = ", ".join(
        f"{key.removeprefix('eval/')}={value:.3f}" for key, value in entry.metrics.items()
        if key.startswith("eval/") and key.count("/") == 1 and isinstance(value, float)
    )
    return [_cell(role), _cell(entry.name if entry.builtin else entry.ref), _cell(entry.kind), _cell(entry.status),
            _cell(created), _cell(held_out or None), _cell(entry.path), _cell(entry.wandb_run)]


def _table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table class={css_class}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    return f"<td>{html.escape(str(value)) if value not in (None, '') else '–'}</td>"


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _cell(value)
    return f"<td class=num title='{value!r}'>{value:.3f}</td>"  # the terminal table's precision; full value on hover


def _answer(response: str | None, expected: str | None) -> str:
    if response is None:
        return _cell(None)
    mark = "" if expected is None else (" ✓" if tasks.is_correct(response, expected) else " ✗")
    return f"<td><code>{html.escape(response)}</code>{mark}</td>"


# -- files ---------------------------------------------------------------------------------------

def _load_history(output_dir: Path) -> list[dict[str, Any]]:
    ppo_history = output_dir / "history.jsonl"
    if ppo_history.is_file():
        return [json.loads(line) for line in ppo_history.read_text().splitlines() if line.strip()]
    state = _read_json(output_dir / "trainer_state.json", default={})
    return [entry for entry in state.get("log_history", []) if "step" in entry]


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _claim(out: Path) -> None:
    """Refuse a folder holding anything but an earlier report; an earlier report is replaced."""
    page = out / "index.html"
    if out.exists() and any(out.iterdir()):
        if not (page.is_file() and GENERATOR in page.read_text(errors="replace")[:2000]):
            raise ReportError(f"{out} already holds other files; choose another --out. Nothing was overwritten.")
        shutil.rmtree(out / "figures", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=generator content="{generator}">
<title>rlhf report: {title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }} figure {{ margin: 0; }}
figcaption, .meta, .note {{ color: #666; font-size: 12px; }}
</style>
<script>
// Lets a headless browser (the tests, CI) read from the DOM whether every figure loaded and decoded.
window.addEventListener("error", () => {{
  document.documentElement.dataset.errors = Number(document.documentElement.dataset.errors || 0) + 1;
}}, true);
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.documentElement.dataset.imagesTotal = images.length;
  document.documentElement.dataset.imagesLoaded = images.filter(image => image.complete && image.naturalWidth > 0).length;
}});
</script></head>
<body>
{body}
</body></html>
"""
