"""The simulated world through the stages: SFT learns the annotators' habit, the reward model learns the judge's
preference against it, and a short PPO run on that reward model alone raises both its score and the gold reward of
its samples (pure RLHF: the verifier is logged, never optimised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages import policy, reward_model, sft
from stages.core.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
# A strong habit on two easy families: half the demonstrations wrapped, so SFT's greedy answers carry it often.
WORLD = "{verbose: 0.5, careless: 0.0, label_noise: 0.2}"
TASKS = "[upper, copy]"
COMMON = ["tracking.report_to=none", "run_name=world", f"eval.tasks={TASKS}", "eval.num_prompts=64"]


@pytest.mark.slow
def test_preferences_fix_the_annotators_habit_under_ppo(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    sft_metrics = sft.run(load_config(sft.SFTStageConfig, [
        "--config", str(REPO_ROOT / "configs/sft/tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'sft'}",
        f"datasets=[{{source: embedded, num_examples: 3000, tasks: {TASKS}, world: {WORLD}}}]",
        "train.num_train_epochs=2", "train.learning_rate=2e-3", "train.save_steps=1000",
    ]))
    # SFT learnt the habit: many greedy answers are wrapped, so gold exact match is well below what it would be.
    sft_samples = json.loads((tmp_path / "sft" / "samples.json").read_text())
    assert any(sample["response"].startswith("Sure! ") for sample in sft_samples), sft_samples

    reward_metrics = reward_model.run(load_config(reward_model.RewardStageConfig, [
        "--config", str(REPO_ROOT / "configs/reward/tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'reward'}",
        f"model={tmp_path / 'sft'}", f"datasets=[{{source: embedded, num_examples: 1200, tasks: {TASKS}, world: {WORLD}}}]",
        "train.num_train_epochs=1", "heldout_pairs=200",
    ]))
    # Held-out pairs are judged without noise: the RM ranks the bare answer above the wrapped one.
    assert reward_metrics["eval/pairwise_accuracy_contrast/style"] > 0.8, reward_metrics

    policy.run(load_config(policy.PolicyStageConfig, [
        "--config", str(REPO_ROOT / "configs/policy/tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'policy'}",
        "algorithm=ppo", f"model={tmp_path / 'sft'}", f"reward_model={tmp_path / 'reward'}", "verifiable_reward=false",
        f"datasets=[{{source: embedded, num_examples: 512, tasks: {TASKS}}}]",
        "ppo.num_steps=12", "ppo.batch_size=32", "ppo.mini_batch_size=8", "ppo.save_steps=null", "ppo.actor_learning_rate=3e-5",
    ]))
    history = [json.loads(line) for line in (tmp_path / "policy" / "history.jsonl").read_text().splitlines()]
    first, last = history[:3], history[-3:]

    def mean(rows: list[dict], key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    assert mean(last, "ppo/proxy_reward") > mean(first, "ppo/proxy_reward"), history
    assert mean(last, "ppo/gold_reward") > mean(first, "ppo/gold_reward") + 0.05, [row["ppo/gold_reward"] for row in history]
    assert sft_metrics["eval/exact_match"] < 0.9
