"""The numbers of an instruction-following benchmark, from per-instruction verdicts (pure Python).

The four standard numbers, as IFEval's and IFBench's `generate_report` define them:
- prompt-level strict / loose: the share of prompts whose every instruction is followed;
- instruction-level strict / loose: the share of all instructions followed;
loose: an instruction counts as followed if any of IFEval's 8 variants of the response follows it (first
or last line removed, or both, markdown `*` removed; the checker packages apply them). Also the accuracy
per instruction type (strict and loose) and the counts of instructions whose checker was `unavailable`
(an NLTK resource missing) or raised (`error`), each named with its instruction ids.

Unavailable and erroring instructions are never passes: they count as not followed in the four numbers
(whose denominators stay the benchmark's, comparable with published figures) and are reported beside them,
so that a reader sees how many verdicts are missing; a type whose every instruction is unavailable has no
per-type accuracy.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from reward.checkers import InstructionScore

HEADLINE = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


@dataclass(frozen=True)
class PromptResult:
    """One prompt's response and its instructions' verdicts."""

    key: str
    prompt: str
    response: str
    instructions: list[InstructionScore]

    @property
    def follow_all_strict(self) -> bool:
        return all(score.strict for score in self.instructions)

    @property
    def follow_all_loose(self) -> bool:
        return all(score.loose for score in self.instructions)

    def to_json(self) -> dict[str, Any]:
        """A results.jsonl row: the fields of the packages' own OutputExample, both modes, and each verdict's status."""
        return {
            "key": self.key,
            "prompt": self.prompt,
            "response": self.response,
            "instruction_id_list": [score.instruction_id for score in self.instructions],
            "follow_all_instructions_strict": self.follow_all_strict,
            "follow_all_instructions_loose": self.follow_all_loose,
            "follow_instruction_list_strict": [score.strict for score in self.instructions],
            "follow_instruction_list_loose": [score.loose for score in self.instructions],
            "status": [score.status for score in self.instructions],
            "detail": [score.detail for score in self.instructions],
        }


def aggregate(results: list[PromptResult]) -> dict[str, Any]:
    """The four numbers, per-type accuracies, and the unavailable / erroring checkers, for a list of prompts."""
    if not results:
        raise ValueError("no prompts to aggregate")
    instructions = [score for result in results for score in result.instructions]
    per_type: dict[str, list[InstructionScore]] = defaultdict(list)
    for score in instructions:
        per_type[score.instruction_id].append(score)
    missing = {status: Counter(s.instruction_id for s in instructions if s.status == status) for status in ("unavailable", "error")}
    return {
        "prompt_strict": sum(r.follow_all_strict for r in results) / len(results),
        "prompt_loose": sum(r.follow_all_loose for r in results) / len(results),
        "instruction_strict": sum(s.strict for s in instructions) / len(instructions),
        "instruction_loose": sum(s.loose for s in instructions) / len(instructions),
        "num_prompts": len(results),
        "num_instructions": len(instructions),
        "unavailable": sum(missing["unavailable"].values()),
        "errors": sum(missing["error"].values()),
        "unavailable_ids": dict(sorted(missing["unavailable"].items())),
        "error_ids": dict(sorted(missing["error"].items())),
        "unavailable_why": sorted({s.detail for s in instructions if s.status == "unavailable"}),
        "per_type": {
            instruction_id: {
                "count": len(scored),
                "strict": sum(s.strict for s in scored) / len(scored),
                "loose": sum(s.loose for s in scored) / len(scored),
            }
            for instruction_id, all_scores in sorted(per_type.items())
            if (scored := [s for s in all_scores if s.status != "unavailable"])
        },
    }


def as_metrics(name: str, scores: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Flat registry metrics of a benchmark: `eval/NAME/prompt_strict` ..., counts, and per type
    `eval/NAME/strict/ID` and `eval/NAME/loose/ID`."""
    base = f"{prefix}{name}/"
    metrics = {base + key: float(scores[key]) for key in (*HEADLINE, "num_prompts", "num_instructions", "unavailable", "errors")}
    for instruction_id, accuracy in scores["per_type"].items():
        metrics[f"{base}strict/{instruction_id}"] = accuracy["strict"]
        metrics[f"{base}loose/{instruction_id}"] = accuracy["loose"]
    return metrics
