"""Process-group plumbing for CPU ranks (stages/distributed.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from stages import distributed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the workaround is for GPU-less hosts only")
def test_cpu_ranks_skip_the_shared_memory_kernel_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed compiles a shared-memory all-reduce kernel on a machine's first launch (45 s here) that
    ZeRO training never calls; a stage started on a CPU rank must not pay for it."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    backend = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(backend, "build_shm_op", backend.build_shm_op)  # restored after the test
    distributed.setup()
    assert backend.build_shm_op() is None
