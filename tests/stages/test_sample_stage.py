"""The sampling stage (stages/sample.py): samples scored by a hand-made reward function, the kept rows and pairs
following the scores row by row, registered as a dataset with lineage, and read back by reference from the SFT,
DPO and reward data loaders; every bad dataset reference is an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import cli, data, sample
from stages.core.config import load_config
from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SCORER = '''
def vowel_share(prompts, responses, answer, **columns):
    return [sum(c in "aeiouAEIOU" for c in r) / max(len(r), 1) for r in responses]
'''


def _sample(tmp_path: Path, *extra: str) -> dict:
    (tmp_path / "scorer.py").write_text(SCORER)
    argv = ["--config", str(REPO_ROOT / "configs/sample/tiny.yaml"), "model=sft:latest", f"output_dir={tmp_path / 'samples'}", "run_name=s",
            "register_as=s/samples", "tracking.report_to=none", "datasets=[{source: embedded, num_examples: 12, tasks: [upper, copy]}]",
            "num_samples=3", f"reward_functions=[{{path: {tmp_path / 'scorer.py'}:vowel_share, weight: 2.0}}]", *extra]
    return sample.run(load_config(sample.SampleStageConfig, argv))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _vowel_share(text: str) -> float:
    return sum(c in "aeiouAEIOU" for c in text) / max(len(text), 1)


@pytest.mark.slow
def test_kept_rows_and_pairs_follow_the_scores_and_the_dataset_is_registered(tmp_path: Path, registered_sft: str, capsys) -> None:
    metrics = _sample(tmp_path, "keep_threshold=0.5", "min_margin=0.2")
    out = tmp_path / "samples"
    samples, rows, pairs = _jsonl(out / "samples.jsonl"), _jsonl(out / "rows.jsonl"), _jsonl(out / "pairs.jsonl")
    assert len(samples) == 36 and metrics["samples/samples"] == 36 and metrics["samples/prompts"] == 12
    expected_rows, expected_pairs = [], []
    for start in range(0, 36, 3):
        group = samples[start : start + 3]
        assert len({json.dumps(s["prompt"]) for s in group}) == 1 and [s["sample"] for s in group] == [0, 1, 2]
        for s in group:  # every score is the weighted function, recomputed here
            assert s["score"] == pytest.approx(2.0 * _vowel_share(s["response"])) and s["scores"]["vowel_share"] == pytest.approx(_vowel_share(s["response"]))
        group = [s for s in group if s["response"].strip()]  # empty answers are never kept (stages/sample.py, select)
        if not group:
            continue
        scores = [s["score"] for s in group]
        best, worst = group[scores.index(max(scores))], group[scores.index(min(scores))]
        if best["score"] >= 0.5:
            expected_rows.append(best["prompt"] + [{"role": "assistant", "content": best["response"]}])
        if best["score"] - worst["score"] > 0.2 and best["response"] != worst["response"]:
            expected_pairs.append((best["response"], worst["response"], best["score"] - worst["score"]))
    assert [row["messages"] for row in rows] == expected_rows
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [(c, r) for c, r, _ in expected_pairs]
    assert [p["margin"] for p in pairs] == pytest.approx([m for _, _, m in expected_pairs])
    assert 0 < len(pairs) and metrics["samples/rows"] == len(rows) and metrics["samples/pairs"] == len(pairs)

    entry = Registry().get("s/samples")
    assert entry.kind == "samples" and entry.status == "ready" and entry.parent == registered_sft
    assert entry.config["reward_functions"][0]["weight"] == 2.0 and entry.config["num_samples"] == 3 and entry.dataset_fingerprint
    capsys.readouterr()
    assert cli.main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"s/samples:1" in listing and "samples" in listing and f"rows={len(rows)} pairs={len(pairs)}" in listing

    # Read back by reference: SFT rows and preference pairs, through the loaders every stage uses.
    sft_rows = data.load_sft_rows(data.DatasetSpec(source="s/samples", split="rows", eval_fraction=0), seed=0)
    assert [row["prompt"] + row["completion"] for row in sft_rows] == expected_rows
    loaded_pairs, dropped = data.load_preference_rows(data.DatasetSpec(source="s/samples", split="pairs", eval_fraction=0))
    assert dropped == 0 and [pair["margin"] for pair in loaded_pairs] == pytest.approx([m for _, _, m in expected_pairs])
    assert [pair["chosen"][-1]["content"] for pair in loaded_pairs] == [c for c, _, _ in expected_pairs]


@pytest.mark.parametrize("source, split, needles", [
    ("previous/sft", "rows", ["dataset reference 'previous/sft' is previous/sft:1, a sft model, not a dataset"]),
    ("half/samples", "rows", ["dataset reference 'half/samples'", "no version of 'half/samples' is ready"]),
    ("half/samples:1", "rows", ["half/samples:1 is incomplete", "never finished"]),
    ("previous/nothing", "rows", ["dataset reference 'previous/nothing'", "not in the registry"]),
    ("done/samples", "train", ["done/samples:1 has the splits rows, pairs, samples, not 'train'", "split: rows"]),
])
def test_a_bad_dataset_reference_is_an_error_naming_it(source: str, split: str, needles: list[str], tmp_path: Path) -> None:
    registry = Registry()
    registry.mark_ready(registry.begin("previous/sft", "sft", tmp_path, run="previous").ref)
    registry.begin("half/samples", "samples", tmp_path / "half", run="half")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "rows.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    registry.mark_ready(registry.begin("done/samples", "samples", tmp_path / "done", run="done").ref)
    with pytest.raises(data.DataError) as caught:
        data.read_rows(data.DatasetSpec(source=source, split=split))
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    rows, where = data.read_rows(data.DatasetSpec(source="done/samples", split="rows"))
    assert len(rows) == 1 and "done/samples" in where


def test_empty_answers_are_neither_rows_nor_pair_sides() -> None:
    def sampled(prompt_index: int, *answers: tuple[str, float]) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": "q"}], "response": text, "score": score, "sample": i, "prompt_index": prompt_index}
                for i, (text, score) in enumerate(answers)]

    rows, pairs = sample.select(sampled(0, ("", 5.0), ("good", 2.0), ("bad", 0.5)) + sampled(1, ("", 1.0), (" ", 0.0), ("", 3.0)), None, 0.0)
    assert [row["messages"][-1]["content"] for row in rows] == ["good"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("good", "bad")]


def test_require_ended_keeps_cut_answers_out_of_rows_and_chosen_and_prefers_them_as_rejected() -> None:
    """An answer cut at max_new_tokens (`ended` false) is never a row or a chosen side under `require_ended`, however
    it scores; a prompt with only cut answers gives neither; the rejected side is a cut answer among equal scores.
    Without the option, the scores alone decide (as before)."""
    def sampled(prompt_index: int, *answers: tuple[str, float, bool]) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": "q"}], "response": text, "score": score, "sample": i,
                 "prompt_index": prompt_index, "ended": ended} for i, (text, score, ended) in enumerate(answers)]

    samples = (sampled(0, ("loop loop", 2.0, False), ("short", 1.0, True), ("bad", 0.0, True), ("cut bad", 0.0, False))
               + sampled(1, ("cut a", 1.0, False), ("cut b", 0.0, False)))
    rows, pairs = sample.select(samples, 0.5, 0.0, require_ended=True)
    assert [row["messages"][-1]["content"] for row in rows] == ["short"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("short", "cut bad")]
    assert [(p["chosen_ended"], p["rejected_ended"]) for p in pairs] == [(True, False)]  # DPO leaves the cut side open
    rows, pairs = sample.select(samples, 0.5, 0.0)
    assert [row["messages"][-1]["content"] for row in rows] == ["loop loop", "cut a"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("loop loop", "bad"), ("cut a", "cut b")]
    assert [(p["chosen_ended"], p["rejected_ended"]) for p in pairs] == [(False, True), (False, False)]


def test_prefer_short_picks_the_fewest_words_among_the_best_and_the_most_among_the_worst() -> None:
    """Among equal best scores the shortest answer is the row and the chosen side, among equal worst the longest is
    the rejected one; the scores still come first (a longer answer that scores higher stays the best), and without
    the option sample order decides, as before. The summary reports the kept answers' lengths."""
    def sampled(prompt_index: int, *answers: tuple[str, float]) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": "q"}], "response": text, "score": score, "sample": i,
                 "prompt_index": prompt_index, "ended": True} for i, (text, score) in enumerate(answers)]

    samples = (sampled(0, ("a long good answer", 1.0), ("good one", 1.0), ("bad", 0.0), ("a long bad answer here", 0.0))
               + sampled(1, ("the longest answer wins here", 1.0), ("short", 0.5))
               + sampled(2, ("fine", 1.0), ("a cut answer", 0.0), ("a much longer ended answer", 0.0)))
    samples[-2]["ended"] = False  # require_ended: among the worst a cut answer comes before a longer ended one
    rows, pairs = sample.select(samples, 0.5, 0.0, require_ended=True, prefer_short=True)
    assert [row["messages"][-1]["content"] for row in rows] == ["good one", "the longest answer wins here", "fine"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("good one", "a long bad answer here"), ("the longest answer wins here", "short"), ("fine", "a cut answer")]
    rows, pairs = sample.select(samples, 0.5, 0.0, require_ended=True)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs][0] == ("a long good answer", "bad")
    metrics = sample.summary(samples[:6], *sample.select(samples[:6], 0.5, 0.0, prefer_short=True), 2, {})
    assert metrics["samples/row_words"] == metrics["samples/chosen_words"] == (2 + 5) / 2
    assert metrics["samples/rejected_words"] == (5 + 1) / 2
    assert sample.summary(samples, [], [], 3, {})["samples/chosen_words"] == 0.0  # the same keys when nothing is kept


