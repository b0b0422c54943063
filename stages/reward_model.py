"""Stage 2: a scalar reward model trained on preference pairs, on trl.RewardTrainer.

What it implements: a sequence-classification head (num_labels=1) on the SFT model's backbone,
trained with the Bradley-Terry pairwise loss (margins when the data has them, optional reward
centring), optional LoRA with the score head trained in full. `head: likelihood` instead scores a
response by its log-likelihood under a copy of the SFT model trained with the same loss
(reward/likelihood.py says why the embedded default uses it). The embedded data pairs the correct
answer against the SFT model's own sampled mistakes (on-policy negatives) or, where it was right, a
plausible corruption. Each batch's chosen and rejected sequences run packed without padding
(`padding_free`, stages/data/packing.py; same loss and gradients). Evaluation is on held-out pairs:
prompts from the eval split, negatives sampled afresh. The RM keeps the policy's tokenizer and chat template, checked before training.

Run:
    rlhf reward --config configs/reward/tiny.yaml [key=value ...]
    python -m stages.reward_model --config configs/reward/tiny.yaml
    deepspeed --num_gpus 2 --module stages.reward_model --config configs/reward/tiny.yaml deepspeed=deepspeed_configs/zero3.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from reward import kinds, likelihood
from reward.evaluation import pairwise_metrics
from reward.models import load_reward
from reward.scoring import check_same_tokenizer
from stages import data, evaluation, generation, trainers
from stages.core import distributed, models
from stages.core.config import ConfigError
from stages.core.registry import Registry
from stages.data import batching, mixture, packing
from stages.core.errors import run_main
from stages.lifecycle import StageConfig, StageRun, base_name, parse_args
from stages.tasks.pairs import embedded_pairs


@dataclass
class RewardStageConfig(StageConfig):
    """Config of the reward-model stage (configs/reward/*.yaml)."""

    model: str = field(default="sft:latest", metadata={"help": "Initialise from this model (default: the newest SFT output)."})
    policy: str | None = field(
        default=None, metadata={"help": "Model whose tokenizer/template the RM must match and whose samples are negatives (default: model)."}
    )
    datasets: list[data.DatasetSpec] = field(
        default_factory=lambda: [data.DatasetSpec(num_examples=4000)],
        metadata={"help": "Preference datasets: the sources of the mixture (weights: stages/data/mixture.py)."},
    )
    mixture_size: int | None = field(
        default=None, metadata={"help": "Total preference pairs; sources with a weight share what fixed num_examples leave."}
    )
    head: Literal["classifier", "likelihood"] = field(
        default="classifier",
        metadata={"help": "classifier: a scalar head on the last token; likelihood: the response's log-likelihood (reward/likelihood.py)."},
    )
    chosen_nll_coefficient: float = field(
        default=0.0,
        metadata={"help": "head: likelihood only: add this x the chosen reply's negative log-likelihood to the pairwise loss (reward/likelihood.py)."},
    )
    onpolicy_negatives: bool = field(default=True, metadata={"help": "Embedded data: use the policy's own wrong samples as rejected answers."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Temperature of the on-policy samples."})
    drop_malformed: bool = field(default=False, metadata={"help": "Skip malformed pairs with a count instead of stopping."})
    use_margins: bool = field(
        default=True,
        metadata={"help": "Train with the margins of scored pairs (score or rating difference); pairs of unscored sources get margin 0. "
                  "false: plain Bradley-Terry on every pair."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "Run each batch's chosen and rejected sequences packed without padding (same loss and gradients, "
                          "either head; stages/data/packing.py); false: TRL's padded batches."},
    )
    heldout_pairs: int = field(default=500, metadata={"help": "Held-out pairs for the evaluation."})
    train: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.RewardConfig arguments (checked against its fields)."})

    def __post_init__(self) -> None:
        from trl import RewardConfig

        super().__post_init__()
        self.train = trainers.check_trl_section(RewardConfig, self.train, "train", "reward config")
        mixture.check(self.datasets, self.mixture_size, self.eval.heldout_tasks)
        if self.eval.benchmarks:
            raise ConfigError(
                "eval.benchmarks: a reward model scores answers and writes none, so it has no instruction-following score; "
                "set eval.benchmarks on the sft and policy stages"
            )
        if self.head == "likelihood" and self.train.get("center_rewards_coefficient") is not None:
            raise ConfigError(
                "train.center_rewards_coefficient does not apply to head: likelihood (its scores are log-likelihoods, "
                "which centring would push towards 0, i.e. towards likelier answers); remove it"
            )
        if self.chosen_nll_coefficient < 0 or (self.chosen_nll_coefficient and self.head != "likelihood"):
            raise ConfigError(
                f"chosen_nll_coefficient must be >= 0 and applies to head: likelihood only (got {self.chosen_nll_coefficient} "
                f"with head: {self.head}): a classifier's score is not a likelihood"
            )
        if self.head == "likelihood" and self.lora.enabled and not self.lora.merge_on_save:
            raise ConfigError("head: likelihood needs lora.merge_on_save: true (its reward is read from the merged causal LM)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, check_only = parse_args(RewardStageConfig, argv)
    return {} if check_only else run(config)


def run(config: RewardStageConfig) -> dict[str, Any]:
    # -- setup ---------------------------------------------------------------------------------
    with StageRun.open(config, stage="reward") as stage:
        if stage.already_done:
            return stage.metrics

        # -- model and tokenizer ---------------------------------------------------------------
        registry = Registry()
        base = registry.get(config.model)
        policy_entry = registry.get(config.policy) if config.policy else base
        kinds.require(base, "reward_init", "model", "reward", config.check_model_kinds)
        if config.policy:
            kinds.require(policy_entry, "policy", "policy", "reward", config.check_model_kinds)
        tokenizer = models.load_tokenizer(base, config.trust_remote_code)
        policy_tokenizer = models.load_tokenizer(policy_entry, config.trust_remote_code)
        check_same_tokenizer(policy_tokenizer, tokenizer, f"policy {policy_entry.name!r}", f"reward model init {base.name!r}")
        if tokenizer.chat_template is None:
            raise ConfigError(f"model {config.model!r} has no chat template; preference pairs are chat conversations")
        policy = models.load_causal_lm(policy_entry, config.trust_remote_code) if policy_entry.kind != "base" or policy_entry.builtin else None
        if config.head == "likelihood":
            model = likelihood.as_reward_model(models.load_causal_lm(base, config.trust_remote_code), tokenizer)
        else:
            model = models.load_sequence_classifier(base, config.trust_remote_code)
            model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token

        # -- data ------------------------------------------------------------------------------
        def load(spec: data.DatasetSpec, index: int, count: int | None) -> list[dict[str, Any]]:
            if spec.source == "embedded":
                return _embedded_training_pairs(spec, config, policy, tokenizer, config.seed + index, count or 4000)
            rows, dropped = data.load_preference_rows(spec, config.drop_malformed)
            if dropped:
                print(f"reward: dropped {dropped} malformed pairs from {spec.source}")
            return rows

        pairs = mixture.mix(config.datasets, config.mixture_size, config.seed, load)
        mixture_metrics = mixture.report(pairs, data.token_counts(tokenizer, pairs), mixture.requested_shares(config.datasets, config.mixture_size))
        print("reward: training mixture\n" + mixture.describe(mixture_metrics))
        train_dataset = trainers.shared_dataset(stage, _to_dataset(pairs, config.use_margins))
        dataset_fingerprint = data.fingerprint(pairs)
        # Held-out pairs of the user's sources (never in `pairs`); embedded pairs are drawn on eval-split prompts.
        user_heldout = [pair for spec in config.datasets if spec.source != "embedded" for pair in data.load_preference_heldout(spec, config.drop_malformed)]
        embedded = any(spec.source == "embedded" for spec in config.datasets)

        # -- trainer ---------------------------------------------------------------------------
        from trl import RewardConfig, RewardTrainer

        trainer_class = packing.padding_free(likelihood.with_chosen_nll(RewardTrainer, config.chosen_nll_coefficient), config.padding_free)
        trainer = batching.length_grouped(trainer_class, config.length_grouping)(
            model=model,
            args=trainers.trl_args(RewardConfig, stage, config, config.train),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=_peft_config(config),
        )
        stage.begin(parent=base, tokenizer=tokenizer, dataset_fingerprint=dataset_fingerprint)

        # -- train -----------------------------------------------------------------------------
        result = trainers.train(trainer, stage, config)

        # -- save ------------------------------------------------------------------------------
        trainers.save_output(stage, lambda: trainer.save_model(str(stage.output_dir)))
        classifier = config.head == "classifier"
        trainers.settle_after_save(stage, config, base, merge_lora=config.lora.merge_on_save, sequence_classifier=classifier)
        if not classifier and distributed.is_main_process():
            likelihood.mark_saved_config(stage.output_dir, tokenizer)
        distributed.barrier()  # every rank loads the marked config below

        # -- evaluate (on the saved model; every rank a share) -------------------------------------
        saved = Registry().get(str(stage.output_dir))
        reward_model = load_reward(saved).to(distributed.device())
        if policy is not None:
            policy.to(distributed.device())
        stage.record(**{"train/loss": float(result.training_loss), "train/pairs": len(pairs)}, **mixture_metrics)
        heldout = []
        if embedded:  # embedded held-out pairs only where the stage trained on embedded pairs
            pair_metrics, heldout = evaluation.embedded_pair_metrics(
                reward_model, policy, tokenizer, config.eval, config.heldout_pairs, config.sample_temperature,
                world=data.embedded_world(config.datasets),
            )
            stage.record(**pair_metrics)
        if user_heldout:
            prefix = "eval/data/" if embedded else "eval/"
            user_metrics = pairwise_metrics(reward_model, tokenizer, user_heldout[: config.heldout_pairs])
            stage.record(**{key.replace("eval/", prefix, 1): value for key, value in user_metrics.items()})
            heldout = heldout or user_heldout
        stage.samples = [
            {"prompt": pair["prompt"][-1]["content"], "chosen": pair["chosen"][-1]["content"], "rejected": pair["rejected"][-1]["content"]}
            for pair in heldout[: config.eval.num_samples]
        ]

        # -- register (on leaving the block) ----------------------------------------------------
        stage.card = {
            "base": base_name(base),
            "data": f"{len(pairs)} preference pairs (fingerprint {dataset_fingerprint})",
            "config": {"head": config.head, "chosen_nll_coefficient": config.chosen_nll_coefficient, "padding_free": config.padding_free}
            | {k: config.train.get(k) for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "center_rewards_coefficient")},
            "steps": trainer.state.global_step,
            # A likelihood-head RM is a plain causal LM; reward.models.load_reward reads it as a reward model.
            "auto_class": "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM",
            "note": None if classifier else (
                "A likelihood-head reward model: the class above gives the language model; "
                "`reward.models.load_reward(Registry().get(REF))` reads it as the reward model."
            ),
        }
    return stage.metrics


def _embedded_training_pairs(
    spec: data.DatasetSpec, config: RewardStageConfig, policy: Any, tokenizer: Any, seed: int, count: int
) -> list[dict[str, Any]]:
    rows = data.embedded_rows(spec, seed, count, config.eval.heldout_tasks)
    sampled = None
    if config.onpolicy_negatives and policy is not None:
        prompts = [row["prompt"] for row in rows]
        # On this rank's accelerator while sampling, then back: training needs that memory.
        policy.to(distributed.device())
        sampled = generation.sample_responses(policy, tokenizer, prompts, seed, config.eval.max_new_tokens, config.sample_temperature)
        policy.to("cpu")
    pairs = embedded_pairs(len(rows), seed, sampled_responses=sampled, rows=rows, world=spec.world)
    on_policy = sum(pair["on_policy"] for pair in pairs)
    judged = f", judged in the configured world ({sum(pair['label_flipped'] for pair in pairs)} labels flipped)" if spec.world else ""
    print(f"reward: {len(pairs)} embedded pairs, {on_policy} with the policy's own sample on one side{judged}")
    return [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]


def _peft_config(config: RewardStageConfig) -> Any:
    if not config.lora.enabled:
        return None
    if config.head == "likelihood":  # adapters only: the LM head is the score
        return config.lora.peft_config("CAUSAL_LM")
    return config.lora.peft_config("SEQ_CLS", modules_to_save=["score"])


def _to_dataset(pairs: list[dict[str, Any]], use_margins: bool) -> Any:
    """The pairs as a dataset for RewardTrainer. Margins: when any source has scores, every pair carries a
    margin, 0 for the pairs of sources without (the plain Bradley-Terry loss for those); `use_margins: false`
    drops them all."""
    from datasets import Dataset

    rows = mixture.strip_source(pairs)
    if use_margins and any("margin" in row for row in rows):
        rows = [{"margin": 0.0} | row for row in rows]
    else:
        rows = [{key: value for key, value in row.items() if key != "margin"} for row in rows]
    return Dataset.from_list(rows)


if __name__ == "__main__":
    run_main(main)
