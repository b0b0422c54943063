"""PPOConfig: every setting of our PPO besides the models and the prompts (the policy stage's `ppo:` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class PPOConfig:
    """Everything PPO needs besides the models and prompts; validated once, in __post_init__."""

    # Schedule
    seed: int = _help("Seed of sampling, mini-batch shuffling and prompt order.", 42)
    num_steps: int | None = _help("PPO steps (rollout + update). Set to null to use total_episodes.", 100)
    total_episodes: int | None = _help("Instead of num_steps: steps = ceil(total_episodes / (batch_size x processes)).", None)
    batch_size: int = _help("Prompts rolled out per PPO step on each process.", 64)
    mini_batch_size: int = _help("Episodes per optimiser step on each process; must divide batch_size.", 16)
    ppo_epochs: int = _help("Passes over each rollout; more reuse is more off-policy (watch ppo/clip_fraction).", 4)
    # Optimisation
    actor_learning_rate: float = _help("AdamW learning rate of the actor.", 3e-6)
    critic_learning_rate: float = _help("AdamW learning rate of the critic.", 1e-5)
    weight_decay: float = _help("AdamW weight decay, both models.", 0.0)
    lr_scheduler: Literal["constant", "linear"] = _help("'linear' decays both learning rates to 0 over the run.", "constant")
    max_grad_norm: float = _help("Gradient-norm clip, per model.", 1.0)
    bf16: bool = _help("Fills DeepSpeed's bf16.enabled 'auto'. Without DeepSpeed, load the models in bf16 yourself.", False)
    # Generation
    max_new_tokens: int = _help("Response length limit; responses cut there have no eos (see missing_eos_penalty).", 64)
    temperature: float = _help("Sampling temperature; log-probs use the same scaling.", 1.0)
    top_p: float = _help("Nucleus sampling; below 1 the PPO ratio is only approximately on-policy.", 1.0)
    missing_eos_penalty: float | None = _help("Subtracted from the (normalised) score of responses without eos.", None)
    reward_model_coef: float = _help(
        "Weight of the reward model's score in the episode score (the reward function, if any, has weight 1). "
        "Below 1 leans on a verifiable reward when the reward model is weak.", 1.0
    )
    reward_model_baseline: Literal["none", "reference"] = _help(
        "reference: score a response by the reward model's score minus the reference's log-likelihood of it (needs a "
        "likelihood-head reward model and temperature 1): DPO's implicit reward, which keeps what reward-model training "
        "changed and drops what the two models share (word length, a rare prompt).", "none"
    )
    gather_params_for_generation: bool = _help(
        "ZeRO-3: gather the whole actor for generate (fast; needs the actor in memory) instead of layer by layer.", True
    )
    # KL penalty
    kl_coef: float = _help("Coefficient of the per-token KL penalty (the initial one with adaptive_kl).", 0.05)
    kl_estimator: Literal["k1", "k3"] = _help("Per-token KL in the reward: k1 = logp - ref_logp; k3 = (r-1) - log r >= 0.", "k1")
    adaptive_kl: bool = _help("Steer kl_coef towards target_kl (Ziegler et al. 2019).", False)
    target_kl: float = _help("Adaptive KL: target KL per episode (summed over its tokens).", 6.0)
    kl_horizon: int = _help("Adaptive KL: episodes over which the coefficient may move by a factor of about e^0.2.", 10000)
    # Advantages and losses
    gamma: float = _help("Discount per token.", 1.0)
    lam: float = _help("GAE lambda: lower leans on the critic (less variance, more bias).", 0.95)
    cliprange: float = _help("Policy ratio clip epsilon.", 0.2)
    cliprange_value: float = _help("Value clip around the rollout's values.", 0.2)
    vf_coef: float = _help("Value-loss weight. The critic has its own Adam, so this mostly moves its gradient clip.", 0.1)
    entropy_coef: float = _help("Entropy bonus weight; above 0 costs a full softmax per training forward.", 0.0)
    whiten_rewards: bool = _help("Scale per-token rewards to unit variance (mean kept) before GAE.", False)
    whiten_advantages: bool = _help("Whiten the advantages of each rollout before the PPO epochs.", True)
    reward_normalisation: Literal["none", "running", "batch"] = _help(
        "Normalise scores with a running mean/std over the run, or with each batch's.", "none"
    )
    reward_clip: float | None = _help("Clip (normalised) scores to [-reward_clip, reward_clip].", None)
    early_stop_approx_kl: float | None = _help(
        "Skip a step's remaining PPO epochs once an epoch's mean approx KL (old || new policy) exceeds this.", None
    )
    # Logging and checkpoints
    logging_steps: int = _help("Call the log hook every this many steps.", 1)
    sample_table_every: int | None = _help("Pass (prompt, response, reward) samples to the log hook every N steps.", 10)
    sample_table_size: int = _help("Samples per table.", 8)
    save_steps: int | None = _help("Checkpoint every this many steps; the last step is always checkpointed.", 50)
    save_total_limit: int | None = _help("Keep only the newest N checkpoints; null keeps all.", None)

    def __post_init__(self) -> None:
        def require(condition: bool, name: str, expectation: str) -> None:
            if not condition:
                raise ValueError(f"PPOConfig.{name} must be {expectation}, got {getattr(self, name)!r}")

        if (self.num_steps is None) == (self.total_episodes is None):
            raise ValueError("PPOConfig: set exactly one of num_steps and total_episodes (num_steps: null to use the other)")
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon", "logging_steps",
                     "sample_table_size", "actor_learning_rate", "critic_learning_rate", "max_grad_norm", "temperature",
                     "target_kl", "cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, name, "positive")
        for name in ("num_steps", "total_episodes", "missing_eos_penalty", "reward_clip", "early_stop_approx_kl",
                     "sample_table_every", "save_steps", "save_total_limit"):
            require(getattr(self, name) is None or getattr(self, name) > 0, name, "positive or null")
        for name in ("weight_decay", "kl_coef", "vf_coef", "entropy_coef", "reward_model_coef"):
            require(getattr(self, name) >= 0, name, ">= 0")
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        require(self.batch_size % self.mini_batch_size == 0, "mini_batch_size", f"a divisor of batch_size={self.batch_size}")
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", "'k1' or 'k3'")
        require(self.reward_model_baseline in ("none", "reference"), "reward_model_baseline", "'none' or 'reference'")
        require(self.reward_model_baseline == "none" or self.temperature == 1.0, "temperature",
                "1 with reward_model_baseline: reference (the reference log-probs are taken at the sampling temperature)")
        require(self.reward_normalisation in ("none", "running", "batch"), "reward_normalisation", "'none', 'running' or 'batch'")
        require(self.lr_scheduler in ("constant", "linear"), "lr_scheduler", "'constant' or 'linear'")
