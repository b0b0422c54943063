"""Checkpoints inside a stage's output directory: the newest complete one, clean-up after registration,
and folding LoRA adapters into the saved weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stages.core import distributed
from stages.core.registry import Entry

SHARED_DATASET = ".train_dataset"  # the training dataset copy every rank reads (trainers.shared_dataset)
# Per-step training history in a checkpoint: HF Trainer's log_history (TRL stages), our PPO's steps.
HISTORY_FILES = ("trainer_state.json", "history.jsonl")


def last_checkpoint(output_dir: Path | str) -> str | None:
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


def merge_adapters(base: Entry, output_dir: Path, trust_remote_code: bool, sequence_classifier: bool = False, scale: float = 1.0) -> None:
    """Fold saved LoRA adapters into the base weights so the output loads without peft; `scale` multiplies the
    adapters' update first (0.5: the weights halfway between the start and the trained model, as in WiSE-FT)."""
    from peft import PeftModel

    from stages.core import models

    load = models.load_sequence_classifier if sequence_classifier else models.load_causal_lm
    adapted = PeftModel.from_pretrained(load(base, trust_remote_code), str(output_dir))
    scale_adapters(adapted, scale)
    merged = adapted.merge_and_unload()
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    for adapter_file in ("adapter_model.safetensors", "adapter_config.json"):
        (output_dir / adapter_file).unlink(missing_ok=True)


def scale_adapters(model: Any, scale: float) -> None:
    """Multiply every LoRA layer's update of a peft model by `scale` (before merging)."""
    if scale == 1.0:
        return
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("scale_adapters: the model has no LoRA layers to scale")
    for layer in layers:
        layer.scale_layer(scale)
