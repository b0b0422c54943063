"""Reward models and critics from registry references: a scalar head on a causal LM backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reward import likelihood
from stages.core import models
from stages.core.registry import Entry, Registry


def load_reward(entry: Entry, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> Any:
    """A registered reward model with either head: a sequence classifier (`head: classifier`) or a causal LM
    read through its likelihood (`head: likelihood`, recorded in its config.json). Both return
    `.logits` of shape (batch, 1) and are read the same way by scoring, PPO and TRL's trainers."""
    if not entry.builtin and likelihood.is_likelihood_head(entry.path):
        return likelihood.read_as_reward_model(models.load_causal_lm(entry, trust_remote_code, dtype))
    return models.load_sequence_classifier(entry, trust_remote_code, dtype)


def is_reward_model(entry: Entry) -> bool:
    """A registered reward model, or a checkpoint with either reward head (a path given as the model)."""
    if entry.kind == "reward":
        return True
    if entry.builtin or not (Path(entry.path) / "config.json").is_file():
        return False
    if likelihood.is_likelihood_head(entry.path):
        return True
    architectures = json.loads((Path(entry.path) / "config.json").read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def load_critic(ref: str, trust_remote_code: bool = False) -> Any:
    """A value model initialised from `ref` (a reward model by default, or an SFT model: fresh head).

    A likelihood-head reward model is a causal LM, so its critic is its backbone with a fresh value head."""
    entry = Registry().get(ref)
    return models.load_sequence_classifier(entry, trust_remote_code)
