"""The simulated world through the stages: SFT learns the annotators' habit, the reward model learns the judge's
preference against it, DPO on the judge's pairs drops most of the habit on held-out prompts, and PPO on the reward
model alone raises that model's score of its samples and their gold reward (the verifier, only logged) on held-out
prompts, and wraps fewer of its greedy answers than SFT (README "The embedded world")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reward.models import load_reward
from reward.scoring import score
from stages import generation, heldout, policy, reward_model, sft, tasks
from stages.core.registry import Registry
from stages.core.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
# The default share of wrapped demonstrations on two easy families, without careless annotators.
WORLD = "{verbose: 0.3, careless: 0.0, label_noise: 0.2}"
TASKS = "[upper, copy]"
COMMON = ["tracking.report_to=none", "run_name=world", f"eval.tasks={TASKS}", "eval.num_prompts=64"]


@pytest.mark.slow
def test_preferences_fix_the_annotators_habit(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    sft_metrics = sft.run(load_config(sft.SFTStageConfig, [
        "--config", str(REPO_ROOT / "configs/sft/tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'sft'}",
        f"datasets=[{{source: embedded, num_examples: 6000, tasks: {TASKS}, world: {WORLD}}}]",
        "train.num_train_epochs=2", "train.learning_rate=2e-3", "train.save_steps=1000",
    ]))
    assert sft_metrics["data/embedded/annotators/verbose"] == pytest.approx(0.3, abs=0.03)

    reward_metrics = reward_model.run(load_config(reward_model.RewardStageConfig, [
        "--config", str(REPO_ROOT / "configs/reward/tiny.yaml"), *COMMON, f"output_dir={tmp_path / 'reward'}",
        f"model={tmp_path / 'sft'}", f"datasets=[{{source: embedded, num_examples: 1200, tasks: {TASKS}, world: {WORLD}}}]",
        "train.num_train_epochs=1", "heldout_pairs=200",
    ]))
    # Held-out pairs are judged without noise: the RM ranks the bare answer above the wrapped one.
    assert reward_metrics["eval/pairwise_accuracy_contrast/style"] > 0.8, reward_metrics

    policy_args = ["--config", str(REPO_ROOT / "configs/policy/tiny.yaml"), *COMMON, f"model={tmp_path / 'sft'}",
                   f"reward_model={tmp_path / 'reward'}"]
    dpo_metrics = policy.run(load_config(policy.PolicyStageConfig, [
        *policy_args, f"output_dir={tmp_path / 'dpo'}", "algorithm=dpo",
        # 1,200 pairs: with 800 the habit left depended on the draw of on-policy samples (2026-12-06, same SFT and RM,
        # greedy wrapped 0.325 -> 0.18 / 0.08 / 0.075 / 0.075 at policy seeds 42-45; 1,200 at seed 42: 0.05).
        f"datasets=[{{source: embedded, num_examples: 1200, tasks: {TASKS}, world: {WORLD}}}]",
    ]))
    # The habit on 200 held-out prompts, greedy, models loaded by plain transformers: SFT learnt to wrap its answers
    # from the demonstrations; DPO on the judge's pairs wraps far fewer, without losing gold exact match.
    rows = tasks.generate(200, seed=99, split="eval", families=["upper", "copy"])
    prompts = [row["prompt"] for row in rows]
    sft_answers, dpo_answers = (_greedy(tmp_path / name, prompts) for name in ("sft", "dpo"))
    sft_wrapped, dpo_wrapped = (sum(a.startswith("Sure!") for a in answers) / len(answers) for answers in (sft_answers, dpo_answers))
    assert sft_wrapped > 0.15, sft_answers[:10]
    assert dpo_wrapped < sft_wrapped / 2, (sft_wrapped, dpo_wrapped, dpo_answers[:10])
    assert dpo_metrics["eval/exact_match"] >= dpo_metrics["eval/ref_exact_match"] - 0.02, dpo_metrics

    policy.run(load_config(policy.PolicyStageConfig, [
        *policy_args, f"output_dir={tmp_path / 'ppo'}", "algorithm=ppo",
        f"datasets=[{{source: embedded, num_examples: 512, tasks: {TASKS}}}]",
        # 40 steps: at 20 the proxy gain was machine-dependent (+0.75 on one machine, +0.13 / +0.15 / +0.20 for seeds
        # 42 / 43 / 44 on another, where 40 steps gave +0.64 / +0.78 / +0.68; gold and the habit moved at both budgets).
        "ppo.num_steps=40", "ppo.batch_size=32", "ppo.mini_batch_size=8", "ppo.save_steps=null", "ppo.actor_learning_rate=3e-5",
    ]))
    history = [json.loads(line) for line in (tmp_path / "ppo" / "history.jsonl").read_text().splitlines()]
    assert all("ppo/gold_reward" in step and "ppo/proxy_reward" in step for step in history)  # the over-optimisation curve's data
    # On the held-out prompts, learnt from the reward model alone (the verifier only logged): its samples score higher
    # under the reward model (measured at 40 steps, seed 42: -6.06 -> -5.42), they are right more often (the exact
    # expected gold reward of a sample, the probability of the bare right answer: 0.183 -> 0.278), and the habit fades
    # from the greedy answers (0.325 -> 0.015).
    sft_proxy, ppo_proxy = (_sampled_reward(tmp_path / name, tmp_path / "reward", prompts) for name in ("sft", "ppo"))
    assert ppo_proxy > sft_proxy + 0.3, (sft_proxy, ppo_proxy)
    sft_gold, ppo_gold = (_gold_probability(tmp_path / name, rows) for name in ("sft", "ppo"))
    assert ppo_gold > sft_gold + 0.02, (sft_gold, ppo_gold)
    ppo_wrapped = sum(a.startswith("Sure!") for a in _greedy(tmp_path / "ppo", prompts)) / len(prompts)
    assert ppo_wrapped < sft_wrapped - 0.1, (sft_wrapped, ppo_wrapped)


def _sampled_reward(model_dir: Path, reward_dir: Path, prompts: list) -> float:
    """The reward model's mean score of 4 seeded samples (temperature 1) per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    responses = generation.generate(model, tokenizer, prompts * 4, max_new_tokens=16, batch_size=200, do_sample=True, seed=5)
    reward = load_reward(Registry().get(str(reward_dir))).eval()
    return score(reward, tokenizer, prompts * 4, responses).mean().item()


def _gold_probability(model_dir: Path, rows: list[dict]) -> float:
    """The mean probability that a sample at temperature 1 is exactly the bare right answer (and its end of turn):
    the expected gold reward of the model's samples, without sampling noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answered = [row | {"completion": [{"role": "assistant", "content": row["answer"]}]} for row in rows]
    scores = heldout.completion_scores(model, tokenizer, answered, batch_size=200)  # (summed log-prob, tokens, argmax hits)
    return sum(math.exp(logprob) for logprob, _, _ in scores) / len(scores)


def _greedy(model_dir: Path, prompts: list) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            output = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