def test_sample_needs_a_scorer() -> None:
    from stages.core.config import ConfigError

    with pytest.raises(ConfigError, match="sample needs a scorer"):
        load_config(sample.SampleStageConfig, ["--config", str(REPO_ROOT / "configs/sample/tiny.yaml"), "reward_functions=[]"])


@pytest.mark.slow
def test_repair_adds_checked_rewrites_and_the_rejected_side_is_always_the_models_own(tmp_path: Path, registered_sft: str) -> None:
    """repair: true on instruction prompts (stages/tasks/instructions.py): each sample is also rewritten to follow its
    constraints; the official checker scores the rewrite like any sample, rows may keep it, pairs never reject it."""
    from reward.functions import instruction_constraints
    from stages.tasks import constraints, instructions

    train = instructions.write(tmp_path / "if", {"train": 10}, seed=1)["train"]
    by_prompt = {row["prompt"]: row for row in _jsonl(train)}
    argv = ["--config", str(REPO_ROOT / "configs/sample/tiny.yaml"), "model=sft:latest", f"output_dir={tmp_path / 'samples'}", "run_name=r",
            "register_as=r/samples", "tracking.report_to=none", f"datasets=[{{source: {train}, eval_fraction: 0}}]", "num_samples=2",
            "max_new_tokens=24", "reward_functions=[{name: instruction_constraints}]", "repair=true", "keep_threshold=1.0"]
    metrics = sample.run(load_config(sample.SampleStageConfig, argv))
    samples = _jsonl(tmp_path / "samples" / "samples.jsonl")
    own, repaired = [s for s in samples if not s.get("repaired")], [s for s in samples if s.get("repaired")]
    assert len(own) == 20 and repaired and metrics["samples/repaired"] == len(repaired)
    for rewrite in repaired:
        row = by_prompt[rewrite["prompt"][-1]["content"]]
        original = next(s for s in own if s["prompt_index"] == rewrite["prompt_index"] and s["sample"] == rewrite["sample"])
        assert rewrite["response"] == constraints.repair_all(original["response"], row["instruction_id_list"], row["kwargs"]) != original["response"]
        expected = instruction_constraints([rewrite["prompt"]], [rewrite["response"]], [row["instruction_id_list"]], [row["kwargs"]], [row["key"]])
        assert rewrite["score"] == pytest.approx(expected[0])
    assert sum(s["score"] for s in repaired) / len(repaired) > sum(s["score"] for s in own) / len(own), "the rewrites follow more constraints"
    rows, pairs = _jsonl(tmp_path / "samples" / "rows.jsonl"), _jsonl(tmp_path / "samples" / "pairs.jsonl")
    assert metrics["samples/rows_repaired"] == sum(row["repaired"] for row in rows) > 0
    own_answers = {s["response"] for s in own}
    assert pairs and all(pair["rejected"][0]["content"] in own_answers for pair in pairs)
