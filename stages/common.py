"""Plumbing every stage shares: the common config fields, output directories, registration, reports.

A stage's lifecycle (the same section order in every stage module):
setup → model and tokenizer → data → trainer → train → save → evaluate → register.
`StageRun` holds what the lifecycle needs across sections: the run name, output directory, the
registry entry (incomplete until `finish`), and the W&B run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import distributed, tracking
from stages.config import to_dict
from stages.evaluation import EvalConfig
from stages.registry import Entry, Registry, rlhf_home
from stages.secrets import scrub

MANIFEST = "stage_config.json"
SHARED_DATASET = ".train_dataset"  # see shared_dataset
# Per-step training history in a checkpoint: HF Trainer's log_history (TRL stages), our PPO's steps.
HISTORY_FILES = ("trainer_state.json", "history.jsonl")
# Errors that are the user's to fix: printed as one line, no traceback.
USER_ERRORS = (
    "ConfigError", "RegistryError", "DataError", "ModelLoadError", "OutputDirError", "DeepSpeedConfigError",
    "TokenizerMismatchError", "OutputWriteError", "NonFiniteLossError",
)


@dataclass
class LoraSection:
    """Optional LoRA adapters (peft)."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=8, metadata={"help": "Adapter rank; higher = more capacity and memory."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "Module names that get adapters."}
    )
    merge_on_save: bool = field(default=True, metadata={"help": "Save merged full weights (loadable without peft) instead of adapters."})

    def peft_config(self, task_type: str, modules_to_save: list[str] | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
            modules_to_save=modules_to_save,
        )


