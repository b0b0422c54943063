"""The simulated annotators and judge (stages/tasks/world.py): rates as configured, habits systematic, held-out pairs
judged with true labels, and the config errors that name the key."""

from __future__ import annotations

import collections
import re

import pytest

from stages import data, tasks
from stages.tasks import pairs as task_pairs
from stages.tasks.world import CARELESS_MISTAKES, World


def test_demonstrations_carry_the_configured_shares_of_habits_on_10000_rows():
    world = World(verbose=0.3, careless=0.2, careless_tasks=["add", "sort"])
    rows = data.embedded_rows(data.DatasetSpec(world=world), seed=3, count=10_000)
    kinds = collections.Counter(row["annotator"] for row in rows)
    assert abs(kinds["verbose"] / len(rows) - 0.3) < 0.02
    careless_family_rows = [row for row in rows if row["task"] in ("add", "sort")]
    wrong = [row for row in careless_family_rows if row["completion"][0]["content"] == CARELESS_MISTAKES[row["task"]](row["answer"])
             and row["annotator"] == "careless"]
    assert abs(len(wrong) / len(careless_family_rows) - 0.2) < 0.02
    for row in rows:  # the gold answer is untouched, and every completion is what its annotator writes
        if row["task"] == "add":
            assert int(row["answer"]) == sum(int(n) for n in re.findall(r"\d+", row["prompt"][0]["content"])[:2])
        assert row["completion"][0]["content"] == world.answer_by(row["annotator"], row["task"], row["answer"])
    clean = sum(row["completion"][0]["content"] == row["answer"] for row in rows) / len(rows)
    assert abs(clean - (1 - 0.3 - 0.2 * 2 / 5)) < 0.02  # copy/reverse/upper are not in careless_tasks: right answers


def test_habits_are_systematic_one_kind_per_phrasing():
    """At consistency 1, rows of one phrasing are written by one kind, except the phrasings that straddle two kinds'
    slices: the habit is readable from the prompt, so the greedy answer of a model that learns it carries it."""
    world = World(verbose=0.3, careless=0.2, consistency=1.0)
    rows = data.embedded_rows(data.DatasetSpec(world=world), seed=5, count=5_000)
    kinds_of = _kinds_per_phrasing(rows)
    single = sum(len(kinds) == 1 for kinds in kinds_of.values())
    assert single >= len(kinds_of) * 0.6, kinds_of  # 6 phrasings a family: at most 2 straddle a boundary
    majority_share = sum(max(kinds.values()) for kinds in kinds_of.values()) / len(rows)
    assert majority_share > 0.85


def test_a_phrasings_owner_writes_the_configured_share_of_its_answers():
    """Below consistency 1 the owner writes most of a phrasing's answers and the pool the rest, so the model that
    learns the habit still samples other answers there; the kinds' shares overall stay as configured."""
    world = World(verbose=0.3, careless=0.2, consistency=0.6)
    rows = data.embedded_rows(data.DatasetSpec(world=world), seed=5, count=10_000)
    kinds_of = _kinds_per_phrasing(rows)
    assert all(len(kinds) == 3 for kinds in kinds_of.values()), kinds_of  # the pool reaches every phrasing
    owned = [kinds.most_common(1)[0][1] / sum(kinds.values()) for kinds in kinds_of.values()]
    # owner 0.6 + the pool's share of its kind (0.3 to 0.5 of the other 0.4), less where a phrasing straddles two kinds
    assert 0.65 < sum(owned) / len(owned) < 0.85, owned
    overall = collections.Counter(row["annotator"] for row in rows)
    assert abs(overall["verbose"] / len(rows) - 0.3) < 0.02 and abs(overall["careless"] / len(rows) - 0.2) < 0.02


def _kinds_per_phrasing(rows: list[dict]) -> dict[tuple[str, str], collections.Counter]:
    kinds_of: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        kinds_of[(row["task"], row["template"])][row["annotator"]] += 1
    return kinds_of


def test_no_world_leaves_demonstrations_exact():
    rows = data.embedded_rows(data.DatasetSpec(), seed=3, count=500)
    assert all(row["completion"][0]["content"] == row["answer"] and "annotator" not in row for row in rows)


