"""The registry: round trip, lineage, references, incomplete entries, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from stages.core.registry import Registry, RegistryError


def test_round_trip_and_lineage(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    sft = registry.begin("sft", "sft", tmp_path / "a", parent="tiny-llama", config={"lr": 1}, dataset_fingerprint="abc")
    assert registry.get("sft:1").status == "incomplete"
    registry.mark_ready(sft.ref, metrics={"eval/exact_match": 0.7})
    rm = registry.begin("rm", "reward", tmp_path / "b", parent=sft.ref)
    registry.mark_ready(rm.ref)
    loaded = registry.get("rm")
    assert loaded.parent == "sft:1"
    assert registry.get(loaded.parent).metrics == {"eval/exact_match": 0.7}
    assert registry.get("sft").dataset_fingerprint == "abc"


def test_references(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for _ in range(3):
        entry = registry.begin("run-a/sft", "sft", tmp_path / "x")
    registry.mark_ready("run-a/sft:1")
    registry.mark_ready("run-a/sft:2")
    assert registry.get("run-a/sft").version == 2  # newest ready, not the incomplete v3
    assert registry.get("run-a/sft:latest").version == 2
    assert registry.get("run-a/sft:3").status == "incomplete"
    assert registry.get("sft:latest").ref == "run-a/sft:2"  # kind fallback
    assert registry.get("tiny-llama").builtin
    with pytest.raises(RegistryError, match="'nothing-here' is not in the registry"):
        registry.get("nothing-here")
    with pytest.raises(RegistryError, match="is not a model directory"):
        registry.get(str(tmp_path))
    assert entry.version == 3


def test_incomplete_entries_are_listed_and_collected_only_on_request(tmp_path: Path, dead_owner: dict) -> None:
    registry = Registry(tmp_path)
    registry.begin("half", "sft", tmp_path / "half", owner=dead_owner, heartbeat=time.time() - 700)
    registry.mark_ready(registry.begin("whole", "sft", tmp_path / "whole").ref)
    assert {e.name: e.status for e in registry.list(include_builtin=False)} == {"half": "incomplete", "whole": "ready"}
    with pytest.raises(RegistryError, match="no version of 'half' is ready"):
        registry.get("half")
    removed, skipped, warnings = registry.collect()  # the default grace period is 600 s
    assert [e.ref for e in removed] == ["half:1"] and skipped == [] and warnings == []
    assert [e.name for e in registry.list(include_builtin=False)] == ["whole"]


def test_secrets_never_reach_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_plantedsecret123")
    registry = Registry(tmp_path)
    registry.begin("s", "sft", tmp_path, config={"hub_token": "x1234567", "note": "uses hf_plantedsecret123", "max_new_tokens": 16})
    raw = (tmp_path / "registry.sqlite").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("registry.sqlite-*"))
    assert b"hf_plantedsecret123" not in raw and b"x1234567" not in raw
    assert registry.get("s:1").config["max_new_tokens"] == 16  # ordinary keys containing 'token' survive


def _writer(home: str, worker: int, count: int) -> None:
    registry = Registry(home)
    for index in range(count):
        entry = registry.begin("shared", "sft", f"/tmp/{worker}-{index}", config={"worker": worker, "index": index})
        registry.mark_ready(entry.ref)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    workers, per_worker = 8, 20
    processes = [multiprocessing.get_context("spawn").Process(target=_writer, args=(str(tmp_path), w, per_worker)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    entries = Registry(tmp_path).list(include_builtin=False)
    assert len(entries) == workers * per_worker
    assert sorted(e.version for e in entries) == list(range(1, workers * per_worker + 1))  # no version handed out twice
    assert {(e.config["worker"], e.config["index"]) for e in entries} == {(w, i) for w in range(workers) for i in range(per_worker)}
    assert all(e.status == "ready" for e in entries)
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
