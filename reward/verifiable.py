"""Verifiable rewards of the embedded tasks: 1 for the exact answer, 0 otherwise.

The signature follows TRL's reward-function convention (GRPO/RLOO pass dataset columns as
keyword arguments), so the same function serves TRL's trainers and ours.
"""

from __future__ import annotations

from typing import Any

from stages.tasks import is_correct


def exact_answer_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """Reward 1.0 where the completion's text equals the task's answer."""
    return [float(is_correct(_text(completion), expected)) for completion, expected in zip(completions, answer)]


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]  # conversational: [{"role": "assistant", "content": ...}]
