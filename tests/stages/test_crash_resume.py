"""Crashes: a stage killed with SIGKILL mid-run resumes from its last checkpoint and ends within float
noise of an uninterrupted run with the same seed (SFT, reward model, DPO; PPO has its own test in
test_ppo_trainer.py). Until then its output is `incomplete`, and `rlhf registry list` says so; `rlhf
registry gc` removes incomplete entries only when asked.

The killed run is a real process: a test-only callback parks it after step 3 (checkpoints every 2 steps),
and the test sends SIGKILL, so the kill lands mid-run at a known step, without cleanup of any kind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import cli, trainers
from stages.core.config import load_config
from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs a stage's main() with a callback that stops after step PAUSE_AT and waits to be killed.
RUNNER = """
import os, sys, time
from transformers import TrainerCallback
from stages import trainers

module, pause_at, marker, *argv = sys.argv[1:]

class PauseForKill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(pause_at):
            open(marker + ".tmp", "w").close()
            os.replace(marker + ".tmp", marker)
            time.sleep(600)  # the test sends SIGKILL here

real_train = trainers.train
def train(trainer, stage, config):
    trainer.add_callback(PauseForKill())
    return real_train(trainer, stage, config)
trainers.train = train

import importlib
importlib.import_module(module).main(argv)
"""

# 96 examples, batch 16: 6 steps, a checkpoint every 2; no evaluation or W&B (not what is tested here).
STEPS, PAUSE_AT = 6, 3
TRAIN = ["num_train_epochs=1", "per_device_train_batch_size=16", "warmup_steps=0", "logging_steps=1", "save_steps=2", "save_total_limit=1"]
STAGES = {
    "sft": ("stages.sft", "configs/sft/tiny.yaml", "train", ["eval.enabled=false"]),
    # Length-grouped batches (stages/batching.py): the resumed run must see the same batch order.
    "sft_grouped": ("stages.sft", "configs/sft/tiny.yaml", "train", ["eval.enabled=false", "length_grouping=2"]),
    "reward": ("stages.reward_model", "configs/reward/tiny.yaml", "train", ["model=tiny-llama", "onpolicy_negatives=false", "heldout_pairs=16"]),
    "dpo": ("stages.policy", "configs/policy/tiny.yaml", "dpo", ["model=tiny-llama", "reward_model=null", "onpolicy_negatives=false", "eval.enabled=false"]),
}


def _arguments(stage: str, output_dir: Path, *extra: str) -> list[str]:
    _, config, section, specific = STAGES[stage]
    return [
        "--config", str(REPO_ROOT / config), f"output_dir={output_dir}", f"run_name={output_dir.name}", f"register_as={output_dir.name}/{stage}",
        "datasets=[{source: embedded, num_examples: 96}]", "tracking.report_to=none",
        *[f"{section}.{setting}" for setting in TRAIN], *specific, *extra,
    ]


def _run_in_process(stage: str, output_dir: Path, *extra: str) -> None:
    import importlib

    module = importlib.import_module(STAGES[stage][0])
    config_class = next(value for name, value in vars(module).items() if name.endswith("StageConfig") and value.__module__ == module.__name__)
    module.run(load_config(config_class, _arguments(stage, output_dir, *extra)))


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_resumes_to_the_uninterrupted_result(
    stage: str, tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    killed, straight, marker = tmp_path / "killed", tmp_path / "straight", tmp_path / "paused"
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, STAGES[stage][0], str(PAUSE_AT), str(marker), *_arguments(stage, killed)],
            cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _run_in_process(stage, straight)  # the uninterrupted run, while the other one starts up
        deadline = time.time() + 300
        while not marker.exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "the run to be killed never reached its pause step"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL

    # Half-written: listed as incomplete, never resolved as a model, no final weights.
    registry = Registry()
    (entry,) = [e for e in registry.list(include_builtin=False) if e.path == str(killed)]
    assert entry.status == "incomplete" and not (killed / "model.safetensors").exists()
    assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    capsys.readouterr()
    cli.main(["registry", "list"])
    listing = capsys.readouterr().out
    assert f"{entry.ref}" in listing and "INCOMPLETE" in listing and "1 incomplete" in listing
    # A checkpoint cut off mid-write (as by a kill during a save) is newer but must be skipped.
    (killed / "checkpoint-5").mkdir()
    (killed / "checkpoint-5" / "model.safetensors").write_bytes(b"\0" * 100)

    executed_steps = []
    real_train = trainers.train

    def counting_train(trainer, stage_run, config):  # noqa: ANN001, ANN202
        from transformers import TrainerCallback

        class Count(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN202
                executed_steps.append(state.global_step)

        trainer.add_callback(Count())
        return real_train(trainer, stage_run, config)

    monkeypatch.setattr(trainers, "train", counting_train)
    _run_in_process(stage, killed, "resume=true")

    assert executed_steps == list(range(PAUSE_AT, STEPS + 1)), "resume must continue from checkpoint-2, not start over"
    resumed_entry = registry.get(entry.ref)
    assert resumed_entry.status == "ready"
    assert [e.ref for e in registry.list(include_builtin=False) if e.path == str(killed)] == [entry.ref]
    assert not list(killed.glob("checkpoint-*"))
    expected, actual = _weights(straight), _weights(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=f"{stage}: {name} differs after resume")
    from stages.core import models  # training moved the weights, so the comparison above has power

    initial = models.load_causal_lm(registry.get("tiny-llama")).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (actual[name] - initial[name]).abs().max() > 1e-4  # 10x the tolerance


def test_registry_gc_removes_incomplete_entries_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture, dead_owner: dict) -> None:
    registry = Registry()
    half, whole = tmp_path / "half", tmp_path / "whole"
    for directory in (half, whole):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x")
    registry.begin("crashed/sft", "sft", half, owner=dead_owner)  # its process was killed
    registry.mark_ready(registry.begin("finished/sft", "sft", whole).ref)

    for _ in range(2):  # listing (twice) changes nothing
        assert cli.main(["registry", "list"]) == 0
        assert "1 incomplete (never finished, owner gone; `rlhf registry gc` removes them after the grace period): crashed/sft:1" in capsys.readouterr().out
    assert cli.main(["registry", "list", "--json"]) == 0
    assert '"live_status": "incomplete"' in capsys.readouterr().out

    assert cli.main(["registry", "gc"]) == 0  # its heartbeat is fresh: kept for the grace period
    assert "removed 0 entries" in (out := capsys.readouterr().out) and "skipped crashed/sft:1: owner gone" in out, out
    assert cli.main(["registry", "gc", "--grace", "0"]) == 0
    assert "removed 1 incomplete entries: crashed/sft:1" in capsys.readouterr().out
    assert [e.ref for e in registry.list(include_builtin=False)] == ["finished/sft:1"]
    assert (half / "model.safetensors").exists(), "files are deleted only with --delete-files"

    registry.begin("crashed/sft", "sft", half, owner=dead_owner)
    assert cli.main(["registry", "gc", "--delete-files", "--grace", "0"]) == 0
    assert not half.exists() and (whole / "model.safetensors").exists()
    assert not list(tmp_path.glob(".half.gc-*")), "the directory moved aside is deleted too"
