"""The embedded instruction tasks: verifiable, generated, with a held-out split disjoint from training.

Each example is one task *instance* (family + arguments, e.g. add 23 and 45) rendered through one
instruction *phrasing* from `configs/templates/embedded_tasks.yaml`. Which split an instance belongs
to is decided by a hash of the instance alone (not of the seed or the phrasing), so held-out prompts
can never occur in training data, whatever seeds or sizes either side is generated with.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATES = REPO_ROOT / "configs" / "templates" / "embedded_tasks.yaml"
HELDOUT_PERCENT = 20  # share of task instances reserved for evaluation
MAX_ADDEND = 20  # sums below 40: learnable by the tiny default in its budget
WORD_LENGTHS = (3, 6)

Split = Literal["train", "eval"]
TemplateSet = Literal["train", "heldout"]


@dataclass(frozen=True)
class TaskFamily:
    name: str
    placeholders: frozenset[str]
    sample: Callable[[random.Random], dict[str, str]]
    solve: Callable[[dict[str, str]], str]


def _sample_numbers(rng: random.Random) -> dict[str, str]:
    return {"a": str(rng.randrange(MAX_ADDEND)), "b": str(rng.randrange(MAX_ADDEND))}


def _sample_word(rng: random.Random) -> dict[str, str]:
    length = rng.randint(*WORD_LENGTHS)
    return {"text": "".join(rng.choice(string.ascii_lowercase) for _ in range(length))}


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in [
        TaskFamily("add", frozenset({"a", "b"}), _sample_numbers, lambda x: str(int(x["a"]) + int(x["b"]))),
        TaskFamily("reverse", frozenset({"text"}), _sample_word, lambda x: x["text"][::-1]),
        TaskFamily("upper", frozenset({"text"}), _sample_word, lambda x: x["text"].upper()),
        TaskFamily("sort", frozenset({"text"}), _sample_word, lambda x: "".join(sorted(x["text"]))),
        TaskFamily("copy", frozenset({"text"}), _sample_word, lambda x: x["text"]),
    ]
}


def load_templates(path: str | Path = DEFAULT_TEMPLATES) -> dict[str, dict[str, list[str]]]:
    """Read phrasings per family; an unknown family or placeholder is an error naming it."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of task family to phrasings")
    templates: dict[str, dict[str, list[str]]] = {}
    for family_name, sets in raw.items():
        if family_name not in FAMILIES:
            raise ValueError(f"{path}: unknown task family {family_name!r} (known: {', '.join(FAMILIES)})")
        if not isinstance(sets, dict) or not isinstance(sets.get("train"), list) or not sets["train"]:
            raise ValueError(f"{path}: {family_name} needs a non-empty 'train' list of phrasings")
        family = FAMILIES[family_name]
        templates[family_name] = {}
        for set_name in ("train", "heldout"):
            phrasings = sets.get(set_name) or []
            for index, phrasing in enumerate(phrasings):
                used = set(string.Formatter().parse(phrasing)) if isinstance(phrasing, str) else None
                if used is None:
                    raise ValueError(f"{path}: {family_name}.{set_name}[{index}] must be a string")
                names = {name for _, name, _, _ in used if name is not None}
                unknown = names - family.placeholders
                if unknown:
                    raise ValueError(
                        f"{path}: {family_name}.{set_name}[{index}] uses unknown placeholder "
                        f"{{{sorted(unknown)[0]}}} (allowed: {', '.join('{' + p + '}' for p in sorted(family.placeholders))})"
                    )
                if names != family.placeholders:
                    raise ValueError(f"{path}: {family_name}.{set_name}[{index}] must use every placeholder of {family_name}")
            templates[family_name][set_name] = list(phrasings)
        unseen_in_train = set(templates[family_name]["heldout"]) & set(templates[family_name]["train"])
        if unseen_in_train:
            raise ValueError(f"{path}: {family_name} lists {sorted(unseen_in_train)[0]!r} as both train and heldout")
    return templates


def instance_split(family: str, arguments: dict[str, str]) -> Split:
    """Deterministic split of a task instance, independent of seeds and phrasings."""
    key = family + "|" + "|".join(f"{k}={arguments[k]}" for k in sorted(arguments))
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "eval" if bucket < HELDOUT_PERCENT else "train"


def generate(
    num_examples: int,
    seed: int,
    split: Split = "train",
    families: list[str] | None = None,
    template_set: TemplateSet = "train",
    templates_per_family: int | None = None,
    templates_path: str | Path = DEFAULT_TEMPLATES,
) -> list[dict]:
    """Generate `num_examples` task examples, cycling through families in equal shares.

    Returns rows with `prompt` (user message list), `completion` (assistant message list),
    `task`, `template` (index within its set) and `answer` (the exact string expected).
    `templates_per_family=1` restricts training to one phrasing per family (the ablation of
    template augmentation).
    """
    families = families or list(FAMILIES)
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    templates = load_templates(templates_path)
    rng = random.Random(f"{seed}-{split}-{template_set}")
    rows = []
    attempts = 0
    while len(rows) < num_examples:
        attempts += 1
        if attempts > 1000 * max(num_examples, 1):
            raise RuntimeError("could not draw enough task instances; the task space is too small")
        family = FAMILIES[families[len(rows) % len(families)]]
        arguments = family.sample(rng)
        if instance_split(family.name, arguments) != split:
            continue
        phrasings = templates.get(family.name, {}).get(template_set) or []
        if templates_per_family is not None:
            phrasings = phrasings[:templates_per_family]
        if not phrasings:
            raise ValueError(f"{templates_path}: no {template_set!r} phrasings for task family {family.name!r}")
        template_index = rng.randrange(len(phrasings))
        answer = family.solve(arguments)
        rows.append(
            {
                "prompt": [{"role": "user", "content": phrasings[template_index].format(**arguments)}],
                "completion": [{"role": "assistant", "content": answer}],
                "task": family.name,
                "template": f"{template_set}/{template_index}",
                "answer": answer,
            }
        )
    return rows


def is_correct(response: str, answer: str) -> bool:
    """Exact match after trimming surrounding whitespace (the verifiable check of every family)."""
    return response.strip() == answer.strip()
