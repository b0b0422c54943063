"""The shapes that cross layers: chat messages and the one reward-function signature.

A reward function scores decoded responses to chat prompts: our PPO calls it on every rollout, the
held-out evaluation on the policy's and the reference's answers. TRL's GRPO/RLOO call reward functions
with their own convention (keyword columns, completions as messages); `as_trl_reward` adapts ours to it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


class RewardFunction(Protocol):
    def __call__(self, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        """One score per (prompt, response), shape (batch,)."""
        ...


def prompt_key(messages: Messages) -> str:
    """A chat prompt as a hashable key: callers that hold prompts only look their rows' columns up by it."""
    return json.dumps([[message["role"], message["content"]] for message in messages])


def as_trl_reward(function: RewardFunction, name: str) -> Callable[..., list[float]]:
    """`function` in TRL's reward-function convention: (prompts, completions, **dataset columns) -> floats.
    TRL logs each reward under its function's __name__, hence `name`."""

    def trl_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        responses = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
        return [float(score) for score in function(prompts, responses)]

    trl_reward.__name__ = trl_reward.__qualname__ = name
    return trl_reward
