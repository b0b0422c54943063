"""Pairs whose answers the model did not end (stages/data/unended.py): TRL's DPOTrainer, wrapped, tokenizes such a
side without the chat template's closing and leaves every other side as TRL gives it; the flags ride through the
preference loader and are filled where a mixture's rows lack them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stages import generation
from stages.core import models
from stages.core.registry import Registry
from stages.data import DataError, convert_preference_row
from stages.data.unended import unended_sides_open, with_ended_flags, without_closing


def _pairs() -> list[dict[str, Any]]:
    def pair(answer: str, worse: str, chosen_ended: bool, rejected_ended: bool) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": f"copy {answer}"}], "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": worse}], "chosen_ended": chosen_ended, "rejected_ended": rejected_ended}

    return [pair("abc", "ab ab ab ab", True, False), pair("hello", "help", True, True), pair("xyz", "x", False, True)]


def _tokenized(trainer_class: type, rows: list[dict[str, Any]], tokenizer: Any, tmp_path: Path) -> list[dict[str, Any]]:
    from datasets import Dataset
    from trl import DPOConfig

    model = models.load_causal_lm(Registry(os.devnull).get("tiny-llama"))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False)
    trainer = trainer_class(model=model, ref_model=models.load_causal_lm(Registry(os.devnull).get("tiny-llama")), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [trainer.train_dataset[index] for index in range(len(rows))]


def test_dpo_tokenizes_an_unended_side_without_the_turns_closing(tmp_path: Path, tiny_tokenizer: Any) -> None:
    from trl import DPOTrainer

    rows = _pairs()
    plain = _tokenized(DPOTrainer, rows, tiny_tokenizer, tmp_path / "plain")
    opened = _tokenized(unended_sides_open(DPOTrainer), rows, tiny_tokenizer, tmp_path / "opened")
    turn_end = generation.end_of_turn_token(tiny_tokenizer)
    assert turn_end is not None
    for row, before, after in zip(rows, plain, opened):
        assert after["prompt_ids"] == before["prompt_ids"]
        for side in ("chosen", "rejected"):
            ids, closed = after[f"{side}_ids"], before[f"{side}_ids"]
            assert turn_end in closed  # TRL closes every side with the template's end of turn
            if row[f"{side}_ended"]:
                assert ids == closed
            else:  # the answer's own tokens, nothing after them
                assert turn_end not in ids and ids == closed[: len(ids)] and len(ids) < len(closed)
                assert tiny_tokenizer.decode(ids).strip() == row[side][0]["content"]


def test_without_closing_cuts_at_the_last_turn_end_only() -> None:
    assert without_closing([5, 6, 2, 9], [2]) == [5, 6]
    assert without_closing([2, 5, 2, 9], [2, 3]) == [2, 5]
    assert without_closing([5, 6], [2]) == [5, 6]


def test_flags_ride_through_the_preference_loader_and_are_filled_in_a_mixture() -> None:
    row = {"prompt": "q", "chosen": "a b", "rejected": "a a a", "rejected_ended": False}
    assert convert_preference_row(row, "pairs.jsonl row 3") == {
        "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a b"}],
        "rejected": [{"role": "assistant", "content": "a a a"}], "rejected_ended": False}
    with pytest.raises(DataError, match=r"pairs.jsonl row 3: 'chosen_ended' must be true or false, got 'no'"):
        convert_preference_row(row | {"chosen_ended": "no"}, "pairs.jsonl row 3")
    sampled, from_file = {"prompt": "q", "rejected_ended": False}, {"prompt": "r"}
    assert with_ended_flags([from_file, sampled]) == [
        {"prompt": "r", "chosen_ended": True, "rejected_ended": True}, {"prompt": "q", "chosen_ended": True, "rejected_ended": False}]
    assert with_ended_flags([from_file]) == [from_file]
