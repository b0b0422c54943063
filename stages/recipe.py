"""Run a recipe: its stages in order, each as its own process tree under the deepspeed launcher.

Each stage's output is registered as `<run>/<stage>` and the next stage's model references point at
it, so no paths are written by hand. The runner imports no stage module: one child process validates
every stage's config with the stage's own `--check`, then each stage is launched, then the runner
reads the registry for results. That child imports the stage modules by module path
(`STAGE_MODULES`, in `_check_stages_in_this_process`): the one, deliberate, seam between the recipe and
the stages, which import-linter cannot see and which keeps the recipe free of torch.
With `resume=true`, stages already registered ready are skipped and an interrupted stage continues
from its last checkpoint.

Two forms. The classic one has `sft:`, `reward:` and `policy:` sections, wired automatically (the reward and
policy stages start from RUN/sft, the policy is rewarded by RUN/reward). A chained recipe lists `steps:`, each
with its own `name` and a `stage` kind (sft | reward | policy | sample), so stages of one kind can follow each
other (sample -> sft -> sample -> policy); nothing is wired implicitly: a step names what it reads, and `{run}`
in its values is the run's name (`model: "{run}/sft"`, `datasets: [{source: "{run}/pairs", split: pairs}]`).

    rlhf run configs/recipes/tiny.yaml [policy.algorithm=ppo] [key=value ...] [--dry-run]
    rlhf run configs/recipes/tiny_sampled.yaml [steps.2.overrides.num_samples=8 ...]
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stages.core.config import ConfigError, build, read_yaml, set_dotted, usage, wants_help
from stages.core.errors import is_user_error
from stages.core.paths import REPO_ROOT
from stages.core.registry import Registry, RegistryError, rlhf_home
from stages.core.secrets import scrub_argv

STAGE_ORDER = ("sft", "reward", "policy")
CHECK_STAGES = "--check-stages"  # `python -m stages.recipe --check-stages PLAN_JSON`: see _check_stages
# The stage modules, by name only: launched as processes, and imported only by the --check-stages child.
STAGE_MODULES = {"sft": "stages.sft", "reward": "stages.reward_model", "policy": "stages.policy", "sample": "stages.sample"}
SUMMARY_METRICS = (
    "eval/exact_match", "eval/exact_match_unseen_templates", "eval/exact_match_unseen_tasks",
    "eval/pairwise_accuracy", "eval/reward_mean", "eval/win_rate", "eval/kl_to_ref",
)
# eval.benchmarks (stages/benchmarks): the four numbers of each (in the table), the unavailable count and the
# per-type accuracies (summary.json only: the report draws them), e.g. eval/ifbench/prompt_loose, eval/ifbench/strict/ID.
BENCHMARK_HEADLINE = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
BENCHMARK_KEY = re.compile(r"^eval/(?!ref_)[a-z0-9_]+/(?:" + "|".join(BENCHMARK_HEADLINE) + r"|unavailable|(?:strict|loose)/.+)$")


@dataclass
class StageEntry:
    """One stage of a recipe."""

    config: str = field(metadata={"help": "The stage's YAML config."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config for this stage (default: the recipe's); 'none' = no DeepSpeed."})
    num_processes: int | None = field(default=None, metadata={"help": "Processes for this stage (default: the recipe's)."})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "key: value overrides of the stage config."})


@dataclass
class StepEntry(StageEntry):
    """One step of a chained recipe: a stage of kind `stage` registered as RUN/`name`."""

    name: str = field(default="", metadata={"help": "The step's name: its output is registered as RUN/NAME (letters, digits, _ and -)."})
    stage: str = field(default="", metadata={"help": "Which stage runs: sft | reward | policy | sample."})


@dataclass
class RecipeConfig:
    """A whole pipeline (configs/recipes/*.yaml). Keys under sft/reward/policy (or a step) that are not
    StageEntry fields are overrides of that stage's config, so `policy.algorithm=ppo` works on the command line."""

    sft: StageEntry | None = field(default=None, metadata={"help": "config: FILE, optional deepspeed/num_processes, other keys override the stage config."})
    reward: StageEntry | None = field(default=None, metadata={"help": "As sft, for the reward-model stage."})
    policy: StageEntry | None = field(default=None, metadata={"help": "As sft, for the policy stage (e.g. policy.algorithm=ppo)."})
    steps: list[StepEntry] = field(
        default_factory=list, metadata={"help": "A chained recipe instead of sft/reward/policy: steps in order, each {name, stage, config, ...}."}
    )
    run_name: str | None = field(default=None, metadata={"help": "Run name (default: recipe name + timestamp)."})
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER), metadata={"help": "Stages to run, in order."})
    num_processes: int = field(default=2, metadata={"help": "Processes (GPUs, or CPU ranks) per node."})
    deepspeed: str | None = field(default="deepspeed_configs/zero2.json", metadata={"help": "DeepSpeed config for every stage."})
    hostfile: str | None = field(default=None, metadata={"help": "Multi-node: DeepSpeed hostfile passed to the launcher."})
    launcher_args: list[str] = field(default_factory=list, metadata={"help": "Extra deepspeed launcher arguments."})
    resume: bool = field(default=False, metadata={"help": "Skip stages registered ready; continue an interrupted one."})
    report_to: str = field(default="wandb", metadata={"help": "'wandb' or 'none' for every stage."})

    def __post_init__(self) -> None:
        unknown = [stage for stage in self.stages if stage not in STAGE_ORDER]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r} in stages (valid: {', '.join(STAGE_ORDER)})")
        if self.num_processes < 1:
            raise ConfigError("num_processes must be at least 1")
        if self.steps and any(getattr(self, stage) is not None for stage in STAGE_ORDER):
            raise ConfigError("a recipe has either steps: or sft/reward/policy sections, not both")
        names = [step.name for step in self.steps]
        for step in self.steps:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", step.name):
                raise ConfigError(f"steps: name {step.name!r} must be letters, digits, _ and - (it names RUN/NAME)")
            if step.stage not in STAGE_MODULES:
                raise ConfigError(f"steps.{step.name}: unknown stage {step.stage!r} (valid: {', '.join(STAGE_MODULES)})")
            if names.count(step.name) > 1:
                raise ConfigError(f"steps: the name {step.name!r} is used twice")

    def planned(self) -> list[tuple[str, str, StageEntry]]:
        """(name, stage kind, entry) of every stage to run, in order."""
        if self.steps:
            return [(step.name, step.stage, step) for step in self.steps]
        return [(stage, stage, getattr(self, stage)) for stage in self.stages]


def load_recipe(path: str, overrides: list[str]) -> tuple[RecipeConfig, str]:
    values = read_yaml(path)
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator:
            raise ConfigError(f"unexpected argument {override!r}: expected key=value")
        import yaml

        set_dotted(values, key, yaml.safe_load(raw) if raw.strip() else None)
    entry_fields = {f.name for f in fields(StepEntry)}
    sections = [values.get(stage) for stage in STAGE_ORDER] + (values.get("steps") if isinstance(values.get("steps"), list) else [])
    for section in sections:
        if isinstance(section, dict):
            extra = {key: section.pop(key) for key in list(section) if key not in entry_fields}
            section.setdefault("overrides", {}).update(extra)
    recipe = build(RecipeConfig, values, source=path)
    if not recipe.steps:
        missing = [stage for stage in recipe.stages if getattr(recipe, stage) is None]
        if missing:
            raise ConfigError(f"{path}: missing required value for {', '.join(missing)}")
    run_name = recipe.run_name or f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return recipe, run_name


def stage_arguments(recipe: RecipeConfig, run_name: str, stage: str, entry: StageEntry | None = None) -> list[str]:
    """The stage's command-line arguments: its config, the recipe's wiring, then the user's overrides. `stage` is
    the step's name (the stage itself in a classic recipe)."""
    entry = entry or getattr(recipe, stage)
    home = rlhf_home()
    wiring: dict[str, Any] = {
        "run_name": run_name,
        "output_dir": str(home / run_name / stage),
        "register_as": f"{run_name}/{stage}",
        "resume": recipe.resume,
        "tracking.group": run_name,
        "tracking.report_to": recipe.report_to,
        "deepspeed": _deepspeed_for(recipe, entry),
    }
    if not recipe.steps and stage in ("reward", "policy") and "sft" in recipe.stages:
        wiring["model"] = f"{run_name}/sft"
    if not recipe.steps and stage == "policy" and "reward" in recipe.stages:
        wiring["reward_model"] = f"{run_name}/reward"
    arguments = ["--config", entry.config]
    for key, value in {**wiring, **_flatten(_with_run(entry.overrides, run_name))}.items():
        arguments.append(f"{key}={_yaml_value(value)}")
    return arguments


def launch_command(recipe: RecipeConfig, stage: str, arguments: list[str], entry: StageEntry | None = None) -> list[str]:
    entry = entry or getattr(recipe, stage)
    module = STAGE_MODULES[entry.stage if isinstance(entry, StepEntry) else stage]
    processes = entry.num_processes or recipe.num_processes
    if _deepspeed_for(recipe, entry) is None and processes == 1 and recipe.hostfile is None:
        return [sys.executable, "-m", module, *arguments]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if recipe.hostfile:
        launcher += ["--hostfile", recipe.hostfile]
    launcher += ["--num_gpus", str(processes), "--master_port", str(_free_port()), *recipe.launcher_args]
    return [*launcher, "--module", module, *arguments]


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(usage(RecipeConfig, "rlhf run RECIPE.yaml [key=value ...] [--dry-run]"))
        return 0
    dry_run = "--dry-run" in argv
    argv = [argument for argument in argv if argument != "--dry-run"]
    if not argv or "=" in argv[0]:
        raise ConfigError("usage: rlhf run RECIPE.yaml [key=value ...] [--dry-run]")
    recipe, run_name = load_recipe(argv[0], argv[1:])
    entries = {name: (kind, entry) for name, kind, entry in recipe.planned()}
    plan = {name: stage_arguments(recipe, run_name, name, entry) for name, (_, entry) in entries.items()}
    _check_stages({name: [STAGE_MODULES[entries[name][0]], arguments] for name, arguments in plan.items()})  # before any compute
    if dry_run:
        for stage, arguments in plan.items():
            print(shlex.join(scrub_argv(launch_command(recipe, stage, arguments, entries[stage][1]))))
        return 0

    registry, results = Registry(), []
    summary_path = rlhf_home() / run_name / "summary.json"
    for stage, arguments in plan.items():
        kind, stage_entry = entries[stage]
        name = f"{run_name}/{stage}"
        done = _ready_entry(registry, name) if recipe.resume else None
        if done is not None:
            print(f"[recipe] {stage}: {done.ref} is already ready; skipping (resume=true)", flush=True)
            results.append(_result(stage, done, seconds=done.metrics.get("recipe/seconds", done.metrics.get("seconds", 0.0)), kind=kind))
            continue
        # An entry that exists but is not ready is an interrupted attempt this launch continues.
        resumed = recipe.resume and any(entry.name == name for entry in registry.list(include_builtin=False))
        command = launch_command(recipe, stage, arguments, stage_entry)
        print(f"[recipe] {stage}: {shlex.join(scrub_argv(command))}", flush=True)  # output is often kept as a log
        started = time.time()
        returncode = subprocess.run(command, env=_stage_environment(recipe, stage_entry)).returncode
        if returncode != 0:
            _write_summary(summary_path, run_name, results)
            print(f"[recipe] {stage} failed (exit {returncode}); finished stages are in {summary_path}. "
                  f"Re-run with resume=true run_name={run_name} to continue.", file=sys.stderr)
            return returncode
        entry = _ready_entry(registry, name)
        if entry is None:
            raise RuntimeError(f"stage {stage} exited cleanly but registered no ready entry {name}")
        seconds = round(time.time() - started, 1)  # wall clock, launcher start-up included
        # After a resume, the seconds are this attempt's only (an interrupted one's end is unknown): say so.
        entry = registry.update(entry.ref, metrics=entry.metrics | {"recipe/seconds": seconds} | ({"recipe/resumed": 1.0} if resumed else {}))
        results.append(_result(stage, entry, seconds=seconds, kind=kind))
    _write_summary(summary_path, run_name, results)
    print_table(results)
    print(f"\nsummary: {summary_path}")
    _write_report(run_name)
    return 0


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per stage, and first the base model as the SFT stage scored it: base -> SFT -> policy."""
    keys = [key for key in SUMMARY_METRICS if any(key in r["metrics"] for r in results)]
    benchmark_keys = {key for r in results for key in r["metrics"] if BENCHMARK_KEY.match(key) and key.rsplit("/", 1)[-1] in BENCHMARK_HEADLINE}
    keys += sorted(benchmark_keys, key=lambda key: (key.split("/")[1], BENCHMARK_HEADLINE.index(key.rsplit("/", 1)[-1])))
    header = ["stage", "algorithm", "registry", "seconds", *[key.split("/", 1)[1] for key in keys]]
    rows = [header]
    for r in results:
        if r.get("start"):
            rows.append(["base", "-", r["start"]["registry"], "-", *[f"{r['start']['metrics'][key]:.3f}" if key in r["start"]["metrics"] else "-" for key in keys]])
        rows.append(
            [r["stage"], r.get("algorithm") or "-", r["registry"], f"{r['seconds']:.0f}" + (" (resumed)" if r.get("resumed") else ""),
             *[f"{r['metrics'][key]:.3f}" if key in r["metrics"] else "-" for key in keys]]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)))


def _write_report(run_name: str) -> None:
    """The HTML report is a view of the finished run: failing to draw it warns, the run still succeeded."""
    try:
        from stages import report

        print(f"report:  {report.write_report([run_name])}")
    except Exception as error:  # noqa: BLE001 - whatever broke the report, the trained models are the result
        print(f"[recipe] warning: no report ({type(error).__name__}: {error}); retry with `rlhf report {run_name}`", file=sys.stderr)


def _check_stages(plan: dict[str, list[str]]) -> None:
    """Each stage's `--check`, all in one child process: one start of torch/transformers/TRL, not one
    per stage (that was 21 of the default recipe's first seconds)."""
    result = subprocess.run(
        [sys.executable, "-m", "stages.recipe", CHECK_STAGES, json.dumps(plan)],
        capture_output=True, text=True, env=_stage_environment_plain(),
    )
    if result.returncode != 0:
        raise ConfigError((result.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("rlhf: error: "))


def _check_stages_in_this_process(plan_json: str) -> None:
    """The child side of `_check_stages`."""
    import importlib

    for stage, (module, arguments) in json.loads(plan_json).items():
        try:
            importlib.import_module(module).main([*arguments, "--check"])
        except Exception as error:  # noqa: BLE001 - user errors get the stage's name, the rest propagate
            if not is_user_error(error):
                raise
            raise ConfigError(f"recipe stage {stage}: {error}") from None


def _ready_entry(registry: Registry, name: str) -> Any:
    try:
        entry = registry.get(name)
    except RegistryError:
        return None
    return entry if entry.status == "ready" else None


def _result(stage: str, entry: Any, seconds: float, kind: str | None = None) -> dict[str, Any]:
    kind = kind or stage
    metrics = {key: value for key, value in entry.metrics.items() if key in SUMMARY_METRICS or BENCHMARK_KEY.match(key)}
    # The SFT stage scores the base it started from on the same prompts (eval/ref_*): the table's first row.
    start = {
        key: value for reference, value in entry.metrics.items()
        if reference.startswith("eval/ref_") and ((key := reference.replace("eval/ref_", "eval/", 1)) in SUMMARY_METRICS or BENCHMARK_KEY.match(key))
    }
    return {
        "stage": stage,
        "algorithm": entry.metrics.get("algorithm") if kind == "policy" else None,
        "registry": entry.ref,
        "output_dir": entry.path,
        "seconds": round(seconds, 1),
        "metrics": metrics,
    } | ({"resumed": True} if entry.metrics.get("recipe/resumed") else {}) | (
        {"start": {"registry": entry.parent, "metrics": start}} if kind == "sft" and start else {}
    )


def _write_summary(path: Path, run_name: str, results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"run": run_name, "stages": results}, indent=2))
    os.replace(temporary, path)


def _stage_environment(recipe: RecipeConfig, entry: StageEntry) -> dict[str, str]:
    environment = dict(os.environ)
    processes = entry.num_processes or recipe.num_processes
    # One process per core: more threads than cores makes torch's spinning workers fight (10x slower here).
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return environment


def _stage_environment_plain() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return environment


def _deepspeed_for(recipe: RecipeConfig, entry: StageEntry) -> str | None:
    chosen = entry.deepspeed if entry.deepspeed is not None else recipe.deepspeed
    return None if chosen in (None, "none") else chosen


def _with_run(value: Any, run_name: str) -> Any:
    """`{run}` in a chained recipe's values is the run's name."""
    if isinstance(value, str):
        return value.replace("{run}", run_name)
    if isinstance(value, dict):
        return {key: _with_run(item, run_name) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_run(item, run_name) for item in value]
    return value


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__" and sys.argv[1:2] == [CHECK_STAGES]:
    from stages.core.errors import run_main

    run_main(lambda: _check_stages_in_this_process(sys.argv[2]))
