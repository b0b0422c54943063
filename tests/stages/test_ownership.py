"""Housekeeping never destroys live work: every entry that is not ready names its owner process and carries
a heartbeat; `rlhf registry gc` removes only what is over (failed, or owner gone past the grace period);
a stage whose entry vanishes stops before training further; resume never takes over a running stage.

The stage tests run a real tiny SFT in a subprocess that parks after a given step until the test lets it go
(a marker file), so gc, kill -9 or the removal lands mid-run at a known step.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import cli
from stages.core import ownership
from stages.core.registry import EntryBusyError, EntryLostError, Registry

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs stages.sft's main() with a callback that parks after step PAUSE until the file `release` exists.
RUNNER = """
import os, sys, time
from transformers import TrainerCallback
from stages import trainers
from stages.core.errors import run_main

pause_at, marker, release, *argv = sys.argv[1:]

class Park(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"finished step {state.global_step}", flush=True)
        if state.global_step == int(pause_at):
            open(marker, "w").close()
            deadline = time.time() + 300
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.1)

real_train = trainers.train
def train(trainer, stage, config):
    trainer.add_callback(Park())
    return real_train(trainer, stage, config)
trainers.train = train

from stages import sft
run_main(lambda: sft.main(argv))
"""
# 64 examples, batch 8: 8 steps, no checkpoint, evaluation or W&B.
SFT = ["datasets=[{source: embedded, num_examples: 64}]", "train.num_train_epochs=1", "train.per_device_train_batch_size=8",
       "train.warmup_steps=0", "train.logging_steps=1", "train.save_steps=1000", "eval.enabled=false", "tracking.report_to=none"]


class ParkedStage:
    """A tiny SFT in a subprocess, parked after step `pause_at` until `release()`."""

    def __init__(self, tmp_path: Path, name: str, pause_at: int = 2) -> None:
        self.output_dir, self.marker, self.release_file = tmp_path / name, tmp_path / f"{name}.parked", tmp_path / f"{name}.go"
        self.log = tmp_path / f"{name}.log"
        argv = ["--config", str(REPO_ROOT / "configs/sft/tiny.yaml"), f"output_dir={self.output_dir}", f"run_name={name}",
                f"register_as={name}/sft", *SFT]
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **{ownership.HEARTBEAT_ENV: "0.2"})
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(pause_at), str(self.marker), str(self.release_file), *argv],
                cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_parked(self) -> None:
        deadline = time.time() + 300
        while not self.marker.exists():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, "the stage never reached its pause step"
            time.sleep(0.2)

    def release(self, timeout: float = 300) -> int:
        self.release_file.touch()
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _rlhf(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


@pytest.mark.slow
def test_gc_never_touches_a_running_stage_which_then_finishes_ready(tmp_path: Path) -> None:
    stage = ParkedStage(tmp_path, "live")
    try:
        stage.wait_parked()
        listing = _rlhf("registry", "list")
        assert "live/sft:1" in listing.stdout and "RUNNING" in listing.stdout and "1 running" in listing.stdout, listing.stdout
        gc = _rlhf("registry", "gc", "--delete-files", "--grace", "0", "--force")  # the most destructive call there is
        assert gc.returncode == 0, gc.stderr
        assert "removed 0 entries" in gc.stdout and "skipped live/sft:1: running" in gc.stdout, gc.stdout
        assert stage.release() == 0, stage.log.read_text()[-3000:]
    finally:
        stage.kill()
    entry = Registry().get("live/sft:1")
    assert entry.status == "ready" and Registry().get("live/sft").ref == "live/sft:1"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "README.md"):
        assert (stage.output_dir / name).is_file(), name


@pytest.mark.slow
def test_a_killed_stage_is_incomplete_and_collected_after_the_grace_period(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stage = ParkedStage(tmp_path, "killed")
    try:
        stage.wait_parked()
        running = Registry().get("killed/sft:1")
        assert Registry().status_of(running) == "running"
        assert running.owner["pid"] == stage.process.pid
    finally:
        stage.kill()
    entry = Registry().get("killed/sft:1")
    assert Registry().status_of(entry) == "incomplete" and entry.status == "incomplete"
    capsys.readouterr()
    assert cli.main(["registry", "list"]) == 0
    assert "INCOMPLETE" in (listing := capsys.readouterr().out) and "1 incomplete" in listing and "running" not in listing

    grace = 2.0
    assert cli.main(["registry", "gc", "--delete-files", "--grace", str(grace)]) == 0
    assert "within the grace period of 2 s" in capsys.readouterr().out
    assert stage.output_dir.exists() and Registry().get("killed/sft:1")
    time.sleep(max(0.0, entry.heartbeat + grace + 0.2 - time.time()))
    assert cli.main(["registry", "gc", "--delete-files", "--grace", str(grace)]) == 0
    assert "removed 1 incomplete entries: killed/sft:1" in capsys.readouterr().out
    assert not stage.output_dir.exists() and Registry().list(include_builtin=False) == []


@pytest.mark.slow
def test_a_stage_whose_entry_vanished_stops_before_training_further(tmp_path: Path) -> None:
    stage = ParkedStage(tmp_path, "orphan", pause_at=2)
    try:
        stage.wait_parked()
        with sqlite3.connect(Registry().path) as db:  # removed by hand (or by an older gc) under the running stage
            db.execute("DELETE FROM entries WHERE name = 'orphan/sft'")
        time.sleep(1.0)  # several heartbeats
        code = stage.release()
    finally:
        stage.kill()
    log = stage.log.read_text()
    assert code == 2, log[-3000:]
    assert "rlhf: error: registry entry orphan/sft:1 was removed" in log and "stopping before training further" in log, log[-3000:]
    assert "Traceback" not in log
    assert not (stage.output_dir / "model.safetensors").exists()
    assert "finished step 2" in log and "finished step 3" not in log, log[-3000:]


def _begin_dead(registry: Registry, count: int, root: Path, owner: dict) -> list[str]:
    refs = []
    for index in range(count):
        (root / f"run{index}").mkdir()
        (root / f"run{index}" / "model.safetensors").write_bytes(b"x")
        refs.append(registry.begin(f"dead{index}/sft", "sft", root / f"run{index}", owner=owner, heartbeat=0.0).ref)
    return refs


def test_two_gc_commands_at_once_remove_each_entry_once(tmp_path: Path, dead_owner: dict) -> None:
    registry = Registry()
    refs = _begin_dead(registry, 12, tmp_path, dead_owner)
    registry.mark_ready(registry.begin("kept/sft", "sft", tmp_path / "kept").ref)
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    processes = [subprocess.Popen([sys.executable, "-m", "stages.cli", "registry", "gc", "--delete-files"], cwd=REPO_ROOT, env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    removed = [line.split(": ", 1)[1].split(", ") for out, _ in outputs for line in out.splitlines() if line.startswith("removed") and ": " in line]
    flat = [ref for refs_of_one in removed for ref in refs_of_one]
    assert sorted(flat) == sorted(refs), outputs  # every one removed, none twice
    assert [e.ref for e in registry.list(include_builtin=False)] == ["kept/sft:1"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rlhf_home"]
    with sqlite3.connect(registry.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_entries_of_another_host_need_force_and_a_stale_heartbeat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    registry = Registry()
    elsewhere = {"host": "another-node", "pid": 1234, "process_start": 1}
    fresh = registry.begin("fresh/sft", "sft", tmp_path / "fresh", owner=elsewhere)
    stale = registry.begin("stale/sft", "sft", tmp_path / "stale", owner=elsewhere, heartbeat=time.time() - 3600)
    assert registry.status_of(fresh) == "running" and registry.status_of(stale) == "incomplete"
    assert cli.main(["registry", "gc"]) == 0
    out = capsys.readouterr().out
    assert "removed 0 entries" in out and "skipped fresh/sft:1: running on another-node" in out
    assert "skipped stale/sft:1: owner on another host" in out and "--force removes it" in out
    assert cli.main(["registry", "gc", "--force"]) == 0
    captured = capsys.readouterr()
    assert "removed 1 incomplete entries: stale/sft:1" in captured.out and "skipped fresh/sft:1" in captured.out
    assert "warning: stale/sft:1: removing an entry of another host (pid 1234 on another-node)" in captured.err
    assert [e.ref for e in registry.list(include_builtin=False)] == ["fresh/sft:1"]


def test_resume_never_takes_over_a_running_entry(tmp_path: Path, dead_owner: dict) -> None:
    registry = Registry()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = ownership.current_owner() | {"pid": sleeper.pid, "process_start": ownership._process_start(sleeper.pid)}
        entry = registry.begin("busy/sft", "sft", tmp_path / "busy", owner=live)
        with pytest.raises(EntryBusyError, match=f"busy/sft:1 at .* is being written right now by pid {sleeper.pid}"):
            registry.take_over(entry.ref)
        with pytest.raises(EntryLostError, match=f"taken over by pid {sleeper.pid}"):  # a write by a process that is not the owner
            registry.update(entry.ref, owner=ownership.current_owner(), status="ready")
    finally:
        sleeper.kill()
        sleeper.wait()
    taken = registry.take_over(entry.ref)  # the owner is gone: resume continues it
    assert ownership.same_owner(taken.owner, ownership.current_owner()) and taken.status == "incomplete"
    assert registry.status_of(registry.get(entry.ref)) == "running"
    failed = registry.begin("failed/sft", "sft", tmp_path / "failed", owner=dead_owner)
    registry.update(failed.ref, status="failed")
    removed, _, _ = registry.collect()
    assert [e.ref for e in removed] == ["failed/sft:1"], "a failed stage is over: removed without a grace period"
