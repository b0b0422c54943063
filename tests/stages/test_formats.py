"""Published dataset formats, read right: each committed fixture under tests/data/formats/ copies a public
dataset's schema field for field (synthetic content); it converts to the messages written out here by hand,
and TRL's own trainer tokenization of the converted row holds the prompt exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages import data
from stages.data import DataError, DatasetSpec

FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


PREFERENCE_FIXTURES = {
    # HuggingFaceH4/ultrafeedback_binarized: a `prompt` string AND conversations that repeat it. Read as the
    # whole conversation, the user turn was trained as part of both answers.
    "ultrafeedback_binarized": [
        {"prompt": [user("What is the capital of Peru?")], "chosen": [assistant("Lima.")], "rejected": [assistant("Cusco.")], "margin": 4.5},
        {"prompt": [user("Name a prime number above 10.")], "chosen": [assistant("11.")], "rejected": [assistant("12.")], "margin": 6.0},
    ],
    "hh_rlhf": [
        {"prompt": [user("What is 2 plus 2?")], "chosen": [assistant("4.")], "rejected": [assistant("5.")]},
        {"prompt": [user("Hi there."), assistant("Hello! How can I help?"), user("Spell cat backwards.")],
         "chosen": [assistant("tac")], "rejected": [assistant("cat")]},
    ],
    "trl_ultrafeedback_binarized": [
        {"prompt": [user("What is the capital of Peru?")], "chosen": [assistant("Lima.")], "rejected": [assistant("Cusco.")], "margin": 4.5},
    ],
    # argilla/dpo-mix-7k: multi-turn conversations; the turns both sides share are the prompt; ratings 5 vs 2.
    "dpo_mix_7k": [
        {"prompt": [user("Hi."), assistant("Hello."), user("Upper-case ok.")], "chosen": [assistant("OK")], "rejected": [assistant("ok")], "margin": 3.0},
    ],
}

SFT_FIXTURES = {
    # HuggingFaceH4/ultrachat_200k: multi-turn `messages`; the last assistant turn is trained, the rest is context.
    "ultrachat_200k": [{"prompt": [user("Reverse the word abc."), assistant("cba"), user("And xyz?")], "completion": [assistant("zyx")]}],
    "alpaca": [  # the rendered `text` column is ignored: instruction/input/output are the source
        {"prompt": [user("Add 3 and 4.")], "completion": [assistant("7")]},
        {"prompt": [user("Upper-case the word.\n\ndog")], "completion": [assistant("DOG")]},
    ],
    "sharegpt": [{"prompt": [system("Answer briefly."), user("Copy the word sun.")], "completion": [assistant("sun")]}],
    "openai_messages": [{"prompt": [system("You are terse."), user("Sort the letters of cab.")], "completion": [assistant("abc")]}],
    "prompt_completion": [{"prompt": [user("Add 1 and 2.")], "completion": [assistant("3")]}],
}


@pytest.mark.parametrize("name", sorted(PREFERENCE_FIXTURES))
def test_published_preference_formats_convert_to_the_expected_pairs(name: str) -> None:
    rows, dropped = data.load_preference_rows(DatasetSpec(source=str(FORMATS / f"{name}.jsonl")))
    assert dropped == 0 and rows == PREFERENCE_FIXTURES[name]


@pytest.mark.parametrize("name", sorted(SFT_FIXTURES))
def test_published_sft_formats_convert_to_the_expected_rows(name: str) -> None:
    assert data.load_sft_rows(DatasetSpec(source=str(FORMATS / f"{name}.jsonl")), seed=0) == SFT_FIXTURES[name]


def _count(sequence: list[int], part: list[int]) -> int:
    return sum(sequence[start : start + len(part)] == part for start in range(len(sequence) - len(part) + 1))


@pytest.mark.parametrize("name", sorted(PREFERENCE_FIXTURES))
def test_trl_tokenization_of_converted_pairs_holds_the_prompt_once(name: str, tiny_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """RewardTrainer tokenizes chosen and rejected whole (prompt included); DPOTrainer the prompt apart. In both,
    the prompt's last user turn occurs exactly once: it is not repeated inside the answers."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from stages.core.paths import BUILTIN_MODELS_DIR
    import yaml

    rows, _ = data.load_preference_rows(DatasetSpec(source=str(FORMATS / f"{name}.jsonl")))
    rows = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]
    config = AutoConfig.for_model(**yaml.safe_load((BUILTIN_MODELS_DIR / "tiny-llama.yaml").read_text())["config"])
    reward = RewardTrainer(
        model=AutoModelForSequenceClassification.from_config(config.__class__(**config.to_dict(), num_labels=1)),
        args=RewardConfig(output_dir=str(tmp_path / "rm"), report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
    )
    dpo = DPOTrainer(
        model=AutoModelForCausalLM.from_config(config), ref_model=AutoModelForCausalLM.from_config(config),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
    )
    for row, reward_row, dpo_row in zip(rows, reward.train_dataset, dpo.train_dataset):
        last_user = tiny_tokenizer(row["prompt"][-1]["content"], add_special_tokens=False)["input_ids"]
        for side in ("chosen_ids", "rejected_ids"):
            assert _count(reward_row[side], last_user) == 1, (name, side)
            assert _count(dpo_row["prompt_ids"] + dpo_row[side], last_user) == 1, (name, side)
        assert _count(dpo_row["prompt_ids"], last_user) == 1


def test_a_null_value_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "Add 1 and 2.", "input": "", "output": null}\n')
    with pytest.raises(DataError, match=r"alpaca.jsonl row 0: missing column 'output' value: the column exists, but this row's value is missing or null"):
        data.load_sft_rows(DatasetSpec(source=str(path)), seed=0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Q?", "chosen": "A.", "rejected": null}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl row 0: missing 'rejected' side of the pair value: the column exists, but this row's value is missing or null"):
        data.load_preference_rows(DatasetSpec(source=str(pairs)))


