"""Process-group plumbing for CPU ranks (stages/distributed.py)."""

from __future__ import annotations

import importlib
import os
import pickle
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.core import distributed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the workaround is for GPU-less hosts only")
def test_cpu_ranks_skip_the_shared_memory_kernel_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed compiles a shared-memory all-reduce kernel on a machine's first launch (45 s here) that
    ZeRO training never calls; a stage started on a CPU rank must not pay for it."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    backend = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(backend, "build_shm_op", backend.build_shm_op)  # restored after the test
    monkeypatch.setattr(distributed, "_join_process_group", lambda: None)  # no second rank to join
    distributed.setup()
    assert backend.build_shm_op() is None


def _run_on_two_ranks(worker: Any, tmp_path: Path) -> list[Any]:
    """worker(rank) on two gloo ranks; returns each rank's result (pickled to a file per rank)."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_rank_main, args=(worker, port, tmp_path), nprocs=2, join=True)
    return [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


def _rank_main(rank: int, worker: Any, port: int, tmp_path: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        (tmp_path / f"rank{rank}.pkl").write_bytes(pickle.dumps(worker(rank)))
    finally:
        torch.distributed.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown, where a C++ thread of the spawned child
    # (gloo's or torch's pool) still joinable at exit aborts it now and then ("terminate called without an
    # active exception", SIGABRT) after the work has succeeded.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chunks_with_owner(rank: int) -> list[tuple[int, int, int]]:
    """(item, chunk index, rank that computed it) for 11 items in chunks of 3."""
    return distributed.map_shards(lambda index, chunk: [(item, index, rank) for item in chunk], list(range(11)), 3)


def test_map_shards_outside_the_launcher_is_a_plain_map() -> None:
    assert distributed.map_shards(lambda index, chunk: [(item, index) for item in chunk], list(range(5)), 2) == [
        (0, 0), (1, 0), (2, 1), (3, 1), (4, 2)
    ]
    assert distributed.map_shards(lambda index, chunk: chunk, [], 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        distributed.map_shards(lambda index, chunk: chunk, [1], 0)


def test_map_shards_splits_chunks_between_ranks_and_gives_every_rank_all_results(tmp_path: Path) -> None:
    """Chunks 0, 2 on rank 0 and 1, 3 on rank 1 (round robin), each computed once; both ranks return the
    11 results in input order."""
    on_rank0, on_rank1 = _run_on_two_ranks(_chunks_with_owner, tmp_path)
    assert on_rank0 == on_rank1
    assert [item for item, _, _ in on_rank0] == list(range(11))
    assert [(index, owner) for _, index, owner in on_rank0] == [(0, 0)] * 3 + [(1, 1)] * 3 + [(2, 0)] * 3 + [(3, 1)] * 2


def _samples_and_greedy(rank: int) -> tuple[list[str], list[str]]:
    from stages import generation

    generation.SAMPLE_BATCH_SIZE = 4  # 4 rows at once: refills on each rank (a spawned process: nothing leaks)
    return _sample_and_answer()


def _sample_and_answer() -> tuple[list[str], list[str]]:
    from stages import generation, tasks
    from stages.core import models
    from stages.core.registry import Registry

    entry = Registry(os.devnull).get("tiny-llama")
    model, tokenizer = models.load_causal_lm(entry), models.load_tokenizer(entry)
    prompts = [row["prompt"] for row in tasks.generate(10, seed=3, split="eval")]
    sampled = generation.sample_responses(model, tokenizer, prompts, seed=5, max_new_tokens=6)
    greedy = generation.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=200)
    return sampled, greedy


def test_samples_do_not_depend_on_the_number_of_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On-policy negatives are seeded per prompt (seed, index), so two ranks sharing the prompts draw exactly what
    one process draws alone (an untrained model, so the samples are varied and a wrong seed would show)."""
    from stages import generation

    on_rank0, on_rank1 = _run_on_two_ranks(_samples_and_greedy, tmp_path)
    monkeypatch.setattr(generation, "SAMPLE_BATCH_SIZE", 4)
    alone = _sample_and_answer()
    assert on_rank0 == on_rank1 == alone
    sampled, greedy = alone
    assert len(set(sampled)) > 5 and sampled != greedy  # real samples, not the greedy answers
