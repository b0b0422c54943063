"""Held-out evaluation shared by every stage: greedy generation on embedded task prompts, exact match.

Prompts come from the task generator's eval split (instances never generated for training). Three
scores, each with a per-family breakdown (`KEY/FAMILY`):
- `eval/exact_match`: the trained families in the phrasings seen in training;
- `eval/exact_match_unseen_templates`: the trained families in held-out phrasings (never trained on);
- `eval/exact_match_unseen_tasks`: the families of `heldout_tasks`, which every stage leaves out of its
  embedded training data (only when some are held out).
Generation (stages/generation.py) is continuously batched with left padding and the KV cache; decoding is greedy
so numbers are comparable between stages. Also here: the policy stage's metrics (reward, win rate, KL to
the reference) on embedded or the user's held-out prompts, `rlhf eval` of a reward model on held-out embedded
pairs, and `rlhf eval --data FILE` (evaluate_file; the user-data metrics themselves are in stages/heldout.py), and
`eval.benchmarks` (benchmark_metrics: IFBench and IFEval-format files, stages/benchmarks) for trained model and start.

Collective under the deepspeed launcher, as generation is: every rank calls these functions.
May import: `stages.core`, `stages.tasks`, `stages.generation`, `stages.heldout`, `stages.benchmarks`, the torch-only math and `reward/`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages import benchmarks, tasks
from stages.core import distributed
from stages.core.protocols import RewardFunction
from stages.generation import SAMPLE_BATCH_SIZE, batch_rng, generate, left_padded_prompts
from stages.logprobs import response_mask_from_eos, token_logprobs


@dataclass
class EvalConfig:
    """Held-out evaluation on the embedded tasks."""

    enabled: bool = field(default=True, metadata={"help": "Evaluate after training (needs a model that follows the embedded tasks' template)."})
    num_prompts: int = field(default=200, metadata={"help": "Held-out prompts per split (seen / unseen phrasings)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest answer generated."})
    batch_size: int = field(default=200, metadata={"help": "Prompts per generation batch; more is faster, uses more memory."})
    seed: int = field(default=1234, metadata={"help": "Seed of the held-out prompt draw (any seed stays disjoint from training)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Task families to evaluate (default: all)."})
    heldout_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Task families left out of the stage's embedded training data and scored separately "
            "(eval/exact_match_unseen_tasks), e.g. [sort]."
        },
    )
    templates: str | None = field(
        default=None, metadata={"help": "Phrasings of the embedded tasks (default stages/tasks/embedded_tasks.yaml): the file training used."}
    )
    num_samples: int = field(default=8, metadata={"help": "Sample generations kept for the report and W&B table."})
    benchmarks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instruction-following benchmarks scored after training, for the trained model and its start (eval/NAME/..., "
            "eval/ref_NAME/...): ifbench, ifeval:FILE or an IFEval-format FILE (stages/benchmarks). Not for reward models."
        },
    )
    benchmark_limit: int | None = field(default=None, metadata={"help": "A seeded subset (eval.seed) of this many prompts per benchmark (default: all)."})
    benchmark_max_new_tokens: int = field(default=384, metadata={"help": "Longest benchmark answer; longer ones are cut (and mostly fail)."})
    benchmark_batch_size: int = field(default=64, metadata={"help": "Benchmark rows decoding at once (continuous batching); more is faster, uses more memory."})
    benchmark_max_batch_tokens: int = field(default=32768, metadata={"help": "Benchmark batch positions (rows x width) when a prompt joins (a long prompt decodes with few others); more on a GPU."})
    benchmark_dtype: str = field(default="auto", metadata={"help": "Benchmark generation dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16."})
    benchmark_start: bool = field(default=True, metadata={
        "help": "Score the model the stage started from on eval.benchmarks too (eval/ref_NAME/...); false in a chained recipe "
                "where the previous stage already scored that model on the same prompts."})
    embedded: bool | None = field(
        default=None,
        metadata={"help": "Score the embedded tasks' held-out prompts (eval/exact_match ...). Default: when the stage trains on "
                          "embedded data; true for a stage trained on data derived from them (e.g. sampled answers)."},
    )

    def scores_embedded(self, specs: list[Any]) -> bool:
        """Whether a stage training on `specs` scores the embedded tasks."""
        return self.embedded if self.embedded is not None else any(spec.source == "embedded" for spec in specs)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive")
        self.seen_tasks()  # unknown families, or every family held out, stop here
        tasks.load_templates(self.templates or tasks.DEFAULT_TEMPLATES)
        if self.benchmarks:  # every file and instruction id checked now, before any compute
            self.benchmark_settings()
            names = [benchmarks.load(spec, self.benchmark_limit, self.seed).name for spec in self.benchmarks]
            if len(set(names)) < len(names):
                raise benchmarks.BenchmarkError(f"eval.benchmarks: two benchmarks scored by the same checkers ({', '.join(names)}) would share metric names; keep one")

    def benchmark_settings(self) -> Any:
        """The generation settings of eval.benchmarks (stages/benchmarks/runner.py)."""
        from stages.benchmarks import runner

        return runner.Settings(
            max_new_tokens=self.benchmark_max_new_tokens, batch_size=self.benchmark_batch_size,
            max_batch_tokens=self.benchmark_max_batch_tokens, limit=self.benchmark_limit,
            seed=self.seed, dtype=self.benchmark_dtype,
        )

    def seen_tasks(self) -> list[str]:
        """The evaluated families that training saw."""
        unknown = [name for name in (self.tasks or []) + self.heldout_tasks if name not in tasks.FAMILIES]
        if unknown:
            raise ValueError(f"eval: unknown task family {unknown[0]!r} (known: {', '.join(tasks.FAMILIES)})")
        seen = [name for name in self.tasks or tasks.FAMILIES if name not in self.heldout_tasks]
        if not seen:
            raise ValueError("eval: every evaluated task family is held out; eval/exact_match needs one that training saw")
        return seen


def heldout_rows(config: EvalConfig, template_set: tasks.TemplateSet = "train", families: list[str] | None = None) -> list[dict[str, Any]]:
    """Eval-split prompts of `families` (default: the trained ones) in the given phrasing set."""
    return tasks.generate(
        config.num_prompts,
        seed=config.seed,
        split="eval",
        families=families or config.seen_tasks(),
        template_set=template_set,
        templates_path=config.templates or tasks.DEFAULT_TEMPLATES,
    )


def for_entry(entry: Any, num_prompts: int, seed: int) -> EvalConfig:
    """The evaluation a registered model was trained for: its held-out families and template file."""
    trained = (getattr(entry, "config", None) or {}).get("eval") or {}
    return EvalConfig(
        num_prompts=num_prompts, seed=seed, heldout_tasks=trained.get("heldout_tasks") or [], templates=trained.get("templates")
    )


def exact_match(model: Any, tokenizer: Any, config: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out exact match on seen phrasings, unseen phrasings and unseen families; plus a few samples."""
    metrics, samples, _ = _exact_match(model, tokenizer, config)
    return metrics, samples


