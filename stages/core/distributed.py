"""DeepSpeed and process-group plumbing, including the one workaround for GPU-less hosts.

HF Trainer (hence every TRL trainer) asks accelerate for a backend; with `LOCAL_RANK` set by the
deepspeed launcher and no accelerator present, accelerate 1.15 picks none, the world size reads 1
and DeepSpeed's batch-size check fails (`8 != 8 * 1 * 2`). Choosing gloo (multi-CPU) in exactly that
case is enough for ZeRO-2/3 to train on CPU ranks. Delete `_patch_accelerate_for_cpu_ranks` once
accelerate selects gloo for CPU-only DeepSpeed ranks itself.

On the same hosts DeepSpeed 0.19 compiles a shared-memory all-reduce kernel the first time its comm
backend starts (45 s on this 2-core machine, once per machine). Only tensor-parallel inference uses it;
ZeRO's gradient and parameter traffic goes through torch.distributed (gloo). `_skip_shm_kernel` skips
the build on CPU ranks.

Under the launcher every stage joins the process group at its start (`setup`), before any data is built,
so that the ranks can split inference between them: `map_shards` deals out the batches of on-policy
sampling and of the held-out evaluation, and every rank gets the whole result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from stages.core.errors import UserError
from stages.core.paths import REPO_ROOT

Item = TypeVar("Item")
Result = TypeVar("Result")

_patched = False


class DeepSpeedConfigError(UserError, ValueError):
    """The DeepSpeed config file is missing, not JSON, or asks for what this hardware can't do."""


def setup() -> None:
    """Call first in every stage: makes HF Trainer + DeepSpeed work on CPU-only ranks, and joins the
    launcher's process group now rather than when the trainer is built (see map_shards)."""
    if not is_distributed_launch():
        return
    if not torch.cuda.is_available():
        _patch_accelerate_for_cpu_ranks()
        _skip_shm_kernel()
    _join_process_group()


def is_distributed_launch() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1


def rank() -> int:
    """This process's global rank: the process group's once joined, else the launcher's RANK (0 outside it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def world_size() -> int:
    """Processes in the group (1 outside the launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def device() -> torch.device:
    """Where this rank runs inference (sampling, evaluation): its own GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def spread_chunk_size(num_items: int, at_most: int | None = None) -> int:
    """A chunk size that gives every rank one chunk of `num_items` (at most `at_most` items each), for work whose
    result does not depend on how it is chunked (greedy answers, scores, token counts)."""
    even = max(1, -(-num_items // world_size()))
    return even if at_most is None else max(1, min(at_most, even))


def map_shards(function: Callable[[int, list[Item]], list[Result]], items: list[Item], chunk_size: int) -> list[Result]:
    """`function(chunk_index, chunk)` over consecutive chunks of `items`, the chunks dealt out round-robin
    to the ranks; every rank returns all results, in the order of `items`.

    Collective under the launcher: every rank must call it with the same items. A chunk's result must
    depend only on its index and contents (seed sampling from the index), so that the outcome does not
    depend on the number of ranks.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunks = [items[start : start + chunk_size] for start in range(0, len(items), chunk_size)]
    size = world_size()
    own = {index: function(index, chunks[index]) for index in range(rank() % size, len(chunks), size)}
    if size > 1:
        gathered: list[dict[int, list[Result]]] = [{} for _ in range(size)]
        torch.distributed.all_gather_object(gathered, own)
        own = {index: results for part in gathered for index, results in part.items()}
    return [result for index in range(len(chunks)) for result in own[index]]


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. the registry version allocated by rank 0)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def end_zero3_init() -> None:
    """After training: later `from_pretrained` calls (rank 0's evaluation of the saved model) must build
    plain models, not ZeRO-3-partitioned ones whose construction waits on ranks that have exited."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def resolve_deepspeed_config(path: str | None) -> str | None:
    """Check a DeepSpeed config file before any compute; returns its absolute path."""
    if path is None:
        return None
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = REPO_ROOT / path
    if not candidate.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config not found: {path} (shipped: {', '.join(shipped_deepspeed_configs())})")
    try:
        config = json.loads(candidate.read_text())
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"{candidate} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{candidate} must hold a JSON object of DeepSpeed settings, not {type(config).__name__}")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{candidate}: zero_optimization.stage must be 0-3, got {stage!r}")
    for offload_key in ("offload_optimizer", "offload_param"):
        device = (zero.get(offload_key) or {}).get("device", "none")
        if device == "nvme" and not (zero.get(offload_key) or {}).get("nvme_path"):
            raise DeepSpeedConfigError(f"{candidate}: {offload_key}.device is nvme but no nvme_path is set")
        if offload_key == "offload_param" and device != "none" and stage != 3:
            raise DeepSpeedConfigError(f"{candidate}: offload_param needs ZeRO stage 3 (stage is {stage})")
    if config.get("fp16", {}).get("enabled") is True and not torch.cuda.is_available():
        raise DeepSpeedConfigError(f"{candidate}: fp16 is enabled but there is no GPU; use bf16 'auto' or fp32 on CPU")
    return str(candidate.resolve())


def shipped_deepspeed_configs() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "deepspeed_configs").glob("*.json"))


def _join_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # NCCL collectives run on this rank's GPU
    # The backend accelerate would pick later (gloo without a GPU); the trainer then reuses this group.
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")


def _patch_accelerate_for_cpu_ranks() -> None:
    global _patched
    if _patched:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None) -> Any:
        chosen_backend, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if distributed_type == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen_backend, distributed_type

    PartialState._prepare_backend = _prepare_backend
    _patched = True


def _skip_shm_kernel() -> None:
    import importlib

    # By module name: the attribute `deepspeed.comm.torch` is the torch package that deepspeed.comm imports.
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None  # the backend then takes its gloo path for every collective
