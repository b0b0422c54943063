"""Reward functions: built-in verifiers and the user's own code, one mechanism for PPO, GRPO, RLOO, the sampling
stage and evaluation.

In a stage config, `reward_functions:` lists them, each with a weight (the reward model has its own,
`reward_model_weight`); the total reward is the weighted sum:

    reward_functions:
      - {name: exact_answer}                                  # built-in: 1 where the response is the row's `answer`
      - {name: instruction_constraints, options: {mode: loose}}   # built-in: share of the row's constraints followed
      - {path: my_rewards.py:score, weight: 0.5}              # your file (run only because a config names it)
      - {module: my_package.rewards:score}                    # an importable module

The signature (stages/core/protocols.py, `ColumnRewardFunction`): `score(prompts, responses, **columns)` returns
one number per response; `prompts` are chat messages, `responses` strings, and every other column of the prompt
rows arrives as a keyword list aligned with them (`answer`, `instruction_id_list`, `kwargs`, ...), as TRL passes
dataset columns. Accept `**columns` to ignore those you do not use.

Bad code never becomes a silent 0: a missing file or name, an exception (the prompt that raised is found and
named), a wrong number of scores, or a NaN/inf is a RewardFunctionError naming the function and the prompt.

May import: `stages.core`, `stages.tasks.constraints` (what a finished answer looks like) and this package (see
reward/__init__.py); built-ins that need a checker package import it when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from stages.core.config import ConfigError
from stages.core.errors import UserError
from stages.core.protocols import Messages, prompt_key
from stages.tasks import constraints


class RewardFunctionError(UserError, RuntimeError):
    """A reward function could not be loaded or misbehaved; the message names it and the prompt."""


@dataclass
class RewardFunctionSpec:
    """One entry of `reward_functions:`: exactly one of name (built-in), path (FILE.py:FUNCTION) or module
    (package.module:FUNCTION), and its weight."""

    name: str | None = field(default=None, metadata={"help": "A built-in: exact_answer | instruction_constraints (options: mode, suite, min_words, task_check, max_repetition, require_ending)."})
    path: str | None = field(default=None, metadata={"help": "Your file and function, e.g. my_rewards.py:score."})
    module: str | None = field(default=None, metadata={"help": "An importable module and function, e.g. my_package.rewards:score."})
    weight: float = field(default=1.0, metadata={"help": "Weight of this function in the total reward."})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of a built-in (e.g. {mode: loose})."})

    def __post_init__(self) -> None:
        given = [key for key in ("name", "path", "module") if getattr(self, key)]
        if len(given) != 1:
            raise ConfigError(f"reward_functions: each entry needs exactly one of name, path or module (got {given or 'none'})")
        if self.name and self.name not in BUILTINS:
            raise ConfigError(f"reward_functions: unknown built-in {self.name!r} (built-ins: {', '.join(BUILTINS)}; your own code: path or module)")
        for key in ("path", "module"):
            value = getattr(self, key)
            if value and value.count(":") != 1:
                raise ConfigError(f"reward_functions: {key} must be {'FILE.py' if key == 'path' else 'package.module'}:FUNCTION, got {value!r}")
        if not math.isfinite(self.weight):
            raise ConfigError(f"reward_functions: weight of {self.label} must be a finite number")

    @property
    def label(self) -> str:
        """How logs and errors name it: the built-in's name, or the function's name."""
        return self.name or (self.path or self.module).rsplit(":", 1)[1]


# -- built-ins ------------------------------------------------------------------------------------

def exact_answer(prompts: list[Messages], responses: list[str], answer: Sequence[str | None] | None = None, **_: Any) -> list[float]:
    """1.0 where the response is the row's `answer` (surrounding whitespace aside), else 0.0."""
    if answer is None:
        raise ValueError("exact_answer needs an 'answer' column in the prompt rows")
    scores = []
    for prompt, response, expected in zip(prompts, responses, answer):
        if expected is None:
            raise ValueError(f"exact_answer: the row of prompt {_short(prompt)} has no answer")
        scores.append(float(response.strip() == str(expected).strip()))
    return scores