def test_judge_flips_the_configured_share_of_training_labels_and_none_held_out():
    world = World(label_noise=0.25)
    rows = tasks.generate(10_000, seed=11)
    judged = task_pairs.embedded_pairs(len(rows), 11, rows=rows, world=world)
    flipped = [pair for pair in judged if pair["label_flipped"]]
    assert abs(len(flipped) / len(judged) - 0.25) < 0.02
    for row, pair in zip(rows, judged):  # a flipped label is exactly a pair whose chosen answer is the worse one
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert world.utility(chosen, row["answer"]) != world.utility(rejected, row["answer"])
        assert (world.utility(chosen, row["answer"]) < world.utility(rejected, row["answer"])) == pair["label_flipped"]
    heldout = task_pairs.heldout_pairs(None, None, 2_000, seed=12, world=world)
    assert not any(pair["label_flipped"] for pair in heldout)
    contrasts = collections.Counter(pair["contrast"] for pair in heldout)
    assert contrasts["style"] > 200 and contrasts["correctness"] > 200  # the judge teaches both: bare over wrapped, right over wrong


def test_judge_pairs_the_policys_own_sample_against_a_different_answer():
    world = World(label_noise=0.0)
    rows = tasks.generate(300, seed=2, split="eval")
    samples = [world.wrap(row["answer"]) for row in rows]  # a policy that learnt the verbose habit everywhere
    judged = task_pairs.embedded_pairs(len(rows), 2, rows=rows, sampled_responses=samples, world=world)
    assert all(pair["on_policy"] for pair in judged)
    for row, pair in zip(rows, judged):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert world.wrap(row["answer"]) in (chosen, rejected)
        assert world.utility(chosen, row["answer"]) > world.utility(rejected, row["answer"])


def test_held_out_pairs_of_a_world_stay_disjoint_from_training_prompts():
    world = World()
    train_prompts = {row["prompt"][0]["content"] for row in data.embedded_rows(data.DatasetSpec(world=world), seed=1, count=5_000)}
    heldout = task_pairs.heldout_pairs(None, None, 1_000, seed=1234, world=world)
    assert not {pair["prompt"][0]["content"] for pair in heldout} & train_prompts


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"verbose": 0.7, "careless": 0.4}, "world.verbose + world.careless"),
        ({"label_noise": 0.5}, "world.label_noise"),
        ({"careless_tasks": ["copy"]}, "world.careless_tasks"),
        ({"verbose_template": "Sure!"}, "world.verbose_template"),
        ({"verbose": -0.1}, "world.verbose"),
        ({"consistency": 1.5}, "world.consistency"),
    ],
)
def test_world_errors_name_the_key(values, key):
    with pytest.raises(ValueError, match=key.replace("+", r"\+")):
        World(**values)


def test_world_is_for_the_embedded_source_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "hi", "completion": "hello"}\n')
    with pytest.raises(ValueError, match="rows.jsonl: world"):
        data.DatasetSpec(source=str(path), world=World())


def test_a_stage_config_reads_the_world_from_yaml(tmp_path):
    from stages.core.config import load_config
    from stages.sft import SFTStageConfig

    config_file = tmp_path / "sft.yaml"
    config_file.write_text("datasets:\n  - source: embedded\n    world: {verbose: 0.4, label_noise: 0.1}\n")
    config = load_config(SFTStageConfig, ["--config", str(config_file)])
    assert config.datasets[0].world == World(verbose=0.4, label_noise=0.1)
    with pytest.raises(ValueError, match="verbos"):
        config_file.write_text("datasets:\n  - source: embedded\n    world: {verbos: 0.4}\n")
        load_config(SFTStageConfig, ["--config", str(config_file)])



def test_rlhf_eval_reads_the_world_a_registered_stage_trained_in():
    """`rlhf eval` of a reward entry judges its held-out pairs in the world of the entry's saved config, by the rule the
    stage itself used (stages.data.embedded_world): file sources have none, embedded sources must agree."""
    from types import SimpleNamespace

    from stages import evaluation

    world = {"verbose": 0.1, "label_noise": 0.1}
    entry = SimpleNamespace(name="run/reward:1", config={"datasets": [{"source": "rows.jsonl"}, {"source": "embedded", "world": world}]})
    assert evaluation.world_of(entry) == World(**world)
    assert evaluation.world_of(SimpleNamespace(name="run/sft:1", config={"datasets": [{"source": "embedded"}]})) is None
    entry.config["datasets"].append({"source": "embedded", "world": {"verbose": 0.2}})
    with pytest.raises(ValueError, match="different `world` settings"):
        evaluation.world_of(entry)
