"""Instruction-following benchmarks (stages/benchmarks): the official checkers on hand-written answers, the loose
variants, the four numbers on a hand-computed example, bad files, the offline NLTK set-up, generation order."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from reward import checkers
from stages.benchmarks import scores, suites
from reward.checkers import InstructionScore
from stages.benchmarks.scores import PromptResult

BENCHMARK_DATA = Path(__file__).resolve().parents[1] / "data" / "benchmarks"


def _verdict(instruction_id: str, kwargs: dict, response: str, suite: str = "ifeval", prompt: str = "Answer.") -> InstructionScore:
    return checkers.score_instruction(suite, "k", prompt, 0, instruction_id, kwargs, response)


# (instruction id, kwargs, an answer that follows it, one that does not): IFEval's checkers unless marked ifbench.
CASES = [
    ("change_case:english_lowercase", {}, "the sea is calm today and the sky is grey.", "The Sea Is Calm Today."),
    ("punctuation:no_comma", {}, "red green and blue", "red, green and blue"),
    ("detectable_format:json_format", {}, '{"name": "Ada"}', "name: Ada"),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "A cat purrs. Is there anything else?", "Is there anything else? A cat purrs."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five six", "one two three"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Only one sentence here.", "One. Two. Three."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Send it to [name] at [address].", "Send it to [name]."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe start.\nSection 2\nThe end.", "The start. The end."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Dear Ann, see you soon.\nP.S. Bring the map.", "Dear Ann, see you soon."),
    ("language:response_language", {"language": "de"},
     "Heute scheint die Sonne und wir gehen zusammen in den großen Park am Fluss.",
     "Today the sun is shining and we are all going to the big park by the river."),
    ("count:keywords_multiple", {"keyword1": "sun", "keyword2": "moon", "keyword3": "star", "keyword4": "sky", "keyword5": "sea"},
     "sun " + "moon " * 2 + "star " * 3 + "sky " * 5 + "sea " * 7, "sun moon star sky sea"),
]


@pytest.mark.parametrize("instruction_id, kwargs, follows, breaks", CASES, ids=[case[0] for case in CASES])
def test_checker_passes_and_fails_hand_written_answers(instruction_id: str, kwargs: dict, follows: str, breaks: str) -> None:
    suite = "ifbench" if instruction_id.startswith("count:") else "ifeval"
    passed, failed = _verdict(instruction_id, kwargs, follows, suite), _verdict(instruction_id, kwargs, breaks, suite)
    assert passed.status == failed.status == "scored", (passed, failed)
    assert passed.strict and passed.loose, passed
    assert not failed.strict and not failed.loose, failed


def test_loose_variants_forgive_a_first_line_and_markdown_stars() -> None:
    """IFEval's loose mode: any of 8 variants (first/last line dropped, `*` removed) may follow the instruction."""
    preamble = _verdict("punctuation:no_comma", {}, "Sure, here it is:\nred green and blue")
    assert not preamble.strict and preamble.loose
    stars = _verdict("startend:end_checker", {"end_phrase": "Is there anything else?"}, "A cat purrs. **Is there anything else?**")
    assert not stars.strict and stars.loose
    neither = _verdict("punctuation:no_comma", {}, "Sure, here:\nred, green\nand blue, too")
    assert not neither.strict and not neither.loose


def test_four_numbers_on_a_hand_computed_example() -> None:
    """Four prompts, six instructions (strict/loose): P1 [T/T, T/T], P2 [F/T, T/T], P3 [F/F], P4 [unavailable].
    prompt strict: P1 -> 1/4; prompt loose: P1, P2 -> 2/4; instruction strict: 3/6; loose: 4/6. The unavailable one
    counts as not followed, is counted apart and has no per-type accuracy."""
    def score(instruction_id: str, strict: bool, loose: bool, status: str = "scored") -> InstructionScore:
        return InstructionScore(instruction_id, strict, loose, status)

    results = [
        PromptResult("1", "p1", "r1", [score("a", True, True), score("b", True, True)]),
        PromptResult("2", "p2", "r2", [score("a", False, True), score("b", True, True)]),
        PromptResult("3", "p3", "r3", [score("a", False, False)]),
        PromptResult("4", "p4", "r4", [score("verb", False, False, "unavailable")]),
    ]
    numbers = scores.aggregate(results)
    assert numbers["prompt_strict"] == pytest.approx(1 / 4) and numbers["prompt_loose"] == pytest.approx(2 / 4)
    assert numbers["instruction_strict"] == pytest.approx(3 / 6) and numbers["instruction_loose"] == pytest.approx(4 / 6)
    assert numbers["num_prompts"] == 4 and numbers["num_instructions"] == 6
    assert numbers["unavailable"] == 1 and numbers["unavailable_ids"] == {"verb": 1} and numbers["errors"] == 0
    assert numbers["per_type"]["a"] == {"count": 3, "strict": pytest.approx(1 / 3), "loose": pytest.approx(2 / 3)}
    assert "verb" not in numbers["per_type"]
    metrics = scores.as_metrics("ifeval", numbers)
    assert metrics["eval/ifeval/prompt_loose"] == pytest.approx(0.5) and metrics["eval/ifeval/strict/b"] == 1.0


