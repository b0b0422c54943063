"""Unpaired feedback for KTO, as `{"prompt", "completion", "label"}` conversations: a thumbs up (`label: true`) or
down on one answer.

Formats (convert_feedback_row): TRL's published unpaired-preference format, the columns of trl-lib/kto-mix-14k
(`prompt` and `completion` as message lists, `label` a boolean), or the same with plain strings. A source of
pairs (any format stages/data/preferences.py reads) is unpaired with TRL's own `unpair_preference_dataset`:
every pair gives its chosen answer labelled true and its rejected one labelled false. A row without a label, or
with one that is not a boolean, is an error naming the file and row (with `drop_malformed`, a counted skip).
"""

from __future__ import annotations

from typing import Any

from stages.data.formats import (
    DataError, DatasetSpec, check_messages, heldout_indices, heldout_raw_rows, read_rows, rename_columns, require_value,
)
from stages.data.preferences import convert_preference_row

FEEDBACK_COLUMNS = ("prompt", "completion", "label")


def load_feedback_rows(spec: DatasetSpec, drop_malformed: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Unpaired feedback from a file or Hub dataset (pairs are unpaired); returns the rows and how many malformed
    rows were dropped (only with `drop_malformed`). Held-out rows (eval_fraction) are left out, as for pairs."""
    raw_rows, where = read_rows(spec)
    heldout = heldout_indices(spec, raw_rows)
    return _convert([(index, row) for index, row in enumerate(raw_rows) if index not in heldout], where, spec, drop_malformed)


def load_feedback_heldout(spec: DatasetSpec, drop_malformed: bool = False) -> list[dict[str, Any]]:
    """The source's held-out feedback rows: its eval_split, or the eval_fraction `load_feedback_rows` left out."""
    raw_rows, where = heldout_raw_rows(spec)
    return _convert(raw_rows, where, spec, drop_malformed, allow_empty=True)[0]


def _convert(
    raw_rows: list[tuple[int, dict[str, Any]]], where: str, spec: DatasetSpec, drop_malformed: bool, allow_empty: bool = False
) -> tuple[list[dict[str, Any]], int]:
    indexed = [(index, rename_columns(row, spec.columns)) for index, row in raw_rows]
    paired = bool(indexed) and "chosen" in indexed[0][1] and "rejected" in indexed[0][1] and "label" not in indexed[0][1]
    rows, dropped = [], 0
    for index, row in indexed:
        try:
            if paired:
                rows += unpair([convert_preference_row(row, f"{where} row {index}")])
            else:
                rows.append(convert_feedback_row(row, f"{where} row {index}"))
        except DataError as error:
            if not drop_malformed:
                raise DataError(f"{error} (set drop_malformed=true to skip such rows with a count)") from None
            dropped += 1
    if not rows and not (allow_empty and not dropped):
        raise DataError(f"{where}: no usable feedback rows ({dropped} malformed)")
    return rows, dropped


def convert_feedback_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One unpaired row -> conversational prompt/completion/label (other columns dropped)."""
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
    return {"prompt": prompt, "completion": completion, "label": label}


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs `{"prompt", "chosen", "rejected"}` -> two feedback rows each, through trl.data_utils.unpair_preference_dataset
    (chosen: label true, rejected: false). Other columns (a margin) are dropped."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    if not pairs:
        return []
    columns = {key: [pair[key] for pair in pairs] for key in ("prompt", "chosen", "rejected")}
    unpaired = unpair_preference_dataset(Dataset.from_dict(columns))
    return [{key: row[key] for key in FEEDBACK_COLUMNS} for row in unpaired]
