"""The policy stage's algorithms: each takes one `PolicyInputs` and returns one `PolicyOutcome`.

- dpo: trl.DPOTrainer with an explicitly loaded reference (the SFT model; with LoRA, the actor with
  adapters disabled), `dpo.loss_type`/`dpo.beta` from config;
- ppo: our PPO trainer (stages/ppo): actor and reference from SFT, reward model from stage 2, critic
  initialised from the reward model;
- grpo / rloo: TRL's trainers with the stage-2 reward model as reward function (plus, optionally, the
  embedded tasks' verifiable exact-answer reward).
PPO, GRPO and RLOO log the verifier as a gold reward where the prompts have answers, optimised only with
`verifiable_reward: true`: the proxy (reward model) and the gold reward against KL show over-optimisation.
The stage (stages/policy.py) loads the models and data before, and saves, evaluates and registers after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from stages import trainers
from stages.core import tracking
from stages.core.config import ConfigError
from stages.core.protocols import as_trl_reward
from stages.data import batching, mixture
from stages.lifecycle import StageRun
from stages.tasks.verifier import answer_reward

if TYPE_CHECKING:
    from stages.policy import PolicyStageConfig


@dataclass
class PolicyInputs:
    """What every algorithm gets from the stage's model, tokenizer and data sections."""

    config: PolicyStageConfig
    stage: StageRun
    examples: list[dict[str, Any]]  # DPO: preference pairs; PPO/GRPO/RLOO: prompts (with `answer` where known)
    policy: Any
    reference: Any  # None with LoRA: the policy with its adapters disabled is the reference
    reward_model: Any  # None without a stage-2 reward model
    tokenizer: Any


@dataclass
class PolicyOutcome:
    """What the save and register sections need from training."""

    save: Callable[[], None]  # writes the trained policy into the stage's output directory
    loss: float  # the last training loss
    steps: int
    card: dict[str, Any] = field(default_factory=dict)  # the algorithm's settings for the model card


def train_dpo(inputs: PolicyInputs) -> PolicyOutcome:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config, stage = inputs.config, inputs.stage
    trainer = batching.length_grouped(DPOTrainer, config.length_grouping)(
        model=inputs.policy,
        ref_model=inputs.reference,  # None with LoRA: TRL then uses the adapter-disabled policy
        args=trainers.trl_args(DPOConfig, stage, config, config.dpo),
        # DPO's loss has no margin term: the score margins of rated sources are not used.
        train_dataset=trainers.shared_dataset(stage, Dataset.from_list(_without_margins(mixture.strip_source(inputs.examples)))),
        processing_class=inputs.tokenizer,
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    return _train_trl(trainer, inputs, config.dpo, ("loss_type", "beta", "learning_rate", "num_train_epochs"))


def _without_margins(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in row.items() if key != "margin"} for row in rows]


def train_group_relative(inputs: PolicyInputs) -> PolicyOutcome:
    """GRPO or RLOO through TRL, rewarded by the stage-2 reward model (and optionally the verifier)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, stage, reward_model = inputs.config, inputs.stage, inputs.reward_model
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if config.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    section = getattr(config, config.algorithm)
    reward_funcs: list[Any] = [reward_model] if reward_model is not None else []
    # Without verifiable_reward, the verifier still rides along at weight 0 where the prompts have answers: TRL logs
    # it (rewards/exact_answer_reward/mean), and the reward model's score and this gold reward against KL are the
    # over-optimisation curve (stages/report.py).
    monitor_gold = not config.verifiable_reward and reward_model is not None and _has_answers(inputs.examples) and "reward_weights" not in section
    if config.verifiable_reward or monitor_gold:
        reward_funcs.append(as_trl_reward(answer_reward(inputs.examples), "exact_answer_reward"))
    if monitor_gold:
        section = section | {"reward_weights": [1.0, 0.0]}
    trainer = trainer_class(
        model=inputs.policy,
        reward_funcs=reward_funcs,
        args=trainers.trl_args(config_class, stage, config, section),
        train_dataset=Dataset.from_list(mixture.strip_source(inputs.examples)),
        processing_class=inputs.tokenizer,
        reward_processing_classes=[inputs.tokenizer if fn is reward_model else None for fn in reward_funcs],
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    return _train_trl(trainer, inputs, section, ("learning_rate", "num_generations", "beta", "max_steps"))


def _train_trl(trainer: Any, inputs: PolicyInputs, section: dict[str, Any], card_keys: tuple[str, ...]) -> PolicyOutcome:
    """Train a TRL trainer (resuming if asked) and describe the outcome for the save/register sections."""
    result = trainers.train(trainer, inputs.stage, inputs.config)
    return PolicyOutcome(
        save=lambda: trainer.save_model(str(inputs.stage.output_dir)),
        loss=float(result.training_loss),
        steps=trainer.state.global_step,
        card={key: section.get(key) for key in card_keys},
    )


def train_ppo(inputs: PolicyInputs) -> PolicyOutcome:
    from reward.models import load_critic
    from stages.ppo import PPOTrainer

    config, stage, policy = inputs.config, inputs.stage, inputs.policy
    critic_ref = config.critic or config.reward_model
    critic = load_critic(critic_ref, config.trust_remote_code) if critic_ref else None
    if critic is None:
        raise ConfigError("PPO needs a critic initialisation: set critic or reward_model")
    if config.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, config.lora.peft_config("CAUSAL_LM"))

    def log_hook(step: int, metrics: dict[str, float], samples: list[dict[str, Any]] | None) -> None:
        tracking.log(stage.wandb_run, metrics | {"train/global_step": step})
        if samples:
            tracking.log_table(stage.wandb_run, "ppo/samples", samples)

    trainer = PPOTrainer(
        actor=policy,
        reference=inputs.reference,
        reward_model=inputs.reward_model,
        critic=critic,
        tokenizer=inputs.tokenizer,
        prompts=[row["prompt"] for row in inputs.examples],
        config=config.ppo,
        output_dir=stage.output_dir,
        reward_fn=answer_reward(inputs.examples) if config.verifiable_reward else None,
        # Logged, not optimised: the gold reward of the over-optimisation curve, where the prompts have answers.
        gold_fn=answer_reward(inputs.examples) if not config.verifiable_reward and _has_answers(inputs.examples) else None,
        deepspeed_config=stage.deepspeed_config,
        log_hook=log_hook,
        step_hook=lambda step: stage.beat(),  # stops at the next step if the registry entry was removed
    )
    history = trainer.train(resume=config.resume)
    return PolicyOutcome(
        # The output directory is this stage's (claimed by StageRun.open); on resume it may hold the model that
        # the interrupted run wrote before it could register it.
        save=lambda: trainer.save_model(stage.output_dir, overwrite=True),
        loss=history[-1]["ppo/policy_loss"] if history else float("nan"),
        steps=trainer.num_steps,
        card={k: getattr(config.ppo, k) for k in ("actor_learning_rate", "kl_coef", "batch_size", "num_steps")},
    )


def _has_answers(examples: list[dict[str, Any]]) -> bool:
    return bool(examples) and all(example.get("answer") is not None for example in examples)


ALGORITHMS: dict[str, Callable[[PolicyInputs], PolicyOutcome]] = {
    "dpo": train_dpo,
    "ppo": train_ppo,
    "grpo": train_group_relative,
    "rloo": train_group_relative,
}
