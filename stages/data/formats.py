"""Dataset loading and conversion to one conversational shape every stage trains on.

Sources: the embedded task generator, local JSON/JSONL/Parquet files, and Hub dataset names (via
`datasets.load_dataset`). SFT rows come out as `{"prompt": [messages], "completion": [assistant
message]}` (or `{"text": ...}` for plain language modelling), whatever format the user brought:
`messages`, ShareGPT `conversations` (from/value), `prompt`/`completion`, Alpaca
`instruction`/`input`/`output`, or `text`. Converting to prompt/completion works with any chat
template (no `{% generation %}` markers needed) and lets TRL mask the loss to the completion.
Departure: in multi-turn conversations only the final assistant turn is trained on; earlier turns
are context.

A dataset with `templates:` is rephrased through a template file (stages/tasks/templates.py): each row
gets one of the file's training phrasings, or `fanout: k` of them (k rows); held-out phrasings are
never used. How many examples each dataset gives a stage is the mixture's business (stages/data/mixture.py).

Preference pairs are converted in `stages/data/preferences.py`. A malformed row is an error naming the
source and row; an empty dataset is an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from stages import tasks
from stages.core import distributed
from stages.data.files import SUPPORTED_FILE_SUFFIXES, DataError, check_data_file, registered_dataset_file
from stages.tasks import templates
from stages.tasks.world import World

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class DatasetSpec:
    """One dataset of a stage's training data (one source of its mixture, see stages/data/mixture.py)."""

    source: str = field(
        default="embedded",
        metadata={"help": "'embedded' (task generator), a local .json/.jsonl/.parquet file, or a Hub dataset name."},
    )
    name: str | None = field(
        default=None, metadata={"help": "Label in the mixture report and metrics (default: 'embedded', the file stem or the Hub name)."}
    )
    split: str = field(default="train", metadata={"help": "Split to read from a file or Hub dataset."})
    format: Literal["auto", "messages", "conversations", "prompt_completion", "alpaca", "text"] = field(
        default="auto", metadata={"help": "Row format; 'auto' detects it from the columns."}
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Column mapping, our name -> the dataset's name (e.g. {completion: answer})."},
    )
    num_examples: int | None = field(
        default=None,
        metadata={"help": "Fixed number of examples from this source (sampled; repeated if it has fewer). None = all, or its weight's share."},
    )
    weight: float | None = field(
        default=None, metadata={"help": "Relative share of the stage's mixture_size (for sources without num_examples)."}
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": "Embedded only: task families to generate (default: all but eval.heldout_tasks)."}
    )
    templates: str | None = field(
        default=None,
        metadata={
            "help": "Instruction template file (stages/tasks/templates.py). Embedded: its phrasings (default "
            "stages/tasks/embedded_tasks.yaml); other sources: rows rephrased through it (e.g. configs/templates/alpaca.yaml)."
        },
    )
    fanout: int = field(
        default=1,
        metadata={"help": "Phrasings per example: 1 = one training phrasing drawn per example; k = each example rendered k times, worded differently."},
    )
    templates_per_task: int | None = field(
        default=None,
        metadata={"help": "Use only the first N training phrasings per task (1 = one phrasing: the no-augmentation ablation)."},
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out rows for the stage's evaluation: a split of the Hub dataset (e.g. test_prefs) or a second file. "
                  "Default: eval_fraction of this source's rows."},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Without eval_split: this share of the rows (chosen by a hash of each row, whatever the seed) is held out "
                  "of training for evaluation. 0: none."},
    )
    eval_max_rows: int = field(default=1000, metadata={"help": "At most this many rows are held out by eval_fraction (the lowest hashes)."})
    world: World | None = field(
        default=None,
        metadata={"help": "Embedded only: the simulated annotators who write its demonstrations and the judge of its pairs "
                  "(stages/tasks/world.py); absent: exact demonstrations and noise-free labels."},
    )

    def __post_init__(self) -> None:
        if self.num_examples is not None and self.num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {self.num_examples}")
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.weight is not None and self.num_examples is not None:
            raise ValueError("give a source either num_examples (a fixed count) or weight (a share of mixture_size), not both")
        if self.fanout < 1 or (self.templates_per_task is not None and self.templates_per_task < 1):
            raise ValueError("fanout and templates_per_task must be at least 1")
        if self.templates_per_task is not None and self.fanout > self.templates_per_task:
            raise ValueError(f"fanout={self.fanout} needs templates_per_task >= {self.fanout}")
        if self.source != "embedded" and (self.fanout > 1 or self.templates_per_task) and not self.templates:
            raise ValueError(f"{self.source}: fanout/templates_per_task rephrase rows through a template file; set templates")
        if self.name is not None and ("/" in self.name or not self.name.strip()):
            raise ValueError(f"name {self.name!r} must be non-empty and without '/' (it becomes a metric key)")
        if not 0 <= self.eval_fraction < 1 or self.eval_max_rows < 1:
            raise ValueError(f"eval_fraction must be in [0, 1) and eval_max_rows at least 1, got {self.eval_fraction} and {self.eval_max_rows}")
        if self.source == "embedded" and self.eval_split is not None:
            raise ValueError("eval_split is for files and Hub datasets; the embedded tasks hold out their own instances")
        if self.source != "embedded" and self.world is not None:
            raise ValueError(f"{self.source}: world simulates the annotators of the embedded tasks; a file or Hub dataset has its own")
        self.phrasings()  # a malformed template file stops here, at parse time

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "embedded" if self.source == "embedded" else Path(self.source).stem

    def phrasings(self) -> templates.Templates | None:
        """The checked template file of this source (None: rows are used as written)."""
        if self.source == "embedded":
            return tasks.load_templates(self.templates or tasks.DEFAULT_TEMPLATES)
        return templates.load(self.templates, templates.DATASET_TASKS) if self.templates else None


