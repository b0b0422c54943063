"""Unpaired feedback for KTO (stages/data/feedback.py; the embedded world's thumbs, stages/tasks/world.py): TRL's
published format (tests/data/formats/kto_mix_14k.jsonl copies trl-lib/kto-mix-14k's schema), plain strings, pairs
unpaired as TRL does, and a row without a label is an error naming the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import data
from stages.tasks import families
from stages.tasks.pairs import corrupt, embedded_feedback, embedded_pairs
from stages.tasks.world import World

FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_trl_unpaired_format_reads_as_published() -> None:
    raw = [json.loads(line) for line in (FORMATS / "kto_mix_14k.jsonl").read_text().splitlines()]
    rows, dropped = data.load_feedback_rows(data.DatasetSpec(source=str(FORMATS / "kto_mix_14k.jsonl"), eval_fraction=0))
    assert dropped == 0 and len(rows) == len(raw)
    assert [row["label"] for row in rows] == [row["label"] for row in raw]
    assert rows[0] == {
        "prompt": [{"role": "user", "content": raw[0]["prompt"][0]["content"]}],
        "completion": [{"role": "assistant", "content": "Yes"}],
        "label": True,
    }


def test_plain_strings_become_a_user_turn_and_an_assistant_turn(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "thumbs.jsonl", [{"prompt": "2+2?", "completion": "4", "label": True, "user_id": 7},
                                              {"prompt": "2+2?", "completion": "5", "label": False, "user_id": 8}])
    rows, _ = data.load_feedback_rows(data.DatasetSpec(source=str(path), eval_fraction=0))
    assert rows == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}], "label": True},
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "5"}], "label": False},
    ]


def test_pairs_are_unpaired_as_trl_does() -> None:
    """Each pair gives two rows: its chosen answer labelled true, its rejected one false, the prompt repeated
    (trl.data_utils.unpair_preference_dataset)."""
    spec = data.DatasetSpec(source=str(FORMATS / "dpo_mix_7k.jsonl"), eval_fraction=0)
    pairs, _ = data.load_preference_rows(spec)
    rows, _ = data.load_feedback_rows(spec)
    assert len(rows) == 2 * len(pairs)
    for pair, up, down in zip(pairs, rows[0::2], rows[1::2]):
        assert (up["label"], down["label"]) == (True, False)
        assert up["prompt"] == down["prompt"] == pair["prompt"]
        assert up["completion"] == pair["chosen"] and down["completion"] == pair["rejected"]


def test_a_row_without_a_label_is_an_error_naming_it(tmp_path: Path) -> None:
    good = {"prompt": "hi", "completion": "hello", "label": True}
    path = _jsonl(tmp_path / "feedback.jsonl", [good, {"prompt": "hi", "completion": "hey"}, good])
    spec = data.DatasetSpec(source=str(path), eval_fraction=0)
    with pytest.raises(data.DataError, match=r"feedback\.jsonl row 1: missing 'label'"):
        data.load_feedback_rows(spec)
    rows, dropped = data.load_feedback_rows(spec, drop_malformed=True)
    assert (len(rows), dropped) == (2, 1)

    _jsonl(path, [good, {"prompt": "hi", "completion": "hey", "label": "yes"}])
    with pytest.raises(data.DataError, match=r"row 1: 'label' must be true .* got 'yes'"):
        data.load_feedback_rows(spec)
    _jsonl(path, [{"prompt": "hi", "completion": "   ", "label": False}])
    with pytest.raises(data.DataError, match=r"row 0: 'completion' must end with a non-empty assistant turn"):
        data.load_feedback_rows(spec)


def test_the_judge_gives_thumbs_on_single_answers_with_its_label_noise() -> None:
    """Two rows per prompt, the two answers the judge would compare; the true thumb is up only for a right, bare
    answer (utility 2), and label_noise of the thumbs are flipped, as the judge's pairs are."""
    world = World(label_noise=0.2)
    rows = families.generate(1000, seed=3)
    feedback = world.thumbs(rows, 3, corrupt)
    assert len(feedback) == 2 * len(rows)
    assert [row["prompt"] for row in feedback[0::2]] == [row["prompt"] for row in rows]
    for index, row in enumerate(feedback):
        truth = world.utility(row["completion"][-1]["content"], rows[index // 2]["answer"]) == 2
        assert row["label"] == (truth != row["label_flipped"])
    flipped = sum(row["label_flipped"] for row in feedback) / len(feedback)
    assert 0.17 < flipped < 0.23
    assert 0.3 < sum(row["label"] for row in feedback) / len(feedback) < 0.7
    assert world.thumbs(rows, 3, corrupt, noisy=False) != feedback and not any(r["label_flipped"] for r in world.thumbs(rows, 3, corrupt, noisy=False))


def test_without_a_world_the_embedded_pairs_are_unpaired() -> None:
    rows = families.generate(20, seed=5)
    feedback = embedded_feedback(20, 5, rows=rows)
    pairs = embedded_pairs(20, 5, rows=rows)
    assert [row["completion"] for row in feedback] == [pair[side] for pair in pairs for side in ("chosen", "rejected")]
    assert [row["label"] for row in feedback] == [True, False] * 20