def test_a_checker_without_its_nltk_resource_is_unavailable_never_a_pass() -> None:
    nltk = pytest.importorskip("nltk")
    checkers.setup_offline("ifbench")
    try:
        nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
        pytest.skip("the perceptron tagger is installed here")
    except LookupError:
        pass
    verdict = _verdict("words:start_verb", {}, "Write the poem now.", suite="ifbench")
    assert verdict.status == "unavailable" and not verdict.strict and not verdict.loose
    assert "averaged_perceptron_tagger_eng" in verdict.detail


def test_nltk_download_never_reaches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkers call nltk.download (punkt, stopwords, the tagger); offline it must be inert, and the data the
    project installs must be enough for word and sentence splitting and stop words."""
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    checkers.setup_offline("ifbench")
    checkers.setup_offline("ifeval")
    import nltk

    assert nltk.download("punkt") is False  # the stand-in: records, never downloads
    stop_words = _verdict("ratio:stop_words", {"percentage": 50}, "Cats chase mice at night in gardens.", suite="ifbench")
    sentences = _verdict("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two. Three.")
    assert stop_words.status == sentences.status == "scored" and stop_words.strict and sentences.strict
    assert "stopwords" in checkers._requested_downloads


def test_missing_nltk_data_is_an_error_naming_it_and_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(checkers.BenchmarkSetupError, match=r"punkt_tab.*make setup.*install_nltk_data\.py"):
        checkers._offline_nltk(nltk)


def test_random_draws_are_seeded_per_prompt_and_leave_the_global_generator_alone() -> None:
    """IFEval's letter-frequency checker draws a random letter for an invalid one ('#'): the verdict must not
    depend on what ran before, and the caller's random state must be untouched."""
    arguments = {"letter": "#", "let_frequency": 2, "let_relation": "at least"}
    random.seed(1)
    first = _verdict("keywords:letter_frequency", arguments, "a banana and a cabbage")
    state = random.getstate()
    random.random()
    second = _verdict("keywords:letter_frequency", arguments, "a banana and a cabbage")
    assert first == second
    random.setstate(state)
    _verdict("keywords:letter_frequency", arguments, "x")
    assert random.getstate() == state


def test_ifbench_ships_its_294_prompts_and_a_seeded_subset_is_stable() -> None:
    full = suites.load("ifbench")
    assert full.name == "ifbench" and len(full.prompts) == full.total == 294
    subset = suites.load("ifbench", limit=12, seed=5)
    assert [p.key for p in subset.prompts] == [p.key for p in suites.load("ifbench", limit=12, seed=5).prompts]
    assert len(subset.prompts) == 12 and {p.key for p in subset.prompts} < {p.key for p in full.prompts}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ifeval:{data}/unknown_id.jsonl", r"unknown_id\.jsonl row 2: unknown instruction id 'punctuation:no_commas'.*'punctuation:no_comma'"),
        ("ifeval:{data}/malformed_row.jsonl", r"malformed_row\.jsonl row 2: 'kwargs' must be a list of 2 objects"),
        ("ifeval:{data}/missing.jsonl", r"benchmark file .*missing\.jsonl does not exist"),
        ("ifeval", r"IFEval's prompt file is not on PyPI"),
    ],
)
def test_bad_benchmark_files_are_errors_naming_file_row_and_id(spec: str, message: str) -> None:
    with pytest.raises(suites.BenchmarkError, match=message):
        suites.load(spec.format(data=BENCHMARK_DATA))


def test_rows_that_are_not_ifeval_objects_name_the_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}\nnot json\n')
    with pytest.raises(suites.BenchmarkError, match=r"bad\.jsonl row 2: not JSON"):
        suites.load(str(bad))
    bad.write_text('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]}\n')
    with pytest.raises(suites.BenchmarkError, match=r"row 1: instruction 'punctuation:no_comma' takes no argument 'num_words'"):
        suites.load(str(bad))