def load_sft_rows(spec: DatasetSpec, seed: int, count: int | None = None, heldout_tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Load one dataset as prompt/completion (or text) rows, rephrased through its templates if it has
    any; errors name the row. `count`: how many the mixture takes (embedded: how many to generate)."""
    if spec.source == "embedded":
        return embedded_rows(spec, seed, count or 6000, heldout_tasks)
    raw_rows, where = read_rows(spec)
    phrasings = spec.phrasings()
    rng = random.Random(f"rephrase-{seed}")
    rows = []
    heldout = heldout_indices(spec, raw_rows, _sft_prompt(spec))
    for index, raw in enumerate(raw_rows):
        if index in heldout:
            continue
        raw = rename_columns(raw, spec.columns)
        row_format = detect_format(raw, f"{where} row {index}") if spec.format == "auto" else spec.format
        converted = convert_sft_row(raw, row_format, f"{where} row {index}")
        rows += _rephrase(raw, row_format, converted, phrasings, spec, rng, f"{where} row {index}") if phrasings else [converted]
    return rows


def load_sft_heldout(spec: DatasetSpec) -> list[dict[str, Any]]:
    """The source's held-out rows (its eval_split, or the eval_fraction `load_sft_rows` left out), converted
    as written: evaluation reads the user's own wording, not a rephrasing."""
    raw_rows, where = heldout_raw_rows(spec, _sft_prompt(spec))
    rows = []
    for index, raw in raw_rows:
        raw = rename_columns(raw, spec.columns)
        row_format = detect_format(raw, f"{where} row {index}") if spec.format == "auto" else spec.format
        rows.append(convert_sft_row(raw, row_format, f"{where} row {index}"))
    return rows


def heldout_indices(spec: DatasetSpec, raw_rows: list[dict[str, Any]], group: Callable[[dict[str, Any]], Any] | None = None) -> set[int]:
    """The rows of the training split held out by eval_fraction: those whose hash falls below it (at most
    eval_max_rows, the lowest hashes), so the choice depends on the row alone, never on the seed; identical
    rows land on the same side. With `group`, the hash is of `group(row)` (a prompt, for feedback: a prompt's
    thumbs up and down answers) and a group is held out whole or not at all, the cap included. None when the
    source has an eval_split, is smaller than 1 / eval_fraction rows, or would have no row left to train on."""
    if spec.source == "embedded" or spec.eval_split is not None or spec.eval_fraction == 0:
        return set()
    if len(raw_rows) * spec.eval_fraction < 1:  # fewer rows than one expected held-out row: trained whole
        return set()
    groups: dict[float, list[int]] = {}  # bucket -> its rows (a bucket is one group: the hash of its key)
    for index, row in enumerate(raw_rows):
        if (bucket := row_bucket(row if group is None else group(row))) < spec.eval_fraction:
            groups.setdefault(bucket, []).append(index)
    chosen: set[int] = set()
    for bucket in sorted(groups):
        if len(chosen) + len(groups[bucket]) > spec.eval_max_rows:
            break
        chosen.update(groups[bucket])
    return chosen if len(chosen) < len(raw_rows) else set()


def by_prompt(spec: DatasetSpec, convert: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], Any]:
    """The held-out split's group of a raw row (for heldout_indices): its prompt as `convert` reads it (a string
    and the same user turn as a message list are one prompt), so that a prompt's rows (its pairs, its thumbs up
    and down, its answers) are held out together; a row without a prompt (text) or that does not convert is its
    own group (it is dropped or reported later)."""

    def prompt(raw: dict[str, Any]) -> Any:
        try:
            return convert(rename_columns(raw, spec.columns)).get("prompt", raw)
        except DataError:
            return raw

    return prompt


