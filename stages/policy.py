"""Stage 3: policy optimisation from the SFT model; `algorithm: dpo | ppo | grpo | rloo | kto` picks the method.

The algorithms (stages/algorithms.py): dpo (trl.DPOTrainer, reference = the SFT model), ppo (ours,
stages/ppo: critic initialised from the reward model), grpo / rloo (TRL's trainers), kto (trl.KTOTrainer on
unpaired feedback: TRL's prompt/completion/label rows, pairs unpaired, in the embedded world the judge's thumbs
on single answers, stages/tasks/world.py). The online algorithms
are rewarded by the stage-2 reward model and/or reward functions (`reward_functions:`: built-in verifiers
such as `exact_answer`, or your own code; reward/functions.py), weighted and summed. Embedded
DPO pairs reject the SFT model's own mistakes, as in the reward stage.
Every algorithm ends with the same held-out evaluation: exact match (greedy), mean reward under the
stage-2 reward model, sampled KL to the reference, response length; the SFT reference is scored on the
same prompts (`eval/ref_*`).

Run:
    rlhf policy --config configs/policy/tiny.yaml [algorithm=ppo] [key=value ...]
    python -m stages.policy --config configs/policy/tiny.yaml
    deepspeed --num_gpus 2 --module stages.policy --config configs/policy/tiny.yaml deepspeed=deepspeed_configs/zero3.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reward import kinds
from reward.functions import RewardFunctionSpec
from reward.models import load_critic, load_reward
from reward.scoring import check_same_tokenizer, score_across_ranks
from stages import algorithms, data, evaluation, generation, heldout, trainers
from stages.core import distributed, models
from stages.core.config import ConfigError
from stages.core.registry import Registry
from stages.data import mixture
from stages.data.prompts import load_heldout_prompt_rows, load_prompt_rows
from stages.core.errors import run_main
from stages.lifecycle import StageConfig, StageRun, base_name, parse_args
from stages.ppo.config import PPOConfig
from stages.tasks.pairs import embedded_feedback, embedded_pairs

ALGORITHMS = tuple(algorithms.ALGORITHMS)
# Offsets of the stage seed for the draws of its embedded data, so that they differ from the reward stage's
# (which draws at seed + source index) and from each other. Changing one changes the default recipe's numbers.
DPO_PAIRS_SEED_OFFSET = 1  # the embedded prompts of DPO pairs
ONPOLICY_SAMPLES_SEED_OFFSET = 0  # the SFT model's sampled answers (rejected where wrong) and the corruptions
ONLINE_PROMPTS_SEED_OFFSET = 2  # the prompts of PPO/GRPO/RLOO


@dataclass
class PolicyStageConfig(StageConfig):
    """Config of the policy stage (configs/policy/*.yaml)."""

    algorithm: str = field(default="dpo", metadata={"help": "dpo | ppo | grpo | rloo | kto."})
    model: str = field(default="sft:latest", metadata={"help": "Policy initialisation and reference (default: the newest SFT output)."})
    reward_model: str | None = field(
        default="reward:latest", metadata={"help": "Stage-2 reward model: PPO/GRPO/RLOO reward and every algorithm's eval/reward_mean."}
    )
    critic: str | None = field(default=None, metadata={"help": "PPO critic initialisation (default: the reward model)."})
    datasets: list[data.DatasetSpec] = field(
        default_factory=lambda: [data.DatasetSpec(num_examples=3000)],
        metadata={"help": "DPO: preference pairs; KTO: feedback rows (prompt, completion, label) or pairs, unpaired; PPO/GRPO/RLOO: prompts (a 'prompt' column, optional 'answer'). Mixed as in stages/data/mixture.py."},
    )
    mixture_size: int | None = field(
        default=None, metadata={"help": "Total pairs (DPO) or prompts; sources with a weight share what fixed num_examples leave."}
    )
    onpolicy_negatives: bool = field(default=True, metadata={"help": "DPO/KTO on embedded data: judge the SFT model's own samples."})
    reward_functions: list[RewardFunctionSpec] = field(
        default_factory=list,
        metadata={"help": "PPO/GRPO/RLOO: reward functions, each {name | path | module, weight, options}, summed with the reward "
                          "model's score (reward/functions.py); e.g. [{name: exact_answer}]."},
    )
    reward_model_weight: float | None = field(
        default=None,
        metadata={"help": "PPO/GRPO/RLOO: weight of the reward model's score in the total reward (default 1; PPO: ppo.reward_model_coef)."},
    )
    verifiable_reward: bool | None = field(default=None, metadata={"help": "Replaced by reward_functions: [{name: exact_answer}]; setting it is an error."})
    drop_malformed: bool = field(default=False, metadata={"help": "Skip malformed preference pairs (KTO: feedback rows) with a count."})
    dpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.DPOConfig arguments."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "DPO: run each batch's chosen and rejected sequences, policy and reference, packed without padding "
                          "(same loss and gradients; stages/data/packing.py); false: TRL's padded batches."},
    )
    grpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.GRPOConfig arguments."})
    rloo: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.RLOOConfig arguments."})
    kto: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "trl.KTOConfig arguments (desirable_weight, undesirable_weight, beta, ...)."}
    )
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "Our PPO trainer's settings (stages/ppo/config.py)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig

        for section, trl_class in (("dpo", DPOConfig), ("grpo", GRPOConfig), ("rloo", RLOOConfig), ("kto", KTOConfig)):
            setattr(self, section, trainers.check_trl_section(trl_class, getattr(self, section), section, "policy config"))
        if "padding_free" in self.dpo:
            raise ConfigError("dpo.padding_free is TRL's own switch, which TRL 1.16 turns off with a warning; "
                              "use the top-level padding_free (ours, on by default)")
        if self.verifiable_reward is not None:
            raise ConfigError("verifiable_reward was replaced by reward functions: write `reward_functions: [{name: exact_answer}]` "
                              "for verifiable_reward: true, and nothing for false")
        if self.reward_model_weight is not None and self.ppo.reward_model_coef != 1.0:
            raise ConfigError("reward_model_weight and ppo.reward_model_coef are both set: they are the same weight; keep one")
        for section in ("grpo", "rloo"):
            if "reward_weights" in getattr(self, section):
                raise ConfigError(f"{section}.reward_weights is set by the stage: give each reward function its weight and reward_model_weight")
        if self.algorithm in ("ppo", "grpo", "rloo") and self.reward_model is None and not self.reward_functions:
            raise ConfigError(f"algorithm {self.algorithm} needs a reward: reward_model, reward_functions, or both")
        if self.algorithm == "ppo" and self.reward_model is None and self.critic is None:
            raise ConfigError("ppo without a reward model needs a critic to start from: set critic (e.g. critic: sft:latest, a fresh value head)")
        if self.algorithm == "kto" and self.length_grouping:
            raise ConfigError("length_grouping applies to SFT, reward and DPO; KTO draws its batches as TRL does: set it to 0")
        mixture.check(self.datasets, self.mixture_size, self.eval.heldout_tasks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, check_only = parse_args(PolicyStageConfig, argv)
    return {} if check_only else run(config)


def run(config: PolicyStageConfig) -> dict[str, Any]:
    # -- setup ---------------------------------------------------------------------------------
    with StageRun.open(config, stage="policy") as stage:
        if stage.already_done:
            return stage.metrics

        # -- model and tokenizer ---------------------------------------------------------------
        registry = Registry()
        base = registry.get(config.model)
        reward_entry = registry.get(config.reward_model) if config.reward_model else None
        _check_kinds(config, base, reward_entry)
        tokenizer = models.load_tokenizer(base, config.trust_remote_code)
        reward_model = None
        if reward_entry is not None:
            check_same_tokenizer(tokenizer, models.load_tokenizer(reward_entry), f"policy {base.name!r}", f"reward model {reward_entry.ref!r}")
            reward_model = load_reward(reward_entry, config.trust_remote_code)
            reward_model.requires_grad_(False)
        policy = models.load_causal_lm(base, config.trust_remote_code)
        reference = None if config.lora.enabled else _frozen(models.load_causal_lm(base, config.trust_remote_code))
        critic_ref = config.critic or config.reward_model  # PPO's value model: its weights checked before anything is written
        critic = load_critic(critic_ref, config.trust_remote_code) if config.algorithm == "ppo" and critic_ref else None

        # -- data (before tracking and registration: bad data leaves no W&B run or registry entry) -----
        examples = _judged_examples(config, policy, tokenizer) if config.algorithm in ("dpo", "kto") else _prompt_rows(config)
        mixture_metrics = mixture.report(examples, data.token_counts(tokenizer, examples), mixture.requested_shares(config.datasets, config.mixture_size))
        print("policy: training mixture\n" + mixture.describe(mixture_metrics))
        heldout_pairs, heldout_prompts = _user_heldout(config)
        embedded = config.eval.scores_embedded(config.datasets)

        # -- trainer, train ------------------------------------------------------------------------
        stage.begin(parent=base, tokenizer=tokenizer, dataset_fingerprint=data.fingerprint(mixture.strip_source(examples)))
        if reward_entry is not None:
            stage.record(reward_model=reward_entry.ref)
        inputs = algorithms.PolicyInputs(config, stage, examples, policy, reference, reward_model, tokenizer, critic)
        outcome = algorithms.ALGORITHMS[config.algorithm](inputs)

        # -- save ------------------------------------------------------------------------------
        trainers.save_output(stage, outcome.save)
        # PPO's save_model already merges adapters into the actor it writes.
        trainers.settle_after_save(stage, config, base, merge_lora=config.algorithm != "ppo")

        # -- evaluate (on the saved model, against a freshly loaded reference; every rank a share) ---
        device = distributed.device()
        saved = models.load_causal_lm(Registry().get(str(stage.output_dir))).to(device)
        reference = models.load_causal_lm(base, config.trust_remote_code).to(device)
        # Reloaded: under ZeRO-3 the training copy is partitioned across the ranks.
        eval_reward_model = load_reward(reward_entry, config.trust_remote_code).to(device) if reward_entry else None
        reward_fn = (lambda prompts, responses: score_across_ranks(eval_reward_model, tokenizer, prompts, responses)) if eval_reward_model else None
        stage.record(**{"train/loss": outcome.loss, "algorithm": config.algorithm}, **mixture_metrics)
        if config.eval.enabled and embedded:  # the embedded tasks' metrics only where the stage trained on them
            eval_metrics, stage.samples = evaluation.policy_metrics(saved, reference, tokenizer, config.eval, reward_fn)
            stage.record(**eval_metrics)
        if config.eval.enabled and heldout_prompts:  # the user's held-out prompts (and pairs, for DPO)
            prefix, count = ("eval/data/" if embedded else "eval/"), config.eval.num_prompts
            data_metrics, data_samples = evaluation.policy_metrics(
                saved, reference, tokenizer, config.eval, reward_fn, prompts=heldout_prompts[:count], prefix=prefix
            )
            if heldout_pairs:
                beta = config.dpo.get("beta", _dpo_default("beta"))
                data_metrics |= heldout.dpo_pair_metrics(saved, reference, tokenizer, heldout_pairs[:count], beta, config.eval.batch_size, prefix)
            stage.record(**data_metrics)
            stage.samples = stage.samples or data_samples
        if config.eval.enabled and config.eval.benchmarks:  # IFBench / IFEval-format files, policy and reference; last: may cast dtype
            stage.record(**evaluation.benchmark_metrics(saved, reference, tokenizer, config.eval, stage.output_dir))

        # -- register (on leaving the block) ----------------------------------------------------
        stage.card = {
            "base": base_name(base),
            "data": f"{config.algorithm} on {', '.join(s.source for s in config.datasets)}"
            + (f"; reward model {reward_entry.ref}" if reward_entry else ""),
            "config": {"algorithm": config.algorithm, **outcome.card},
            "steps": outcome.steps,
        }
    return stage.metrics


def _check_kinds(config: PolicyStageConfig, base: Any, reward_entry: Any) -> None:
    """Every model reference in its role (reward/kinds.py), before anything is loaded."""
    kinds.require(base, "policy", "model", f"policy ({config.algorithm})", config.check_model_kinds)
    if reward_entry is not None:
        kinds.require(reward_entry, "reward_model", "reward_model", f"policy ({config.algorithm})", config.check_model_kinds)
    if config.algorithm == "ppo" and config.critic:
        kinds.require(Registry().get(config.critic), "critic", "critic", "policy (ppo)", config.check_model_kinds)


# -- data ----------------------------------------------------------------------------------------

def _judged_examples(config: PolicyStageConfig, policy: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """DPO: preference pairs; KTO: unpaired feedback, on embedded data answers drawn as the pairs' are, judged one by one."""
    unpaired = config.algorithm == "kto"

    def load(spec: data.DatasetSpec, index: int, count: int | None) -> list[dict[str, Any]]:
        if spec.source != "embedded":
            rows, dropped = (data.load_feedback_rows if unpaired else data.load_preference_rows)(spec, config.drop_malformed)
            if dropped:
                print(f"policy: dropped {dropped} malformed {'feedback rows' if unpaired else 'pairs'} from {spec.source}")
            return rows
        # KTO: two feedback rows per prompt, so num_examples rows come from half as many prompts.
        num_prompts = -(-(count or 3000) // 2) if unpaired else count or 3000
        rows = data.embedded_rows(spec, config.seed + DPO_PAIRS_SEED_OFFSET + index, num_prompts, config.eval.heldout_tasks)
        samples_seed = config.seed + ONPOLICY_SAMPLES_SEED_OFFSET + index
        sampled = None
        if config.onpolicy_negatives:
            policy.to(distributed.device())  # where the trainer will put it anyway
            sampled = generation.sample_responses(policy, tokenizer, [r["prompt"] for r in rows], samples_seed, config.eval.max_new_tokens)
        if unpaired:
            feedback = embedded_feedback(len(rows), samples_seed, sampled_responses=sampled, rows=rows, world=spec.world)
            print(f"policy: {len(feedback)} embedded feedback rows on {len(rows)} prompts, {sum(r['label'] for r in feedback)} thumbs up")
            return [{key: row[key] for key in ("prompt", "completion", "label")} for row in feedback]
        generated = embedded_pairs(len(rows), samples_seed, sampled_responses=sampled, rows=rows, world=spec.world)
        print(f"policy: {len(generated)} embedded pairs, {sum(p['on_policy'] for p in generated)} with the SFT model's own sample on one side")
        return [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in generated]

    return mixture.mix(config.datasets, config.mixture_size, config.seed, load)


def _prompt_rows(config: PolicyStageConfig) -> list[dict[str, Any]]:
    """Prompts for the online algorithms: `prompt` (messages), `answer` where known, the sources' other columns."""
    return mixture.mix(
        config.datasets, config.mixture_size, config.seed,
        lambda spec, index, count: load_prompt_rows(spec, config.seed + ONLINE_PROMPTS_SEED_OFFSET + index, count, config.eval.heldout_tasks),
    )


def _user_heldout(config: PolicyStageConfig) -> tuple[list[dict[str, Any]], list[list[dict[str, str]]]]:
    """The held-out pairs (DPO) and prompts of the user's sources, never trained on."""
    pairs: list[dict[str, Any]] = []
    heldout_prompts: list[list[dict[str, str]]] = []
    for spec in config.datasets:
        if spec.source == "embedded":
            continue
        if config.algorithm == "dpo":
            pairs += data.load_preference_heldout(spec, config.drop_malformed)
        elif config.algorithm == "kto":  # each prompt once: it may carry several judged answers
            feedback_prompts = [row["prompt"] for row in data.load_feedback_heldout(spec, config.drop_malformed)]
            heldout_prompts += [prompt for i, prompt in enumerate(feedback_prompts) if prompt not in feedback_prompts[:i]]
        else:
            heldout_prompts += [row["prompt"] for row in load_heldout_prompt_rows(spec)]
    return pairs, [pair["prompt"] for pair in pairs] + heldout_prompts


def _dpo_default(name: str) -> Any:
    from dataclasses import fields

    from trl import DPOConfig

    return next(field.default for field in fields(DPOConfig) if field.name == name)


def _frozen(model: Any) -> Any:
    model.requires_grad_(False)
    model.eval()
    return model


if __name__ == "__main__":
    run_main(main)
