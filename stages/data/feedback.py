"""Unpaired feedback for KTO, as `{"prompt", "completion", "label"}` conversations: a thumbs up (`label: true`) or
down on one answer.

Formats (convert_feedback_row): TRL's published unpaired-preference format, the columns of trl-lib/kto-mix-14k
(`prompt` and `completion` as message lists, `label` a boolean), or the same with plain strings. A source of
pairs (any format stages/data/preferences.py reads) is converted whole, then unpaired with one call of TRL's own
`unpair_preference_dataset` (stages/tasks/pairs.py, `unpair`): every pair gives its chosen answer labelled true and
its rejected one labelled false, each keeping its side's `chosen_ended`/`rejected_ended` as `ended` (did the model
end that answer: stages/data/unended.py, for KTO). A row without a label, or with one that is not a boolean, is an error naming the
file and row (with `drop_malformed`, a counted skip).

Held out (eval_fraction) by prompt, not by row: in kto-mix-14k each prompt holds a thumbs up and a thumbs down answer,
and a hash of the whole row would train on one while holding out the other, so the policy stage would score held-out
prompts it trained on.
"""

from __future__ import annotations

from typing import Any, Callable

from stages.data.formats import (
    DataError, DatasetSpec, by_prompt, check_messages, heldout_indices, heldout_raw_rows, read_rows, rename_columns, require_value,
)
from stages.data.preferences import convert_pairs, convert_preference_row, convert_rows
from stages.data.unended import ENDED_FLAGS
from stages.tasks.pairs import unpair as unpair_pairs

FEEDBACK_COLUMNS = ("prompt", "completion", "label")


def load_feedback_rows(spec: DatasetSpec, drop_malformed: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Unpaired feedback from a file or Hub dataset (pairs are unpaired); returns the rows and how many malformed
    rows were dropped (only with `drop_malformed`). Held-out rows (eval_fraction) are left out, as for pairs, but
    by prompt: every row of a held-out prompt (its thumbs up and its thumbs down) is held out with it."""
    raw_rows, where = read_rows(spec)
    heldout = heldout_indices(spec, raw_rows, _prompt_of(spec))
    return _convert([(index, row) for index, row in enumerate(raw_rows) if index not in heldout], where, spec, drop_malformed)


def load_feedback_heldout(spec: DatasetSpec, drop_malformed: bool = False) -> list[dict[str, Any]]:
    """The source's held-out feedback rows: its eval_split, or the eval_fraction `load_feedback_rows` left out."""
    raw_rows, where = heldout_raw_rows(spec, _prompt_of(spec))
    return _convert(raw_rows, where, spec, drop_malformed, allow_empty=True)[0]


def _is_paired(row: dict[str, Any]) -> bool:
    return "chosen" in row and "rejected" in row and "label" not in row


def _prompt_of(spec: DatasetSpec) -> Callable[[dict[str, Any]], Any]:
    """What the held-out split groups a raw row by: its prompt (stages.data.formats.by_prompt), pair or feedback."""
    return by_prompt(spec, lambda row: convert_preference_row(row, "") if _is_paired(row) else convert_feedback_row(row, ""))


def _convert(
    raw_rows: list[tuple[int, dict[str, Any]]], where: str, spec: DatasetSpec, drop_malformed: bool, allow_empty: bool = False
) -> tuple[list[dict[str, Any]], int]:
    if raw_rows and _is_paired(rename_columns(raw_rows[0][1], spec.columns)):
        pairs, dropped = convert_pairs(raw_rows, where, spec, drop_malformed, allow_empty)
        return unpair(pairs), dropped
    return convert_rows(raw_rows, where, spec, drop_malformed, allow_empty, convert_feedback_row, "feedback rows")


def convert_feedback_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One unpaired row -> conversational prompt/completion/label, and `ended` when given (other columns dropped)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for column in FEEDBACK_COLUMNS:
        require_value(row, column, where, what=f"{column!r} (unpaired feedback needs {', '.join(FEEDBACK_COLUMNS)})")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true (a thumbs up) or false (down), got {label!r}")
    prompt = row["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
    completion = row["completion"]
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else check_messages(completion, where, "completion")
    if completion[-1]["role"] != "assistant" or not completion[-1]["content"].strip():
        raise DataError(f"{where}: 'completion' must end with a non-empty assistant turn")
    converted = {"prompt": prompt, "completion": completion, "label": label}
    if row.get("ended") is not None:  # the sampling stage's: did the model end that answer (stages/data/unended.py)
        if not isinstance(row["ended"], bool):
            raise DataError(f"{where}: 'ended' must be true or false, got {row['ended']!r}")
        converted["ended"] = row["ended"]
    return converted


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs `{"prompt", "chosen", "rejected"}` -> two feedback rows each (chosen: label true, then rejected: false),
    all pairs in one call of trl.data_utils.unpair_preference_dataset. Other columns (a margin) are dropped, except
    the sampling stage's flags: a row's `ended` is its side's `chosen_ended`/`rejected_ended` (missing: true)."""
    rows = unpair_pairs([{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs])  # FEEDBACK_COLUMNS out
    sides = ENDED_FLAGS.values()  # chosen_ended, rejected_ended: unpair_pairs gives each pair's chosen row, then its rejected
    if not any(flag in pair for pair in pairs for flag in sides):
        return rows
    flags = [pair.get(flag, True) for pair in pairs for flag in sides]
    return [row | {"ended": ended} for row, ended in zip(rows, flags, strict=True)]
