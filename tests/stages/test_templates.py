"""Instruction templates: shipped files parse, malformed ones fail naming file and phrasing, held-out
phrasings and held-out task families never reach training data (checked on the rendered strings)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stages import data, evaluation, tasks
from stages.data import mixture
from stages.tasks import templates
from stages.core.config import ConfigError, load_config
from stages.data import DatasetSpec
from stages.tasks.templates import TemplateError

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_FILES = sorted((REPO_ROOT / "configs" / "templates").glob("*.yaml"))


def _load_shipped(path: Path) -> templates.Templates:
    if path.resolve() == tasks.DEFAULT_TEMPLATES.resolve():  # configs/templates/ links to the package copy
        return tasks.load_templates(path)
    return templates.load(path, templates.DATASET_TASKS)


def _matches_any(text: str, phrasings: list[str]) -> str | None:
    return next((phrasing for phrasing in phrasings if templates.pattern(phrasing).fullmatch(text)), None)


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_shipped_template_files_parse(path: Path) -> None:
    loaded = _load_shipped(path)
    assert loaded and all(sets["train"] for sets in loaded.values())


def test_embedded_families_have_varied_and_heldout_phrasings() -> None:
    loaded = tasks.load_templates()
    assert set(loaded) == set(tasks.FAMILIES)
    for family, sets in loaded.items():
        assert len(sets["train"]) >= 5 and len(sets["heldout"]) >= 3, family


def test_heldout_phrasings_are_new_combinations_of_seen_words() -> None:
    """A tiny model cannot guess an unseen word's meaning: every word of a held-out phrasing occurs
    in some training phrasing (of any family), while the phrasing itself is not a training one."""
    loaded = tasks.load_templates()
    words = lambda phrasing: set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", phrasing)))  # noqa: E731
    training_words = set().union(*(words(p) for sets in loaded.values() for p in sets["train"]))
    for family, sets in loaded.items():
        for phrasing in sets["heldout"]:
            assert words(phrasing) <= training_words, (family, phrasing, words(phrasing) - training_words)
            assert phrasing not in sets["train"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("add:\n  train:\n    - 'Add {a} and {c}.'\n", r"t\.yaml: add\.train\[0\] 'Add \{a\} and \{c\}\.' uses unknown placeholder \{c\} \(allowed: \{a\}, \{b\}\)"),
        ("add:\n  train: ['Add {a}.']\n", r"t\.yaml: add\.train\[0\] 'Add \{a\}\.' must use every placeholder"),
        ("copy:\n  train: ['Copy {text}.']\n  heldout: ['Copy {txt}.']\n", r"t\.yaml: copy\.heldout\[0\] 'Copy \{txt\}\.' uses unknown placeholder \{txt\}"),
        ("copy:\n  train: ['Copy {text'] \n", r"t\.yaml: copy\.train\[0\] 'Copy \{text' is not a valid template"),
        ("copy:\n  train: ['Copy {text}.']\n  heldout: ['Copy {text}.']\n", r"t\.yaml: copy lists 'Copy \{text\}\.' as both train and heldout"),
        ("divide:\n  train: ['x']\n", r"t\.yaml: unknown task 'divide'"),
        ("copy:\n  heldout: ['Copy {text}.']\n", r"t\.yaml: copy needs a non-empty 'train' list"),
        ("copy: [unclosed\n", r"t\.yaml is not valid YAML"),
    ],
)
def test_malformed_template_names_file_and_phrasing(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError, match=message):
        tasks.load_templates(path)


def test_malformed_template_stops_the_config(tmp_path: Path) -> None:
    from stages.sft import SFTStageConfig

    path = tmp_path / "mine.yaml"
    path.write_text("instruction:\n  train: ['Do {instruction} with {inptu}']\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: instruction\.train\[0\] .* unknown placeholder \{inptu\}"):
        load_config(SFTStageConfig, [f"datasets=[{{source: data.jsonl, templates: {path}}}]"])
    with pytest.raises(ConfigError, match="template file not found: .*missing.yaml"):
        load_config(SFTStageConfig, [f"datasets=[{{source: embedded, templates: {tmp_path / 'missing.yaml'}}}]"])


@pytest.mark.parametrize("fanout", [1, 3])
def test_heldout_phrasings_never_leak_into_training(fanout: int) -> None:
    loaded = tasks.load_templates()
    train = tasks.generate(3000, seed=5, fanout=fanout)
    for row in train:
        text = row["prompt"][0]["content"]
        family = loaded[row["task"]]
        assert _matches_any(text, family["heldout"]) is None, text
        assert _matches_any(text, family["train"]) is not None, text
    # Every training phrasing is used, and evaluation does render the held-out ones.
    assert {row["template"] for row in train} == {f"train/{i}" for sets in loaded.values() for i in range(len(sets["train"]))}
    unseen = tasks.generate(500, seed=5, split="eval", template_set="heldout")
    assert all(_matches_any(row["prompt"][0]["content"], loaded[row["task"]]["heldout"]) for row in unseen)


def test_fanout_renders_each_instance_with_distinct_phrasings() -> None:
    rows = tasks.generate(300, seed=2, fanout=3)
    for start in range(0, 300, 3):
        group = rows[start : start + 3]
        assert len({row["answer"] for row in group}) == 1 and len({row["task"] for row in group}) == 1
        assert len({row["template"] for row in group}) == 3
    single = tasks.generate(300, seed=2, templates_per_task=1)
    assert {row["template"] for row in single} == {"train/0"}
    with pytest.raises(TemplateError, match="fanout=4 needs at least 4"):
        tasks.generate(10, seed=2, templates_per_task=3, fanout=4)


def test_alpaca_rows_are_rephrased_never_with_heldout_phrasings(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Translate item {i}", "input": f"chat {i}" if i % 2 else "", "output": f"cat {i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    shipped = REPO_ROOT / "configs/templates/alpaca.yaml"
    loaded = templates.load(shipped, templates.DATASET_TASKS)
    # eval_fraction=0: every row is trained (none held out), so rephrased row i comes from source row i // 3.
    rephrased = data.load_sft_rows(DatasetSpec(source=str(path), templates=str(shipped), fanout=3, eval_fraction=0), seed=0)
    assert len(rephrased) == 3 * len(rows)
    for index, row in enumerate(rephrased):
        source = rows[index // 3]
        task = "instruction_input" if source["input"] else "instruction"
        text = row["prompt"][-1]["content"]
        assert source["instruction"] in text and source["input"] in text
        assert _matches_any(text, loaded[task]["train"]) and not _matches_any(text, loaded[task]["heldout"]), text
        assert row["completion"] == [{"role": "assistant", "content": source["output"]}]
    assert len({row["prompt"][-1]["content"] for row in rephrased[:3]}) == 3
    # A row the file has no phrasings for is an error naming the row and the file.
    only_prompt = tmp_path / "prompt_only.yaml"
    only_prompt.write_text("prompt:\n  train: ['Q: {prompt}']\n")
    with pytest.raises(data.DataError, match=r"alpaca.jsonl row 0: .*prompt_only.yaml has no phrasings for 'instruction' rows"):
        data.load_sft_rows(DatasetSpec(source=str(path), templates=str(only_prompt)), seed=0)


def test_heldout_families_never_appear_in_training_data(tmp_path: Path) -> None:
    from stages.sft import SFTStageConfig

    config = load_config(
        SFTStageConfig,
        ["--config", str(REPO_ROOT / "configs/sft/tiny.yaml"), "eval.heldout_tasks=[sort]", "datasets=[{source: embedded, num_examples: 2000, fanout: 2}]"],
    )
    rows = mixture.mix(
        config.datasets, config.mixture_size, config.seed,
        lambda spec, index, count: data.load_sft_rows(spec, config.seed + index, count, config.eval.heldout_tasks),
    )
    sort_phrasings = [p for sets in tasks.load_templates()["sort"].values() for p in sets]
    assert len(rows) == 2000 and {row["task"] for row in rows} == set(tasks.FAMILIES) - {"sort"}
    for row in rows:
        assert _matches_any(row["prompt"][0]["content"], sort_phrasings) is None, row["prompt"]
    # Reward and policy stages draw embedded data through the same function.
    assert "sort" not in {row["task"] for row in data.embedded_rows(DatasetSpec(), seed=3, count=500, heldout_tasks=["sort"])}
    with pytest.raises(ConfigError, match="'sort' is both requested for training and held out"):
        load_config(SFTStageConfig, ["eval.heldout_tasks=[sort]", "datasets=[{source: embedded, tasks: [sort, add]}]"])
    with pytest.raises(ConfigError, match="unknown task family 'sorting'"):
        load_config(SFTStageConfig, ["eval.heldout_tasks=[sorting]"])


def test_evaluation_reports_seen_unseen_templates_and_unseen_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An oracle that knows only what training showed (trained families, training phrasings) must
    score 1 on eval/exact_match and 0 on both unseen scores: each prompt lands in its own bucket."""
    config = evaluation.EvalConfig(num_prompts=60, heldout_tasks=["sort"])
    plain = evaluation.EvalConfig(num_prompts=20)
    known = {}
    for draw in (config, plain):
        for template_set, families in (("train", None), ("heldout", None), ("train", ["sort"])):
            for row in evaluation.heldout_rows(draw, template_set, families):
                known[row["prompt"][0]["content"]] = row
    assert config.seen_tasks() == [name for name in tasks.FAMILIES if name != "sort"]

    def oracle(model, tokenizer, prompts, max_new_tokens, batch_size):  # noqa: ANN001
        answers = []
        for prompt in prompts:
            row = known[prompt[0]["content"]]
            trained = row["task"] != "sort" and row["template"].startswith("train/")
            answers.append(row["answer"] if trained else "?")
        return answers

    monkeypatch.setattr(evaluation, "generate", oracle)
    metrics, samples = evaluation.exact_match(None, None, config)
    assert metrics["eval/exact_match"] == 1.0 and "eval/exact_match/sort" not in metrics
    assert metrics["eval/exact_match_unseen_templates"] == 0.0
    assert metrics["eval/exact_match_unseen_tasks"] == 0.0 and "eval/exact_match_unseen_tasks/sort" in metrics
    assert samples and all(sample["response"] == sample["answer"] for sample in samples)
    # Without held-out families there is no unseen-task score (and sort counts as seen).
    plain_metrics, _ = evaluation.exact_match(None, None, plain)
    assert "eval/exact_match_unseen_tasks" not in plain_metrics and plain_metrics["eval/exact_match/sort"] == 0.0
    # `rlhf eval REF` evaluates what the entry was trained for: its held-out families.
    entry = type("Entry", (), {"config": {"eval": {"heldout_tasks": ["sort"]}}})()
    assert evaluation.for_entry(entry, num_prompts=20, seed=1).heldout_tasks == ["sort"]
