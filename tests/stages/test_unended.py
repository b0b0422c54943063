"""Pairs whose answers the model did not end (stages/data/unended.py): TRL's DPOTrainer, wrapped, tokenizes such a
side without the chat template's closing and leaves every other side as TRL gives it; KTOTrainer, wrapped, does the
same for feedback rows (and its KL completions); the flags ride through the preference and feedback loaders and are
filled where a mixture's rows lack them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stages import generation
from stages.core import models
from stages.core.registry import Registry
from stages.data import DataError, convert_feedback_row, convert_preference_row, unpair
from stages.data.unended import FEEDBACK_FLAG, unended_completions_open, unended_sides_open, with_ended_flags, without_closing


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


def test_kto_tokenizes_an_unended_completion_open_and_rotates_the_opened_ones_for_kl(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Pairs unpaired for KTO keep each side's flag as `ended`; the wrapped KTOTrainer gives a completion flagged
    false its own tokens only, others TRL's, and its KL completions are the batch's opened completions rotated by one
    (what TRL builds from its own): an unended answer is open wherever KTO reads it."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = unpair(_pairs())
    assert [row["label"] for row in rows] == [True, False] * 3
    assert [row["completion"][0]["content"] for row in rows if not row["ended"]] == ["ab ab ab ab", "xyz"]
    assert [row["ended"] for row in unpair([{"prompt": "q", "chosen": "a", "rejected": "b b", "rejected_ended": False}])] == [True, False]

    def tokenized(trainer_class: type, name: str) -> list[dict[str, Any]]:
        model = models.load_causal_lm(Registry(os.devnull).get("tiny-llama"))
        args = KTOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False)
        trainer = trainer_class(model=model, ref_model=models.load_causal_lm(Registry(os.devnull).get("tiny-llama")), args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
        return [trainer.train_dataset[index] for index in range(len(rows))]

    plain, opened = tokenized(KTOTrainer, "plain"), tokenized(unended_completions_open(KTOTrainer), "opened")
    turn_end = generation.end_of_turn_token(tiny_tokenizer)
    for row, before, after in zip(rows, plain, opened):
        assert after["prompt_ids"] == before["prompt_ids"] and turn_end in before["completion_ids"]
        if row["ended"]:
            assert after["completion_ids"] == before["completion_ids"]
        else:
            ids = after["completion_ids"]
            assert turn_end not in ids and ids == before["completion_ids"][: len(ids)]
            assert tiny_tokenizer.decode(ids).strip() == row["completion"][0]["content"]
    # TRL's own KL pairing (whose completion each row borrows, read from the unwrapped trainer), over the opened ones
    assert len({tuple(example["completion_ids"]) for example in plain}) == len(plain)
    borrowed = [next(j for j, other in enumerate(plain) if other["completion_ids"] == example["KL_completion_ids"]) for example in plain]
    assert borrowed != list(range(len(plain)))  # the default loss computes the KL term from mismatched rows
    assert [example["KL_completion_ids"] for example in opened] == [opened[j]["completion_ids"] for j in borrowed]


def test_the_feedback_loader_keeps_ended_and_a_mixture_fills_it() -> None:
    row = {"prompt": "q", "completion": "a a a", "label": False, "ended": False}
    assert convert_feedback_row(row, "feedback.jsonl row 2")["ended"] is False
    assert "ended" not in convert_feedback_row(row | {"ended": None}, "feedback.jsonl row 2")
    with pytest.raises(DataError, match=r"feedback.jsonl row 2: 'ended' must be true or false, got 1"):
        convert_feedback_row(row | {"ended": 1}, "feedback.jsonl row 2")
    assert with_ended_flags([{"prompt": "r"}, {"prompt": "q", "ended": False}], FEEDBACK_FLAG) == [
        {"prompt": "r", "ended": True}, {"prompt": "q", "ended": False}]
    assert all("ended" not in row for row in unpair([{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in _pairs()]))
