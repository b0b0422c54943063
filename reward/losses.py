"""Pairwise reward-model loss (Bradley-Terry), pure torch: importable without deepspeed or wandb.

TRL's RewardTrainer computes the same quantity in training; this function is the reference its
test and our evaluation use, so the definition lives in one readable place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected − margin), averaged; plus c·mean((r_chosen + r_rejected)²) to centre rewards.

    Shapes: (batch,) each. The centring term (Eisenstein et al., 2023) keeps rewards near zero so
    they are comparable across prompts and PPO's reward scale stays stable.
    """
    differences = chosen_rewards - rejected_rewards
    if margins is not None:
        differences = differences - margins
    loss = -F.logsigmoid(differences).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher."""
    return (chosen_rewards > rejected_rewards).float().mean().item()