def exact_match_from_start(model: Any, start: Any, tokenizer: Any, config: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """exact_match of a trained model and of the model its training started from, on the same prompts
    (`eval/ref_*`, as the policy stage reports its reference): what the stage changed is one subtraction.
    Each sample also holds the starting model's answer (`reference_response`)."""
    metrics, samples, _ = _exact_match(model, tokenizer, config)
    start_metrics, start_samples, _ = _exact_match(start, tokenizer, config)
    for sample, start_sample in zip(samples, start_samples):
        sample["reference_response"] = start_sample["response"]
    return metrics | as_reference(start_metrics), samples


def as_reference(metrics: dict[str, float]) -> dict[str, float]:
    """A starting model's exact-match metrics under the `eval/ref_` keys."""
    return _renamed(metrics, "eval/exact_match", "eval/ref_exact_match")


def _renamed(metrics: dict[str, float], prefix: str, new_prefix: str) -> dict[str, float]:
    """The metrics whose key starts with `prefix`, with `new_prefix` in its place."""
    return {new_prefix + key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}


def _exact_match(model: Any, tokenizer: Any, config: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]], list[str]]:
    """exact_match, plus the answers to the seen-phrasing prompts (`heldout_rows(config)`, in order)."""
    splits = [("eval/exact_match", "train", None), ("eval/exact_match_unseen_templates", "heldout", None)]
    if config.heldout_tasks:
        splits.append(("eval/exact_match_unseen_tasks", "train", config.heldout_tasks))
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    seen_responses: list[str] = []
    for key, template_set, families in splits:
        rows = heldout_rows(config, template_set, families)
        responses = generate(model, tokenizer, [row["prompt"] for row in rows], config.max_new_tokens, config.batch_size)
        per_task: dict[str, list[bool]] = defaultdict(list)
        for row, response in zip(rows, responses):
            per_task[row["task"]].append(tasks.is_correct(response, row["answer"]))
        scores = [score for task_scores in per_task.values() for score in task_scores]
        metrics[key] = sum(scores) / len(scores)
        metrics |= {f"{key}/{task}": sum(s) / len(s) for task, s in sorted(per_task.items())}
        if key == "eval/exact_match":
            seen_responses = responses
            samples = [
                {"prompt": row["prompt"][-1]["content"], "response": response, "answer": row["answer"]}
                for row, response in list(zip(rows, responses))[: config.num_samples]
            ]
    metrics["eval/num_prompts"] = float(config.num_prompts)
    return metrics, samples, seen_responses


