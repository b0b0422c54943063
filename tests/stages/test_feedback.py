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


def test_feedback_is_held_out_by_prompt_never_one_answer_of_a_prompt(tmp_path: Path) -> None:
    """kto-mix-14k's layout: each prompt holds a thumbs up and a thumbs down answer (here 2 or 3 rows, some prompts
    written as a string and again as the same user turn). A hash of the whole row would hold out one answer of a
    prompt and train on the other, so the policy stage would score held-out prompts it trained on: every row of a
    prompt lands on the same side, the eval_max_rows cap included, and pair sources likewise."""
    rows = []
    for index in range(60):
        prompt = f"question {index}?"
        written = [{"role": "user", "content": prompt}] if index % 2 else prompt
        rows += [{"prompt": written, "completion": f"good {index}", "label": True},
                 {"prompt": [{"role": "user", "content": prompt}], "completion": f"bad {index}", "label": False}]
        rows += [{"prompt": prompt, "completion": f"meh {index}", "label": False}] if index % 3 == 0 else []
    path = _jsonl(tmp_path / "thumbs.jsonl", rows)
    for spec in (data.DatasetSpec(source=str(path), eval_fraction=0.3), data.DatasetSpec(source=str(path), eval_fraction=0.3, eval_max_rows=7)):
        train, _ = data.load_feedback_rows(spec)
        heldout = data.load_feedback_heldout(spec)
        assert train and heldout and len(train) + len(heldout) == len(rows) and len(heldout) <= spec.eval_max_rows
        train_prompts = {row["prompt"][0]["content"] for row in train}
        heldout_prompts = {row["prompt"][0]["content"] for row in heldout}
        assert not train_prompts & heldout_prompts

    pairs = [{"prompt": f"question {index // 2}?", "chosen": f"good {index}", "rejected": f"bad {index}"} for index in range(120)]
    spec = data.DatasetSpec(source=str(_jsonl(tmp_path / "pairs.jsonl", pairs)), eval_fraction=0.3)
    train_prompts = {row["prompt"][0]["content"] for row in data.load_feedback_rows(spec)[0]}
    heldout_prompts = {row["prompt"][0]["content"] for row in data.load_feedback_heldout(spec)}
    assert heldout_prompts and train_prompts and not train_prompts & heldout_prompts


def test_a_source_of_pairs_is_unpaired_in_one_call_keeping_each_pair_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,200 pairs: one call of TRL's unpair_preference_dataset (not one Dataset and map per pair), and the rows still
    come pair by pair, chosen then rejected, across TRL's batches of 1,000 (which list a batch's chosen answers first)."""
    import trl.data_utils

    calls = []
    original = trl.data_utils.unpair_preference_dataset
    monkeypatch.setattr(trl.data_utils, "unpair_preference_dataset", lambda dataset, **kwargs: calls.append(len(dataset)) or original(dataset, **kwargs))
    pairs = [{"prompt": f"q{index}", "chosen": f"up {index}", "rejected": f"down {index}", "margin": 1.0} for index in range(1200)]
    rows, dropped = data.load_feedback_rows(data.DatasetSpec(source=str(_jsonl(tmp_path / "pairs.jsonl", pairs)), eval_fraction=0))
    assert calls == [1200] and dropped == 0
    assert rows == [
        {"prompt": [{"role": "user", "content": pair["prompt"]}], "completion": [{"role": "assistant", "content": pair[side]}], "label": side == "chosen"}
        for pair in pairs for side in ("chosen", "rejected")
    ]

    calls.clear()
    task_rows = families.generate(30, seed=5)
    feedback = embedded_feedback(30, 5, rows=task_rows, sampled_responses=["zz"] * 30)  # every sample wrong: the rejected side
    assert calls == [30]
    assert [row["on_policy"] for row in feedback] == [False, True] * 30
    assert all(row["task"] == task_row["task"] for row, task_row in zip(feedback[0::2], task_rows))


def test_the_thumbs_rate_the_answers_the_noise_free_judge_compares_at_the_same_seed() -> None:
    """What World.thumbs documents: per prompt, the better then the worse of the two answers `judge(noisy=False)`
    compares at the seed, also with the policy's samples on some prompts; the noisy judge's training pairs at the same
    seed draw a flip per pair, so they hold other answers (the docstring says so rather than claim the same ones)."""
    world = World(label_noise=0.3)
    rows = families.generate(300, seed=9)
    sampled = [row["answer"] + "?" if index % 4 == 0 else None for index, row in enumerate(rows)]
    feedback = embedded_feedback(300, 9, rows=rows, sampled_responses=sampled, world=world)
    noise_free = world.judge(rows, 9, corrupt, first_answers=sampled, noisy=False)
    assert [row["completion"] for row in feedback] == [pair[side] for pair in noise_free for side in ("chosen", "rejected")]
    training = embedded_pairs(300, 9, rows=rows, sampled_responses=sampled, world=world)
    answers = lambda pairs: [{pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]} for pair in pairs]  # noqa: E731
    assert answers(training)[0] == answers(noise_free)[0] and answers(training) != answers(noise_free)
