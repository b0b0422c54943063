"""Hand-computed checks of stages/ppo/math.py and stages/logprobs.py.

Every expected number below is worked out in the docstring of its test, never by calling a second
implementation of the same formula, so a wrong sign, a missing mask or an off-by-one fails the test.
"""

import math

import pytest
import torch

from stages.logprobs import entropy_from_logits, last_token_index, response_mask_from_eos, token_logprobs
from stages.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_bonus,
    explained_variance,
    gae_advantages_and_returns,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- log-probs and entropy
def test_token_logprobs_hand_computed():
    """Logits [0, ln 3] are probabilities [1/4, 3/4]: log p(token 1) = ln(3/4) = -0.287682.

    At temperature 2 the logits become [0, ln(3)/2] = [0, ln sqrt(3)], probabilities
    [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]: log p(token 0) = -ln(1 + sqrt 3) = -1.005053.
    """
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    assert_close(token_logprobs(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    assert_close(token_logprobs(logits, tokens, temperature=2.0)[0, 1], -math.log(1 + math.sqrt(3)))


def test_token_logprobs_upcasts_bf16():
    """bf16 logits [0, ln 3] still give ln(3/4) = -0.2877 to bf16 input precision (ln 3 ~ 1.0986 -> 1.1016)."""
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    result = token_logprobs(logits, torch.tensor([[1]]))
    assert result.dtype == torch.float32
    assert_close(result, [[math.log(0.75)]], atol=3e-3)


def test_entropy_hand_computed():
    """Uniform over 4 tokens: H = ln 4 = 1.386294.
    Probabilities [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335."""
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, math.log(3.0), -float("inf"), -float("inf")]]])
    assert_close(entropy_from_logits(logits), [[math.log(4.0), 0.562335]], atol=1e-5)


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    """eos = 1. [5, 1, 7, 1] keeps 5 and the first eos; [5, 6, 7, 8] has no eos and keeps everything;
    [1, 0, 0, 0] is an immediate eos: one token."""
    response_ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert_close(response_mask_from_eos(response_ids, eos_token_id=1), expected)


# ---------------------------------------------------------------------------- masked statistics
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_masked_mean_ignores_padding():
    """Unmasked entries 1..5: mean 15 / 5 = 3 (the padded 100 would give 19.17). Per row: 6/3 = 2, 9/2 = 4.5."""
    assert_close(masked_mean(VALUES, MASK), 3.0)
    assert_close(masked_mean(VALUES, MASK, dim=1), [2.0, 4.5])


def test_masked_var_hand_computed():
    """1..5 around mean 3: squared deviations 4 + 1 + 0 + 1 + 4 = 10. Population 10 / 5 = 2, unbiased 10 / 4 = 2.5."""
    assert_close(masked_var(VALUES, MASK), 2.5)
    assert_close(masked_var(VALUES, MASK, unbiased=False), 2.0)


def test_masked_whiten_hand_computed():
    """(x - 3) / sqrt(2.5) with sqrt(2.5) = 1.581139: [-1.264911, -0.632456, 0, 0.632456, 1.264911];
    the padded entry comes back 0. Without shifting the mean, 3 is added back to the real entries."""
    s = math.sqrt(2.5)
    expected = [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]]
    assert_close(masked_whiten(VALUES, MASK), expected, atol=1e-5)
    expected_unshifted = [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]]
    assert_close(masked_whiten(VALUES, MASK, shift_mean=False), expected_unshifted, atol=1e-5)


