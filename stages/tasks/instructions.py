"""Instruction prompts with verifiable constraints, generated here: a base task (instruction_tasks.yaml: writing,
summarising a given passage, question answering, explanation, rewriting, classification, brainstorming, simple
reasoning, code) with 1-3 constraints (stages/tasks/constraints.py), in IFEval's schema (`key`, `prompt`,
`instruction_id_list`, `kwargs`), so IFEval's checkers score them, plus `task_id`, `task_kind` and `task_keywords`
(the base task's own check, reward/functions.py).

Three splits, disjoint by construction:
- `train`: training templates x training fillers, with the training constraint types;
- `heldout_tasks`: base tasks never trained on (every template, including those held out, with the fillers kept
  for held-out tasks: every fourth item of each pool), with the training constraint types;
- `heldout_constraints`: the same held-out tasks with only held-out constraint types (the FLAN question: does
  tuning transfer to instructions it never saw?).
Which templates and constraint types are held out is configuration (`InstructionSet`); the fillers' split is fixed
(item index), so a training row and a held-out row never share a filler. Rows are drawn from `seed`: the same seed
gives the same rows.

May import: the standard library, yaml, and `stages.tasks.constraints`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.tasks import constraints

TASKS_FILE = Path(__file__).with_name("instruction_tasks.yaml")
SPLITS = ("train", "heldout_tasks", "heldout_constraints")
HELDOUT_EVERY = 4  # every fourth filler of a pool is for held-out tasks only
Split = Literal["train", "heldout_tasks", "heldout_constraints"]
DEFAULT_HELDOUT_TYPES = ("startend:quotation", "keywords:letter_frequency", "length_constraints:nth_paragraph_first_word",
                         "change_case:capital_word_frequency", "combination:two_responses")
DEFAULT_HELDOUT_TEMPLATES = ("writing/speech", "summarising/main_point", "question_answering/curious_q", "explanation/simple",
                             "rewriting/simpler", "classification/food_group", "brainstorming/gift", "reasoning/work_out", "code/show_how")


@dataclass
class InstructionSet:
    """What is held out and how many constraints a prompt carries."""

    heldout_types: list[str] = field(default_factory=lambda: list(DEFAULT_HELDOUT_TYPES), metadata={
        "help": "IFEval instruction ids never in training rows; only the heldout_constraints split carries them."})
    heldout_templates: list[str] = field(default_factory=lambda: list(DEFAULT_HELDOUT_TEMPLATES), metadata={
        "help": "Base-task templates (kind/id) never in training rows."})
    min_constraints: int = field(default=1, metadata={"help": "Fewest constraints per prompt."})
    max_constraints: int = field(default=3, metadata={"help": "Most constraints per prompt (held-out-constraint prompts: at most 2)."})

    def __post_init__(self) -> None:
        unknown = [name for name in self.heldout_types if name not in constraints.TYPES]
        if unknown:
            raise ValueError(f"heldout_types: unknown constraint types {unknown} (known: {', '.join(constraints.TYPES)})")
        templates = {f"{kind}/{template['id']}" for kind, listed in _bank()["templates"].items() for template in listed}
        unknown = [name for name in self.heldout_templates if name not in templates]
        if unknown:
            raise ValueError(f"heldout_templates: unknown templates {unknown} (known: {', '.join(sorted(templates))})")
        if not 1 <= self.min_constraints <= self.max_constraints <= 3:
            raise ValueError(f"min_constraints/max_constraints must satisfy 1 <= min <= max <= 3, got {self.min_constraints}/{self.max_constraints}")
        if not self.training_types:
            raise ValueError("heldout_types holds out every constraint type: nothing is left to train on")

    @property
    def training_types(self) -> list[str]:
        return [name for name in constraints.TYPES if name not in self.heldout_types]


@dataclass(frozen=True)
class BaseTask:
    task_id: str  # kind/template/filler-index
    kind: str
    text: str
    keywords: tuple[str, ...]


@lru_cache(maxsize=1)
def _bank() -> dict[str, Any]:
    return yaml.safe_load(TASKS_FILE.read_text())


def base_tasks(settings: InstructionSet, heldout: bool) -> list[BaseTask]:
    """Training tasks (training templates x training fillers) or held-out tasks (any template x held-out fillers)."""
    bank, tasks = _bank(), []
    for kind, templates in bank["templates"].items():
        for template in templates:
            name = f"{kind}/{template['id']}"
            if not heldout and name in settings.heldout_templates:
                continue
            slot = re.search(r"{(\w+)}", template["text"]).group(1)
            for index, item in enumerate(bank["pools"][slot]):
                if ((index + 1) % HELDOUT_EVERY == 0) != heldout:
                    continue
                keywords = tuple(template.get("keywords") or item[1:] or [item[0]])
                tasks.append(BaseTask(f"{name}/{index}", kind, template["text"].format(**{slot: item[0]}), tuple(map(str, keywords))))
    return tasks


def generate(count: int, seed: int, split: Split, settings: InstructionSet | None = None) -> list[dict[str, Any]]:
    """`count` prompt rows of `split` in IFEval's schema (+ task_id, task_kind, task_keywords, split), drawn at `seed`;
    no two rows share a prompt."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    settings = settings or InstructionSet()
    tasks = base_tasks(settings, heldout=split != "train")
    types = settings.heldout_types if split == "heldout_constraints" else settings.training_types
    most = min(settings.max_constraints, 2) if split == "heldout_constraints" else settings.max_constraints
    rng = random.Random(f"{seed}:{split}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"only {len(rows)} distinct {split} prompts could be drawn, {count} asked for: hold out less, or ask for fewer")
        task = rng.choice(tasks)
        row = _row(task, rng, types, settings.min_constraints, most, split)
        if row is None or row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row | {"key": f"{split}-{seed}-{len(rows)}"})
    return rows


