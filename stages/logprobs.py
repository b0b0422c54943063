"""Log-probabilities of tokens under a model's logits, and the masks that say which tokens count.

Torch only (no deepspeed, wandb or transformers: checked by import-linter), shared by our PPO
(stages/ppo), the held-out KL estimate (stages/evaluation.py) and the likelihood reward head
(reward/likelihood.py). Shapes: logits (batch, seq, vocab), tokens and masks (batch, seq).
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each chosen token under softmax(logits / temperature).

    logits: (batch, seq, vocab); tokens: (batch, seq) -> (batch, seq), float32.
    log p(token) = z[token] - logsumexp(z): no (batch, seq, vocab) log-softmax is materialised, and rows are
    processed one at a time so the float32 copy is at most (seq, vocab) even when logits are bf16.
    The temperature must be the sampling temperature, or the ratio in the PPO loss compares two different
    policies.
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        scaled = row_logits.float() / temperature  # (seq, vocab)
        chosen = scaled.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)  # (seq,)
        rows.append(chosen - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    logits: (batch, seq, vocab) -> (batch, seq), float32.
    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which avoids log(0); tokens of probability 0 (logit -inf,
    as some models emit for masked vocabulary) contribute 0 instead of 0 * -inf = NaN.
    """
    rows = []
    for row_logits in logits:
        scaled = row_logits.float() / temperature  # (seq, vocab)
        probabilities = torch.softmax(scaled, dim=-1)
        weighted_logits = torch.where(probabilities > 0, probabilities * scaled, 0.0)
        rows.append(torch.logsumexp(scaled, dim=-1) - weighted_logits.sum(-1))
    return torch.stack(rows)


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first eos, 0 after it.

    response_ids: (batch, response_len) -> (batch, response_len), same dtype as a float mask (float32).
    Whatever follows the first eos (pad, or tokens generated for other rows of the batch) is not part of the
    episode. Responses without eos keep all their tokens (they were cut at the length limit).
    """
    is_eos = (response_ids == eos_token_id).long()
    # Number of eos strictly before each position: a token is kept while none has been seen yet.
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).float()


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask (batch, seq) -> (batch,) long; 0 for an all-zero row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).max(dim=1).values