def heldout_raw_rows(spec: DatasetSpec, group: Callable[[dict[str, Any]], Any] | None = None) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """(row index, raw row) pairs of the source's held-out rows (`group`: as for heldout_indices), and a name for
    error messages."""
    if spec.eval_split is None:
        raw_rows, where = read_rows(spec)
        chosen = heldout_indices(spec, raw_rows, group)
        return [(index, row) for index, row in enumerate(raw_rows) if index in chosen], where
    as_file = Path(spec.eval_split).suffix in SUPPORTED_FILE_SUFFIXES or Path(spec.eval_split).exists()
    raw_rows, where = read_rows(replace(spec, source=spec.eval_split) if as_file else replace(spec, split=spec.eval_split))
    return list(enumerate(raw_rows)), where


def _sft_prompt(spec: DatasetSpec) -> Callable[[dict[str, Any]], Any]:
    return by_prompt(spec, lambda row: convert_sft_row(row, detect_format(row, "") if spec.format == "auto" else spec.format, ""))


def row_bucket(row: Any) -> float:
    """A number in [0, 1) from the row's content (or any JSON value) alone."""
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    return int(digest[:12], 16) / 16**12


def embedded_rows(spec: DatasetSpec, seed: int, count: int, heldout_tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Embedded task examples of the training split, without the held-out families; with a `world`, their
    completions are written by its annotators (each row keeps its gold `answer`)."""
    rows = tasks.generate(
        count,
        seed=seed,
        split="train",
        families=tasks.training_families(spec.tasks, heldout_tasks),
        templates_per_task=spec.templates_per_task,
        fanout=spec.fanout,
        templates_path=spec.templates or tasks.DEFAULT_TEMPLATES,
    )
    if spec.world is None:
        return rows
    phrasings = spec.phrasings() or {}
    num_phrasings = {task: len(sets.get("train") or []) for task, sets in phrasings.items()}
    if spec.templates_per_task is not None:
        num_phrasings = {task: min(available, spec.templates_per_task) for task, available in num_phrasings.items()}
    return spec.world.demonstrate(rows, seed, num_phrasings)


def embedded_world(specs: Iterable[DatasetSpec]) -> World | None:
    """The world of a stage's embedded sources (its held-out pairs are judged in it); sources that disagree are an error."""
    worlds = [spec.world for spec in specs if spec.source == "embedded" and spec.world is not None]
    if any(world != worlds[0] for world in worlds[1:]):
        raise DataError("the embedded sources of one stage have different `world` settings; give them one world")
    return worlds[0] if worlds else None


def token_count(tokenizer: Any, row: dict[str, Any]) -> int:
    """Tokens of one example as the trainer sees it (chat template applied; both sides of a pair)."""
    if "text" in row:
        return len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
    answers = [row[key] for key in ("completion", "chosen", "rejected") if key in row]
    texts = [tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=False) for answer in answers]
    if not answers:  # a prompt for online RL: the model writes the answer
        texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)]
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def token_counts(tokenizer: Any, rows: list[dict[str, Any]]) -> list[int]:
    """token_count of every row, the rows split between the launcher's ranks (collective under it)."""
    chunk_size = distributed.spread_chunk_size(len(rows))
    return distributed.map_shards(lambda _, chunk: [token_count(tokenizer, row) for row in chunk], rows, chunk_size)


def _rephrase(
    raw: dict[str, Any], row_format: str, converted: dict[str, Any], phrasings: templates.Templates, spec: DatasetSpec, rng: random.Random, where: str
) -> list[dict[str, Any]]:
    """The row rendered through `fanout` training phrasings of its task (held-out ones never)."""
    found = templates.dataset_values(raw, row_format, converted)
    if found is None:
        raise DataError(f"{where}: only rows whose prompt ends with a user message can be rephrased through {spec.templates}")
    task, values = found
    if task not in phrasings:
        raise DataError(f"{where}: {spec.templates} has no phrasings for {task!r} rows (add a {task}: section)")
    train = phrasings[task]["train"][: spec.templates_per_task]
    rows = []
    for index in templates.pick(rng, len(train), spec.fanout):
        user = {"role": "user", "content": train[index].format(**values)}
        rows.append({"prompt": converted["prompt"][:-1] + [user], "completion": converted["completion"]})
    return rows


