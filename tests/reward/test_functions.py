"""Reward functions (reward/functions.py): weights, columns, built-ins, and every way user code can misbehave
becoming one clear error naming the function and the prompt. The stages train with them in
tests/stages/test_policy_stage.py; here, the same PPO run rewarded by `exact_answer` through the mechanism and by
the embedded verifier directly (what `verifiable_reward: true` used) gives the very same metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reward.functions import RewardFunctionError, RewardFunctions, RewardFunctionSpec, bind_columns
from stages.core.config import ConfigError

PROMPTS = [[{"role": "user", "content": f"question {index}"}] for index in range(4)]
RESPONSES = ["4", " yes ", "no", "HELLO"]
COLUMNS = {"answer": ["4", "yes", "yes", None], "level": [1, 2, 3, 4]}

USER_CODE = '''
def by_level(prompts, responses, level, **columns):
    return [float(value) for value in level]

def length(prompts, responses, **columns):
    return [len(response) for response in responses]

def boom(prompts, responses, **columns):
    return [1.0 / (len(r) - 2) for r in responses]    # "no" has length 2: ZeroDivisionError on the third prompt

def too_few(prompts, responses, **columns):
    return [0.0]

def not_a_number(prompts, responses, **columns):
    return [float("nan") if r == "no" else 0.0 for r in responses]

def wrong_type(prompts, responses, **columns):
    return "high"
'''


@pytest.fixture
def user_file(tmp_path: Path) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_CODE)
    return str(path)


def _functions(*specs: dict) -> RewardFunctions:
    return RewardFunctions.from_specs([RewardFunctionSpec(**spec) for spec in specs])


def test_the_total_is_the_weighted_sum_and_each_function_is_kept_apart(user_file: str) -> None:
    functions = _functions({"path": f"{user_file}:by_level", "weight": 2.0}, {"path": f"{user_file}:length", "weight": -0.5},
                           {"name": "exact_answer", "weight": 10.0})
    rows = COLUMNS | {"answer": ["4", "yes", "yes", "HELLO"]}
    totals = functions.score(PROMPTS, RESPONSES, rows)
    # by_level 1,2,3,4 (x2); lengths 1,5,2,5 (x-0.5); exact 1,1,0,1 (x10)
    assert totals == [2 - 0.5 + 10, 4 - 2.5 + 10, 6 - 1 + 0, 8 - 2.5 + 10]
    metrics = functions.metrics("ppo/reward_functions/")
    assert metrics["ppo/reward_functions/by_level/mean"] == 2.5 and metrics["ppo/reward_functions/exact_answer/mean"] == 0.75
    assert metrics["ppo/reward_functions/length/std"] == pytest.approx(torch.tensor([1.0, 5, 2, 5]).std(unbiased=False).item())


def test_a_module_function_and_builtin_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "team_rewards.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    functions = _functions({"module": "team_rewards:length"})
    assert functions.score(PROMPTS, RESPONSES, COLUMNS) == [1.0, 5.0, 2.0, 5.0]
    assert functions.specs[0].label == "length"


def test_columns_reach_the_function_by_prompt() -> None:
    rows = [{"prompt": prompt, "answer": answer, "level": level} for prompt, answer, level in zip(PROMPTS, COLUMNS["answer"], COLUMNS["level"])]
    columns_of = bind_columns(rows)
    assert columns_of([PROMPTS[2], PROMPTS[0]]) == {"answer": ["yes", "4"], "level": [3, 1]}
    with pytest.raises(RewardFunctionError, match="no prompt row holds the prompt 'elsewhere'"):
        columns_of([[{"role": "user", "content": "elsewhere"}]])


@pytest.mark.parametrize("spec, error, needles", [
    ({"path": "missing.py:score"}, RewardFunctionError, ["reward function missing.py:score", "not found"]),
    ({"path": "{file}:absent"}, RewardFunctionError, ["has no function 'absent'"]),
    ({"module": "no_such_package.rewards:score"}, RewardFunctionError, ["cannot import 'no_such_package.rewards'"]),
    ({"name": "bleu"}, ConfigError, ["unknown built-in 'bleu'", "exact_answer"]),
    ({"name": "exact_answer", "path": "x.py:f"}, ConfigError, ["exactly one of name, path or module"]),
    ({"path": "rewards.py"}, ConfigError, ["path must be FILE.py:FUNCTION"]),
])
def test_bad_specs_are_clear_errors(spec: dict, error: type, needles: list[str], user_file: str) -> None:
    with pytest.raises(error) as caught:
        _functions({key: value.format(file=user_file) if isinstance(value, str) else value for key, value in spec.items()})
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)


@pytest.mark.parametrize("name, needles", [
    ("boom", ["reward function boom raised ZeroDivisionError", "on prompt 'question 2'"]),
    ("too_few", ["reward function too_few returned 1 scores for 4 responses"]),
    ("not_a_number", ["reward function not_a_number returned nan for prompt 'question 2'", "must be finite"]),
    ("wrong_type", ["reward function wrong_type must return one number per response"]),
])
def test_misbehaving_functions_are_never_a_silent_zero(name: str, needles: list[str], user_file: str) -> None:
    functions = _functions({"path": f"{user_file}:{name}"})
    with pytest.raises(RewardFunctionError) as caught:
        functions.score(PROMPTS, RESPONSES, COLUMNS)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)


def test_exact_answer_needs_an_answer_column() -> None:
    with pytest.raises(RewardFunctionError, match="exact_answer raised ValueError: exact_answer: the row of prompt 'question 3' has no answer"):
        _functions({"name": "exact_answer"}).score(PROMPTS, RESPONSES, COLUMNS)


def test_exact_answer_gives_ppo_the_same_run_as_the_embedded_verifier(tmp_path: Path, tiny_tokenizer, registered_sft: str) -> None:
    """The PPO trainer rewarded by the embedded tasks' verifier (what verifiable_reward: true passed) and by the
    `exact_answer` built-in through columns: same seeds, the same metrics at every step. From the session's tiny
    SFT model on its own tasks, so that some answers are right and the reward varies."""
    from stages import data
    from stages.core import models
    from stages.core.registry import Registry
    from stages.ppo import PPOConfig, PPOTrainer
    from stages.tasks.verifier import answer_reward

    torch.set_num_threads(1)
    spec = data.DatasetSpec(num_examples=16, tasks=["upper", "copy"])
    rows = [{"prompt": row["prompt"], "answer": row["answer"]} for row in data.embedded_rows(spec, 3, 16)]
    sft = Registry().get(registered_sft)
    functions = _functions({"name": "exact_answer"})
    columns_of = bind_columns(rows)

    def run(reward_fn, name: str) -> list[dict]:
        torch.manual_seed(0)
        actor = models.load_causal_lm(sft)
        critic = models.load_sequence_classifier(sft)
        # Temperature 0.5 and room for the answer and its end token: the tiny model's samples at temperature 1 are
        # right about 3% of the time (its greedy answers 12%), so 24 of them could all score 0.
        config = PPOConfig(num_steps=3, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=10, temperature=0.5,
                           save_steps=None, sample_table_every=None)
        trainer = PPOTrainer(actor, models.load_causal_lm(sft), None, critic, tiny_tokenizer, [row["prompt"] for row in rows],
                             config, tmp_path / name, reward_fn=reward_fn)
        return [{key: value for key, value in step.items() if not key.startswith("time/") and "per_second" not in key} for step in trainer.train()]

    direct = run(answer_reward(rows), "verifier")
    through_functions = run(lambda prompts, responses: functions.score(prompts, responses, columns_of(prompts)), "functions")
    assert direct == through_functions
    assert 0 < sum(step["ppo/reward_raw"] for step in direct) < len(direct), "the reward must vary for the comparison to mean anything"


def test_instruction_constraints_is_the_share_of_followed_instructions_by_the_official_checkers() -> None:
    """IFEval's own checkers (if-verifiable) through reward/checkers.py: all lowercase, no commas, an end phrase."""
    ids = ["change_case:english_lowercase", "punctuation:no_comma", "startend:end_checker"]
    arguments = [{}, {}, {"end_phrase": "Is there anything else I can help with?"}]
    responses = [
        "the river runs east and the hills stay green. is there anything else i can help with?",  # all 3 (IFEval's end check ignores case)
        "The river runs east, and the hills stay green. Is there anything else I can help with?",  # the end phrase only
        "the river runs east and the hills stay green. Is there anything else I can help with?",  # no comma, end phrase ('Is' is upper)
        "fine",  # no comma only: IFEval's lowercase check also asks langdetect for English, and one word is not
    ]
    columns = {"instruction_id_list": [ids] * 4, "kwargs": [arguments] * 4, "key": [1, 2, 3, 4]}
    prompts = [[{"role": "user", "content": "Describe a river."}]] * 4
    strict = _functions({"name": "instruction_constraints"}).score(prompts, responses, columns)
    assert strict == pytest.approx([1.0, 1 / 3, 2 / 3, 1 / 3])
    guarded = _functions({"name": "instruction_constraints", "options": {"min_words": 3}}).score(prompts, responses, columns)
    assert guarded == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0]), "a one-word answer passes no-comma, and gets nothing"
    on_task = columns | {"task_keywords": [["river"], ["river"], ["mountain", "hill"], ["river"]]}
    checked = _functions({"name": "instruction_constraints", "options": {"task_check": True}}).score(prompts, responses, on_task)
    assert checked == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0]), "'hill' is in 'hills'; 'fine' names no river"
    off_task = on_task | {"task_keywords": [["desert"], None, ["river"], ["fine"]]}  # None: a row without a task check
    assert _functions({"name": "instruction_constraints", "options": {"task_check": True}}).score(prompts, responses, off_task) == pytest.approx([0.0, 1 / 3, 2 / 3, 1 / 3])
    with pytest.raises(RewardFunctionError, match="task_check needs the prompt rows' task_keywords column"):
        _functions({"name": "instruction_constraints", "options": {"task_check": True}}).score(prompts, responses, columns)
    with pytest.raises(RewardFunctionError, match="instruction_constraints needs the prompt rows' instruction_id_list and kwargs"):
        _functions({"name": "instruction_constraints"}).score(prompts, responses, {"answer": [None] * 4})
    with pytest.raises(RewardFunctionError, match="mode must be strict or loose, not 'lenient'"):
        _functions({"name": "instruction_constraints", "options": {"mode": "lenient"}}).score(prompts, responses, columns)