def test_explained_variance_hand_computed():
    """returns [1, 2, 3, 4], values [1, 2, 3, 5]: residuals [0, 0, 0, -1] have mean -1/4 and population
    variance (3 * 1/16 + 9/16) / 4 = 0.1875; Var(returns) = 1.25; EV = 1 - 0.1875 / 1.25 = 0.85.
    A fifth, masked entry with a wild value changes nothing."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert_close(explained_variance(values, returns, mask), 0.85, atol=1e-6)


# ---------------------------------------------------------------------------- KL and rewards
def test_kl_estimators_hand_computed():
    """logp = ln 1/2, ref = ln 1/4, so log r = ref - logp = -ln 2 and r = 1/2.
    k1 = ln 2 = 0.693147; k2 = (ln 2)^2 / 2 = 0.240227; k3 = (1/2 - 1) + ln 2 = 0.193147."""
    logprobs, ref_logprobs = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), [[0.693147]], atol=1e-6)
    assert_close(kl_per_token(logprobs, ref_logprobs, "k2"), [[0.240227]], atol=1e-6)
    assert_close(kl_per_token(logprobs, ref_logprobs, "k3"), [[0.193147]], atol=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logprobs, ref_logprobs, "k4")


def test_kl_estimators_are_zero_for_identical_policies():
    """r = 1 gives k1 = k2 = k3 = 0 exactly."""
    logprobs = torch.tensor([[-0.3, -2.0]])
    for estimator in ("k1", "k2", "k3"):
        assert_close(kl_per_token(logprobs, logprobs.clone(), estimator), [[0.0, 0.0]])


def test_last_token_index():
    """Masks [1,1,0], [1,1,1], [0,0,0]: last real token at 1, 2, and 0 for the empty row."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert last_token_index(mask).tolist() == [1, 2, 0]


def test_per_token_rewards_hand_computed():
    """kl_coef 0.1. Row 0 (2 real tokens, kl 0.1, 0.2, score 1): [-0.01, -0.02 + 1 = 0.98, 0 (padding,
    whose kl 0.3 is ignored)]. Row 1 (3 tokens, kl 0.5 each, score -2): [-0.05, -0.05, -0.05 - 2 = -2.05]."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = per_token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.1)
    assert_close(rewards, [[-0.01, 0.98, 0.0], [-0.05, -0.05, -2.05]])


# ---------------------------------------------------------------------------- GAE
def test_gae_three_tokens_gamma_1_lambda_095():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lambda 0.95; the value after the last token is 0.
        t=2: delta = 1 + 0 - 0.7 = 0.3;        A2 = 0.3
        t=1: delta = 0 + 0.7 - 0.6 = 0.1;      A1 = 0.1 + 0.95 * 0.3 = 0.385
        t=0: delta = 0 + 0.6 - 0.5 = 0.1;      A0 = 0.1 + 0.95 * 0.385 = 0.46575
    returns = A + V = [0.96575, 0.985, 1.0]."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(advantages, [[0.46575, 0.385, 0.3]])
    assert_close(returns, [[0.96575, 0.985, 1.0]])


def test_gae_padding_never_contributes():
    """Row 0 is the example above followed by two padding tokens holding a reward of 5 and values 9, 9:
    its advantages must be unchanged and 0 on padding (the episode ends at the last real token).
    Row 1, two real tokens, rewards [0, 2], values [1, 1], gamma 0.9, lambda 0.5:
        t=1: delta = 2 - 1 = 1;                 A1 = 1
        t=0: delta = 0 + 0.9 * 1 - 1 = -0.1;    A0 = -0.1 + 0.9 * 0.5 * 1 = 0.35
    returns [1.35, 2]. Row 0 recomputed with gamma 0.9, lambda 0.5:
        t=2: A2 = 1 - 0.7 = 0.3; t=1: A1 = 0.9 * 0.7 - 0.6 + 0.45 * 0.3 = 0.165;
        t=0: A0 = 0.9 * 0.6 - 0.5 + 0.45 * 0.165 = 0.11425."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0], [0.0, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(advantages, [[0.11425, 0.165, 0.3, 0.0, 0.0], [0.35, 1.0, 0.0, 0.0, 0.0]])
    assert_close(returns, [[0.61425, 0.765, 1.0, 0.0, 0.0], [1.35, 2.0, 0.0, 0.0, 0.0]])