@dataclass
class StageConfig:
    """Fields every stage has."""

    model: str = field(default="tiny-llama", metadata={"help": "Model reference: registry name[:version], kind:latest, built-in name, or path."})
    run_name: str | None = field(default=None, metadata={"help": "Name of this run (default: STAGE-TIMESTAMP)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the output goes (default: RLHF_HOME/RUN_NAME/STAGE)."})
    register_as: str | None = field(default=None, metadata={"help": "Registry name of the output (default: the stage name)."})
    seed: int = field(default=42, metadata={"help": "Seed of data order, initialisation and sampling."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in output_dir from its last checkpoint."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model repositories' own Python code. Off unless you trust it."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config, e.g. deepspeed_configs/zero3.json (needs the deepspeed launcher)."})
    length_grouping: int = field(
        default=0,
        metadata={
            "help": "SFT/reward/DPO: sort each group of N batches by length, then shuffle all batches (less padding; "
            "0: random batches). See stages/batching.py."
        },
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA adapters."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation."})
    tracking: tracking.TrackingConfig = field(default_factory=tracking.TrackingConfig, metadata={"help": "W&B."})


class OutputDirError(RuntimeError):
    """The output directory holds another run; refusing to overwrite it."""


class OutputWriteError(RuntimeError):
    """Writing the stage's output failed (disk full, permissions); the registry entry stays incomplete."""


# Fields of TRL's configs that every stage sets itself from its top-level keys.
OWNED_TRAIN_KEYS = ("output_dir", "run_name", "seed", "deepspeed", "report_to", "resume_from_checkpoint")


def check_trl_section(trl_class: type, values: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """Validate a section of TRL arguments (`train:`, `dpo:`, ...) against `trl_class`'s fields."""
    from stages.config import ConfigError, validate_section

    for key in OWNED_TRAIN_KEYS:
        if key in values:
            raise ConfigError(f"{section}.{key} is set by the stage; use the top-level key instead")
    return validate_section(trl_class, values, source, f"{section}.")


def trl_args(trl_class: type, stage: "StageRun", config: "StageConfig", section: dict[str, Any], deepspeed_config: str | None) -> Any:
    """TRL training arguments: the stage's owned fields plus the checked section."""
    return trl_class(
        output_dir=str(stage.output_dir),
        run_name=stage.run_name,
        seed=config.seed,
        deepspeed=deepspeed_config,
        report_to=["wandb"] if config.tracking.report_to == "wandb" else [],  # reuses the run opened by open_tracking
        # HF Trainer's default replaces a non-finite step loss by the running mean, hiding a diverged run
        # from NonFiniteLossGuard; a section may still set it back.
        **({"logging_nan_inf_filter": False} | section),
    )


def parse_args(config_class: type, argv: list[str] | None) -> tuple[Any, bool]:
    """Parse a stage's command line; `--check` validates the config (and its DeepSpeed file) and stops."""
    import sys

    from stages.config import load_config, usage, wants_help

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        module = config_class.__module__  # stages.sft, stages.reward_model, stages.policy
        command = f"python -m {module} --config FILE.yaml [key=value ...] [--check]   (also: rlhf {module.split('.')[-1].split('_')[0]} ...)"
        print(usage(config_class, command))
        sys.exit(0)
    check_only = "--check" in argv
    config = load_config(config_class, [argument for argument in argv if argument != "--check"])
    if check_only:
        distributed.resolve_deepspeed_config(config.deepspeed)
        print(f"{config_class.__name__}: ok")
    return config, check_only


def is_user_error(error: BaseException) -> bool:
    """Bad input the user can fix (named in USER_ERRORS), as opposed to a bug that deserves a traceback."""
    return any(kind.__name__ in USER_ERRORS for kind in type(error).__mro__)


def run_main(main: Any) -> None:
    """`python -m stages.X` entry: user errors exit 2 with one clear line."""
    import sys

    try:
        main()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a known user error
        if not is_user_error(error):
            raise
        print(f"rlhf: error: {error}", file=sys.stderr)
        sys.exit(2)


@dataclass
class StageRun:
    stage: str
    kind: str
    run_name: str
    output_dir: Path
    registry: Registry
    entry: Entry | None = None
    wandb_run: Any = None
    started: float = field(default_factory=time.time)
    already_done: bool = False


def start(config: StageConfig, stage: str, kind: str) -> StageRun:
    """Setup section: name the run, claim the output directory, open W&B (main process only writes)."""
    from transformers import set_seed

    distributed.setup()
    # Seed before any model is built: a new head (the reward model's score layer) is initialised from the
    # global generator, so without this an interrupted-and-resumed run would not match an uninterrupted one.
    set_seed(config.seed)
    run_name = config.run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(config.output_dir) if config.output_dir else rlhf_home() / run_name / stage
    run = StageRun(stage=stage, kind=kind, run_name=run_name, output_dir=output_dir.resolve(), registry=Registry())
    resolved = scrub(to_dict(config)) | {"run_name": run_name, "output_dir": str(run.output_dir), "stage": stage}
    if distributed.is_main_process():
        _claim_output_dir(run, config, resolved)
    run.already_done = distributed.broadcast_object(run.already_done)
    return run


def open_tracking(run: StageRun, config: StageConfig) -> None:
    if distributed.is_main_process() and not run.already_done:
        run.wandb_run = tracking.start_run(
            config.tracking, run.run_name, job_type=run.stage, config=scrub(to_dict(config)), run_dir=run.output_dir
        )


def register_start(run: StageRun, config: StageConfig, parent: Entry | None, **fields: Any) -> None:
    """Record the output as incomplete before training, so a crash leaves a visible incomplete entry."""
    if not distributed.is_main_process():
        return
    name = config.register_as or run.stage
    existing = [e for e in run.registry.list(include_builtin=False) if Path(e.path) == run.output_dir]
    if existing and config.resume:
        run.entry = existing[-1]
        return
    run.entry = run.registry.begin(
        name,
        run.kind,
        run.output_dir,
        parent=parent.ref if parent and not parent.builtin else (parent.name if parent else None),
        stage=run.stage,
        run=run.run_name,
        config=scrub(to_dict(config)),
        trust_remote_code=config.trust_remote_code,
        wandb_run=tracking.run_path(run.wandb_run),
        **fields,
    )


def finish(run: StageRun, metrics: dict[str, Any], samples: list[dict[str, Any]], card: dict[str, Any]) -> None:
    """Register section: metrics file, model card, then flip the entry to ready; close W&B."""
    if not distributed.is_main_process():
        return
    seconds = time.time() - run.started
    metrics = {key: value for key, value in metrics.items()} | {"seconds": round(seconds, 1)}
    write_json(run.output_dir / "metrics.json", scrub(metrics))
    write_json(run.output_dir / "samples.json", scrub(samples))
    write_model_card(run, metrics, card)
    tracking.log(run.wandb_run, metrics)
    tracking.log_table(run.wandb_run, "eval/samples", samples)
    if run.entry is not None:
        run.entry = run.registry.mark_ready(run.entry.ref, metrics=metrics, wandb_run=tracking.run_path(run.wandb_run))
    tracking.finish(run.wandb_run, metrics)
    print_summary(run, metrics, card)


def write_model_card(run: StageRun, metrics: dict[str, Any], card: dict[str, Any]) -> None:
    ref = run.entry.ref if run.entry else "(not registered)"
    lines = [
        f"# {ref}",
        "",
        f"Stage `{run.stage}` of rlhf-stages, run `{run.run_name}`.",
        "",
        f"- base model: `{card.get('base', '?')}`",
        f"- data: {card.get('data', '?')}",
        *[f"- {key}: `{value}`" for key, value in card.get("config", {}).items()],
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in sorted(metrics.items())],
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {card.get('auto_class', 'AutoModelForCausalLM')}, AutoTokenizer",
        f"model = {card.get('auto_class', 'AutoModelForCausalLM')}.from_pretrained('{run.output_dir}')",
        f"tokenizer = AutoTokenizer.from_pretrained('{run.output_dir}')",
        "```",
        f"or in any stage config: `model: {ref}`.",
        "",
        *([card["note"], ""] if card.get("note") else []),
    ]
    _atomic_write(run.output_dir / "README.md", "\n".join(lines))


def train(trainer: Any, stage: StageRun, config: StageConfig) -> Any:
    """Train section of the TRL stages: stop at a non-finite loss; with resume=true continue from the newest
    complete checkpoint."""
    from stages.callbacks import NonFiniteLossGuard

    trainer.add_callback(NonFiniteLossGuard(stage.stage, stage.output_dir))
    checkpoint = last_checkpoint(stage.output_dir) if config.resume else None
    if checkpoint:
        print(f"{stage.stage}: resuming from {checkpoint}", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except OSError as error:
        if not str(getattr(error, "filename", "") or "").startswith(str(stage.output_dir)):
            raise
        raise _write_error(stage, "a checkpoint", error) from error
    # trainer_state.json (the log history) in the output dir, for `rlhf report`: runs that save no
    # checkpoints (save_strategy: "no") would otherwise keep no curves.
    trainer.save_state()
    return result


def save_output(stage: StageRun, save: Any) -> None:
    """Save section: run `save` (writes the model into the output directory); a failed write (disk full,
    permissions) becomes one clear error, and the entry stays incomplete, so nothing half-written is loaded."""
    try:
        save()
    except OSError as error:
        raise _write_error(stage, "the model", error) from error
    if distributed.is_main_process():
        # A pickle of every training argument, `hub_token` included; stage_config.json holds the scrubbed config.
        (stage.output_dir / "training_args.bin").unlink(missing_ok=True)


def _write_error(stage: StageRun, what: str, error: OSError) -> OutputWriteError:
    ref = stage.entry.ref if stage.entry else "its registry entry"
    return OutputWriteError(
        f"{stage.stage}: writing {what} to {stage.output_dir} failed ({error}); {ref} stays incomplete and no other "
        "output was touched. Free disk space (or fix permissions), then rerun with resume=true to continue from the "
        "last complete checkpoint."
    )


def print_summary(run: StageRun, metrics: dict[str, Any], card: dict[str, Any]) -> None:
    rows = [
        ("model", card.get("base", "?")),
        ("stage", run.stage),
        ("steps", card.get("steps", "?")),
        ("seconds", f"{metrics.get('seconds', 0):.1f}"),
        *[(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in metrics.items() if key.startswith(("train/", "eval/")) and key.count("/") == 1],
        ("output", str(run.output_dir)),
        ("registry", run.entry.ref if run.entry else "-"),
    ]
    width = max(len(key) for key, _ in rows)
    print("\n" + "\n".join(f"  {key:<{width}}  {value}" for key, value in rows) + "\n", flush=True)


def _claim_output_dir(run: StageRun, config: StageConfig, resolved: dict[str, Any]) -> None:
    manifest = run.output_dir / MANIFEST
    # A directory holding only a manifest (and the dataset copy) is a run that failed before writing anything: reuse it.
    if run.output_dir.exists() and any(path.name not in (MANIFEST, SHARED_DATASET) for path in run.output_dir.iterdir()):
        ready = [e for e in run.registry.list(include_builtin=False) if Path(e.path) == run.output_dir and e.status == "ready"]
        held_stage = json.loads(manifest.read_text()).get("stage", run.stage) if manifest.exists() else run.stage
        if config.resume and held_stage != run.stage:
            raise OutputDirError(
                f"{run.output_dir} holds a {held_stage} run, not a {run.stage} run; resume=true cannot continue it. "
                "Choose another output_dir/run_name. Nothing was overwritten."
            )
        if not config.resume:
            holder = json.loads(manifest.read_text()).get("run_name", "?") if manifest.exists() else "unknown files"
            raise OutputDirError(
                f"{run.output_dir} already holds {'run ' + repr(holder) if manifest.exists() else holder}; "
                "pass resume=true to continue it, or choose another output_dir/run_name. Nothing was overwritten."
            )
        if ready:
            run.already_done = True
            run.entry = ready[-1]
            print(f"{run.stage}: {run.output_dir} is already registered ready as {ready[-1].ref}; nothing to do.")
            return
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest, resolved)


def write_json(path: Path, value: Any) -> None:
    """A JSON file written atomically (see _atomic_write)."""
    _atomic_write(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file, and a failed write leaves the old one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def remove_checkpoints(output_dir: Path) -> None:
    """Drop intermediate checkpoints (and the shared dataset copy) once the final model is saved and
    registered, keeping the newest checkpoint's training history: the final save writes weights only, and
    `rlhf report` draws its curves from these files (with a save strategy of "no" there is no checkpoint,
    hence no history). Main process only."""
    if not distributed.is_main_process():
        return
    newest = last_checkpoint(output_dir)
    for name in HISTORY_FILES:
        if newest is not None and (Path(newest) / name).is_file():
            shutil.copyfile(Path(newest) / name, output_dir / name)
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(output_dir / SHARED_DATASET, ignore_errors=True)


def shared_dataset(stage: StageRun, dataset: Any) -> Any:
    """The training dataset, read by every rank from one copy on disk that rank 0 writes.

    TRL tokenizes on the main process first and then on the others, for them to read its cache files;
    an in-memory dataset has no cache files, so the other ranks would tokenize it all again, one after
    the other. Outside the launcher, or where rank 0's copy is not visible (nodes without a shared
    RLHF_HOME), the in-memory dataset is returned and every rank tokenizes for itself.
    """
    if distributed.world_size() == 1:
        return dataset
    from datasets import load_from_disk

    path = stage.output_dir / SHARED_DATASET
    if distributed.is_main_process():
        shutil.rmtree(path, ignore_errors=True)
        dataset.save_to_disk(str(path))
    distributed.barrier()
    return load_from_disk(str(path)) if (path / "state.json").is_file() else dataset


def settle_after_save(stage: StageRun, config: StageConfig, base: Entry, merge_lora: bool, sequence_classifier: bool = False) -> None:
    """After every rank saved: leave ZeRO-3 model construction, merge LoRA on rank 0, and wait for it.

    Every rank then evaluates its share of the held-out set (stages/evaluation.py); rank 0 alone
    registers. The order matters: under ZeRO-3, any model built while the DeepSpeed config is still
    active is partitioned, and its construction would wait on the other ranks.
    """
    distributed.barrier()
    distributed.end_zero3_init()
    if distributed.is_main_process() and config.lora.enabled and merge_lora:
        merge_adapters(base, stage.output_dir, config.trust_remote_code, sequence_classifier)
    distributed.barrier()


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` in output_dir, for resume=true (None: start from scratch).

    HF Trainer writes a checkpoint in place and its `trainer_state.json` last (our PPO renames a finished
    temporary directory, with `trainer_state_rank0.pt` inside), so a checkpoint without that file was cut
    off mid-write (kill -9, disk full) and is skipped: resuming from it would load half a model.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    numbered = [path for path in output_dir.glob("checkpoint-*") if path.is_dir() and path.name.split("-", 1)[1].isdigit()]
    for checkpoint in sorted(numbered, key=lambda path: int(path.name.split("-", 1)[1]), reverse=True):
        if (checkpoint / "trainer_state.json").is_file() or (checkpoint / "trainer_state_rank0.pt").is_file():
            return str(checkpoint)
        print(f"skipping {checkpoint}: incomplete (interrupted while it was written)", flush=True)
    return None


def merge_adapters(base: Entry, output_dir: Path, trust_remote_code: bool, sequence_classifier: bool = False) -> None:
    """Fold saved LoRA adapters into the base weights so the output loads without peft."""
    from peft import PeftModel

    from stages import models

    load = models.load_sequence_classifier if sequence_classifier else models.load_causal_lm
    merged = PeftModel.from_pretrained(load(base, trust_remote_code), str(output_dir)).merge_and_unload()
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    for adapter_file in ("adapter_model.safetensors", "adapter_config.json"):
        (output_dir / adapter_file).unlink(missing_ok=True)
