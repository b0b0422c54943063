"""The policy stage's algorithms: each takes one `PolicyInputs` and returns one `PolicyOutcome`.

- dpo: trl.DPOTrainer with an explicitly loaded reference (the SFT model; with LoRA, the actor with
  adapters disabled), `dpo.loss_type`/`dpo.beta` from config, padding-free pairs unless `padding_free: false`
  (stages/data/packing.py); a side the model did not end (`chosen_ended`/`rejected_ended` false, from the sampling
  stage) is tokenized without the turn's closing (stages/data/unended.py);
- ppo: our PPO trainer (stages/ppo): actor and reference from SFT, reward model from stage 2, critic
  initialised from the reward model;
- grpo / rloo: TRL's trainers with the stage-2 reward model as reward function;
- kto: trl.KTOTrainer on unpaired feedback (a thumbs up or down on one answer; pairs unpaired), reference as
  for DPO, `kto.desirable_weight`/`kto.undesirable_weight`/`kto.beta` from config; an answer the model did not end
  (`ended` false) is tokenized without the turn's closing, as for DPO.
PPO, GRPO and RLOO are rewarded by the reward model (`reward_model_weight`) and the configured reward functions
(`reward_functions:`, reward/functions.py), a weighted sum; each function is logged apart. Where the prompts have
answers and `exact_answer` is not among the functions, it rides along as a gold reward, logged, never optimised:
the proxy (reward model) and the gold reward against KL show over-optimisation.
The stage (stages/policy.py) loads the models and data before, and saves, evaluates and registers after.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from stages import trainers
from stages.core import tracking
from stages.core.config import ConfigError
from reward.functions import RewardFunctions, RewardFunctionSpec, bind_columns, call
from stages.core.protocols import as_trl_reward
from stages.data import batching, mixture, packing, unended
from stages.lifecycle import StageRun

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
    critic: Any = None  # PPO: the value model, initialised from `critic` (default the reward model)


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
    pairs = unended.with_ended_flags(_without_margins(mixture.strip_source(inputs.examples)))
    # padding_free: policy and reference run each batch's sequences packed without padding (stages/data/packing.py);
    # an answer the model did not end (cut at the sampling stage's max_new_tokens) keeps no closing end-of-turn.
    trainer_class = packing.padding_free(batching.length_grouped(unended.unended_sides_open(DPOTrainer), config.length_grouping),
                                         config.padding_free)
    trainer = trainer_class(
        model=inputs.policy,
        ref_model=inputs.reference,  # None with LoRA: TRL then uses the adapter-disabled policy
        args=trainers.trl_args(DPOConfig, stage, config, config.dpo),
        # DPO's loss has no margin term: the score margins of rated sources are not used.
        train_dataset=trainers.shared_dataset(stage, Dataset.from_list(pairs)),
        processing_class=inputs.tokenizer,
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    card_keys = ("loss_type", "beta", "learning_rate", "num_train_epochs", "padding_free")
    return _train_trl(trainer, inputs, config.dpo | {"padding_free": config.padding_free}, card_keys)


def train_kto(inputs: PolicyInputs) -> PolicyOutcome:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    config, stage = inputs.config, inputs.stage
    rows = unended.with_ended_flags(mixture.strip_source(inputs.examples), unended.FEEDBACK_FLAG)
    trainer = unended.unended_completions_open(KTOTrainer)(  # an answer the model did not end stays open
        model=inputs.policy,
        ref_model=inputs.reference,  # None with LoRA: TRL then uses the adapter-disabled policy
        args=trainers.trl_args(KTOConfig, stage, config, config.kto),
        train_dataset=trainers.shared_dataset(stage, Dataset.from_list(rows)),
        processing_class=inputs.tokenizer,
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    keys = ("loss_type", "beta", "desirable_weight", "undesirable_weight", "learning_rate", "num_train_epochs")
    return _train_trl(trainer, inputs, config.kto, keys)


def _without_margins(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in row.items() if key != "margin"} for row in rows]


def train_group_relative(inputs: PolicyInputs) -> PolicyOutcome:
    """GRPO or RLOO through TRL, rewarded by the stage-2 reward model (and optionally the verifier)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, stage, reward_model = inputs.config, inputs.stage, inputs.reward_model
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if config.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    functions = RewardFunctions.from_specs(config.reward_functions)
    reward_funcs: list[Any] = [reward_model] if reward_model is not None else []
    weights = [1.0 if config.reward_model_weight is None else config.reward_model_weight] if reward_model is not None else []
    reward_funcs += [_trl_reward(functions, index) for index in range(len(functions.specs))]  # TRL logs rewards/NAME/mean, /std
    weights += [spec.weight for spec in functions.specs]
    gold = _gold(config, inputs.examples)
    if gold is not None:  # TRL logs it (rewards/exact_answer_reward/mean) at weight 0: the over-optimisation curve (stages/report/)
        reward_funcs.append(as_trl_reward(gold, "exact_answer_reward"))
        weights.append(0.0)
    section = getattr(config, config.algorithm) | {"reward_weights": weights}
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
    from stages.ppo import PPOTrainer

    config, stage, policy, critic = inputs.config, inputs.stage, inputs.policy, inputs.critic
    functions = RewardFunctions.from_specs(config.reward_functions)
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
        config=config.ppo if config.reward_model_weight is None else replace(config.ppo, reward_model_coef=config.reward_model_weight),
        output_dir=stage.output_dir,
        reward_fn=_total_reward(functions, inputs.examples) if functions.specs else None,
        # Logged, not optimised: the gold reward of the over-optimisation curve, where the prompts have answers.
        gold_fn=_gold(config, inputs.examples),
        deepspeed_config=stage.deepspeed_config,
        log_hook=log_hook,
        step_hook=lambda step: stage.beat(),  # stops at the next step if the registry entry was removed
        reward_fn_metrics=lambda: functions.metrics("ppo/reward_functions/"),
    )
    history = trainer.train(resume=config.resume)
    return PolicyOutcome(
        # The output directory is this stage's (claimed by StageRun.open); on resume it may hold the model that
        # the interrupted run wrote before it could register it.
        save=lambda: trainer.save_model(stage.output_dir, overwrite=True, merge_scale=config.lora.merge_scale),
        loss=history[-1]["ppo/policy_loss"] if history else float("nan"),
        steps=trainer.num_steps,
        card={k: getattr(config.ppo, k) for k in ("actor_learning_rate", "kl_coef", "batch_size", "num_steps")},
    )


