"""Data formats convert to prompt/completion; malformed rows fail naming file and row; held-out stays disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import data, tasks
from stages.data import DataError, DatasetSpec


def _jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [USER, ASSISTANT]}, {"prompt": [USER], "completion": [ASSISTANT]}),
        (
            {"messages": [{"role": "system", "content": "s"}, USER, ASSISTANT, USER, {"role": "assistant", "content": "bye"}]},
            {"prompt": [{"role": "system", "content": "s"}, USER, ASSISTANT, USER], "completion": [{"role": "assistant", "content": "bye"}]},
        ),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, {"prompt": [USER], "completion": [ASSISTANT]}),
        ({"prompt": "hi", "completion": "hello"}, {"prompt": [USER], "completion": [ASSISTANT]}),
        ({"prompt": [USER], "completion": [ASSISTANT]}, {"prompt": [USER], "completion": [ASSISTANT]}),
        (
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"prompt": [{"role": "user", "content": "Translate\n\nchat"}], "completion": [{"role": "assistant", "content": "cat"}]},
        ),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, {"prompt": [{"role": "user", "content": "Say hi"}], "completion": [{"role": "assistant", "content": "hi"}]}),
        ({"text": "plain text"}, {"text": "plain text"}),
    ],
)
def test_each_format_converts(row: dict, expected: dict) -> None:
    assert data.convert_sft_row(row, "auto", "row 0") == expected


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [USER]}, "no assistant turn"),
        ({"messages": [ASSISTANT]}, "no assistant turn|there is no prompt"),
        ({"messages": [USER, {"role": "assistant", "content": 3}]}, r"messages\[1\].content must be a string"),
        ({"messages": [USER, {"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "final assistant turn is empty"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
        ({"prompt": "q"}, "cannot tell the format"),
        ({"instruction": 5, "output": "x"}, "'instruction' must be a string"),
        ({"columns_we_do_not_know": 1}, "cannot tell the format"),
    ],
)
def test_malformed_rows_name_the_row(row: dict, message: str) -> None:
    with pytest.raises(DataError, match=f"file.jsonl row 7: .*({message})"):
        data.convert_sft_row(row, "auto", "file.jsonl row 7")


def test_local_files_jsonl_json_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    jsonl = _jsonl(tmp_path, rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for path in (jsonl, str(tmp_path / "d.json"), str(tmp_path / "d.parquet")):
        loaded = data.load_sft_rows(DatasetSpec(source=path), seed=0)
        assert loaded[3] == {"prompt": [{"role": "user", "content": "q3"}], "completion": [{"role": "assistant", "content": "a3"}]}


def test_column_mapping(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"question": "q", "answer": "a"}])
    loaded = data.load_sft_rows(DatasetSpec(source=path, columns={"prompt": "question", "completion": "answer"}), seed=0)
    assert loaded == [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset file not found"):
        data.load_sft_rows(DatasetSpec(source=str(tmp_path / "missing.jsonl")), seed=0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        data.load_sft_rows(DatasetSpec(source=str(tmp_path / "empty.jsonl")), seed=0)
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        data.load_sft_rows(DatasetSpec(source=str(tmp_path / "d.csv")), seed=0)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", \n')
    with pytest.raises(DataError, match="broken.jsonl line 1: could not be read as .jsonl, not valid JSON"):
        data.load_sft_rows(DatasetSpec(source=str(tmp_path / "broken.jsonl")), seed=0)
    path = _jsonl(tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q"}], name="partial.jsonl")
    with pytest.raises(DataError, match="partial.jsonl row 1: missing column 'completion'"):
        data.load_sft_rows(DatasetSpec(source=path), seed=0)


def test_embedded_heldout_is_disjoint_from_training() -> None:
    train = tasks.generate(4000, seed=1)
    heldout = tasks.generate(1000, seed=99, split="eval")
    train_prompts = {row["prompt"][0]["content"] for row in train}
    assert not train_prompts & {row["prompt"][0]["content"] for row in heldout}
    assert {row["task"] for row in train} == set(tasks.FAMILIES) and len(tasks.FAMILIES) >= 5
    for row in train + heldout:  # the completion is the verifiable answer
        assert row["completion"][0]["content"] == row["answer"]
    assert tasks.generate(50, seed=3) == tasks.generate(50, seed=3)


# Template files, held-out phrasings and held-out families: tests/stages/test_templates.py.