def benchmark_metrics(model: Any, start: Any, tokenizer: Any, config: EvalConfig, output_dir: Path) -> dict[str, float]:
    """eval.benchmarks for a trained model and the model its training started from, on the same prompts and
    settings: `eval/NAME/...` and `eval/ref_NAME/...` (the four numbers, per type, counts, settings). Their
    responses, per-prompt results and scores go to OUTPUT_DIR/benchmarks/NAME-SETTINGS/{model,start}/.
    Run last in a stage's evaluation: the models may be cast to the benchmark dtype. Collective under the launcher."""
    from stages.benchmarks import runner

    settings = config.benchmark_settings()
    metrics: dict[str, float] = {}
    for spec in config.benchmarks:
        benchmark = benchmarks.load(spec, settings.limit, settings.seed)
        for who, scored, prefix in (("model", model, "eval/"), ("start", start, "eval/ref_"))[: 2 if config.benchmark_start else 1]:
            result = runner.run(scored, tokenizer, benchmark, settings, title=f"{benchmark.name} ({who})")
            described = str(output_dir) if who == "model" else f"the model {output_dir} started from"
            path = runner.write_files(result, output_dir / "benchmarks" / settings.folder(benchmark.name) / who, described)
            if distributed.is_main_process():
                print(f"{who}: {runner.describe(result, per_type=False)}\n  files: {path.parent}", flush=True)
            metrics |= result.metrics(prefix)
    return metrics


def kl_to_reference(policy: Any, reference: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int, seed: int) -> tuple[float, float]:
    """Sampled estimate of KL(policy || reference) per response, and the mean response length.

    One response per prompt at temperature 1; KL = mean over prompts of Σ_t [log π(y_t) − log π_ref(y_t)]
    (the k1 estimator, unbiased for the sequence-level KL). Collective under the launcher, each batch seeded
    on its own (`batch_rng`), so the estimate does not depend on the number of ranks.
    """

    def estimate(index: int, batch_prompts: list[list[dict[str, str]]]) -> list[tuple[float, float]]:
        with batch_rng(policy, seed, index):
            kls, lengths = _kl_batch(policy, reference, tokenizer, batch_prompts, max_new_tokens)
        return list(zip(kls.tolist(), lengths.tolist()))

    per_prompt = distributed.map_shards(estimate, prompts, SAMPLE_BATCH_SIZE)
    return sum(kl for kl, _ in per_prompt) / len(per_prompt), sum(length for _, length in per_prompt) / len(per_prompt)