def _has_answers(examples: list[dict[str, Any]]) -> bool:
    return bool(examples) and all(example.get("answer") is not None for example in examples)


def _total_reward(functions: RewardFunctions, examples: list[dict[str, Any]]) -> Callable[[list[Any], list[str]], list[float]]:
    """The weighted reward functions for callers holding prompts only (our PPO): columns looked up by prompt."""
    columns_of = bind_columns(mixture.strip_source(examples))
    return lambda prompts, responses: functions.score(prompts, responses, columns_of(prompts))


def _gold(config: PolicyStageConfig, examples: list[dict[str, Any]]) -> Callable[[list[Any], list[str]], list[float]] | None:
    """The verifier as a gold reward (logged, weight 0) where every prompt has an answer and it is not trained on."""
    if any(spec.name == "exact_answer" for spec in config.reward_functions) or not _has_answers(examples):
        return None
    return _total_reward(RewardFunctions.from_specs([RewardFunctionSpec(name="exact_answer")]), examples)


# Keys TRL adds to a reward function's keyword arguments beside the dataset columns.
_TRL_KEYWORDS = ("trainer_state", "log_extra", "log_metric", "completion_ids", "environments")


def _trl_reward(functions: RewardFunctions, index: int) -> Callable[..., list[float]]:
    """Function `index` in TRL's convention, named as it is logged (rewards/NAME/mean)."""
    spec, function = functions.specs[index], functions.functions[index]

    def trl_reward(prompts: list[Any], completions: list[Any], **keywords: Any) -> list[float]:
        responses = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
        columns = {key: value for key, value in keywords.items() if key not in _TRL_KEYWORDS}
        return call(function, spec.label, prompts, responses, columns)

    trl_reward.__name__ = trl_reward.__qualname__ = spec.label
    return trl_reward


ALGORITHMS: dict[str, Callable[[PolicyInputs], PolicyOutcome]] = {
    "dpo": train_dpo,
    "ppo": train_ppo,
    "grpo": train_group_relative,
    "rloo": train_group_relative,
    "kto": train_kto,
}
