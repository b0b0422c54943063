"""Preference formats convert to prompt/chosen/rejected; malformed pairs fail naming file and row or are dropped with a count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stages.tasks.pairs import corrupt, embedded_pairs
from stages import data, tasks
from stages.data import DataError, DatasetSpec

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
B = {"role": "assistant", "content": "go away"}


@pytest.mark.parametrize(
    "row, margin",
    [
        ({"prompt": "hi", "chosen": "hello", "rejected": "go away"}, None),
        ({"prompt": [U], "chosen": [A], "rejected": [B]}, None),
        ({"chosen": [U, A], "rejected": [U, B]}, None),  # UltraFeedback-binarized
        ({"chosen": [U, A], "rejected": [U, B], "score_chosen": 8.0, "score_rejected": 5.5}, 2.5),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}, None),  # HH-RLHF
    ],
)
def test_formats_convert(row: dict, margin: float | None) -> None:
    pair = data.convert_preference_row(row, "row 0")
    assert pair["prompt"] == [U] and pair["chosen"] == [A] and pair["rejected"] == [B]
    assert pair.get("margin") == margin


def test_hh_multi_turn_keeps_earlier_turns_as_prompt() -> None:
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: "
    pair = data.convert_preference_row({"chosen": text + "good", "rejected": text + "bad"}, "row 0")
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"][0]["content"] == "good"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "hi", "chosen": "hello"}, "missing 'rejected'"),
        ({"prompt": "hi", "chosen": "same", "rejected": " same "}, "identical"),
        ({"prompt": "hi", "chosen": "hello", "rejected": "  "}, "'rejected' response is empty"),
        ({"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, B]}, "share every turn"),
        ({"chosen": "hello", "rejected": "bye"}, "plain text without a prompt"),
    ],
)
def test_malformed_pairs(row: dict, message: str) -> None:
    with pytest.raises(DataError, match=f"prefs.jsonl row 3: .*{message}"):
        data.convert_preference_row(row, "prefs.jsonl row 3")


def test_file_errors_name_row_or_drop_with_count(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q2", "chosen": "x", "rejected": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"prefs.jsonl row 1: .*identical.*drop_malformed=true"):
        data.load_preference_rows(DatasetSpec(source=str(path)))
    kept, dropped = data.load_preference_rows(DatasetSpec(source=str(path)), drop_malformed=True)
    assert dropped == 1 and [p["prompt"][0]["content"] for p in kept] == ["q", "q2"]


def test_corruptions_are_wrong_but_plausible() -> None:
    rng = random.Random(0)
    for row in tasks.generate(300, seed=0):
        wrong = corrupt(row["answer"], row["task"], rng)
        assert wrong != row["answer"] and wrong.strip()
        assert abs(len(wrong) - len(row["answer"])) <= 2


def test_embedded_pairs_use_wrong_samples_as_rejected() -> None:
    rows = tasks.generate(4, seed=0)
    sampled = [rows[0]["answer"], "definitely wrong", "", rows[3]["answer"] + "!"]
    pairs = embedded_pairs(4, 0, sampled_responses=sampled, rows=rows)
    assert [p["on_policy"] for p in pairs] == [False, True, False, True]
    assert pairs[1]["rejected"][0]["content"] == "definitely wrong"
    assert all(p["chosen"][0]["content"] == r["answer"] != p["rejected"][0]["content"] for p, r in zip(pairs, rows))
