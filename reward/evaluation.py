"""Held-out reward-model evaluation: pairwise accuracy and reward margin on pairs never trained on.

The pairs come from the caller (embedded held-out pairs: stages/tasks/pairs.py; `rlhf eval` of a reward
model: stages/evaluation.py)."""

from __future__ import annotations

from typing import Any

import torch

from reward.losses import pairwise_accuracy
from reward.scoring import score_across_ranks


def pairwise_metrics(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy and margins of `model` on held-out pairs (collective under the launcher)."""
    prompts = [pair["prompt"] for pair in pairs]
    chosen = score_across_ranks(model, tokenizer, prompts, [pair["chosen"][-1]["content"] for pair in pairs])
    rejected = score_across_ranks(model, tokenizer, prompts, [pair["rejected"][-1]["content"] for pair in pairs])
    metrics = {
        "eval/pairwise_accuracy": pairwise_accuracy(chosen, rejected),
        "eval/reward_margin": (chosen - rejected).mean().item(),
        "eval/reward_chosen": chosen.mean().item(),
        "eval/reward_rejected": rejected.mean().item(),
        "eval/num_pairs": float(len(pairs)),
    }
    on_policy = torch.tensor([bool(pair.get("on_policy")) for pair in pairs])
    if not any("on_policy" in pair for pair in pairs):  # the user's pairs: no negatives of ours to tell apart
        return metrics
    if on_policy.any():
        metrics["eval/pairwise_accuracy_onpolicy"] = pairwise_accuracy(chosen[on_policy], rejected[on_policy])
    if (~on_policy).any():
        metrics["eval/pairwise_accuracy_corrupted"] = pairwise_accuracy(chosen[~on_policy], rejected[~on_policy])
    for key, name in (("task", "eval/pairwise_accuracy/"), ("contrast", "eval/pairwise_accuracy_contrast/")):
        groups = [pair.get(key) for pair in pairs]  # contrast: what a judged pair tells apart (stages/tasks/world.py)
        for group in sorted({g for g in groups if g}):
            selected = torch.tensor([g == group for g in groups])
            metrics[name + group] = pairwise_accuracy(chosen[selected], rejected[selected])
    return metrics

