"""The SFT stage end to end on the tiny model: learns, saves a loadable model, registers it with lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import sft
from stages.core import models
from stages.lifecycle import OutputDirError
from stages.core.config import load_config
from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--config", str(REPO_ROOT / "configs/sft/tiny.yaml"),
    "datasets=[{source: embedded, num_examples: 3000, tasks: [upper]}]",
    "train.num_train_epochs=2", "train.learning_rate=2e-3", "train.save_steps=1000",
    "eval.num_prompts=40", "eval.tasks=[upper]",
]


def _config(tmp_path: Path, *extra: str) -> sft.SFTStageConfig:
    return load_config(sft.SFTStageConfig, [*SMALL, f"output_dir={tmp_path / 'out'}", "run_name=t", *extra])


def test_sft_learns_saves_and_registers(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    metrics = sft.run(_config(tmp_path))
    entry = Registry().get("sft:latest")
    assert entry.status == "ready" and entry.parent == "tiny-llama" and entry.kind == "sft"
    assert entry.dataset_fingerprint and entry.tokenizer_hash and entry.chat_template_hash
    assert entry.config["train"]["learning_rate"] == 2e-3
    out = Path(entry.path)
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists() and (out / "README.md").exists()
    assert not list(out.glob("checkpoint-*"))
    # Learning: held-out exact match far above chance (random strings: ~0), loss well below its start (ln 261 = 5.6).
    assert metrics["eval/exact_match"] >= 0.3, metrics
    assert metrics["train/loss"] < 3.0
    # The starting model is scored on the same prompts: the untrained base answers none of them.
    assert metrics["eval/ref_exact_match"] <= 0.02 and "eval/ref_exact_match_unseen_templates" in metrics, metrics
    # Parameters moved away from the seeded initialisation.
    trained = load_file(out / "model.safetensors")
    initial = models.load_causal_lm(Registry().get("tiny-llama")).state_dict()
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"])
    # W&B ran offline (no credentials, no network) and its run directory holds the logged history.
    offline_runs = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert offline_runs and offline_runs[0].stat().st_size > 0
    assert entry.wandb_run and "offline-run" in entry.wandb_run
    assert b"eval/exact_match" in offline_runs[0].read_bytes()
    # The saved model is what the registry's eval sees.
    assert json.loads((out / "metrics.json").read_text())["eval/exact_match"] == metrics["eval/exact_match"]
    # A second run into the same directory is refused, and nothing is overwritten.
    before = (out / "model.safetensors").stat().st_mtime
    with pytest.raises(OutputDirError, match="pass resume=true"):
        sft.run(_config(tmp_path))
    assert (out / "model.safetensors").stat().st_mtime == before
    # resume=true on a finished, ready output is a no-op.
    assert sft.run(_config(tmp_path, "resume=true"))["eval/exact_match"] == metrics["eval/exact_match"]


def test_lora_changes_only_adapters(tmp_path: Path) -> None:
    from peft import PeftModel

    config = _config(tmp_path, "lora.enabled=true", "lora.merge_on_save=false", "train.max_steps=5", "eval.enabled=false")
    sft.run(config)
    out = tmp_path / "out"
    adapters = load_file(out / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    base = models.load_causal_lm(Registry().get("tiny-llama"))
    reference = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(out))
    changed = {name for name, param in model.named_parameters() if "lora_B" in name and param.abs().sum() > 0}
    assert changed, "LoRA B matrices start at zero; training must have moved them"
    for name, tensor in model.get_base_model().state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" not in name and clean in reference:
            assert torch.equal(tensor, reference[clean]), f"base weight {clean} changed"


def test_cli_registry_and_eval(tmp_path: Path) -> None:
    sft.run(_config(tmp_path, "train.max_steps=3", "eval.enabled=false"))
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    listing = subprocess.run([sys.executable, "-m", "stages.cli", "registry", "list", "--json"], capture_output=True, text=True, env=environment, check=True)
    names = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    assert names["sft"]["status"] == "ready" and names["tiny-llama"]["builtin"]
    shown = subprocess.run([sys.executable, "-m", "stages.cli", "registry", "show", "sft:1", "--json"], capture_output=True, text=True, env=environment, check=True)
    assert json.loads(shown.stdout)["parent"] == "tiny-llama"
    evaluated = subprocess.run(
        [sys.executable, "-m", "stages.cli", "eval", "sft:1", "--json", "--num-prompts", "20"], capture_output=True, text=True, env=environment, check=True
    )
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert {"eval/exact_match", "eval/exact_match/upper", "eval/exact_match_unseen_templates"} <= set(metrics)
    missing = subprocess.run([sys.executable, "-m", "stages.cli", "eval", "nope"], capture_output=True, text=True, env=environment)
    assert missing.returncode == 2 and "'nope' is not in the registry" in missing.stderr
