"""Held-out reward-model evaluation: pairwise accuracy and reward margin on pairs never trained on."""

from __future__ import annotations

from typing import Any

import torch

from reward.losses import pairwise_accuracy
from reward.pairs import embedded_pairs
from reward.scoring import score_across_ranks
from stages import evaluation, tasks


def heldout_pairs(
    policy: Any | None, tokenizer: Any, num_pairs: int, seed: int, temperature: float = 1.0, families: list[str] | None = None
) -> list[dict[str, Any]]:
    """Pairs on eval-split prompts (of `families`, default all); negatives sampled from `policy` where
    it errs, else corruptions."""
    rows = tasks.generate(num_pairs, seed=seed, split="eval", families=families)
    sampled = None
    if policy is not None:
        sampled = evaluation.sample_responses(policy, tokenizer, [r["prompt"] for r in rows], seed, 16, temperature)
    return embedded_pairs(num_pairs, seed, split="eval", sampled_responses=sampled, rows=rows)


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
    if on_policy.any():
        metrics["eval/pairwise_accuracy_onpolicy"] = pairwise_accuracy(chosen[on_policy], rejected[on_policy])
    if (~on_policy).any():
        metrics["eval/pairwise_accuracy_corrupted"] = pairwise_accuracy(chosen[~on_policy], rejected[~on_policy])
    families = [pair.get("task") for pair in pairs]
    for family in sorted({f for f in families if f}):
        selected = torch.tensor([f == family for f in families])
        metrics[f"eval/pairwise_accuracy/{family}"] = pairwise_accuracy(chosen[selected], rejected[selected])
    return metrics


def evaluate_reward_model(entry: Any, num_pairs: int = 500, seed: int = 1234) -> dict[str, float]:
    """`rlhf eval` on a reward entry: held-out pairs, with on-policy negatives from its parent model if registered."""
    from reward.models import load_reward
    from stages import models
    from stages.registry import Registry, RegistryError

    tokenizer = models.load_tokenizer(entry)
    reward_model = load_reward(entry)
    policy = None
    if entry.parent:
        try:
            parent = Registry().get(entry.parent)
            policy = models.load_causal_lm(parent) if parent.kind != "base" else None
        except (RegistryError, models.ModelLoadError):
            policy = None
    return pairwise_metrics(reward_model, tokenizer, heldout_pairs(policy, tokenizer, num_pairs, seed))
