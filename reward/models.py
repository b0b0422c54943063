"""Reward models and critics from registry references: a scalar head on a causal LM backbone."""

from __future__ import annotations

from typing import Any

from stages import models
from stages.registry import Registry


def load_reward_model(ref: str, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, entry) of a reward model (kind `reward`) or any model given a scalar head."""
    entry = Registry().get(ref)
    return models.load_sequence_classifier(entry, trust_remote_code), models.load_tokenizer(entry, trust_remote_code), entry


def load_critic(ref: str, trust_remote_code: bool = False) -> Any:
    """A value model initialised from `ref` (a reward model by default, or an SFT model: fresh head)."""
    entry = Registry().get(ref)
    return models.load_sequence_classifier(entry, trust_remote_code)