def instruction_constraints(
    prompts: list[Messages], responses: list[str], instruction_id_list: Sequence[list[str]] | None = None,
    kwargs: Sequence[list[dict[str, Any] | None]] | None = None, key: Sequence[Any] | None = None,
    mode: str = "strict", suite: str = "ifeval", min_words: int = 0, task_keywords: Sequence[list[str] | None] | None = None,
    task_check: bool = False, max_repetition: float | None = None, require_ending: bool = False, **_: Any,
) -> list[float]:
    """The share of a row's instructions (IFEval's schema: `instruction_id_list`, `kwargs`) its response follows,
    judged by the checker package's own functions (reward/checkers.py; `suite`: ifeval or ifbench; `mode`:
    strict or loose). A checker that cannot run (a missing NLTK resource) is left out of the share, never
    counted as followed; a row with no checkable instruction is an error.
    Guards against answers that follow the form and skip the task (each scores 0 whatever it follows):
    - fewer than `min_words` words (an empty or one-word answer passes "all lowercase" and "no commas");
    - `task_check`: the row's `task_keywords` (the base task's own check, stages/tasks/instructions.py) and none of
      them in the answer (case-insensitive): off task;
    - `max_repetition`: more than this share of the answer's word 4-grams are repeats (a loop until the token cap);
    - `require_ending`: the answer stops mid-sentence (cut at the token cap: no closing punctuation, bracket or fence)."""
    from reward import checkers

    if mode not in ("strict", "loose"):
        raise ValueError(f"instruction_constraints: mode must be strict or loose, not {mode!r}")
    if instruction_id_list is None or kwargs is None:
        raise ValueError("instruction_constraints needs the prompt rows' instruction_id_list and kwargs columns (IFEval's schema)")
    if task_check and task_keywords is None:
        raise ValueError("instruction_constraints: task_check needs the prompt rows' task_keywords column (stages/tasks/instructions.py writes it)")
    scores = []
    for row, (prompt, response, ids, arguments) in enumerate(zip(prompts, responses, instruction_id_list, kwargs)):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        keywords = task_keywords[row] if task_check and task_keywords is not None else None
        if _off_task(response, min_words, keywords, max_repetition) or (require_ending and not constraints.complete(response)):
            scores.append(0.0)
            continue
        verdicts = [
            checkers.score_instruction(suite, str(key[row]) if key is not None else text, text, index, instruction_id, (arguments or [])[index] or {}, response)
            for index, instruction_id in enumerate(ids or [])
        ]
        scored = [getattr(verdict, mode) for verdict in verdicts if verdict.status == "scored"]
        if not scored:
            problems = "; ".join(f"{v.instruction_id}: {v.status} {v.detail}".strip() for v in verdicts) or "no instructions"
            raise ValueError(f"instruction_constraints: no instruction of prompt {_short(prompt)} can be checked ({problems})")
        scores.append(sum(scored) / len(scored))
    return scores


