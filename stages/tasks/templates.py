"""Instruction templates kept in files: several phrasings per task, split into training and held-out sets.

A template file is YAML mapping each task to `{train: [phrasing, ...], heldout: [phrasing, ...]}`; a
phrasing is a string with `{placeholders}`. Which placeholders a task takes is fixed by the code that
renders it: the embedded task families (stages/tasks/families.py) and the dataset rephrasings below
(`DATASET_TASKS`: Alpaca `instruction`/`input` pairs and single-turn prompts). A phrasing must use
every placeholder of its task, since one that drops the argument asks an unanswerable question; an
unknown placeholder, an unknown task or a phrasing in both sets is an error naming the file and the
phrasing. Held-out phrasings are read here but never rendered into training data (see data.py).
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from stages.core.config import ConfigError

TemplateSet = Literal["train", "heldout"]
Templates = dict[str, dict[TemplateSet, list[str]]]  # task -> set -> phrasings

# Rephrasing of user datasets: Alpaca rows with and without an input, and any row whose prompt ends
# with a user message (its text is the {prompt}).
DATASET_TASKS: dict[str, frozenset[str]] = {
    "instruction": frozenset({"instruction"}),
    "instruction_input": frozenset({"instruction", "input"}),
    "prompt": frozenset({"prompt"}),
}


class TemplateError(ConfigError):
    """A template file is missing or malformed; the message names the file and the phrasing."""


def load(path: str | Path, placeholders: Mapping[str, frozenset[str]]) -> Templates:
    """Read and check a template file against `placeholders` (task -> the placeholders it takes)."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"template file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise TemplateError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping of task to phrasings")
    templates: Templates = {}
    for task, sets in raw.items():
        if task not in placeholders:
            raise TemplateError(f"{path}: unknown task {task!r} (known: {', '.join(placeholders)})")
        if not isinstance(sets, dict) or set(sets) - {"train", "heldout"}:
            raise TemplateError(f"{path}: {task} must map 'train' (and optionally 'heldout') to lists of phrasings")
        if not isinstance(sets.get("train"), list) or not sets["train"]:
            raise TemplateError(f"{path}: {task} needs a non-empty 'train' list of phrasings")
        templates[task] = {}
        for set_name in ("train", "heldout"):
            phrasings = sets.get(set_name) or []
            if not isinstance(phrasings, list):
                raise TemplateError(f"{path}: {task}.{set_name} must be a list of phrasings")
            for index, phrasing in enumerate(phrasings):
                _check_phrasing(phrasing, placeholders[task], f"{path}: {task}.{set_name}[{index}]")
            templates[task][set_name] = list(phrasings)
        both = set(templates[task]["train"]) & set(templates[task]["heldout"])
        if both:
            raise TemplateError(f"{path}: {task} lists {sorted(both)[0]!r} as both train and heldout")
    return templates


def pattern(phrasing: str) -> re.Pattern[str]:
    """A regex matching every rendering of `phrasing` (for checking that nothing leaked into training)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(phrasing):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append("(.+?)")
    return re.compile("".join(parts), re.DOTALL)


def pick(rng: random.Random, num_phrasings: int, fanout: int) -> list[int]:
    """Indices of the phrasings one example is rendered with: `fanout` distinct ones, drawn at random."""
    if fanout > num_phrasings:
        raise TemplateError(f"fanout={fanout} needs at least {fanout} training phrasings per task, found {num_phrasings}")
    return rng.sample(range(num_phrasings), fanout)


def dataset_values(raw: dict[str, Any], row_format: str, converted: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
    """The dataset task and placeholder values of one row, or None when it cannot be rephrased.

    Alpaca rows keep instruction and input apart (so a phrasing can put the input first); any other
    row is rephrased through its final user message.
    """
    if row_format == "alpaca":
        extra = (raw.get("input") or "").strip()
        if extra:
            return "instruction_input", {"instruction": raw["instruction"], "input": raw["input"]}
        return "instruction", {"instruction": raw["instruction"]}
    prompt = converted.get("prompt")
    if not prompt or prompt[-1]["role"] != "user":
        return None
    return "prompt", {"prompt": prompt[-1]["content"]}


def _check_phrasing(phrasing: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(phrasing, str) or not phrasing.strip():
        raise TemplateError(f"{where} must be a non-empty string")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(phrasing) if name is not None}
    except ValueError as error:  # e.g. a lone '{'
        raise TemplateError(f"{where} {phrasing!r} is not a valid template ({error}; write {{{{ for a literal brace)") from None
    shown = ", ".join("{" + name + "}" for name in sorted(allowed))
    unknown = names - allowed
    if unknown:
        raise TemplateError(f"{where} {phrasing!r} uses unknown placeholder {{{sorted(unknown)[0]}}} (allowed: {shown})")
    if names != allowed:
        raise TemplateError(f"{where} {phrasing!r} must use every placeholder of its task ({shown})")
