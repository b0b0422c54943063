"""How the stages drive TRL's trainers: checked argument sections, training with a non-finite-loss guard
and resume, saving with clear write errors, LoRA merge after save, one on-disk dataset for every rank.

Kept apart from `stages/lifecycle.py`, which holds what every stage does whatever trains it (our PPO
included); this module is the TRL side.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from stages.core import checkpoints, distributed
from stages.core.checkpoints import SHARED_DATASET, last_checkpoint
from stages.core.config import ConfigError, validate_section
from stages.core.errors import UserError
from stages.core.registry import Entry
from stages.lifecycle import StageConfig, StageRun

# Fields of TRL's configs that every stage sets itself from its top-level keys.
OWNED_TRAIN_KEYS = ("output_dir", "run_name", "seed", "deepspeed", "report_to", "resume_from_checkpoint")


class OutputWriteError(UserError, RuntimeError):
    """Writing the stage's output failed (disk full, permissions); the registry entry is marked failed."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm; stopped before it reached a checkpoint."""


def check_trl_section(trl_class: type, values: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """Validate a section of TRL arguments (`train:`, `dpo:`, ...) against `trl_class`'s fields."""
    for key in OWNED_TRAIN_KEYS:
        if key in values:
            raise ConfigError(f"{section}.{key} is set by the stage; use the top-level key instead")
    return validate_section(trl_class, values, source, f"{section}.")


def trl_args(trl_class: type, stage: StageRun, config: StageConfig, section: dict[str, Any]) -> Any:
    """TRL training arguments: the stage's owned fields plus the checked section."""
    return trl_class(
        output_dir=str(stage.output_dir),
        run_name=stage.run_name,
        seed=config.seed,
        deepspeed=stage.deepspeed_config,
        report_to=["wandb"] if config.tracking.report_to == "wandb" else [],  # reuses the run opened by StageRun.begin
        # HF Trainer's default replaces a non-finite step loss by the running mean, hiding a diverged run
        # from NonFiniteLossGuard; a section may still set it back.
        **({"logging_nan_inf_filter": False} | section),
    )


def train(trainer: Any, stage: StageRun, config: StageConfig) -> Any:
    """Train section of the TRL stages: stop at a non-finite loss; with resume=true continue from the newest
    complete checkpoint."""
    trainer.add_callback(NonFiniteLossGuard(stage.stage, stage.output_dir))
    trainer.add_callback(EntryGuard(stage))
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


def save_output(stage: StageRun, save: Callable[[], Any]) -> None:
    """Save section: run `save` (writes the model into the output directory); a failed write (disk full,
    permissions) becomes one clear error, and the entry is marked failed, so nothing half-written is loaded."""
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
        f"{stage.stage}: writing {what} to {stage.output_dir} failed ({error}); {ref} is marked failed (never what "
        "NAME:latest resolves to) and no other output was touched. Free disk space (or fix permissions), then rerun "
        "with resume=true to continue from the last complete checkpoint."
    )


def settle_after_save(stage: StageRun, config: StageConfig, base: Entry, merge_lora: bool, sequence_classifier: bool = False) -> None:
    """After every rank saved: leave ZeRO-3 model construction, merge LoRA on rank 0, and wait for it.

    Every rank then evaluates its share of the held-out set (stages/evaluation.py); rank 0 alone
    registers. The order matters: under ZeRO-3, any model built while the DeepSpeed config is still
    active is partitioned, and its construction would wait on the other ranks.
    """
    distributed.barrier()
    distributed.end_zero3_init()
    if distributed.is_main_process() and config.lora.enabled and merge_lora:
        checkpoints.merge_adapters(base, stage.output_dir, config.trust_remote_code, sequence_classifier, scale=config.lora.merge_scale)
    distributed.barrier()


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


class EntryGuard(TrainerCallback):
    """Stop at the next step if the stage's registry entry was removed or taken over (StageRun.check_alive);
    a checkpoint refreshes the entry's heartbeat."""

    def __init__(self, stage: StageRun) -> None:
        self.stage = stage

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.stage.check_alive()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stage.beat()


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first logged non-finite loss or gradient norm, naming the step and the last good checkpoint.

    The logged loss is the mean over the steps since the previous log, gathered across processes, so every
    rank stops at the same step (`trl_args` turns off HF's `logging_nan_inf_filter`, which would
    otherwise replace a NaN step loss by the running mean). A step that saves a checkpoint is always logged
    first, so no checkpoint is written after a non-finite step: the newest one on disk is the last good one.
    The checkpoints' `training_args.bin` (a pickle of every argument, `hub_token` included) is removed; the
    stage's scrubbed `stage_config.json` records the configuration instead, and resuming does not need it.
    """

    def __init__(self, stage: str, output_dir: str | Path) -> None:
        self.stage, self.output_dir, self.last_checked_step = stage, Path(output_dir), 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:
            control.should_log = True  # check this step's loss before its checkpoint is written
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        bad = {key: logs[key] for key in ("loss", "grad_norm") if key in logs and not math.isfinite(logs[key])}
        if bad:
            first, last = self.last_checked_step + 1, state.global_step
            steps = f"step {last}" if first >= last else f"steps {first}-{last} (logged together)"
            checkpoint = last_checkpoint(self.output_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been written yet"
            values = " and ".join(f"{key}={value}" for key, value in bad.items())
            raise NonFiniteLossError(
                f"{self.stage}: non-finite {values} at {steps}; training stopped and {kept}. Lower the learning rate "
                "(or set max_grad_norm), then rerun with resume=true to continue from the last good checkpoint, if any."
            )
        if "loss" in logs:
            self.last_checked_step = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            (self.output_dir / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)
