"""PPO checkpoints and the exported model.

A checkpoint is written into a temporary directory renamed at the end (a crash mid-write leaves the
previous one the newest complete checkpoint); it holds the actor and critic with their optimiser and
scheduler states (DeepSpeed: each process's shards), the KL controller, the running score statistics,
every process's RNG state and the step history (`history.jsonl`), so a resumed run continues exactly where
an uninterrupted one would be. The exported model is a plain Hugging Face model (safetensors, LoRA merged).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from stages.core.checkpoints import scale_adapters
from stages.ppo.engine import barrier

if TYPE_CHECKING:
    from stages.ppo.trainer import PPOTrainer

# Every step's metrics, one JSON object a line, written into each checkpoint: a resumed run carries the
# steps before the crash, and the stage keeps the newest checkpoint's copy for `rlhf report` (no W&B needed).
HISTORY_FILE = "history.jsonl"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with a dot and never match)."""
    found = [path for path in output_dir.glob("checkpoint-*") if path.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-", 1)[1]))


def save_checkpoint(trainer: PPOTrainer, step: int) -> None:
    """Write checkpoint-{step} into a temporary directory renamed at the end: a crash mid-write leaves the
    previous checkpoint the newest complete one."""
    final, temporary = trainer.output_dir / f"checkpoint-{step}", trainer.output_dir / f".checkpoint-{step}.tmp"
    if trainer.rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(trainer.world_size)
    if trainer.deepspeed is not None:  # each process writes its shards of the weights and optimiser states
        trainer.trained_actor.engine.save_checkpoint(temporary / "actor", tag="state")
        trainer.trained_critic.engine.save_checkpoint(temporary / "critic", tag="state")
    elif trainer.rank == 0:
        save_safetensors(trainer.actor, str(temporary / "actor.safetensors"))
        save_safetensors(trainer.critic, str(temporary / "critic.safetensors"))
        for name, trained in (("actor", trainer.trained_actor), ("critic", trainer.trained_critic)):
            torch.save(trained.optimizer.state_dict(), temporary / f"{name}_optimizer.pt")
            torch.save(trained.scheduler.state_dict(), temporary / f"{name}_scheduler.pt")
    state = {"step": step, "kl_controller": trainer.kl_controller.state_dict(),
             "score_moments": trainer.score_moments.state_dict(), "rng": rng_state()}
    torch.save(state, temporary / f"trainer_state_rank{trainer.rank}.pt")
    if trainer.rank == 0:  # metrics are already averaged across processes
        (temporary / HISTORY_FILE).write_text("".join(json.dumps(record) + "\n" for record in trainer.step_history))
    barrier(trainer.world_size)
    if trainer.rank == 0:
        os.replace(temporary, final)
        if trainer.config.save_total_limit is not None:
            for old in checkpoints(trainer.output_dir)[: -trainer.config.save_total_limit]:
                shutil.rmtree(old)
    barrier(trainer.world_size)


def load_checkpoint(trainer: PPOTrainer, checkpoint: Path) -> int:
    if trainer.deepspeed is not None:
        for name, trained in (("actor", trainer.trained_actor), ("critic", trainer.trained_critic)):
            load_path, _ = trained.engine.load_checkpoint(checkpoint / name, tag="state")
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed {name} checkpoint in {checkpoint / name}")
    else:
        load_safetensors(trainer.actor, checkpoint / "actor.safetensors", device=str(trainer.device))
        load_safetensors(trainer.critic, checkpoint / "critic.safetensors", device=str(trainer.device))
        for name, trained in (("actor", trainer.trained_actor), ("critic", trainer.trained_critic)):
            trained.optimizer.load_state_dict(torch.load(checkpoint / f"{name}_optimizer.pt", weights_only=True))
            trained.scheduler.load_state_dict(torch.load(checkpoint / f"{name}_scheduler.pt", weights_only=True))
    state = torch.load(checkpoint / f"trainer_state_rank{trainer.rank}.pt", weights_only=True)
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    set_rng_state(state["rng"])
    history_file = checkpoint / HISTORY_FILE  # absent in checkpoints written before it existed
    if history_file.is_file():
        trainer.step_history = [json.loads(line) for line in history_file.read_text().splitlines() if line]
    return int(state["step"])


def export_model(trainer: PPOTrainer, path: str | os.PathLike, overwrite: bool = False, merge_scale: float = 1.0) -> None:
    """Write the actor as a plain Hugging Face model (safetensors; LoRA adapters merged) with the tokenizer,
    through a temporary directory whose files are then moved in. `path` may exist (the stage's output
    directory holds its manifest and checkpoints) but must not hold a model already, unless `overwrite`
    (the stage resuming a run that died after saving, before registering). Under DeepSpeed every process
    must call it (ZeRO-3 gathers the weights); process 0 writes. `merge_scale` multiplies the adapters' update
    before merging (lora.merge_scale)."""
    path = Path(path)
    exists = (path / "config.json").exists() and not overwrite
    # Every process looks before process 0 writes: a slower process would otherwise find the new model
    # and refuse (a ZeRO-2 race seen under the launcher). All of them raise, or none.
    barrier(trainer.world_size)
    if exists:
        raise FileExistsError(f"{path} already holds a model: save_model never overwrites a model")
    temporary = path.with_name(f".{path.name}.tmp")
    gathered = (trainer.deepspeed.zero.GatheredParameters(list(trainer.actor.parameters())) if trainer.zero_stage == 3
                else contextlib.nullcontext())
    with gathered:
        if trainer.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            if trainer.is_peft:
                model = copy.deepcopy(trainer.actor)
                scale_adapters(model, merge_scale)
                model = model.merge_and_unload()
            else:
                model = trainer.actor
            state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
            model.save_pretrained(temporary, state_dict=state_dict)
            trainer.tokenizer.save_pretrained(temporary)
            path.mkdir(parents=True, exist_ok=True)
            # Weights first, config.json last: a directory with config.json is a complete model.
            files = sorted(temporary.iterdir(), key=lambda file: file.name == "config.json")
            for file in files:
                os.replace(file, path / file.name)
            temporary.rmdir()
    barrier(trainer.world_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    # numpy's state as plain lists and numbers, so the file loads with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
