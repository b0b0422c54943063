"""Preference pairs from files and Hub datasets, as `{"prompt", "chosen", "rejected"[, "margin"]}` conversations.

Formats (convert_preference_row): TRL's standard and conversational preference formats, with explicit or
implicit prompt (UltraFeedback-binarized, trl-lib's, argilla's dpo-mix: TRL's own `trl.data_utils` finds
the prompt), and Anthropic HH-RLHF raw text. A malformed pair is an error naming the file and row, or with
`drop_malformed` a counted skip.
"""

from __future__ import annotations

from typing import Any, Callable

from stages.data.formats import (
    DataError,
    DatasetSpec,
    by_prompt,
    check_messages,
    heldout_indices,
    heldout_raw_rows,
    read_rows,
    rename_columns,
    require_value,
)


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def load_preference_rows(spec: DatasetSpec, drop_malformed: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Load preference pairs from a file or Hub dataset as `{"prompt", "chosen", "rejected"[, "margin"]}`.

    Returns the rows and how many malformed pairs were dropped (only when `drop_malformed`).
    """
    raw_rows, where = read_rows(spec)
    heldout = heldout_indices(spec, raw_rows, by_prompt(spec, _pair))
    return convert_pairs([(index, row) for index, row in enumerate(raw_rows) if index not in heldout], where, spec, drop_malformed)


def load_preference_heldout(spec: DatasetSpec, drop_malformed: bool = False) -> list[dict[str, Any]]:
    """The source's held-out pairs: its eval_split, or the eval_fraction `load_preference_rows` left out."""
    raw_rows, where = heldout_raw_rows(spec, by_prompt(spec, _pair))
    return convert_pairs(raw_rows, where, spec, drop_malformed, allow_empty=True)[0]


def convert_pairs(
    raw_rows: list[tuple[int, dict[str, Any]]], where: str, spec: DatasetSpec, drop_malformed: bool, allow_empty: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """(row index, raw row) pairs -> converted pairs and how many malformed ones were dropped (only with
    `drop_malformed`; otherwise the first is an error naming its row). No usable pair is an error unless
    `allow_empty` and none was malformed."""
    return convert_rows(raw_rows, where, spec, drop_malformed, allow_empty, convert_preference_row, "preference pairs")


def convert_rows(
    raw_rows: list[tuple[int, dict[str, Any]]], where: str, spec: DatasetSpec, drop_malformed: bool, allow_empty: bool,
    convert: Callable[[dict[str, Any], str], dict[str, Any]], noun: str,
) -> tuple[list[dict[str, Any]], int]:
    """`convert` applied to each raw row (columns renamed by `spec.columns`): the converted rows and how many
    malformed ones were dropped (only with `drop_malformed`; otherwise the first is an error naming its row). No
    usable row is an error (naming the `noun`) unless `allow_empty` and none was malformed."""
    rows, dropped = [], 0
    for index, row in raw_rows:
        try:
            rows.append(convert(rename_columns(row, spec.columns), f"{where} row {index}"))
        except DataError as error:
            if not drop_malformed:
                raise DataError(f"{error} (set drop_malformed=true to skip such {noun} with a count)") from None
            dropped += 1
    if not rows and not (allow_empty and not dropped):
        raise DataError(f"{where}: no usable {noun} ({dropped} malformed)")
    return rows, dropped


def convert_preference_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One pair in any supported format -> conversational prompt/chosen/rejected (+ margin where scored).

    - `prompt` + `chosen`/`rejected` as strings (TRL's standard format) or message lists;
    - `chosen`/`rejected` conversations that repeat the prompt (UltraFeedback-binarized from H4, whose
      `prompt` string is then ignored; trl-lib's; argilla's dpo-mix): TRL's `maybe_extract_prompt` takes
      the shared turns as the prompt. Turns that `chosen` and `rejected` still share after an explicit
      prompt (multi-turn pairs) join the prompt too, as TRL's `extract_prompt` would have it;
    - Anthropic HH-RLHF raw text (Human:/Assistant: transcripts), which TRL does not read.
    The margin: a `margin` column, else `score_chosen - score_rejected`, else `chosen_rating - rejected_rating`.
    `chosen_ended`/`rejected_ended` (the sampling stage's; false: the model did not end that answer) ride along for
    DPO and KTO (stages/data/unended.py).
    """
    from trl.data_utils import extract_prompt, maybe_extract_prompt

    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for side in ("chosen", "rejected"):
        require_value(row, side, where, what=f"{side!r} side of the pair")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            prompt, chosen = _split_hh(chosen, where, "chosen")
            rejected_prompt, rejected = _split_hh(rejected, where, "rejected")
            if rejected_prompt != prompt:
                raise DataError(f"{where}: 'chosen' and 'rejected' continue different conversations")
        else:
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    else:
        example: dict[str, Any] = {"chosen": _as_assistant(chosen, where, "chosen"), "rejected": _as_assistant(rejected, where, "rejected")}
        repeats_prompt = isinstance(prompt, str) and any(message["role"] == "user" for message in example["chosen"])
        if prompt is None or repeats_prompt:
            # The conversations hold the prompt (H4's `prompt` string only repeats their user turn): TRL takes the
            # turns both sides share as the prompt, and ignores such a string.
            example = maybe_extract_prompt(example | ({"prompt": prompt} if repeats_prompt else {}))
            prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
        else:
            explicit = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
            shared = extract_prompt(example)  # turns both replies still share (multi-turn pairs) join the prompt
            prompt, chosen, rejected = explicit + shared["prompt"], shared["chosen"], shared["rejected"]
    if not prompt:
        raise DataError(
            f"{where}: the pair has no prompt turns: 'chosen' and 'rejected' share no leading turn (they must share every turn "
            "but the last, or give a 'prompt' column)"
        )
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: {side!r} must end with an assistant turn")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: {side!r} response is empty")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip() and chosen[:-1] == rejected[:-1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair teaches nothing")
    pair: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    margin = _margin(row, where)
    if margin is not None:
        pair["margin"] = margin
    for flag in ("chosen_ended", "rejected_ended"):  # the sampling stage's: did the model end that answer itself
        if row.get(flag) is not None:
            if not isinstance(row[flag], bool):
                raise DataError(f"{where}: {flag!r} must be true or false, got {row[flag]!r}")
            pair[flag] = row[flag]
    return pair


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    return convert_preference_row(row, "")


def _margin(row: dict[str, Any], where: str) -> float | None:
    if row.get("margin") is not None:
        return float(row["margin"])
    for better, worse in (("score_chosen", "score_rejected"), ("chosen_rating", "rejected_rating")):
        if row.get(better) is not None and row.get(worse) is not None:
            try:
                return float(row[better]) - float(row[worse])
            except (TypeError, ValueError):
                raise DataError(f"{where}: {better!r}/{worse!r} must be numbers, got {row[better]!r}/{row[worse]!r}") from None
    return None


def _as_assistant(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return check_messages(value, where, key)


def _split_hh(text: str, where: str, key: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Anthropic HH-RLHF raw text → (prompt messages, [final assistant message])."""
    if HH_HUMAN not in text or HH_ASSISTANT not in text:
        raise DataError(f"{where}: {key!r} is plain text without a prompt; give a 'prompt' column or HH-style Human:/Assistant: turns")
    messages: list[dict[str, str]] = []
    position = text.index(HH_HUMAN)
    while position < len(text):
        next_human = text.find(HH_HUMAN, position + 1)
        next_assistant = text.find(HH_ASSISTANT, position + 1)
        role = "user" if text.startswith(HH_HUMAN, position) else "assistant"
        marker = HH_HUMAN if role == "user" else HH_ASSISTANT
        candidates = [i for i in (next_human, next_assistant) if i != -1]
        end = min(candidates) if candidates else len(text)
        messages.append({"role": role, "content": text[position + len(marker) : end].strip()})
        position = end
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} does not end with an Assistant turn")
    return messages[:-1], [messages[-1]]
