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

import html
import json
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
from stages.report.figures import draw_figures

_PER_TYPE = re.compile(r"^eval/[^/]+/(?:strict|loose)/")  # eval.benchmarks' accuracy per instruction type
GENERATOR = "rlhf-stages report"  # marks a folder as a report, so writing it again may replace its figures


class ReportError(UserError, RuntimeError):
    """A run that cannot be reported, or an output folder that holds something else."""


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
    figures = draw_figures(runs, out / "figures")
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