def read_rows(spec: DatasetSpec) -> tuple[list[dict[str, Any]], str]:
    """Read raw rows of a local file or Hub dataset; returns the rows and a name for error messages."""
    import datasets  # heavy import: only when files are actually read

    path = Path(spec.source)
    if path.suffix in SUPPORTED_FILE_SUFFIXES or path.exists():
        check_data_file(path)  # every way the file itself is bad: one DataError naming the file and line
        builder = SUPPORTED_FILE_SUFFIXES[path.suffix]
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets raises several types for unparsable files
            raise DataError(f"{path}: could not be read as {path.suffix} ({type(error).__name__}: {error})") from None
        where = str(path)
    elif (registered := registered_dataset_file(spec.source, spec.split)) is not None:  # RUN/samples, split rows|pairs
        check_data_file(registered)
        dataset = datasets.load_dataset("json", data_files=str(registered), split="train")
        where = f"dataset {spec.source!r} ({registered})"
    else:
        try:
            dataset = datasets.load_dataset(spec.source, split=spec.split)
        except Exception as error:
            raise DataError(f"dataset {spec.source!r} (split {spec.split!r}) could not be loaded: {error}") from None
        where = f"dataset {spec.source!r}"
    rows = list(dataset)
    if not rows:
        raise DataError(f"{where}: the dataset is empty")
    return rows, where


def convert_sft_row(row: dict[str, Any], row_format: str, where: str) -> dict[str, Any]:
    """Convert one raw row to `{"prompt": [...], "completion": [...]}` or `{"text": ...}`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    row_format = detect_format(row, where) if row_format == "auto" else row_format
    if row_format == "text":
        return {"text": _string(row, "text", where)}
    if row_format == "alpaca":
        instruction = _string(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return _split_conversation([{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output", where)}], where)
    if row_format == "prompt_completion":
        prompt, completion = require_value(row, "prompt", where), require_value(row, "completion", where)
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, "prompt")
        completion_messages = (
            [{"role": "assistant", "content": completion}] if isinstance(completion, str) else check_messages(completion, where, "completion")
        )
        if not completion_messages or completion_messages[-1]["role"] != "assistant" or not completion_messages[-1]["content"].strip():
            raise DataError(f"{where}: 'completion' must end with a non-empty assistant message")
        return {"prompt": prompt_messages, "completion": completion_messages}
    if row_format == "conversations":
        turns = require_value(row, "conversations", where)
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list of turns")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{index}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{index}] has unknown speaker {turn['from']!r}")
            messages.append({"role": role, "content": turn["value"]})
        return _split_conversation(check_messages(messages, where, "conversations"), where)
    if row_format == "messages":
        return _split_conversation(check_messages(require_value(row, "messages", where), where, "messages"), where)
    raise DataError(f"{where}: unknown format {row_format!r}")


def detect_format(row: dict[str, Any], where: str) -> str:
    """Name the row format from its columns."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "conversations"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from columns {sorted(row)}; expected messages, conversations, "
        "prompt/completion, instruction/input/output or text (or set `format` and `columns`)"
    )


def check_messages(messages: Any, where: str, key: str) -> list[dict[str, str]]:
    """Validate a list of chat messages, naming the bad element."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {key}[{index}] needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{index}] has unknown role {message['role']!r}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {key}[{index}].content must be a string, got {type(message['content']).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def fingerprint(rows: Iterable[dict[str, Any]]) -> str:
    """A stable hash of the converted rows (recorded in the registry for lineage)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _split_conversation(messages: list[dict[str, str]], where: str) -> dict[str, Any]:
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    if last_assistant == 0:
        raise DataError(f"{where}: the conversation starts with the assistant; there is no prompt")
    if not messages[last_assistant]["content"].strip():
        raise DataError(f"{where}: the final assistant turn is empty")
    return {"prompt": messages[:last_assistant], "completion": [messages[last_assistant]]}


def rename_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    renamed = dict(row)
    for ours, theirs in columns.items():
        if theirs in renamed:
            renamed[ours] = renamed.pop(theirs)
    return renamed


def require_value(row: dict[str, Any], key: str, where: str, what: str | None = None) -> Any:
    """row[key], or an error that tells a missing column from a missing value."""
    what = what or f"column {key!r}"
    if key not in row:
        raise DataError(f"{where}: missing {what} (has {sorted(row)}; map yours with `columns: {{{key}: NAME}}`)")
    if row[key] is None:
        # A file's reader gives every row every column, so a row without the key reads as null too.
        raise DataError(f"{where}: missing {what} value: the column exists, but this row's value is missing or null")
    return row[key]


def _string(row: dict[str, Any], key: str, where: str) -> str:
    value = require_value(row, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value
