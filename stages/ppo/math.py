"""The tensor math of PPO for RLHF, as small pure functions (torch only: no deepspeed, wandb, transformers).

Conventions, shared by every function here, by `stages/logprobs.py` and by the trainer (`stages/ppo/trainer.py`):
- A batch holds `batch` episodes; each episode is a prompt followed by a response of at most `response_len`
  tokens. Per-token tensors are `(batch, response_len)` and are aligned on response tokens: index t is the
  t-th generated token, its log-probability, and the critic's value of the state *before* it was generated.
- `response_mask` is 1 for real response tokens (up to and including the first eos) and 0 for padding.
  Padding never contributes to a mean, a variance, a reward, an advantage or a loss.
- A sequence-level score (reward model and/or reward function) arrives at the last real response token;
  every token also pays a KL penalty towards the reference policy (Ziegler et al. 2019, Ouyang et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from stages.logprobs import last_token_index

KLEstimator = Literal["k1", "k2", "k3"]


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------
def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of the entries where mask is 1 (over `dim`, or over everything)."""
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries where mask is 1 (over `dim`, or over everything). values, mask: same shape."""
    # Multiplying by the mask (not indexing) keeps gradients and shapes simple; a zero count raises
    # NaN on purpose rather than silently returning 0 for an empty batch.
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the entries where mask is 1; `unbiased` applies Bessel's correction n / (n - 1)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked entries for the unbiased variance, got {count}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, epsilon: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / std over the unmasked entries; masked entries come back as 0.

    With `shift_mean=False` the mean is added back: only the scale changes. Rewards are whitened that way,
    because shifting every per-token reward by a constant would reward or punish length.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + epsilon)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over unmasked tokens: 1 is a perfect critic, 0 predicts the
    mean, negative is worse than predicting the mean. Returns NaN when the returns are constant."""
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)


# --------------------------------------------------------------------------------------------------
# KL penalty and rewards
# --------------------------------------------------------------------------------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the sampled tokens.

    logprobs, ref_logprobs: (batch, response_len) -> (batch, response_len). With log r = ref - logp
    (tokens are sampled from the policy; see J. Schulman, "Approximating KL divergence", 2020):
    - k1 = -log r = logp - ref_logp: unbiased, can be negative per token;
    - k2 = (log r)^2 / 2: biased, always >= 0;
    - k3 = (r - 1) - log r: unbiased and always >= 0, lower variance than k1 when the policies are close.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision for r close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Reward of every response token: -kl_coef * kl, plus the sequence score on the last real token.

    scores: (batch,); kl, response_mask: (batch, response_len) -> (batch, response_len), 0 on padding.
    Rows without any response token get no score (there is no token to carry it).
    """
    rewards = -kl_coef * kl * response_mask
    last_index = last_token_index(response_mask)
    has_tokens = (response_mask.sum(dim=1) > 0).to(rewards.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index] += scores.to(rewards.dtype) * has_tokens
    return rewards


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------
def gae_advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    rewards, values, response_mask: (batch, response_len) -> (advantages, returns), both (batch, response_len)
    and 0 on padding. values[:, t] is V(state before token t). The episode ends after the last real token,
    so the value after it is 0 (the terminal state is worth nothing more than its reward):
        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1} * m_{t+1}
        returns = A + V   (the lambda-return: the critic's regression target)
    The mask must be a prefix of ones per row (true for responses cut at eos).
    """
    batch, length = rewards.shape
    advantages_reversed = []
    next_advantage = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    for t in reversed(range(length)):
        # Zeroing through the mask of t+1 ends the episode at the last real token, whatever the padding holds.
        next_mask = response_mask[:, t + 1] if t + 1 < length else torch.zeros_like(next_value)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        advantage = delta + gamma * lam * next_advantage * next_mask
        advantages_reversed.append(advantage)
        next_advantage, next_value = advantage, values[:, t]
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * response_mask
    returns = (advantages + values) * response_mask
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, to minimise
    clip_fraction: torch.Tensor  # share of tokens whose gradient the clip removed
    approx_kl: torch.Tensor  # estimate of KL(old policy || new policy) on this mini-batch


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017), negated to be minimised, averaged over real tokens.

    All inputs (batch, response_len). ratio = exp(logp - old_logp);
    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))): the pessimistic bound, so moving the
    ratio outside [1 - eps, 1 + eps] in the direction the advantage favours earns nothing.
    approx_kl uses k3 with r = new / old, an unbiased and non-negative estimate of KL(old || new).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


@dataclass
class ValueLossOutput:
    loss: torch.Tensor  # scalar, to minimise
    clip_fraction: torch.Tensor  # share of tokens where the clipped error was the larger one


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLossOutput:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, ±eps).

    All inputs (batch, response_len). The clip keeps the critic close to the values the advantages were
    computed with, as the policy clip does for the actor (the "N implementation details" write-up notes it
    matters less than the policy clip; set cliprange_value large to disable it).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), response_mask)
    return ValueLossOutput(loss=loss, clip_fraction=clip_fraction)


def entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over real response tokens (subtract entropy_coef times it from the loss)."""
    return masked_mean(entropy, response_mask)


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a proportional controller in log space.

    error = clip(KL / target - 1, -0.2, 0.2);  coef <- coef * (1 + error * n_steps / horizon)
    where KL is the observed per-episode KL (summed over tokens) and n_steps the episodes just collected.
    The clip bounds one update's change, so a single noisy batch cannot swing the coefficient.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target_kl = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------------
# Reward normalisation
# --------------------------------------------------------------------------------------------------
class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (Chan et al.'s parallel update).

    Used to normalise reward-model scores with statistics that change slowly, rather than re-centring every
    batch (which would make the reward of a response depend on the others sampled with it).
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0  # population variance of everything seen so far
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        """Fold in a batch of values (any shape)."""
        values = values.detach().double().flatten()
        batch_count = values.numel()
        batch_mean = values.mean().item()
        batch_var = values.var(unbiased=False).item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        # Sum of squared deviations of the union = both parts' own + the spread between their means.
        sum_of_squares = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var = sum_of_squares / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
