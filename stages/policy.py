"""Stage 3: policy optimisation from the SFT model; `algorithm: dpo | ppo | grpo | rloo` picks the method.

What it implements:
- dpo: trl.DPOTrainer with an explicitly loaded reference (the SFT model; with LoRA, the actor with
  adapters disabled), `train.loss_type`/`train.beta` from config. Embedded pairs reject the SFT model's
  own mistakes, as in the reward stage.
- ppo: our PPO trainer (stages/ppo.py): actor and reference from SFT, reward model from stage 2, critic
  initialised from the reward model.
- grpo / rloo: TRL's trainers with the stage-2 reward model as reward function (plus, optionally, the
  embedded tasks' verifiable exact-answer reward).
Every algorithm ends with the same held-out evaluation: exact match (greedy), mean reward under the
stage-2 reward model, sampled KL to the reference, response length.

Run:
    rlhf policy --config configs/policy/tiny_dpo.yaml [algorithm=ppo] [key=value ...]
    python -m stages.policy --config configs/policy/tiny_dpo.yaml
    deepspeed --num_gpus 2 --module stages.policy --config configs/policy/tiny_dpo.yaml deepspeed=deepspeed_configs/zero3.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reward.pairs import embedded_pairs
from reward.models import load_reward
from reward.scoring import check_same_tokenizer, score_across_ranks
from reward.verifiable import exact_answer_reward
from stages import batching, common, data, distributed, evaluation, mixture, models, tasks
from stages.config import ConfigError
from stages.ppo import PPOConfig
from stages.registry import Registry

ALGORITHMS = ("dpo", "ppo", "grpo", "rloo")


@dataclass
class PolicyStageConfig(common.StageConfig):
    """Config of the policy stage (configs/policy/*.yaml)."""

    algorithm: str = field(default="dpo", metadata={"help": "dpo | ppo | grpo | rloo."})
    model: str = field(default="sft:latest", metadata={"help": "Policy initialisation and reference (default: the newest SFT output)."})
    reward_model: str | None = field(
        default="reward:latest", metadata={"help": "Stage-2 reward model: PPO/GRPO/RLOO reward and every algorithm's eval/reward_mean."}
    )
    critic: str | None = field(default=None, metadata={"help": "PPO critic initialisation (default: the reward model)."})
    datasets: list[data.DatasetSpec] = field(
        default_factory=lambda: [data.DatasetSpec(num_examples=3000)],
        metadata={"help": "DPO: preference pairs; PPO/GRPO/RLOO: prompts (a 'prompt' column, optional 'answer'). Mixed as in stages/mixture.py."},
    )
    mixture_size: int | None = field(
        default=None, metadata={"help": "Total pairs (DPO) or prompts; sources with a weight share what fixed num_examples leave."}
    )
    onpolicy_negatives: bool = field(default=True, metadata={"help": "DPO on embedded data: reject the SFT model's own wrong samples."})
    verifiable_reward: bool = field(default=False, metadata={"help": "PPO/GRPO/RLOO on embedded data: add the exact-answer reward."})
    drop_malformed: bool = field(default=False, metadata={"help": "Skip malformed preference pairs with a count."})
    dpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.DPOConfig arguments."})
    grpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.GRPOConfig arguments."})
    rloo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.RLOOConfig arguments."})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "Our PPO trainer's settings (stages/ppo.py)."})

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        from trl import DPOConfig, GRPOConfig, RLOOConfig

        for section, trl_class in (("dpo", DPOConfig), ("grpo", GRPOConfig), ("rloo", RLOOConfig)):
            setattr(self, section, common.check_trl_section(trl_class, getattr(self, section), section, "policy config"))
        if self.algorithm in ("ppo", "grpo", "rloo") and self.reward_model is None and not self.verifiable_reward:
            raise ConfigError(f"algorithm {self.algorithm} needs reward_model (or verifiable_reward: true)")
        mixture.check(self.datasets, self.mixture_size, self.eval.heldout_tasks)
        if self.length_grouping < 0:
            raise ConfigError(f"length_grouping must be 0 (off) or a number of batches, not {self.length_grouping}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, check_only = common.parse_args(PolicyStageConfig, argv)
    return {} if check_only else run(config)


def run(config: PolicyStageConfig) -> dict[str, Any]:
    # -- setup ---------------------------------------------------------------------------------
    stage = common.start(config, stage="policy", kind="policy")
    if stage.already_done:
        return stage.entry.metrics if stage.entry else {}
    deepspeed_config = distributed.resolve_deepspeed_config(config.deepspeed)

    # -- model and tokenizer -------------------------------------------------------------------
    registry = Registry()
    base = registry.get(config.model)
    tokenizer = models.load_tokenizer(base, config.trust_remote_code)
    reward_entry = registry.get(config.reward_model) if config.reward_model else None
    reward_model = None
    if reward_entry is not None:
        check_same_tokenizer(tokenizer, models.load_tokenizer(reward_entry), f"policy {base.name!r}", f"reward model {reward_entry.ref!r}")
        reward_model = load_reward(reward_entry, config.trust_remote_code)
        reward_model.requires_grad_(False)
    policy = models.load_causal_lm(base, config.trust_remote_code)
    reference = None if config.lora.enabled else _frozen(models.load_causal_lm(base, config.trust_remote_code))

    # -- data (before tracking and registration: bad data leaves no W&B run or registry entry) ---------
    examples = _preference_pairs(config, policy, tokenizer) if config.algorithm == "dpo" else _prompt_rows(config)

    # -- trainer, train ----------------------------------------------------------------------------
    common.open_tracking(stage, config)
    train = {"dpo": _train_dpo, "ppo": _train_ppo, "grpo": _train_group, "rloo": _train_group}[config.algorithm]
    common.register_start(
        stage, config, parent=base,
        tokenizer_hash=models.tokenizer_hash(tokenizer), chat_template_hash=models.chat_template_hash(tokenizer),
    )
    outcome = train(config, stage, examples, policy, reference, reward_model, tokenizer, deepspeed_config)

    # -- save ----------------------------------------------------------------------------------
    common.save_output(stage, outcome["save"])
    # PPO's save_model already merges adapters into the actor it writes.
    common.settle_after_save(stage, config, base, merge_lora=config.algorithm != "ppo")

    # -- evaluate (on the saved model, against a freshly loaded reference; every rank a share) -------
    device = distributed.device()
    saved = models.load_causal_lm(Registry().get(str(stage.output_dir))).to(device)
    reference = models.load_causal_lm(base, config.trust_remote_code).to(device)
    # Reloaded: under ZeRO-3 the training copy is partitioned across the ranks.
    eval_reward_model = load_reward(reward_entry, config.trust_remote_code).to(device) if reward_entry else None
    reward_fn = (lambda prompts, responses: score_across_ranks(eval_reward_model, tokenizer, prompts, responses)) if eval_reward_model else None
    metrics: dict[str, Any] = {"train/loss": outcome["loss"], "algorithm": config.algorithm} | outcome["mixture"]
    samples: list[dict[str, Any]] = []
    if config.eval.enabled:
        eval_metrics, samples = evaluation.policy_metrics(saved, reference, tokenizer, config.eval, reward_fn)
        metrics |= eval_metrics

    # -- register ------------------------------------------------------------------------------
    if reward_entry is not None and distributed.is_main_process():
        stage.registry.update(stage.entry.ref, metrics=metrics | {"reward_model": reward_entry.ref})
    common.remove_checkpoints(stage.output_dir)
    common.finish(
        stage,
        metrics,
        samples,
        card={
            "base": base.ref if not base.builtin else base.name,
            "data": f"{config.algorithm} on {', '.join(s.source for s in config.datasets)}"
            + (f"; reward model {reward_entry.ref}" if reward_entry else ""),
            "config": {"algorithm": config.algorithm, **outcome.get("card", {})},
            "steps": outcome["steps"],
        },
    )
    return metrics


# -- algorithms ----------------------------------------------------------------------------------

def _train_dpo(config: PolicyStageConfig, stage: common.StageRun, examples: list[dict[str, Any]], policy: Any, reference: Any, reward_model: Any, tokenizer: Any, deepspeed_config: str | None) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = examples
    trainer = batching.length_grouped(DPOTrainer, config.length_grouping)(
        model=policy,
        ref_model=reference,  # None with LoRA: TRL then uses the adapter-disabled policy
        args=common.trl_args(DPOConfig, stage, config, config.dpo, deepspeed_config),
        train_dataset=common.shared_dataset(stage, Dataset.from_list(mixture.strip_source(pairs))),
        processing_class=tokenizer,
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    outcome = _train_trl(trainer, config, stage, config.dpo, ("loss_type", "beta", "learning_rate", "num_train_epochs"))
    return outcome | {"mixture": _mixture_metrics(config, pairs, tokenizer)}


def _train_group(config: PolicyStageConfig, stage: common.StageRun, examples: list[dict[str, Any]], policy: Any, reference: Any, reward_model: Any, tokenizer: Any, deepspeed_config: str | None) -> dict[str, Any]:
    """GRPO or RLOO through TRL, rewarded by the stage-2 reward model (and optionally the verifier)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if config.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    section = getattr(config, config.algorithm)
    reward_funcs: list[Any] = [reward_model] if reward_model is not None else []
    if config.verifiable_reward:
        reward_funcs.append(exact_answer_reward)
    rows = examples
    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_funcs,
        args=common.trl_args(config_class, stage, config, section, deepspeed_config),
        train_dataset=Dataset.from_list(mixture.strip_source(rows)),
        processing_class=tokenizer,
        reward_processing_classes=[tokenizer if fn is reward_model else None for fn in reward_funcs],
        peft_config=config.lora.peft_config("CAUSAL_LM") if config.lora.enabled else None,
    )
    outcome = _train_trl(trainer, config, stage, section, ("learning_rate", "num_generations", "beta", "max_steps"))
    return outcome | {"mixture": _mixture_metrics(config, rows, tokenizer)}


def _train_trl(trainer: Any, config: PolicyStageConfig, stage: common.StageRun, section: dict[str, Any], card_keys: tuple[str, ...]) -> dict[str, Any]:
    """Train a TRL trainer (resuming if asked) and describe the outcome for the save/register sections."""
    result = common.train(trainer, stage, config)
    return {
        "save": lambda: trainer.save_model(str(stage.output_dir)),
        "loss": float(result.training_loss),
        "steps": trainer.state.global_step,
        "card": {key: section.get(key) for key in card_keys},
    }


def _train_ppo(config: PolicyStageConfig, stage: common.StageRun, examples: list[dict[str, Any]], policy: Any, reference: Any, reward_model: Any, tokenizer: Any, deepspeed_config: str | None) -> dict[str, Any]:
    from reward.models import load_critic
    from stages import tracking
    from stages.ppo import PPOTrainer

    critic_ref = config.critic or config.reward_model
    critic = load_critic(critic_ref, config.trust_remote_code) if critic_ref else None
    if critic is None:
        raise ConfigError("PPO needs a critic initialisation: set critic or reward_model")
    if config.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, config.lora.peft_config("CAUSAL_LM"))
    rows = examples
    # The trainer hands reward functions the chat-formatted prompt text; key the answers the same way.
    answers = {tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False): row.get("answer") for row in rows}

    def verifiable(prompts: list[str], responses: list[str]) -> torch.Tensor:
        expected = [answers.get(prompt) for prompt in prompts]
        return torch.tensor([float(answer is not None and tasks.is_correct(r, answer)) for r, answer in zip(responses, expected)])

    def log_hook(step: int, metrics: dict[str, float], samples: list[dict[str, Any]] | None) -> None:
        tracking.log(stage.wandb_run, metrics | {"train/global_step": step})
        if samples:
            tracking.log_table(stage.wandb_run, "ppo/samples", samples)

    trainer = PPOTrainer(
        actor=policy,
        reference=reference,
        reward_model=reward_model,
        critic=critic,
        tokenizer=tokenizer,
        prompts=[row["prompt"] for row in rows],
        config=config.ppo,
        output_dir=stage.output_dir,
        reward_fn=verifiable if config.verifiable_reward else None,
        deepspeed_config=deepspeed_config,
        log_hook=log_hook,
    )
    history = trainer.train(resume=config.resume)
    return {
        # The output directory is this stage's (claimed by common.start); on resume it may hold the model that
        # the interrupted run wrote before it could register it.
        "save": lambda: trainer.save_model(stage.output_dir, overwrite=True),
        "loss": history[-1]["ppo/policy_loss"] if history else float("nan"),
        "steps": trainer.num_steps,
        "card": {k: getattr(config.ppo, k) for k in ("actor_learning_rate", "kl_coef", "batch_size", "num_steps")},
        "mixture": _mixture_metrics(config, rows, tokenizer),
    }


# -- data ----------------------------------------------------------------------------------------

def _preference_pairs(config: PolicyStageConfig, policy: Any, tokenizer: Any) -> list[dict[str, Any]]:
    def load(spec: data.DatasetSpec, index: int, count: int | None) -> list[dict[str, Any]]:
        if spec.source != "embedded":
            rows, dropped = data.load_preference_rows(spec, config.drop_malformed)
            if dropped:
                print(f"policy: dropped {dropped} malformed pairs from {spec.source}")
            return rows
        seed = config.seed + 1 + index
        rows = data.embedded_rows(spec, seed, count or 3000, config.eval.heldout_tasks)
        sampled = None
        if config.onpolicy_negatives:
            policy.to(distributed.device())  # where the trainer will put it anyway
            sampled = evaluation.sample_responses(policy, tokenizer, [r["prompt"] for r in rows], seed - 1, config.eval.max_new_tokens)
        generated = embedded_pairs(len(rows), seed - 1, sampled_responses=sampled, rows=rows)
        print(f"policy: {len(generated)} embedded pairs, {sum(p['on_policy'] for p in generated)} rejecting the SFT model's own mistakes")
        return [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in generated]

    return mixture.mix(config.datasets, config.mixture_size, config.seed, load)


def _prompt_rows(config: PolicyStageConfig) -> list[dict[str, Any]]:
    """Prompts for the online algorithms: `prompt` (messages) and, where known, `answer`."""

    def load(spec: data.DatasetSpec, index: int, count: int | None) -> list[dict[str, Any]]:
        if spec.source == "embedded":
            generated = data.embedded_rows(spec, config.seed + 2 + index, count or 3000, config.eval.heldout_tasks)
            return [{"prompt": row["prompt"], "answer": row["answer"]} for row in generated]
        raw_rows, where = data.read_rows(spec)
        rows = []
        for row_index, raw in enumerate(raw_rows):
            prompt = raw.get(spec.columns.get("prompt", "prompt"))
            if prompt is None:
                raise data.DataError(f"{where} row {row_index}: missing column 'prompt'")
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else data.check_messages(prompt, f"{where} row {row_index}", "prompt")
            rows.append({"prompt": prompt, "answer": raw.get(spec.columns.get("answer", "answer"))})
        return rows

    rows = mixture.mix(config.datasets, config.mixture_size, config.seed, load)
    if config.verifiable_reward and any(row["answer"] is None for row in rows):
        raise data.DataError("verifiable_reward needs an 'answer' for every prompt")
    return rows


def _mixture_metrics(config: PolicyStageConfig, rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, float]:
    metrics = mixture.report(rows, data.token_counts(tokenizer, rows), mixture.requested_shares(config.datasets, config.mixture_size))
    print("policy: training mixture\n" + mixture.describe(metrics))
    return metrics


def _frozen(model: Any) -> Any:
    model.requires_grad_(False)
    model.eval()
    return model


if __name__ == "__main__":
    common.run_main(main)