@torch.no_grad()
def _kl_batch(policy: Any, reference: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt sampled log-ratio sums and response lengths, each (batch,)."""
    policy.eval()
    batch = left_padded_prompts(tokenizer, prompts, policy.device)
    sequences = policy.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    prompt_length = batch["input_ids"].shape[1]
    response_ids = sequences[:, prompt_length:]  # (batch, response_len)
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([batch["attention_mask"], response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logprobs = []
    for model in (policy, reference):
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
        logprobs.append(token_logprobs(logits[:, prompt_length - 1 : -1], response_ids))
    return ((logprobs[0] - logprobs[1]) * response_mask).sum(-1).cpu(), response_mask.sum(-1).float().cpu()


def policy_metrics(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    config: EvalConfig,
    reward_fn: RewardFunction | None = None,
    prompts: list[list[dict[str, str]]] | None = None,
    prefix: str = "eval/",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The evaluation every policy algorithm reports: reward under `reward_fn` (the stage-2 reward model) of
    the policy's and the reference's greedy answers, the policy's win rate over the reference as that reward
    model judges (ties count half), KL to the reference, response length; on the embedded tasks (`prompts`
    None: their held-out draw) also exact match. Each sample holds the reference's (the SFT model's) answer
    and its reward too, for the run report.

    The reference is scored on the very same prompts (`ref_*`), so "did the algorithm improve on its starting
    point" is one subtraction, free of prompt-draw and template-file differences. `prompts`: the user's
    held-out prompts. Collective under the launcher (and so must `reward_fn` be, if it shares work between ranks)."""
    if prompts is None:
        metrics, samples, responses = _exact_match(policy, tokenizer, config)
        reference_metrics, _, reference_responses = _exact_match(reference, tokenizer, config)
        metrics |= as_reference(reference_metrics)
        prompts = [row["prompt"] for row in heldout_rows(config)]  # the prompts `responses` answer
    else:
        responses = generate(policy, tokenizer, prompts, config.max_new_tokens, config.batch_size)
        reference_responses = generate(reference, tokenizer, prompts, config.max_new_tokens, config.batch_size)
        metrics = {"eval/num_prompts": float(len(prompts))}
        samples = [{"prompt": prompt[-1]["content"], "response": response} for prompt, response in list(zip(prompts, responses))[: config.num_samples]]
    for sample, reference_response in zip(samples, reference_responses):
        sample["reference_response"] = reference_response
    if reward_fn is not None:
        rewards = reward_fn(prompts, responses)
        reference_rewards = reward_fn(prompts, reference_responses)
        metrics["eval/reward_mean"] = rewards.mean().item()
        metrics["eval/ref_reward_mean"] = reference_rewards.mean().item()
        metrics["eval/win_rate"] = ((rewards > reference_rewards).float() + 0.5 * (rewards == reference_rewards).float()).mean().item()
        for sample, reward, reference_reward in zip(samples, rewards.tolist(), reference_rewards.tolist()):
            sample["reward"] = reward
            sample["reference_reward"] = reference_reward
    kl, length = kl_to_reference(policy, reference, tokenizer, prompts, config.max_new_tokens, config.seed)
    metrics["eval/kl_to_ref"] = kl
    metrics["eval/response_length"] = length
    return {key.replace("eval/", prefix, 1): value for key, value in metrics.items()}, samples


def embedded_pair_metrics(
    reward_model: Any, policy: Any | None, tokenizer: Any, config: EvalConfig, num_pairs: int, temperature: float = 1.0,
    world: tasks.World | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A reward model on held-out embedded pairs (negatives sampled from `policy` where it errs; with the training
    data's `world`, its judge's pairs with true labels): eval/pairwise_accuracy on the families training saw, like
    eval/exact_match, and the held-out families apart as eval/pairwise_accuracy_unseen_tasks[/FAMILY], with as many
    pairs per family. Returns the seen pairs too."""
    from reward.evaluation import pairwise_metrics
    from stages.tasks.pairs import heldout_pairs

    seen, unseen = config.seen_tasks(), config.heldout_tasks
    pairs = heldout_pairs(policy, tokenizer, num_pairs, config.seed, temperature, families=seen, world=world)
    metrics = pairwise_metrics(reward_model, tokenizer, pairs)
    if unseen:
        unseen_pairs = heldout_pairs(
            policy, tokenizer, max(1, num_pairs * len(unseen) // len(seen)), config.seed, temperature, families=unseen, world=world
        )
        metrics |= _renamed(pairwise_metrics(reward_model, tokenizer, unseen_pairs), "eval/pairwise_accuracy", "eval/pairwise_accuracy_unseen_tasks")
    return metrics, pairs


def evaluate_reward_model(entry: Any, num_pairs: int = 500, seed: int = 1234) -> dict[str, float]:
    """`rlhf eval` on a reward entry: held-out pairs of the families it trained on (and, apart, those it was kept
    from), with on-policy negatives from its parent model if registered."""
    from reward.models import load_reward
    from stages.core import models
    from stages.core.registry import Registry, RegistryError

    tokenizer = models.load_tokenizer(entry)
    reward_model = load_reward(entry)
    policy = None
    if entry.parent:
        try:
            parent = Registry().get(entry.parent)
            policy = models.load_causal_lm(parent) if parent.kind != "base" else None
        except (RegistryError, models.ModelLoadError):
            policy = None
    return embedded_pair_metrics(reward_model, policy, tokenizer, for_entry(entry, num_pairs, seed), num_pairs, world=world_of(entry))[0]


def world_of(entry: Any) -> tasks.World | None:
    """The world a registered stage's embedded data came from (its saved config), so `rlhf eval` judges as it trained."""
    from stages import data
    from stages.core.config import build

    specs = ((getattr(entry, "config", None) or {}).get("datasets")) or []
    source = f"the config of {entry.name}"
    return data.embedded_world([build(data.DatasetSpec, spec, source=source) for spec in specs if isinstance(spec, dict)])


def evaluate_file(entry: Any, source: str, split: str = "train", num_rows: int = 200, max_new_tokens: int = 16) -> dict[str, float]:
    """`rlhf eval REF --data FILE`: a registered model scored on the rows of a file (or Hub split) in any supported
    format. SFT rows: loss, token accuracy, exact match. Pairs: pairwise accuracy for a reward model; for a policy
    DPO's implicit reward against its parent (the SFT model it started from)."""
    from stages import data, heldout
    from stages.core import models
    from stages.core.registry import Registry

    spec = data.DatasetSpec(source=source, split=split, eval_fraction=0)  # every row of the file is scored
    first, _ = data.read_rows(spec)
    tokenizer = models.load_tokenizer(entry)
    if not ({"chosen", "rejected"} <= set(first[0])):
        rows = data.load_sft_rows(spec, seed=0)[:num_rows]
        return heldout.sft_metrics(models.load_causal_lm(entry), None, tokenizer, rows, max_new_tokens, 32)[0]
    pairs = data.load_preference_rows(spec)[0][:num_rows]
    from reward.models import is_reward_model

    if is_reward_model(entry):
        from reward.evaluation import pairwise_metrics
        from reward.models import load_reward

        return pairwise_metrics(load_reward(entry), tokenizer, pairs)
    if not entry.parent:
        raise data.DataError(f"{entry.ref} has no parent model to serve as the reference of its implicit reward; score pairs with a reward model")
    beta = float(((entry.config or {}).get("dpo") or {}).get("beta", 0.1))  # TRL's DPOConfig default
    reference = models.load_causal_lm(Registry().get(entry.parent))
    return heldout.dpo_pair_metrics(models.load_causal_lm(entry), reference, tokenizer, pairs, beta, 32)
