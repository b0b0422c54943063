"""The sampling stage: a model answers prompts `num_samples` times, reward functions and/or a reward model score
every answer, and the stage registers a **dataset** (registry kind `samples`) that later stages read by reference.

What it writes (in its output directory, each file complete or absent):
- `samples.jsonl`: every sample with its total score, each function's score, and whether the model ended it
  (`ended`; false: cut at `max_new_tokens`);
- `rows.jsonl` (split `rows`): per prompt, its best sample as a conversation (`messages`), kept when its score
  reaches `keep_threshold`: rejection-sampling fine-tuning data (Llama 2's RS, STaR), for the SFT stage;
- `pairs.jsonl` (split `pairs`): per prompt, best versus worst sample when the scores differ by more than
  `min_margin`, with both scores and the margin: on-policy preference pairs (Tülu 3's DPO data), for DPO or
  the reward stage.
A stage reads them as `datasets: [{source: RUN/samples, split: rows}]` (or `split: pairs`); the entry's lineage
records the model, the scorers, the prompt sources, the seed and the sampling settings.

Departures: best and worst are by total score, ties broken by sample order (`require_ended`: towards an ended best
and a cut worst, and never a cut best); a prompt whose samples all score alike gives no pair. The model samples at `temperature` with stages/generation.py, each sample from its own generator seeded by
(seed, its index), so the same config draws the same samples on 1 or N ranks and at any batch size.

Run:
    rlhf sample --config configs/sample/tiny.yaml [key=value ...]
    deepspeed --num_gpus 2 --module stages.sample --config configs/sample/tiny.yaml
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from reward import kinds
from reward.functions import RewardFunctions, RewardFunctionSpec
from reward.models import load_reward
from reward.scoring import check_same_tokenizer, score_across_ranks
from stages import data, generation
from stages.core import distributed, models
from stages.core.config import ConfigError
from stages.core.errors import run_main
from stages.core.files import atomic_write
from stages.core.registry import Registry
from stages.data import mixture
from stages.data.files import SAMPLES_SPLITS
from stages.data.prompts import load_prompt_rows
from stages.lifecycle import StageConfig, StageRun, base_name, parse_args
from stages.tasks import constraints

SAMPLES_FILE, ROWS_FILE, PAIRS_FILE = (SAMPLES_SPLITS[split] for split in ("samples", "rows", "pairs"))


@dataclass
class SampleStageConfig(StageConfig):
    """Config of the sampling stage (configs/sample/*.yaml)."""

    model: str = field(default="sft:latest", metadata={"help": "The model that answers (a causal LM reference)."})
    datasets: list[data.DatasetSpec] = field(
        default_factory=lambda: [data.DatasetSpec(num_examples=200)],
        metadata={"help": "Prompt sources: a 'prompt' column and any others the reward functions read. Mixed as in stages/data/mixture.py."},
    )
    mixture_size: int | None = field(default=None, metadata={"help": "Total prompts; sources with a weight share what fixed num_examples leave."})
    num_samples: int = field(default=4, metadata={"help": "Answers sampled per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer."})
    batch_size: int = field(default=64, metadata={"help": "Rows decoding at once (continuous batching); the samples do not depend on it."})
    reward_functions: list[RewardFunctionSpec] = field(
        default_factory=list, metadata={"help": "Scorers: reward functions, each {name | path | module, weight, options} (reward/functions.py)."}
    )
    reward_model: str | None = field(default=None, metadata={"help": "Scorer: a reward model, weighted by reward_model_weight."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score in the total."})
    keep_threshold: float | None = field(default=None, metadata={"help": "rows: keep a prompt's best sample only if its score is at least this (null: always)."})
    min_margin: float = field(default=0.0, metadata={"help": "pairs: keep best vs worst only if their scores differ by more than this."})
    repair: bool = field(default=False, metadata={
        "help": "Rows with IFEval constraints (instruction_id_list, kwargs): each sample also rewritten to follow them "
                "(stages/tasks/constraints.py), scored by the same scorers; rows and the chosen side of pairs may be "
                "repaired answers, the rejected side is always the model's own."})
    require_ended: bool = field(default=False, metadata={
        "help": "rows and the chosen side of pairs only from answers the model ended itself, not cut at max_new_tokens "
                "(a cut answer, trained on, teaches stopping mid-sentence; most cut answers of a small model are loops); "
                "among equal scores the chosen side is an ended answer and the rejected side a cut one."})
    prefer_short: bool = field(default=False, metadata={
        "help": "among the answers with the best score, the shortest (in words) is the row and the chosen side, and among "
                "the worst the longest is the rejected side: a longer answer the checkers pass no better teaches length "
                "nobody asked for (default: the first in sample order). Ties only: with a reward model among the "
                "scorers scores rarely tie, and the option changes little."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_functions and self.reward_model is None:
            raise ConfigError("sample needs a scorer: reward_functions, reward_model, or both")
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive (sampling; greedy answers would all be the same)")
        if self.min_margin < 0:
            raise ConfigError("min_margin must be >= 0")
        mixture.check(self.datasets, self.mixture_size, self.eval.heldout_tasks)
        RewardFunctions.from_specs(self.reward_functions)  # a missing file or function stops here, before any compute


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, check_only = parse_args(SampleStageConfig, argv)
    return {} if check_only else run(config)


def run(config: SampleStageConfig) -> dict[str, Any]:
    # -- setup ---------------------------------------------------------------------------------
    with StageRun.open(config, stage="sample", kind="samples") as stage:
        if stage.already_done:
            return stage.metrics

        # -- model and tokenizer ---------------------------------------------------------------
        registry = Registry()
        base = registry.get(config.model)
        kinds.require(base, "policy", "model", "sample", config.check_model_kinds)
        reward_entry = registry.get(config.reward_model) if config.reward_model else None
        if reward_entry is not None:
            kinds.require(reward_entry, "reward_model", "reward_model", "sample", config.check_model_kinds)
        tokenizer = models.load_tokenizer(base, config.trust_remote_code)
        model = models.load_causal_lm(base, config.trust_remote_code).to(distributed.device())
        reward_model = None
        if reward_entry is not None:
            check_same_tokenizer(tokenizer, models.load_tokenizer(reward_entry), f"model {base.name!r}", f"reward model {reward_entry.ref!r}")
            reward_model = load_reward(reward_entry, config.trust_remote_code).to(distributed.device())
        functions = RewardFunctions.from_specs(config.reward_functions)

        # -- data ------------------------------------------------------------------------------
        rows = mixture.strip_source(mixture.mix(
            config.datasets, config.mixture_size, config.seed,
            lambda spec, index, count: load_prompt_rows(spec, config.seed + index, count, config.eval.heldout_tasks),
        ))
        stage.begin(parent=base, tokenizer=tokenizer, dataset_fingerprint=data.fingerprint(rows))

        # -- sample and score (the stage's "train" section) -----------------------------------
        prompts = [row["prompt"] for row in rows for _ in range(config.num_samples)]
        responses, ended = generation.generate_ended(model, tokenizer, prompts, config.max_new_tokens, config.batch_size,
                                                     do_sample=True, temperature=config.temperature, seed=config.seed, progress="sample")
        stage.check_alive()
        columns = {key: [row.get(key) for row in rows for _ in range(config.num_samples)] for key in sorted({k for r in rows for k in r} - {"prompt"})}
        totals, per_function = score(prompts, responses, columns, functions, reward_model, tokenizer, config.reward_model_weight)
        samples = [
            {"prompt": prompt, "response": response, "score": total, "prompt_index": index // config.num_samples,
             "sample": index % config.num_samples, "ended": ended[index], "scores": {name: scores[index] for name, scores in per_function.items()}}
            for index, (prompt, response, total) in enumerate(zip(prompts, responses, totals))
        ]
        if config.repair:
            samples += repaired_samples(samples, columns, functions, reward_model, tokenizer, config.reward_model_weight)
        kept_rows, pairs = select(samples, config.keep_threshold, config.min_margin, config.require_ended, config.prefer_short)
        for record in kept_rows + pairs:  # the prompt row's columns ride along: GRPO/PPO can score the pairs' prompts
            record.update({key: rows[record["prompt_index"]].get(key) for key in columns})

        # -- save ------------------------------------------------------------------------------
        if distributed.is_main_process():
            for name, records in ((SAMPLES_FILE, samples), (ROWS_FILE, kept_rows), (PAIRS_FILE, pairs)):
                atomic_write(stage.output_dir / name, "".join(json.dumps(record) + "\n" for record in records))

        # -- evaluate: what was drawn and kept ---------------------------------------------------
        stage.record(**summary(samples, kept_rows, pairs, len(rows), per_function))
        stage.samples = [{"prompt": s["prompt"][-1]["content"], "response": s["response"], "reward": s["score"]} for s in samples[: config.eval.num_samples]]

        # -- register (on leaving the block) ----------------------------------------------------
        scorers = [spec.label for spec in functions.specs] + ([f"reward model {reward_entry.ref}"] if reward_entry else [])
        stage.card = {
            "base": base_name(base),
            "data": f"{len(rows)} prompts from {', '.join(spec.source for spec in config.datasets)}, {config.num_samples} samples each, scored by {', '.join(scorers)}",
            "config": {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens, "keep_threshold": config.keep_threshold,
                       "min_margin": config.min_margin, "require_ended": config.require_ended,
                       "prefer_short": config.prefer_short},
            "steps": len(samples),
            "dataset": True,
        }
    return stage.metrics


def score(prompts: list[Any], responses: list[str], columns: dict[str, list[Any]], functions: RewardFunctions, reward_model: Any,
          tokenizer: Any, reward_model_weight: float) -> tuple[list[float], dict[str, list[float]]]:
    """Each response's total score (the reward functions' weighted sum, plus the reward model's weighted score) and
    each scorer's own scores by name. Collective under the launcher (the reward model scores across ranks)."""
    totals = functions.score(prompts, responses, columns) if functions.specs else [0.0] * len(responses)
    per_function = dict(functions.last_scores)
    if reward_model is not None:
        per_function["reward_model"] = score_across_ranks(reward_model, tokenizer, prompts, responses).tolist()
        totals = [total + reward_model_weight * value for total, value in zip(totals, per_function["reward_model"])]
    return totals, per_function


def repaired_samples(samples: list[dict[str, Any]], columns: dict[str, list[Any]], functions: RewardFunctions, reward_model: Any,
                     tokenizer: Any, reward_model_weight: float) -> list[dict[str, Any]]:
    """Each sample of a row with IFEval constraints rewritten to follow them (stages/tasks/constraints.py: lowercased,
    cut to N sentences, split into sections...), scored like the samples: the checker, not the rewrite, decides
    whether it follows. A rewrite that changes nothing or cannot be made is left out. Collective under the launcher
    (the reward model scores across ranks)."""
    ids, arguments = columns.get("instruction_id_list"), columns.get("kwargs")
    if ids is None or arguments is None:
        raise ConfigError("repair: true needs prompt rows with IFEval constraints (instruction_id_list and kwargs columns)")
    candidates = []
    for index, sample in enumerate(samples):
        rewritten = constraints.repair_all(sample["response"], ids[index] or [], arguments[index] or []) if sample["response"].strip() else None
        if rewritten is not None and rewritten.strip() and rewritten != sample["response"]:
            candidates.append((index, rewritten))
    if not candidates:
        return []
    prompts = [samples[index]["prompt"] for index, _ in candidates]
    responses = [rewritten for _, rewritten in candidates]
    picked = {key: [values[index] for index, _ in candidates] for key, values in columns.items()}
    totals, per_function = score(prompts, responses, picked, functions, reward_model, tokenizer, reward_model_weight)
    return [
        samples[index] | {"response": rewritten, "score": total, "repaired": True,
                          "scores": {name: scores[position] for name, scores in per_function.items()}}
        for position, ((index, rewritten), total) in enumerate(zip(candidates, totals))
    ]


def select(samples: list[dict[str, Any]], keep_threshold: float | None, min_margin: float,
           require_ended: bool = False, prefer_short: bool = False) -> tuple[list[dict], list[dict]]:
    """Per prompt (samples sharing a `prompt_index`): the best sample as an SFT row if it reaches the threshold, and
    best versus worst as a preference pair if their margin exceeds `min_margin`; the worst is always one of the
    model's own samples, never a repaired one. Empty answers (the model ended its turn at once) are neither: an SFT
    row would teach silence, and a pair with an empty side is malformed for every preference loader
    (stages/data/preferences.py); `samples/empty` counts them. `require_ended`: the best only among answers the model
    ended (a sample's `ended`, absent: True; a repair inherits its source's), ties broken towards ended answers for
    the best and cut ones for the worst. `prefer_short`: then, among equal scores, the fewest words for the best and
    the most for the worst."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        groups.setdefault(sample["prompt_index"], []).append(sample)
    rows, pairs = [], []
    for prompt_index in sorted(groups):
        group = [sample for sample in groups[prompt_index] if sample["response"].strip()]
        own = [sample for sample in group if not sample.get("repaired")]
        candidates = [sample for sample in group if sample.get("ended", True)] if require_ended else group
        if not candidates:
            continue
        # the first of equals: sample order breaks the ties left
        best = max(candidates, key=lambda sample: (sample["score"], -_words(sample["response"]) if prefer_short else 0))
        # require_ended: among equal scores a cut answer first (False < True)
        worst = min(own or group, key=lambda sample: (sample["score"], require_ended and sample.get("ended", True),
                                                      -_words(sample["response"]) if prefer_short else 0))
        if keep_threshold is None or best["score"] >= keep_threshold:
            rows.append({"messages": best["prompt"] + [{"role": "assistant", "content": best["response"]}], "score": best["score"],
                         "repaired": bool(best.get("repaired")), "prompt_index": prompt_index})
        margin = best["score"] - worst["score"]
        if margin > min_margin and best["response"] != worst["response"]:
            pairs.append({
                "prompt": best["prompt"], "chosen": [{"role": "assistant", "content": best["response"]}],
                "rejected": [{"role": "assistant", "content": worst["response"]}],
                "score_chosen": best["score"], "score_rejected": worst["score"], "margin": margin, "prompt_index": prompt_index,
                "chosen_repaired": bool(best.get("repaired")),
                # DPO tokenizes an answer the model did not end without the turn's closing (stages/data/unended.py)
                "chosen_ended": bool(best.get("ended", True)), "rejected_ended": bool(worst.get("ended", True)),
            })
    return rows, pairs


def _words(text: str) -> int:
    """An answer's length as the checkers count it roughly: whitespace-separated words."""
    return len(text.split())


def summary(samples: list[dict], rows: list[dict], pairs: list[dict], num_prompts: int, per_function: dict[str, list[float]]) -> dict[str, float]:
    scores = [sample["score"] for sample in samples]
    mean = sum(scores) / len(scores)
    metrics = {
        "samples/prompts": float(num_prompts), "samples/samples": float(len(samples)),
        "samples/score_mean": mean, "samples/score_std": math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)),
        "samples/best_score_mean": sum(row["score"] for row in rows) / len(rows) if rows else 0.0,
        "samples/rows": float(len(rows)), "samples/pairs": float(len(pairs)),
        "samples/margin_mean": sum(pair["margin"] for pair in pairs) / len(pairs) if pairs else 0.0,
        "samples/response_length": sum(len(sample["response"]) for sample in samples) / len(samples),
        "samples/empty": float(sum(not sample["response"].strip() for sample in samples)),
        "samples/cut": float(sum(not sample.get("ended", True) for sample in samples if not sample.get("repaired"))),
    }
    for name, answers in (("row", [row["messages"][-1] for row in rows]), ("chosen", [pair["chosen"][0] for pair in pairs]),
                          ("rejected", [pair["rejected"][0] for pair in pairs])):
        # what the kept answers teach about length (prefer_short); 0 when none was kept
        metrics[f"samples/{name}_words"] = sum(_words(answer["content"]) for answer in answers) / len(answers) if answers else 0.0
    repaired = [sample for sample in samples if sample.get("repaired")]
    if repaired:
        metrics["samples/repaired"] = float(len(repaired))
        metrics["samples/repaired_score_mean"] = sum(sample["score"] for sample in repaired) / len(repaired)
        metrics["samples/rows_repaired"] = float(sum(bool(row.get("repaired")) for row in rows))
    for name, values in per_function.items():
        metrics[f"samples/{name}/mean"] = sum(values) / len(values)
    return metrics


if __name__ == "__main__":
    run_main(main)
