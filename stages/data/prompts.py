"""Prompt rows for the stages that generate (PPO/GRPO/RLOO, the sampling stage): `prompt` as chat messages,
`answer` where known, and every other column of the source (renamed by `columns:`), which reward functions
receive as keyword lists (reward/functions.py): `instruction_id_list`, `kwargs`, ...

May import: `stages.core`, `stages.tasks` and the other data modules (see stages/data/__init__.py).
"""

from __future__ import annotations

from typing import Any

from stages.data.files import DataError
from stages.data.formats import DatasetSpec, check_messages, embedded_rows, heldout_indices, heldout_raw_rows, read_rows, rename_columns


def load_prompt_rows(spec: DatasetSpec, seed: int, count: int | None, heldout_tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """The training prompt rows of one source: embedded task instances (drawn at `seed`), or a file's / Hub
    dataset's rows minus its held-out ones."""
    if spec.source == "embedded":
        generated = embedded_rows(spec, seed, count or 3000, heldout_tasks)
        return [{"prompt": row["prompt"], "answer": row["answer"]} for row in generated]
    raw_rows, where = read_rows(spec)
    held_out = heldout_indices(spec, raw_rows)
    return [prompt_row(spec, raw, f"{where} row {index}") for index, raw in enumerate(raw_rows) if index not in held_out]


def load_heldout_prompt_rows(spec: DatasetSpec) -> list[dict[str, Any]]:
    """The held-out prompt rows of a user's source (never trained on)."""
    raw_rows, where = heldout_raw_rows(spec)
    return [prompt_row(spec, raw, f"{where} row {index}") for index, raw in raw_rows]


def prompt_row(spec: DatasetSpec, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """One prompt row; a missing prompt or malformed messages are errors naming `where` (file and row)."""
    renamed = rename_columns(raw, spec.columns)
    prompt = renamed.get("prompt")
    if prompt is None:
        raise DataError(f"{where}: missing column 'prompt'")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
    return renamed | {"prompt": prompt, "answer": renamed.get("answer")}
