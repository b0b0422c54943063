"""Embedded preference pairs: the correct answer over a plausible wrong one (training and held-out).

Negatives come from two places: the SFT model's own sampled answers when they are wrong (the
mistakes a reward model must judge during PPO), and, where the model happened to be right,
task-aware corruptions (off-by-one sums, unreversed words, one swapped letter). With a `World`
(stages/tasks/world.py) the pairs are its judge's instead: the policy's sample against an answer of
different quality, labelled with the judge's noise (held-out pairs: without it). `embedded_feedback` gives such
answers unpaired, a thumbs up or down each (KTO): without a world the pairs' own, with one those the noise-free judge
compares (World.thumbs).
"""

from __future__ import annotations

import random
from typing import Any

from stages import generation
from stages.tasks.families import Split, generate
from stages.tasks.verifier import is_correct
from stages.tasks.world import World


def corrupt(answer: str, task: str, rng: random.Random) -> str:
    """A plausible wrong answer for `task`; never equal to `answer`."""
    for _ in range(20):
        choice = rng.random()
        if task == "add" and choice < 0.7:
            candidate = str(max(0, int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])))
        elif len(answer) >= 2 and choice < 0.85:
            index = rng.randrange(len(answer) - 1)  # swap two neighbours
            candidate = answer[:index] + answer[index + 1] + answer[index] + answer[index + 2 :]
        elif len(answer) >= 2:
            index = rng.randrange(len(answer))  # drop one character
            candidate = answer[:index] + answer[index + 1 :]
        else:
            candidate = answer + rng.choice("0123456789")
        if task == "upper" and choice > 0.9:
            candidate = answer.lower()
        if candidate.strip() != answer.strip() and candidate.strip():
            return candidate
    return answer + "x"


def embedded_pairs(
    num_pairs: int,
    seed: int,
    split: Split = "train",
    sampled_responses: list[str] | None = None,
    rows: list[dict[str, Any]] | None = None,
    world: World | None = None,
    noisy: bool = True,
) -> list[dict[str, Any]]:
    """Pairs for task prompts; `sampled_responses[i]` (the policy's answer to `rows[i]`) is used as
    the rejected side whenever it is wrong. With a `world`, its judge's pairs (`noisy=False`: true labels)."""
    rows = rows if rows is not None else generate(num_pairs, seed=seed, split=split)
    if world is not None:
        return world.judge(rows, seed, corrupt, first_answers=sampled_responses, noisy=noisy)
    rng = random.Random(f"pairs-{seed}-{split}")
    pairs = []
    for index, row in enumerate(rows):
        sampled = sampled_responses[index] if sampled_responses is not None else None
        on_policy = sampled is not None and sampled.strip() and not is_correct(sampled, row["answer"])
        rejected = sampled if on_policy else corrupt(row["answer"], row["task"], rng)
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": row["answer"]}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "task": row["task"],
                "on_policy": bool(on_policy),
            }
        )
    return pairs


def embedded_feedback(
    num_rows: int, seed: int, sampled_responses: list[str] | None = None, rows: list[dict[str, Any]] | None = None,
    world: World | None = None,
) -> list[dict[str, Any]]:
    """Unpaired feedback for KTO, `{"prompt", "completion", "label", ...}`, two rows per prompt: with a `world`, its
    judge's thumbs on single answers (`World.thumbs`, the same label noise); without one, the pairs of
    `embedded_pairs` unpaired by `unpair` (the right answer up, the wrong one down; `on_policy` only on the sample)."""
    rows = rows if rows is not None else generate(num_rows, seed=seed)
    if world is not None:
        return world.thumbs(rows, seed, corrupt, first_answers=sampled_responses)
    feedback = unpair(embedded_pairs(len(rows), seed, sampled_responses=sampled_responses, rows=rows))
    return [row | {"on_policy": row["on_policy"] and not row["label"]} for row in feedback]  # the sample is the rejected side


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs `{"prompt", "chosen", "rejected", ...}` (all with the same keys) -> two rows `{"prompt", "completion",
    "label", ...}` each, its chosen answer (label true) then its rejected one (false), other columns repeated: one call
    of trl.data_utils.unpair_preference_dataset on the whole list (stages/data/feedback.py unpairs files with it too)."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    if not pairs:
        return []
    columns = {key: [pair[key] for pair in pairs] for key in pairs[0]}
    unpaired = unpair_preference_dataset(Dataset.from_dict(columns | {"pair_index": list(range(len(pairs)))})).to_list()
    # TRL's batched map writes a batch's chosen answers, then its rejected ones: back to the pairs' order, chosen first
    unpaired.sort(key=lambda row: (row["pair_index"], not row["label"]))
    extra = [key for key in pairs[0] if key not in ("prompt", "chosen", "rejected")]
    return [{key: row[key] for key in ("prompt", "completion", "label", *extra)} for row in unpaired]


def heldout_pairs(
    policy: Any | None, tokenizer: Any, num_pairs: int, seed: int, temperature: float = 1.0, families: list[str] | None = None,
    world: World | None = None,
) -> list[dict[str, Any]]:
    """Pairs on eval-split prompts (of `families`, default all); negatives sampled from `policy`
    where it errs, else corruptions (with a `world`: its judge's pairs, labelled without noise).
    Collective under the launcher when a policy samples."""
    rows = generate(num_pairs, seed=seed, split="eval", families=families)
    sampled = None
    if policy is not None:
        sampled = generation.sample_responses(policy, tokenizer, [r["prompt"] for r in rows], seed, 16, temperature)
    return embedded_pairs(num_pairs, seed, split="eval", sampled_responses=sampled, rows=rows, world=world, noisy=False)
