"""Preference pairs from files and Hub datasets, as `{"prompt", "chosen", "rejected"[, "margin"]}` conversations.

Formats: `prompt`/`chosen`/`rejected` (strings or conversations), and Anthropic HH-RLHF raw text
(`chosen`/`rejected` transcripts sharing their prompt). A malformed pair is an error naming the file and
row, or with `drop_malformed` a counted skip.
"""

from __future__ import annotations

from typing import Any

from stages.data.formats import DataError, DatasetSpec, check_messages, read_rows, rename_columns

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def load_preference_rows(spec: DatasetSpec, drop_malformed: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Load preference pairs from a file or Hub dataset as `{"prompt", "chosen", "rejected"[, "margin"]}`.

    Returns the rows and how many malformed pairs were dropped (only when `drop_malformed`).
    """
    raw_rows, where = read_rows(spec)
    rows, dropped = [], 0
    for index, row in enumerate(raw_rows):
        try:
            rows.append(convert_preference_row(rename_columns(row, spec.columns), f"{where} row {index}"))
        except DataError as error:
            if not drop_malformed:
                raise DataError(f"{error} (set drop_malformed=true to skip such pairs with a count)") from None
            dropped += 1
    if not rows:
        raise DataError(f"{where}: no usable preference pairs ({dropped} malformed)")
    return rows, dropped

def convert_preference_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One pair in any supported format → conversational prompt/chosen/rejected.

    Formats: explicit `prompt` + `chosen`/`rejected` (strings or message lists); `chosen`/`rejected`
    full conversations sharing a prompt (UltraFeedback-binarized, optional `score_chosen`/
    `score_rejected` → margin); Anthropic HH-RLHF raw text with Human:/Assistant: turns.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for side in ("chosen", "rejected"):
        if row.get(side) is None:
            raise DataError(f"{where}: missing {side!r} side of the pair")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
        chosen = _as_assistant(chosen, where, "chosen")
        rejected = _as_assistant(rejected, where, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen = _split_hh(chosen, where, "chosen")
        rejected_prompt, rejected = _split_hh(rejected, where, "rejected")
        if rejected_prompt != prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' continue different conversations")
    else:
        chosen_messages = check_messages(chosen, where, "chosen")
        rejected_messages = check_messages(rejected, where, "rejected")
        if chosen_messages[:-1] != rejected_messages[:-1]:
            raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but the last")
        prompt = chosen_messages[:-1]
        chosen, rejected = [chosen_messages[-1]], [rejected_messages[-1]]
        if not prompt:
            raise DataError(f"{where}: the pair has no prompt turns")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: {side!r} must end with an assistant turn")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: {side!r} response is empty")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair teaches nothing")
    pair: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in row and row["margin"] is not None:
        pair["margin"] = float(row["margin"])
    elif row.get("score_chosen") is not None and row.get("score_rejected") is not None:
        pair["margin"] = float(row["score_chosen"]) - float(row["score_rejected"])
    return pair

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
