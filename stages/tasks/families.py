"""The embedded instruction tasks: verifiable, generated, with a held-out split disjoint from training.

Each example is one task *instance* (family + arguments, e.g. add 23 and 45) rendered through one
instruction *phrasing* from `stages/tasks/embedded_tasks.yaml` (also at configs/templates/). Which split an instance belongs
to is decided by a hash of the instance alone (not of the seed or the phrasing), so held-out prompts
can never occur in training data, whatever seeds or sizes either side is generated with. Held-out
*phrasings* (the `heldout` set of the template file) and held-out *families* (`eval.heldout_tasks`,
removed by `training_families`) are kept out of training the same way, by construction.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from stages.core.paths import resource
from stages.tasks import templates

DEFAULT_TEMPLATES = resource("stages.tasks", "embedded_tasks.yaml")  # package data: works from a wheel too
HELDOUT_PERCENT = 20  # share of task instances reserved for evaluation
MAX_ADDEND = 20  # sums below 40: learnable by the tiny default in its budget
WORD_LENGTHS = (3, 6)

Split = Literal["train", "eval"]
TemplateSet = templates.TemplateSet


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


def load_templates(path: str | Path = DEFAULT_TEMPLATES) -> templates.Templates:
    """Read phrasings per family; an unknown family or placeholder is an error naming file and phrasing."""
    return templates.load(path, {name: family.placeholders for name, family in FAMILIES.items()})


def training_families(requested: list[str] | None, heldout: list[str] | None) -> list[str]:
    """The families a stage may train on: those requested (default: all) minus the held-out ones."""
    heldout = heldout or []
    for name in (requested or []) + heldout:
        if name not in FAMILIES:
            raise ValueError(f"unknown task family {name!r} (known: {', '.join(FAMILIES)})")
    clash = [name for name in requested or [] if name in heldout]
    if clash:
        raise ValueError(f"task family {clash[0]!r} is both requested for training and held out (eval.heldout_tasks)")
    families = [name for name in requested or FAMILIES if name not in heldout]
    if not families:
        raise ValueError("every task family is held out; nothing is left to train on")
    return families


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
    template_set: templates.TemplateSet = "train",
    templates_per_task: int | None = None,
    fanout: int = 1,
    templates_path: str | Path = DEFAULT_TEMPLATES,
) -> list[dict]:
    """Generate `num_examples` task examples, cycling through families in equal shares.

    Returns rows with `prompt` (user message list), `completion` (assistant message list),
    `task`, `template` (set/index of the phrasing) and `answer` (the exact string expected).
    Each instance is rendered with `fanout` distinct phrasings (1: one drawn at random; k: the same
    instance k times, worded differently). `templates_per_task=1` restricts to one phrasing per
    family (the ablation of template augmentation).
    """
    families = families or list(FAMILIES)
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    phrasings_of = load_templates(templates_path)
    rng = random.Random(f"{seed}-{split}-{template_set}")
    rows: list[dict] = []
    instances = attempts = 0
    while len(rows) < num_examples:
        attempts += 1
        if attempts > 1000 * max(num_examples, 1):
            raise RuntimeError("could not draw enough task instances; the task space is too small")
        family = FAMILIES[families[instances % len(families)]]
        arguments = family.sample(rng)
        if instance_split(family.name, arguments) != split:
            continue
        instances += 1
        phrasings = phrasings_of.get(family.name, {}).get(template_set) or []
        phrasings = phrasings[:templates_per_task] if templates_per_task is not None else phrasings
        if not phrasings:
            raise ValueError(f"{templates_path}: no {template_set!r} phrasings for task family {family.name!r}")
        answer = family.solve(arguments)
        for index in templates.pick(rng, len(phrasings), fanout):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": phrasings[index].format(**arguments)}],
                    "completion": [{"role": "assistant", "content": answer}],
                    "task": family.name,
                    "template": f"{template_set}/{index}",
                    "answer": answer,
                }
            )
    return rows[:num_examples]

