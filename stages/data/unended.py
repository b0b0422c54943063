"""Preference pairs (and feedback rows) whose answers the model did not end, tokenized as the model generated them.

The chat template closes every assistant turn with its end-of-turn token (SmolLM2: `<|im_end|>` and a newline),
so TRL's DPOTrainer, tokenizing a conversational pair, gives an answer the model never finished (cut at the
sampling stage's `max_new_tokens`, mid-sentence or in a loop) an end the model never chose. On the rejected side
that is a lesson in its own right: "after this loop, do not end the turn"; on the chosen side, "end mid-sentence".
The sampling stage writes, per pair, whether the model ended each side (`chosen_ended`, `rejected_ended`:
stages/sample.py); `unended_sides_open(trainer_class)` removes that closing from every tokenized side flagged
false, so the pair holds exactly the tokens the model produced. Sides without a flag (pairs from files) keep the
template's closing, as TRL gives it. KTO learns from likelihoods too: its feedback rows carry `ended` (a pair's
flag, unpaired: stages/data/feedback.py), and `unended_completions_open(trainer_class)` does the same for TRL's
KTOTrainer (its KL completions, the batch's completions rotated by one, rebuilt from the opened ones).
The reward model keeps the closing: it scores every answer closed (reward/scoring.py), so it trains on what it scores.

`with_ended_flags(rows)` fills a missing flag with true once any row carries one (a mixture of sampled pairs and
a file's pairs), since `datasets` takes a list's columns from its first row.
"""

from __future__ import annotations

from typing import Any

from stages import generation

ENDED_FLAGS = {"chosen_ids": "chosen_ended", "rejected_ids": "rejected_ended"}
FEEDBACK_FLAG = {"completion_ids": "ended"}  # KTO's tokenized column and its row's flag


def with_ended_flags(rows: list[dict[str, Any]], flags: dict[str, str] = ENDED_FLAGS) -> list[dict[str, Any]]:
    """`rows`, each with every flag of `flags` (missing: true) when any row has one; unchanged otherwise."""
    if not any(flag in row for row in rows for flag in flags.values()):
        return rows
    return [row | {flag: row.get(flag, True) for flag in flags.values()} for row in rows]


def without_closing(ids: list[int], turn_ends: list[int]) -> list[int]:
    """A side's completion ids without the template's closing: cut before the last end-of-turn token (and
    whatever the template puts after it); unchanged when it has none."""
    for position in range(len(ids) - 1, -1, -1):
        if ids[position] in turn_ends:
            return ids[:position]
    return ids


def open_unended(example: dict[str, Any], turn_ends: list[int], flags: dict[str, str] = ENDED_FLAGS) -> dict[str, Any]:
    """One tokenized pair (or feedback row) with the closing removed from each side whose flag is false."""
    return {column: without_closing(example[column], turn_ends) if example.get(flag) is False else example[column]
            for column, flag in flags.items()}


def _columns(dataset: Any) -> list[str]:
    """A dataset's columns; an IterableDataset after `map` knows none until read, so its first row says."""
    return list(dataset.column_names or next(iter(dataset), {}))


def _map_kwargs(dataset: Any, args: Any, description: str) -> dict[str, Any]:
    """As TRL maps: `desc` and its `dataset_num_proc` for a map-style dataset (the same shards, so the same batches)."""
    from datasets import Dataset

    return {"desc": description, "num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}


def unended_sides_open(trainer_class: type) -> type:
    """`trainer_class` (TRL's DPOTrainer or a subclass) whose tokenized pairs leave unended sides open."""
    return _opening(trainer_class, ENDED_FLAGS)


def unended_completions_open(trainer_class: type) -> type:
    """`trainer_class` (TRL's KTOTrainer or a subclass) whose tokenized rows leave unended completions open."""
    return _opening(trainer_class, FEEDBACK_FLAG)


def _opening(trainer_class: type, flags: dict[str, str]) -> type:
    """`trainer_class` whose `_prepare_dataset` output has the closing removed from each column of `flags` whose row's
    flag is false (nothing to do when no row has the flag)."""

    class UnendedOpen(trainer_class):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            columns = _columns(dataset)
            if not set(flags.values()) & set(columns):
                return dataset
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = dataset.map(open_unended, fn_kwargs={"turn_ends": generation.stop_ids(None, tokenizer), "flags": flags},
                                  **_map_kwargs(dataset, args, f"Leaving {dataset_name}'s unended answers open"))
            if "KL_completion_ids" not in columns:  # KTO's only
                return dataset
            # TRL 1.x builds KTO's KL completions inside _prepare_dataset, from the closed ones: each batch of
            # per_device_train_batch_size completions rotated by one (its add_kl_completion_ids); rebuilt here with
            # the same batches. Drop this step if TRL ever exposes the tokenization before it.
            return dataset.map(_rotated, batched=True, batch_size=args.per_device_train_batch_size,
                               **_map_kwargs(dataset, args, f"Rebuilding {dataset_name}'s KL completions"))

    UnendedOpen.__name__ = UnendedOpen.__qualname__ = trainer_class.__name__
    return UnendedOpen


def _rotated(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {"KL_completion_ids": [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]}