def test_preference_columns_can_be_mapped(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "Capital of Peru?", "better": "Lima.", "worse": "Cusco."}\n')
    rows, _ = data.load_preference_rows(DatasetSpec(source=str(path), columns={"prompt": "question", "chosen": "better", "rejected": "worse"}))
    assert rows == [{"prompt": [user("Capital of Peru?")], "chosen": [assistant("Lima.")], "rejected": [assistant("Cusco.")]}]


def test_an_explicit_prompt_takes_the_turns_both_replies_share() -> None:
    """As TRL's extract_prompt: turns shared beyond the given prompt belong to the prompt, not to the answers."""
    row = {"prompt": [user("Hi.")], "chosen": [assistant("Hello."), user("Copy a."), assistant("a")],
           "rejected": [assistant("Hello."), user("Copy a."), assistant("b")]}
    assert data.convert_preference_row(row, "row 0") == {
        "prompt": [user("Hi."), assistant("Hello."), user("Copy a.")], "chosen": [assistant("a")], "rejected": [assistant("b")]}


def test_reward_mixture_of_scored_and_unscored_sources_trains_with_margin_zero_for_the_unscored() -> None:
    from stages.reward_model import _to_dataset

    scored = data.load_preference_rows(DatasetSpec(source=str(FORMATS / "ultrafeedback_binarized.jsonl")))[0]
    unscored = data.load_preference_rows(DatasetSpec(source=str(FORMATS / "hh_rlhf.jsonl")))[0]
    mixed = _to_dataset(scored + unscored, use_margins=True)
    assert mixed["margin"] == [4.5, 6.0, 0.0, 0.0]
    assert "margin" not in _to_dataset(scored + unscored, use_margins=False).column_names


def test_pairs_and_sft_rows_are_held_out_by_prompt(tmp_path: Path) -> None:
    """UltraFeedback's binarised sets hold several pairs of one prompt, SFT sets several answers: a hash of the whole
    row would hold out one pair of a prompt and train on another, so the held-out score would be of prompts the model
    trained on. Every row of a prompt lands on one side (a string prompt and the same user turn are one prompt)."""
    import json

    pairs, answers = [], []
    for index in range(80):
        prompt = f"question {index}?"
        for k in range(3):
            written = [{"role": "user", "content": prompt}] if k == 1 else prompt
            pairs.append({"prompt": written, "chosen": f"good {index} {k}", "rejected": f"bad {index} {k}"})
            answers.append({"instruction": prompt, "input": "", "output": f"answer {index} {k}"})
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    answer_file = tmp_path / "alpaca.jsonl"
    answer_file.write_text("".join(json.dumps(row) + "\n" for row in answers))
    prompt_of = lambda row: row["prompt"][-1]["content"]  # noqa: E731
    for cap in (1000, 7):
        spec = DatasetSpec(source=str(pair_file), eval_fraction=0.3, eval_max_rows=cap)
        train, heldout = data.load_preference_rows(spec)[0], data.load_preference_heldout(spec)
        assert train and heldout and len(train) + len(heldout) == len(pairs) and len(heldout) <= cap
        assert not {prompt_of(row) for row in train} & {prompt_of(row) for row in heldout}
        spec = DatasetSpec(source=str(answer_file), eval_fraction=0.3, eval_max_rows=cap)
        train, heldout = data.load_sft_rows(spec, seed=0), data.load_sft_heldout(spec)
        assert train and heldout and len(train) + len(heldout) == len(answers) and len(heldout) <= cap
        assert not {prompt_of(row) for row in train} & {prompt_of(row) for row in heldout}