def _row(task: BaseTask, rng: random.Random, types: list[str], fewest: int, most: int, split: str) -> dict[str, Any] | None:
    wanted = rng.randint(fewest, most)
    chosen: list[str] = []
    for candidate in rng.sample(types, len(types)):
        if len(chosen) == wanted:
            break
        if constraints.compatible(chosen, candidate) and _fits(task, candidate):
            chosen.append(candidate)
    if not chosen:
        return None
    kwargs = [constraints.TYPES[name].arguments(rng, {"text": task.text, "keywords": task.keywords}) for name in chosen]
    kwargs = [_avoid_task_words(arguments, task) for arguments in kwargs]
    phrases = [constraints.TYPES[name].phrase(rng, arguments) for name, arguments in zip(chosen, kwargs)]
    prompt = task.text + rng.choice((" ", "\n\n")) + " ".join(phrases)
    return {"prompt": prompt, "instruction_id_list": chosen, "kwargs": kwargs, "task_id": task.task_id,
            "task_kind": task.kind, "task_keywords": list(task.keywords), "split": split}


def _fits(task: BaseTask, instruction_id: str) -> bool:
    """Constraints that would fight the task: no uppercase-only or comma-free code, no 'repeat the request' for a
    request that holds a whole passage (the answer would be mostly copy)."""
    if task.kind == "code" and instruction_id in ("change_case:english_capital", "change_case:english_lowercase", "detectable_format:json_format"):
        return False
    return not (instruction_id == "combination:repeat_prompt" and len(task.text) > 160)


def _avoid_task_words(arguments: dict[str, Any], task: BaseTask) -> dict[str, Any]:
    """A forbidden word is never one of the task's own keywords (the task check needs them)."""
    if "forbidden_words" in arguments:
        lowered = {keyword.lower() for keyword in task.keywords}
        arguments["forbidden_words"] = [word for word in arguments["forbidden_words"] if word not in lowered] or ["the"]
    return arguments


def write(directory: Path, counts: dict[str, int], seed: int, settings: InstructionSet | None = None) -> dict[str, Path]:
    """Each split's rows as `DIRECTORY/SPLIT.jsonl` (written to a temporary name, then renamed), and a manifest with
    the settings and a fingerprint of each file."""
    settings = settings or InstructionSet()
    directory.mkdir(parents=True, exist_ok=True)
    paths, manifest = {}, {"seed": seed, "counts": counts, "heldout_types": settings.heldout_types,
                           "heldout_templates": settings.heldout_templates, "files": {}}
    for split, count in counts.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generate(count, seed, split, settings))
        path = directory / f"{split}.jsonl"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
        paths[split] = path
        manifest["files"][split] = hashlib.sha256(text.encode()).hexdigest()[:16]
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
