"""The pairwise loss on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from reward.losses import pairwise_accuracy, pairwise_loss


def test_pairwise_loss_hand_computed() -> None:
    """Rewards chosen = [2, 0], rejected = [0, 1].

    Differences: [2, -1]. -log σ(2) = log(1 + e^-2) = 0.126928; -log σ(-1) = log(1 + e^1) = 1.313262.
    Mean: (0.126928 + 1.313262) / 2 = 0.720095.
    """
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)


def test_margin_and_centering_hand_computed() -> None:
    """chosen = [1], rejected = [0], margin = [1]: difference 1 - 0 - 1 = 0, -log σ(0) = log 2 = 0.693147.
    Centring with c = 0.5: 0.5 * (1 + 0)^2 = 0.5. Total 1.193147."""
    loss = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margins=torch.tensor([1.0]), center_rewards_coefficient=0.5)
    assert loss.item() == pytest.approx(math.log(2) + 0.5, abs=1e-6)


def test_accuracy_counts_strict_wins() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])) == 0.5
