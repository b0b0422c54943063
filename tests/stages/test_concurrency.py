"""Concurrent use: two recipes in one RLHF_HOME at the same time both finish and register, with nothing lost
or mixed between them. (Eight processes writing the registry at once: test_registry.py.)"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
# SFT then reward model, one plain process per stage (no launcher), a few steps each.
SHORT = [
    "stages=[sft, reward]", "num_processes=1", "deepspeed=none", "report_to=none",
    "sft.datasets=[{source: embedded, num_examples: 64}]", "sft.train.num_train_epochs=1", "sft.eval.num_prompts=8",
    "reward.datasets=[{source: embedded, num_examples: 64}]", "reward.train.num_train_epochs=1",
    "reward.train.per_device_train_batch_size=16", "reward.heldout_pairs=16", "reward.onpolicy_negatives=false",
]


@pytest.mark.slow
def test_two_recipes_at_once_in_one_home(isolated_home: Path, tmp_path: Path) -> None:
    environment = dict(os.environ, RLHF_HOME=str(isolated_home), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    seeds = {"alpha": 1, "beta": 2}  # different seeds: different models, so a mix-up would show
    processes = {
        run: subprocess.Popen(
            [sys.executable, "-m", "stages.cli", "run", "configs/recipes/tiny.yaml", f"run_name={run}", f"sft.seed={seed}", *SHORT],
            cwd=REPO_ROOT, env=environment, stdout=open(tmp_path / f"{run}.log", "w"), stderr=subprocess.STDOUT,
        )
        for run, seed in seeds.items()
    }
    for run, process in processes.items():
        assert process.wait(timeout=900) == 0, (tmp_path / f"{run}.log").read_text()[-4000:]

    registry = Registry(isolated_home)
    entries = {entry.ref: entry for entry in registry.list(include_builtin=False)}
    assert sorted(entries) == ["alpha/reward:1", "alpha/sft:1", "beta/reward:1", "beta/sft:1"]
    assert all(entry.status == "ready" for entry in entries.values())
    for run, seed in seeds.items():
        summary = json.loads((isolated_home / run / "summary.json").read_text())
        assert [stage["registry"] for stage in summary["stages"]] == [f"{run}/sft:1", f"{run}/reward:1"]
        sft, reward = entries[f"{run}/sft:1"], entries[f"{run}/reward:1"]
        assert reward.parent == sft.ref and reward.run == sft.run == run
        assert sft.config["seed"] == seed
        assert Path(sft.path) == isolated_home / run / "sft" and Path(reward.path) == isolated_home / run / "reward"
        for entry in (sft, reward):
            manifest = json.loads((Path(entry.path) / "stage_config.json").read_text())
            assert manifest["run_name"] == run and (Path(entry.path) / "model.safetensors").exists()
        assert json.loads((Path(reward.path) / "stage_config.json").read_text())["model"] == f"{run}/sft"
    alpha, beta = ((isolated_home / run / "sft" / "model.safetensors").read_bytes() for run in seeds)
    assert alpha != beta
    with sqlite3.connect(isolated_home / "registry.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
