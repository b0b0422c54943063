"""The embedded tasks' verifier: exact match of the answer, and the same check as a reward function.

`answer_reward` follows the one reward-function signature (stages.core.protocols.RewardFunction), so our
PPO calls it as it is and TRL's GRPO/RLOO through `protocols.as_trl_reward`.
"""

from __future__ import annotations

from typing import Any

from stages.core.protocols import Messages, RewardFunction, prompt_key


def is_correct(response: str, answer: str) -> bool:
    """Exact match after trimming surrounding whitespace (the verifiable check of every family)."""
    return response.strip() == answer.strip()


def answer_reward(rows: list[dict[str, Any]]) -> RewardFunction:
    """1.0 where the response is the exact answer of its prompt, else 0.0; `rows` hold each `prompt`
    (chat messages) with its `answer`. A prompt that is not among the rows is an error, not a silent 0."""
    import torch

    answers = {prompt_key(row["prompt"]): row["answer"] for row in rows}

    def exact_answer_reward(prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        scores = []
        for prompt, response in zip(prompts, responses):
            key = prompt_key(prompt)
            if key not in answers:
                raise KeyError(f"answer_reward: no answer known for the prompt {prompt!r}")
            scores.append(float(is_correct(response, answers[key])))
        return torch.tensor(scores)

    return exact_answer_reward