def repetition(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that repeat an earlier one: 0 for varied prose, near 1 for a loop."""
    words = text.lower().split()
    grams = [tuple(words[index : index + n]) for index in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _off_task(response: str, min_words: int, keywords: list[str] | None, max_repetition: float | None) -> bool:
    if len(response.split()) < min_words:
        return True
    if keywords and not any(keyword.lower() in response.lower() for keyword in keywords):
        return True
    return max_repetition is not None and repetition(response) > max_repetition


BUILTINS: dict[str, Callable[..., Sequence[float]]] = {"exact_answer": exact_answer, "instruction_constraints": instruction_constraints}


# -- loading and calling --------------------------------------------------------------------------

def load(spec: RewardFunctionSpec) -> Callable[..., Sequence[float]]:
    """The callable `spec` names; a missing file, module or name is a RewardFunctionError naming it."""
    if spec.name:
        function = BUILTINS[spec.name]
        return (lambda prompts, responses, **columns: function(prompts, responses, **spec.options, **columns)) if spec.options else function
    target, name = (spec.path or spec.module).rsplit(":", 1)
    if spec.path:
        file = Path(target).expanduser()
        if not file.is_file():
            raise RewardFunctionError(f"reward function {spec.path}: file {file} not found")
        module_spec = importlib.util.spec_from_file_location(f"rlhf_user_rewards.{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's module failed to import
            raise RewardFunctionError(f"reward function {spec.path}: importing {file} raised {type(error).__name__}: {error}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise RewardFunctionError(f"reward function {spec.module}: cannot import {target!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function {spec.path or spec.module}: {target} has no function {name!r}")
    return function


@dataclass
class RewardFunctions:
    """The configured functions as one weighted total, with each one's last scores kept for logging."""

    specs: list[RewardFunctionSpec]
    functions: list[Callable[..., Sequence[float]]] = field(default_factory=list)
    last_scores: dict[str, list[float]] = field(default_factory=dict)  # label -> the last batch's scores

    @classmethod
    def from_specs(cls, specs: list[RewardFunctionSpec]) -> RewardFunctions:
        labels = [spec.label for spec in specs]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ConfigError(f"reward_functions: {', '.join(duplicated)} listed twice; each function is logged under its name")
        return cls(specs, [load(spec) for spec in specs])

    def score(self, prompts: list[Messages], responses: list[str], columns: dict[str, list[Any]]) -> list[float]:
        """The weighted total per response; every function checked (count, finite values, exceptions)."""
        totals = [0.0] * len(responses)
        for spec, function in zip(self.specs, self.functions):
            scores = call(function, spec.label, prompts, responses, columns)
            self.last_scores[spec.label] = scores
            totals = [total + spec.weight * score for total, score in zip(totals, scores)]
        return totals

    def metrics(self, prefix: str) -> dict[str, float]:
        """Mean and standard deviation of each function's last scores: `{prefix}NAME/mean`, `.../std`."""
        out = {}
        for label, scores in self.last_scores.items():
            mean = sum(scores) / len(scores) if scores else 0.0
            out[f"{prefix}{label}/mean"] = mean
            out[f"{prefix}{label}/std"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) if scores else 0.0
        return out


def call(function: Callable[..., Sequence[float]], label: str, prompts: list[Messages], responses: list[str],
         columns: dict[str, list[Any]]) -> list[float]:
    """One function on one batch, held to the contract (module docstring)."""
    try:
        raw = function(prompts, responses, **columns)
    except Exception as error:  # noqa: BLE001 - the user's code: find the prompt and say so
        index = _first_failing(function, prompts, responses, columns)
        where = f" on prompt {_short(prompts[index])}" if index is not None else ""
        raise RewardFunctionError(f"reward function {label} raised {type(error).__name__}: {error}{where}") from None
    try:
        scores = [float(score) for score in (raw.tolist() if hasattr(raw, "tolist") else raw)]
    except (TypeError, ValueError):
        raise RewardFunctionError(f"reward function {label} must return one number per response, got {type(raw).__name__}") from None
    if len(scores) != len(responses):
        raise RewardFunctionError(f"reward function {label} returned {len(scores)} scores for {len(responses)} responses")
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            raise RewardFunctionError(f"reward function {label} returned {score} for prompt {_short(prompts[index])}: scores must be finite")
    return scores


def bind_columns(rows: list[dict[str, Any]]) -> Callable[[list[Messages]], dict[str, list[Any]]]:
    """For callers that hold prompts only (our PPO's rollouts, evaluation): the other columns of each prompt's
    row, looked up by the prompt. A prompt that is not among the rows is an error, not a silent 0."""
    by_prompt = {prompt_key(row["prompt"]): row for row in rows}
    names = sorted({key for row in rows for key in row if key != "prompt"})

    def columns(prompts: list[Messages]) -> dict[str, list[Any]]:
        found = []
        for prompt in prompts:
            row = by_prompt.get(prompt_key(prompt))
            if row is None:
                raise RewardFunctionError(f"reward functions: no prompt row holds the prompt {_short(prompt)}")
            found.append(row)
        return {name: [row.get(name) for row in found] for name in names}

    return columns


def _first_failing(function: Callable[..., Any], prompts: list[Messages], responses: list[str], columns: dict[str, list[Any]]) -> int | None:
    for index in range(len(responses)):
        try:
            function(prompts[index : index + 1], responses[index : index + 1], **{key: values[index : index + 1] for key, values in columns.items()})
        except Exception:  # noqa: BLE001
            return index
    return None


def _short(prompt: Messages | str) -> str:
    text = prompt if isinstance(prompt, str) else (prompt[-1]["content"] if prompt else "")
    return repr(text if len(text) <= 80 else text[:77] + "...")


