"""Instruction prompts with verifiable constraints (stages/tasks/instructions.py, constraints.py): held-out constraint
types and base tasks never reach training rows, no prompt shares an 8-word run with IFBench's prompts, every
constraint type the generator emits is scored by IFEval's checkers (a passing and a failing answer each), and the
repairs pass the checker where they claim to."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from reward import checkers
from stages import benchmarks, cli
from stages.tasks import constraints, instructions

ANSWER = ("The ocean covers most of the Earth, and it is home to countless creatures. Waves shape the coast every day. "
          "Many people visit the beach in summer to swim and relax. Scientists study the deep sea, where it is dark and cold. "
          "Protecting the ocean matters for the future of the planet. We can help by using less plastic and keeping beaches clean. "
          "Every small action counts.")


def _failing(instruction_id: str, arguments: dict) -> str:
    """An answer that breaks the constraint: ANSWER (one plain paragraph with commas and capitals) breaks most."""
    relation = arguments.get("relation") or arguments.get("let_relation") or arguments.get("capital_relation")
    if instruction_id == "change_case:english_capital":
        return ANSWER.lower()
    if instruction_id == "change_case:capital_word_frequency":
        return ANSWER.upper() if relation == "less than" else ANSWER
    if instruction_id == "keywords:forbidden_words":
        return ANSWER + " " + " ".join(arguments["forbidden_words"])
    if instruction_id == "keywords:frequency":
        return " ".join([arguments["keyword"]] * (arguments["frequency"] + 1)) if relation == "less than" else ANSWER
    if instruction_id == "keywords:letter_frequency":
        return ANSWER + " " + arguments["letter"] * 20 if relation == "less than" else "zzz"
    if instruction_id == "length_constraints:number_sentences":
        return ANSWER if relation == "less than" else "One sentence only."
    if instruction_id == "length_constraints:number_words":
        return " ".join(["word"] * 200) if relation == "less than" else "Too short."
    return ANSWER


def _arguments(instruction_id: str, seed: int) -> dict:
    task = {"text": "Write a short blog post about the ocean.", "keywords": ("ocean",)}
    return constraints.TYPES[instruction_id].arguments(random.Random(seed), task)


@pytest.mark.parametrize("instruction_id", sorted(constraints.TYPES))
def test_every_constraint_type_is_scored_by_ifevals_checker_pass_and_fail(instruction_id: str) -> None:
    assert instruction_id in checkers.registry("ifeval")
    passed = 0
    for seed in range(12):  # both relations and several counts
        arguments = _arguments(instruction_id, seed)
        repaired = constraints.repair_all(ANSWER, [instruction_id], [arguments])
        failing = _failing(instruction_id, arguments)
        verdict = checkers.score_instruction("ifeval", f"k{seed}", "prompt", 0, instruction_id, arguments, failing)
        assert verdict.status == "scored" and not verdict.strict, (instruction_id, arguments, failing[:80])
        if repaired is not None:  # a repair may decline (too few sentences); when it answers, the checker passes it
            verdict = checkers.score_instruction("ifeval", f"k{seed}", "prompt", 0, instruction_id, arguments, repaired)
            assert verdict.strict, (instruction_id, arguments, repaired)
            passed += 1
    assert passed >= 6, f"{instruction_id}: the repair declined {12 - passed} of 12 argument draws"


def test_heldout_types_and_tasks_never_reach_training_rows() -> None:
    settings = instructions.InstructionSet()
    train = instructions.generate(3000, seed=5, split="train")
    heldout_tasks = instructions.generate(300, seed=5, split="heldout_tasks")
    heldout_types = instructions.generate(200, seed=5, split="heldout_constraints")
    train_ids = {name for row in train for name in row["instruction_id_list"]}
    assert not train_ids & set(settings.heldout_types) and len(train_ids) == len(settings.training_types)
    assert {name for row in heldout_tasks for name in row["instruction_id_list"]} <= set(settings.training_types)
    assert {name for row in heldout_types for name in row["instruction_id_list"]} == set(settings.heldout_types)

    def template(row: dict) -> str:
        return row["task_id"].rsplit("/", 1)[0]

    def filler(row: dict) -> tuple[str, int]:  # (pool, item): the slot's pool is named in the template text
        kind, template_id, index = row["task_id"].split("/")
        text = next(t["text"] for t in instructions._bank()["templates"][kind] if t["id"] == template_id)
        return re.search(r"{(\w+)}", text).group(1), int(index)

    assert not {template(row) for row in train} & set(settings.heldout_templates)
    assert {template(row) for row in heldout_tasks} & set(settings.heldout_templates)
    train_fillers = {filler(row) for row in train}
    assert not train_fillers & {filler(row) for row in heldout_tasks + heldout_types}
    train_tasks = {row["prompt"].split("\n\n")[0].split(". ")[0] for row in train}
    assert not any(row["task_id"] in {r["task_id"] for r in train} for row in heldout_tasks)
    assert len(train_tasks) > 100


def test_rows_are_valid_ifeval_benchmark_files_and_reproducible(tmp_path: Path) -> None:
    counts = {"train": 200, "heldout_tasks": 60, "heldout_constraints": 40}
    paths = instructions.write(tmp_path / "a", counts, seed=3)
    again = instructions.write(tmp_path / "b", counts, seed=3)
    for split, path in paths.items():
        assert path.read_bytes() == again[split].read_bytes()
        loaded = benchmarks.load(f"{split}=ifeval:{path}")  # every id and argument checked by the benchmark reader
        assert loaded.name == split and len(loaded.prompts) == counts[split]
    other = instructions.write(tmp_path / "c", counts, seed=4)
    assert other["train"].read_bytes() != paths["train"].read_bytes()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["seed"] == 3


def _runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_no_generated_prompt_shares_an_8_word_run_with_ifbench() -> None:
    ifbench = set().union(*(_runs(prompt.prompt) for prompt in benchmarks.load("ifbench").prompts))
    assert len(ifbench) > 10_000  # the test would pass vacuously on an empty file
    settings = instructions.InstructionSet(heldout_types=[], heldout_templates=[])  # every type and template
    rows = instructions.generate(4000, seed=1, split="train", settings=settings) + instructions.generate(400, seed=1, split="heldout_tasks")
    shared = [(row["prompt"], run) for row in rows for run in _runs(row["prompt"]) & ifbench]
    assert not shared, shared[:3]
    # and the check itself sees a copied run
    assert _runs(benchmarks.load("ifbench").prompts[0].prompt) & ifbench


def test_settings_errors_name_the_bad_value(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no_such:type"):
        instructions.InstructionSet(heldout_types=["no_such:type"])
    with pytest.raises(ValueError, match="writing/nope"):
        instructions.InstructionSet(heldout_templates=["writing/nope"])
    assert cli.main(["instructions", str(tmp_path), "--heldout-types", "bad:id"]) == 2
    assert "bad:id" in capsys.readouterr().err
    assert not (tmp_path / "train.jsonl").exists()