def test_gae_lambda_1_gamma_1_is_the_monte_carlo_return_minus_value():
    """With gamma = lambda = 1 the advantages telescope to (sum of future rewards) - V_t:
    rewards [-0.1, -0.1, 2], values [0.3, 0.2, 0.1]: returns [1.8, 1.9, 2.0], advantages [1.5, 1.7, 1.9]."""
    rewards = torch.tensor([[-0.1, -0.1, 2.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    advantages, returns = gae_advantages_and_returns(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(returns, [[1.8, 1.9, 2.0]], atol=1e-6)
    assert_close(advantages, [[1.5, 1.7, 1.9]], atol=1e-6)


# ---------------------------------------------------------------------------- losses
def test_clipped_policy_loss_hand_computed():
    """cliprange 0.2.
    Token a: ratio 1.5, A = +1: unclipped -1.5, clipped -1 * 1.2 = -1.2; max = -1.2 (clipped, no gradient).
    Token b: ratio 0.5, A = +2: unclipped -1.0, clipped -2 * 0.8 = -1.6; max = -1.0 (unclipped).
    Token c is padding with an absurd ratio and advantage.
    loss = (-1.2 - 1.0) / 2 = -1.1; clip fraction 1/2;
    approx KL (k3 with r = new/old): a: 0.5 - ln 1.5 = 0.094535, b: -0.5 + ln 2 = 0.193147, mean 0.143841.
    d loss / d logp: a: 0 (clipped); b: -A * ratio / 2 tokens = -2 * 0.5 / 2 = -0.5; c: 0 (masked)."""
    old_logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = (old_logprobs + torch.tensor([[math.log(1.5), math.log(0.5), 5.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    output = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    assert_close(output.loss, -1.1)
    assert_close(output.clip_fraction, 0.5)
    assert_close(output.approx_kl, 0.143841, atol=1e-6)
    output.loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.5, 0.0]])


def test_clipped_policy_loss_negative_advantage():
    """ratio 0.5, A = -1: unclipped 0.5, clipped -(-1) * 0.8 = 0.8; max = 0.8, the clipped (flat) branch,
    so the policy gains nothing by lowering this token further. ratio 1.5, A = -1: unclipped 1.5,
    clipped 1.2; max = 1.5, unclipped: a token made too likely despite a negative advantage keeps its
    gradient. loss = (0.8 + 1.5) / 2 = 1.15, clip fraction 1/2."""
    old_logprobs = torch.zeros(1, 2)
    logprobs = torch.tensor([[math.log(0.5), math.log(1.5)]])
    output = clipped_policy_loss(logprobs, old_logprobs, torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), 0.2)
    assert_close(output.loss, 1.15)
    assert_close(output.clip_fraction, 0.5)


def test_clipped_value_loss_hand_computed():
    """cliprange_value 0.2, old values [0, 0].
    Token a: V = 1, R = 2: V_clip = 0.2; errors (1 - 2)^2 = 1 and (0.2 - 2)^2 = 3.24; max 3.24 (clipped).
    Token b: V = 0.1, R = -1: inside the clip, both errors 1.21; max 1.21, not counted as clipped.
    Token c is padding. loss = 0.5 * (3.24 + 1.21) / 2 = 1.1125; clip fraction 1/2."""
    values = torch.tensor([[1.0, 0.1, 30.0]])
    old_values = torch.zeros(1, 3)
    returns = torch.tensor([[2.0, -1.0, -30.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    output = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert_close(output.loss, 1.1125, atol=1e-6)
    assert_close(output.clip_fraction, 0.5)


def test_entropy_bonus_masks_padding():
    """Entropies [1, 3] on real tokens and 100 on padding: bonus (1 + 3) / 2 = 2."""
    assert_close(entropy_bonus(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])), 2.0)


# ---------------------------------------------------------------------------- controllers and normalisation
def test_adaptive_kl_controller_hand_computed():
    """coef 0.2, target 6, horizon 10000, 64 episodes per update.
    KL 9: error 9/6 - 1 = 0.5, clipped to 0.2; coef * (1 + 0.2 * 64 / 10000) = 0.2 * 1.00128 = 0.200256.
    Then KL 5.4: error -0.1; coef * (1 - 0.1 * 64 / 10000) = 0.200256 * 0.99936 = 0.200127836."""
    controller = AdaptiveKLController(0.2, target_kl=6.0, horizon=10000)
    controller.update(9.0, n_steps=64)
    assert controller.value == pytest.approx(0.200256, abs=1e-9)
    controller.update(5.4, n_steps=64)
    assert controller.value == pytest.approx(0.200127836, abs=1e-9)
    restored = AdaptiveKLController(1.0, target_kl=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05


def test_running_moments_combine_batches():
    """[1, 2, 3] then [4, 5]: all of 1..5, mean 3, population variance 2, count 5."""
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert (moments.mean, moments.var, moments.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    assert moments.std == pytest.approx(math.sqrt(2.0))