def test_rlhf_eval_with_a_bad_benchmark_file_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from stages import cli

    code = cli.main(["eval", "tiny-llama", "--benchmark", "ifeval", "--data", str(BENCHMARK_DATA / "unknown_id.jsonl")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0
    assert "unknown_id.jsonl row 2" in error and "punctuation:no_commas" in error


def test_generation_sorted_by_length_answers_in_the_callers_order(tiny_tokenizer) -> None:
    """Sorting the prompts into length-homogeneous batches must not change which answer goes with which prompt."""
    from stages import generation
    from stages.core import models
    from stages.core.registry import Registry

    model = models.load_causal_lm(Registry().get("tiny-llama"))
    prompts = [[{"role": "user", "content": "x" * length}] for length in (5, 40, 1, 20, 9)]
    plain = generation.generate(model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=1)
    ordered = generation.generate(model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=1, sort_by_length=True, progress="t")
    assert ordered == plain
    # Longest first, at most 3 a batch, at most 100 padded prompt tokens a batch: the 60-token prompt alone.
    assert generation._length_sorted_chunks([60, 30, 25, 20, 10, 5, 1], 3, 100) == [[0], [1, 2, 3], [4, 5, 6]]
    assert generation._length_sorted_chunks([60, 30, 25, 20, 10], 3, None) == [[0, 1, 2], [3, 4]]


def test_eval_benchmarks_inside_a_stage_scores_trained_model_and_start(tmp_path: Path) -> None:
    """`eval.benchmarks` in the SFT stage: both models scored on the same seeded prompts (the tiny model follows
    few instructions: the keys, counts and files are what is checked), metrics in the registry entry."""
    import json

    from stages import sft
    from stages.core.config import load_config
    from stages.core.registry import Registry

    repo = Path(__file__).resolve().parents[2]
    config = load_config(sft.SFTStageConfig, [
        "--config", str(repo / "configs/sft/tiny.yaml"),
        "datasets=[{source: embedded, num_examples: 64, tasks: [upper]}]", "train.max_steps=2", "train.save_steps=1000",
        "eval.num_prompts=4", "eval.tasks=[upper]", "tracking.report_to=none", "run_name=b", f"output_dir={tmp_path / 'out'}",
        f"eval.benchmarks=[{BENCHMARK_DATA / 'ifeval_sample.jsonl'}]", "eval.benchmark_limit=3", "eval.benchmark_max_new_tokens=6",
    ])
    metrics = sft.run(config)
    for prefix in ("eval/ifeval/", "eval/ref_ifeval/"):
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert 0.0 <= metrics[prefix + key] <= 1.0, (prefix, key, metrics)
        assert metrics[prefix + "num_prompts"] == 3 and metrics[prefix + "max_new_tokens"] == 6
    assert Registry().get("sft:latest").metrics["eval/ifeval/prompt_loose"] == metrics["eval/ifeval/prompt_loose"]
    folder = tmp_path / "out" / "benchmarks" / "ifeval-n3-s1234-t6"
    for who in ("model", "start"):
        responses = [json.loads(line) for line in (folder / who / "responses.jsonl").read_text().splitlines()]
        assert len(responses) == 3 and {"key", "prompt", "response"} <= set(responses[0])
        assert json.loads((folder / who / "scores.json").read_text())["num_prompts"] == 3
        assert len((folder / who / "results.jsonl").read_text().splitlines()) == 3


def test_a_reward_stage_with_benchmarks_is_refused() -> None:
    from stages import reward_model
    from stages.core.config import ConfigError, load_config

    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="eval.benchmarks: a reward model"):
        load_config(reward_model.RewardStageConfig, ["--config", str(repo / "configs/reward/tiny.yaml"), "eval.benchmarks=[ifbench]"])


def test_recipe_table_and_report_show_benchmarks_start_vs_trained(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe keeps the four numbers and the per-type accuracies of sft (and its start) in summary.json, prints
    the four in its table, and the report draws accuracy per instruction type, start vs trained."""
    import json

    from PIL import Image

    from stages import recipe, report
    from stages.core.registry import Registry

    per_type = {"eval/ifbench/strict/count:numbers": 0.5, "eval/ifbench/loose/count:numbers": 0.75, "eval/ifbench/strict/format:list": 1.0}
    headline = {"eval/ifbench/prompt_strict": 0.25, "eval/ifbench/prompt_loose": 0.5, "eval/ifbench/instruction_strict": 0.3,
                "eval/ifbench/instruction_loose": 0.6, "eval/ifbench/unavailable": 1.0, "eval/ifbench/seconds": 12.0}
    start = {key.replace("eval/", "eval/ref_", 1): value / 2 for key, value in (headline | per_type).items()}
    registry = Registry()
    entry = registry.mark_ready(registry.begin("r/sft", "sft", isolated_home / "r" / "sft", parent="tiny-llama", run="r").ref,
                                metrics={"eval/exact_match": 0.5} | headline | per_type | start)
    result = recipe._result("sft", entry, seconds=3.0)
    assert result["metrics"]["eval/ifbench/prompt_loose"] == 0.5 and "eval/ifbench/strict/format:list" in result["metrics"]
    assert "eval/ifbench/seconds" not in result["metrics"] and not any(k.startswith("eval/ref_") for k in result["metrics"])
    assert result["start"]["metrics"]["eval/ifbench/prompt_loose"] == 0.25
    recipe.print_table([result])
    table = capsys.readouterr().out
    assert "ifbench/prompt_loose" in table and "strict/format:list" not in table
    base_row, sft_row = table.strip().splitlines()[1:3]
    assert base_row.split()[-4:] == ["0.125", "0.250", "0.150", "0.300"], table  # prompt strict, loose; instruction strict, loose
    assert sft_row.split()[-4:] == ["0.250", "0.500", "0.300", "0.600"], table

    (isolated_home / "r" / "sft").mkdir(parents=True)
    (isolated_home / "r" / "summary.json").write_text(json.dumps({"run": "r", "stages": [result]}))
    page = report.write_report(["r"])
    text = page.read_text()
    assert "Instruction-following benchmarks" in text and "ifbench/prompt_loose" in text and "strict/count:numbers" not in text
    chart = Image.open(page.parent / "figures" / "benchmark_r_ifbench.png").convert("RGB")
    colours = {tuple(pixel) for pixel in chart.getdata()}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # C0 (start) and C1 (sft) bars


def test_nltk_data_is_copied_out_of_the_wheel_private_to_its_owner(tmp_path: Path) -> None:
    """tools/install_nltk_data.py (make setup): only punkt_tab and stopwords, directories 0755, files 0644."""
    import importlib.util
    import stat
    import zipfile

    spec = importlib.util.spec_from_file_location("install_nltk_data", Path(__file__).resolve().parents[2] / "tools" / "install_nltk_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    wheel = tmp_path / "llama_index_core-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("tokenizers/punkt_tab/english/sent_starters.txt", "corpora/stopwords/english", "corpora/other/file", "tokenizers/punkt_tab.zip"):
            archive.writestr(tool.PREFIX + name, "x")
        archive.writestr("llama_index/core/other.py", "x")
    destination = tmp_path / "nltk_data"
    assert tool.install(wheel, destination) == ["corpora/stopwords/", "tokenizers/punkt_tab/"]
    files = sorted(str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file())
    assert files == ["corpora/stopwords/english", "tokenizers/punkt_tab/english/sent_starters.txt"]
    for path in [destination, *destination.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_rlhf_eval_scores_an_ifeval_format_file_and_writes_its_files(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from stages import cli

    data = str(BENCHMARK_DATA / "ifeval_sample.jsonl")
    assert cli.main(["eval", "tiny-llama", "--benchmark", "ifeval", "--data", data, "--limit", "2", "--max-new-tokens", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert 0.0 <= printed["metrics"][f"eval/ifeval_ifeval_sample/{key}"] <= 1.0
    assert printed["metrics"]["eval/ifeval_ifeval_sample/num_prompts"] == 2 and printed["metrics"]["eval/ifeval_ifeval_sample/max_new_tokens"] == 4
    folder = isolated_home / "evals" / "tiny-llama" / "ifeval_ifeval_sample-n2-s1234-t4"
    assert printed["scores"] == str(folder / "scores.json")
    scores_file = json.loads((folder / "scores.json").read_text())
    assert scores_file["model"].startswith("tiny-llama")
    assert scores_file["settings"]["max_new_tokens"] == 4 and scores_file["prompt_file"] == data
    responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2
    # The random tiny model never says its end of turn: both answers run to the 4-token cap.
    assert [row["ended"] for row in responses] == [False, False]
    assert scores_file["cut"] == 1.0 and printed["metrics"]["eval/ifeval_ifeval_sample/cut"] == 1.0


def test_rlhf_eval_of_a_second_file_keeps_the_first_ones_files(isolated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from stages import cli

    first = tmp_path / "Held-Out Tasks.jsonl"
    second = tmp_path / "heldout_types.jsonl"
    shutil.copy(BENCHMARK_DATA / "ifeval_sample.jsonl", first)
    shutil.copy(BENCHMARK_DATA / "ifeval_sample.jsonl", second)
    folders = []
    for data in (first, second):
        assert cli.main(["eval", "tiny-llama", "--benchmark", "ifeval", "--data", str(data), "--limit", "2", "--max-new-tokens", "4", "--json"]) == 0
        folders.append(Path(json.loads(capsys.readouterr().out)["scores"]).parent)
    assert [folder.name for folder in folders] == ["ifeval_held_out_tasks-n2-s1234-t4", "ifeval_heldout_types-n2-s1234-t4"]
    for folder, data in zip(folders, (first, second)):
        assert json.loads((folder / "scores.json").read_text())["prompt_file"] == str(data)
