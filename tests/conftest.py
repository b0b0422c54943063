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


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from stages import models
    from stages.registry import Registry

    return models.load_tokenizer(Registry(os.devnull).get("tiny-llama"))
