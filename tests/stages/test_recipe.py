"""Recipes: parse, dry-run, and short real runs under the deepspeed launcher (2 CPU ranks) with ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.recipe import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(path) for path in (REPO_ROOT / "configs" / "recipes").glob("*.yaml"))
SHORT = [
    "sft.datasets=[{source: embedded, num_examples: 320}]", "sft.train.num_train_epochs=1", "sft.eval.num_prompts=20",
    "reward.datasets=[{source: embedded, num_examples: 128}]", "reward.train.num_train_epochs=1", "reward.heldout_pairs=40",
    "policy.datasets=[{source: embedded, num_examples: 64}]", "policy.dpo.num_train_epochs=1", "policy.dpo.per_device_train_batch_size=16",
    "policy.eval.num_prompts=20", "policy.ppo.num_steps=2", "policy.ppo.batch_size=16", "policy.ppo.mini_batch_size=8",
]


def _rlhf(*arguments: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    environment = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "stages.cli", *arguments], capture_output=True, text=True, env=environment, timeout=timeout, cwd=REPO_ROOT)


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_parses_and_its_stage_configs_validate(path: str, isolated_home: Path) -> None:
    recipe, _ = load_recipe(path, [])
    assert recipe.planned()
    result = _rlhf("run", path, "--dry-run", home=isolated_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--module stages.") == len(recipe.planned())


def test_dry_run_prints_launcher_commands_and_swaps_the_algorithm(isolated_home: Path) -> None:
    result = _rlhf("run", "configs/recipes/tiny.yaml", "--dry-run", "run_name=r1", "policy.algorithm=ppo", home=isolated_home)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("--module ")[1].split()[0] for line in lines] == ["stages.sft", "stages.reward_model", "stages.policy"]
    assert all("deepspeed.launcher.runner --num_gpus 2" in line and "deepspeed=deepspeed_configs/zero2.json" in line for line in lines)
    assert "model=r1/sft" in lines[1] and "reward_model=r1/reward" in lines[2] and "algorithm=ppo" in lines[2]
    assert not list(isolated_home.glob("r1/*")), "a dry run writes nothing"


def test_bad_override_fails_before_any_stage_runs(isolated_home: Path) -> None:
    result = _rlhf("run", "configs/recipes/tiny.yaml", "policy.algorithm=sgd", home=isolated_home)
    assert result.returncode == 2
    assert "unknown algorithm 'sgd'; valid: dpo, ppo, grpo, rloo" in result.stderr
    result = _rlhf("run", "configs/recipes/tiny.yaml", "sft.train.learnig_rate=1", home=isolated_home)
    assert result.returncode == 2 and "did you mean 'learning_rate'" in result.stderr


def _summary(home: Path, run: str) -> dict:
    return json.loads((home / run / "summary.json").read_text())


@pytest.mark.slow
def test_recipe_zero2_dpo_then_resume_skips_finished_stages(isolated_home: Path) -> None:
    result = _rlhf("run", "configs/recipes/tiny.yaml", "run_name=z2", *SHORT, home=isolated_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _summary(isolated_home, "z2")
    assert [s["stage"] for s in summary["stages"]] == ["sft", "reward", "policy"]
    assert [s["registry"] for s in summary["stages"]] == ["z2/sft:1", "z2/reward:1", "z2/policy:1"]
    assert summary["stages"][2]["algorithm"] == "dpo"
    assert {"eval/exact_match", "eval/reward_mean", "eval/kl_to_ref"} <= set(summary["stages"][2]["metrics"])
    assert "eval/pairwise_accuracy" in summary["stages"][1]["metrics"]
    # base -> SFT: the SFT stage scored its base on the same prompts, and the table's first row shows it.
    start = summary["stages"][0]["start"]
    assert start["registry"] == "tiny-llama" and start["metrics"]["eval/exact_match"] <= 0.05  # the untrained base answers ~none
    assert re.search(r"^base\s+-\s+tiny-llama\s", result.stdout, re.M), result.stdout[-2000:]
    for stage in summary["stages"]:
        assert (Path(stage["output_dir"]) / "model.safetensors").exists()
    again = _rlhf("run", "configs/recipes/tiny.yaml", "run_name=z2", "resume=true", *SHORT, home=isolated_home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already ready; skipping") == 3
    assert _summary(isolated_home, "z2")["stages"] == summary["stages"]


@pytest.mark.slow
def test_recipe_zero3_with_ppo(isolated_home: Path) -> None:
    result = _rlhf(
        "run", "configs/recipes/tiny.yaml", "run_name=z3", "deepspeed=deepspeed_configs/zero3.json", "policy.algorithm=ppo", *SHORT,
        home=isolated_home,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _summary(isolated_home, "z3")
    assert summary["stages"][2]["algorithm"] == "ppo"
    from reward.models import load_reward
    from stages.core import models
    from stages.core.registry import Registry

    for stage in summary["stages"]:
        entry = Registry(isolated_home).get(stage["registry"])
        assert entry.status == "ready"
        # A consolidated, loadable checkpoint, not DeepSpeed shards; the likelihood-head RM is a causal LM too.
        assert models.load_causal_lm(entry) is not None
        if stage["stage"] == "reward":
            assert hasattr(load_reward(entry), "token_scores")


@pytest.mark.slow
def test_recipe_killed_during_reward_stage_resumes_without_rerunning_sft(isolated_home: Path) -> None:
    """kill -9 of the whole recipe (launcher and ranks) once the reward stage has written a checkpoint;
    resume=true must skip SFT (still version 1), continue the reward stage and finish the summary."""
    import signal
    import time

    arguments = [
        "run", "configs/recipes/tiny.yaml", "run_name=kr", *SHORT,
        "reward.datasets=[{source: embedded, num_examples: 512}]", "reward.train.save_steps=2",
    ]
    environment = dict(os.environ, RLHF_HOME=str(isolated_home), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", *arguments], env=environment, cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    checkpoint = isolated_home / "kr" / "reward" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the reward stage never wrote its first checkpoint"
    assert not (isolated_home / "kr" / "summary.json").exists() or len(_summary(isolated_home, "kr")["stages"]) < 3

    again = _rlhf(*arguments, "resume=true", home=isolated_home)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sft: kr/sft:1 is already ready; skipping" in again.stdout
    assert "reward: resuming from" in again.stdout and "checkpoint-" in again.stdout, again.stdout[-3000:]
    summary = _summary(isolated_home, "kr")
    assert [s["stage"] for s in summary["stages"]] == ["sft", "reward", "policy"]
    assert summary["stages"][0]["registry"] == "kr/sft:1"
    assert "eval/pairwise_accuracy" in summary["stages"][1]["metrics"]
    # the reward stage's seconds are its resumed attempt only, and the summary says so
    assert [s.get("resumed", False) for s in summary["stages"]] == [False, True, False]
    from stages.core.registry import Registry

    assert [e.version for e in Registry(isolated_home).list(include_builtin=False) if e.name == "kr/sft"] == [1]


def _shrunk_sampled_recipe(tmp_path: Path) -> Path:
    """configs/recipes/tiny_sampled.yaml as shipped, with CI-sized data and steps (two families the tiny SFT learns fast)."""
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "configs/recipes/tiny_sampled.yaml").read_text())
    few = {"eval": {"num_prompts": 20, "tasks": ["upper", "copy"]}}
    sizes = {
        "sft": {"datasets": [{"source": "embedded", "num_examples": 3000, "tasks": ["upper", "copy"]}],
                "train": {"num_train_epochs": 2, "learning_rate": 2.0e-3, "per_device_train_batch_size": 16, "save_steps": 1000}} | few,
        "rs_samples": {"datasets": [{"source": "embedded", "num_examples": 24, "tasks": ["upper", "copy"]}]},
        "rs_sft": {"train": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1.0e-4, "warmup_steps": 0}} | few,
        "pairs": {"datasets": [{"source": "embedded", "num_examples": 24, "tasks": ["upper", "copy"]}]},
        "policy": {"dpo": {"num_train_epochs": 1, "per_device_train_batch_size": 4}} | few,
    }
    for step in recipe["steps"]:
        for key, value in sizes[step["name"]].items():  # sections merged key by key (the step's eval.embedded stays)
            step[key] = step.get(key, {}) | value if isinstance(value, dict) else value
    path = tmp_path / "tiny_sampled_ci.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_chained_recipe_sample_sft_sample_dpo_under_the_launcher(isolated_home: Path, tmp_path: Path) -> None:
    """The shipped chained recipe, CI-sized: two SFT stages and two sampling stages under their own names, each
    reading the previous step's registered output by reference; the datasets are registry entries of kind samples."""
    result = _rlhf("run", str(_shrunk_sampled_recipe(tmp_path)), "run_name=ch", home=isolated_home, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = _summary(isolated_home, "ch")
    assert [s["stage"] for s in summary["stages"]] == ["sft", "rs_samples", "rs_sft", "pairs", "policy"]
    from stages.core.registry import Registry

    registry = Registry(isolated_home)
    entries = {name: registry.get(f"ch/{name}") for name in ("sft", "rs_samples", "rs_sft", "pairs", "policy")}
    assert [entries[name].kind for name in entries] == ["sft", "samples", "sft", "samples", "policy"]
    assert entries["rs_samples"].parent == entries["sft"].ref and entries["pairs"].parent == entries["rs_sft"].ref
    assert entries["rs_sft"].parent == entries["sft"].ref and entries["policy"].parent == entries["rs_sft"].ref
    assert entries["rs_sft"].config["datasets"][0]["source"] == "ch/rs_samples"
    assert entries["rs_samples"].metrics["samples/rows"] > 0 and entries["pairs"].metrics["samples/pairs"] > 0
    assert summary["stages"][4]["algorithm"] == "dpo" and "eval/exact_match" in summary["stages"][4]["metrics"]
    assert "eval/exact_match" in summary["stages"][2]["metrics"]  # eval.embedded: true scores the RS SFT model too