def test_a_looping_answer_gets_nothing_under_max_repetition() -> None:
    """A loop until the token cap (SmolLM2's greedy answers do this on half of IFBench) passes 'no commas'; the
    repetition guard scores it 0, and varied prose keeps its score."""
    from reward.functions import repetition

    prose = "the river runs east past the old mill and the hills stay green through the long dry summer months"
    loop = "the river runs east " + "and the river runs east " * 30
    assert repetition(prose) == 0.0 and repetition(loop) > 0.8 and repetition("") == 0.0
    columns = {"instruction_id_list": [["punctuation:no_comma"]] * 2, "kwargs": [[{}]] * 2, "key": [1, 2]}
    prompts = [[{"role": "user", "content": "Describe a river."}]] * 2
    assert _functions({"name": "instruction_constraints"}).score(prompts, [prose, loop], columns) == [1.0, 1.0]
    guarded = _functions({"name": "instruction_constraints", "options": {"max_repetition": 0.3}})
    assert guarded.score(prompts, [prose, loop], columns) == [1.0, 0.0]


def test_an_answer_cut_at_the_token_cap_gets_nothing_under_require_ending() -> None:
    """An answer that stops mid-sentence was cut at max_new_tokens; repairs drop its unfinished sentence first."""
    from stages.tasks import constraints

    cut = "the river runs east past the old mill. the hills stay green through the long"
    finished = "the river runs east past the old mill. the hills stay green."
    assert constraints.trim_fragment(cut) == "the river runs east past the old mill." and constraints.trim_fragment(finished) == finished
    columns = {"instruction_id_list": [["punctuation:no_comma"]] * 2, "kwargs": [[{}]] * 2, "key": [1, 2]}
    prompts = [[{"role": "user", "content": "Describe a river."}]] * 2
    assert _functions({"name": "instruction_constraints"}).score(prompts, [finished, cut], columns) == [1.0, 1.0]
    guarded = _functions({"name": "instruction_constraints", "options": {"require_ending": True}})
    assert guarded.score(prompts, [finished, cut], columns) == [1.0, 0.0]
    assert constraints.repair_all(cut, ["punctuation:no_comma"], [{}]) == "the river runs east past the old mill."
