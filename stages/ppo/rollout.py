"""A PPO rollout: the batch of episodes one step trains on, and the model inputs built from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.core.protocols import Messages


@dataclass
class Rollout:
    """A batch of episodes with everything the PPO epochs need. Per-token tensors are (batch, response_len),
    aligned on response tokens, and 0 where response_mask is 0."""

    prompts: list[Messages]  # the chat prompts, as the reward function gets them
    responses: list[str]  # decoded responses, special tokens removed
    prompt_ids: torch.Tensor  # (batch, prompt_len), left padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # pad after the first eos
    response_mask: torch.Tensor  # float
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor  # values[:, t] = V(prompt + response[:t])
    entropy: torch.Tensor
    raw_scores: torch.Tensor  # (batch,) reward model + reward function
    scores: torch.Tensor  # (batch,) after normalisation, clipping and the missing-eos penalty
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    generation_seconds: float
    scoring_seconds: float
    proxy_scores: torch.Tensor | None = None  # (batch,) the reward model's own score (before reward_model_coef)
    gold_scores: torch.Tensor | None = None  # (batch,) the monitored gold reward: logged, never optimised


def sequence_inputs(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Model inputs for left-padded prompt + right-padded response: one contiguous run of real tokens per row,
    positions counted from its first token (0 on padding), as generate() counted them."""
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids}


def check_finite(step: int, quantity: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"PPO step {step}: non-finite {quantity}")
