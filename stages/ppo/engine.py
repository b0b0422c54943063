"""The PPO trainer's engine room: models wrapped for training (plain PyTorch or a DeepSpeed engine), models
read as per-token scorers, ZeRO-3 plumbing for generation, the DeepSpeed config filled from PPOConfig, and
the collectives between processes."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel

from stages.ppo.config import PPOConfig


class TokenScores(torch.nn.Module):
    """A sequence-classification model read at every position: score(backbone hidden state) -> (batch, seq).
    The critic's value of every state; the reward model's score wherever a sequence really ends. A
    likelihood-head reward model (reward/likelihood.py) gives its cumulative log-likelihood of the response,
    counted from `response_start` (the padded prompt length), so generated tokens can't move that start."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"critic and reward model need num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_start: int | None = None) -> torch.Tensor:
        if hasattr(self.model, "token_scores"):
            return self.model.token_scores(input_ids, attention_mask, position_ids, response_start).float()
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return self.model.score(hidden.last_hidden_state).squeeze(-1).float()


class Trained:
    """A trained model and its optimiser: plain PyTorch, or a DeepSpeed engine that owns both."""

    def __init__(self, module: torch.nn.Module, optimizer: Any, scheduler: Any, engine: Any = None) -> None:
        self.module, self.optimizer, self.scheduler, self.engine = module, optimizer, scheduler, engine

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return (self.engine or self.module)(**inputs)

    def step(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        if self.engine is not None:  # the engine clips (gradient_clipping), steps, schedules and zeroes
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def frozen_for_deepspeed(model: torch.nn.Module | None, ds_config: dict, zero_stage: int, device: torch.device) -> torch.nn.Module | None:
    """A frozen model (reference, reward model) placed for a DeepSpeed run."""
    if model is None or zero_stage != 3:  # ZeRO-0/1/2 shard no parameters: keep a replica
        return None if model is None else model.to(device)
    import deepspeed

    # ZeRO-3: an optimiser-less engine keeps the frozen model sharded and gathers each layer as it runs.
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return engine


@contextlib.contextmanager
def gathered_for_generation(actor: torch.nn.Module, engine: Any, zero_stage: int, enabled: bool) -> Iterator[None]:
    """ZeRO-3 with gather_params_for_generation: the whole actor on every process, ZeRO-3's per-layer hooks
    off. Those hooks release each layer after its forward, which would re-shard the gathered weights at
    every token and leave some in flight when the gather ends (DeepSpeed asserts "Cannot partition a param
    in flight"). The hooks are private DeepSpeed state (0.19.8): drop the surgery once DeepSpeed offers a
    public switch for generating with gathered parameters."""
    if zero_stage != 3 or not enabled:
        yield
        return
    import deepspeed

    offload = engine.optimizer.parameter_offload  # owns the ZeRO-3 module hooks
    with deepspeed.zero.GatheredParameters(list(actor.parameters())):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            for parameter in actor.parameters():
                parameter.ds_active_sub_modules.clear()
            offload._register_deepspeed_module(offload.module)  # re-adds the hooks and invalidates the trace



def fill_deepspeed_config(source: str | os.PathLike | dict, config: PPOConfig, world_size: int, model_config: Any) -> dict:
    """Fill a DeepSpeed config's "auto" values from PPOConfig. An explicit value contradicting PPOConfig, an
    optimizer/scheduler section (we build one AdamW per model) or an "auto" left unfilled is an error naming it."""
    ds_config = copy.deepcopy(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(f"deepspeed config: remove '{section}'; PPOTrainer builds the optimisers from PPOConfig")
    derived = {
        "train_micro_batch_size_per_gpu": config.mini_batch_size,
        "gradient_accumulation_steps": 1,  # one optimiser step per mini-batch, as PPO's epochs assume
        "train_batch_size": config.mini_batch_size * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in derived.items():
        if ds_config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"deepspeed config: {key}={ds_config[key]!r} contradicts PPOConfig ({value!r}); use \"auto\"")
        ds_config[key] = value
    for precision, enabled in (("bf16", config.bf16), ("fp16", False)):
        if ds_config.get(precision, {}).get("enabled") == "auto":
            ds_config[precision]["enabled"] = enabled
    hidden = getattr(model_config, "hidden_size", None)
    if hidden:  # the bucket sizes Hugging Face's DeepSpeed integration derives from the hidden size
        zero = ds_config.get("zero_optimization", {})
        sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value

    def refuse_auto(node: Any, path: str) -> None:
        if node == "auto":
            raise ValueError(f"deepspeed config: no value to fill \"auto\" at {path}")
        if isinstance(node, dict):
            for key, child in node.items():
                refuse_auto(child, f"{path}.{key}" if path else key)

    refuse_auto(ds_config, "")
    return ds_config


# --------------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------------------------
def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every process's `tensor`, concatenated along the first dimension."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_across_processes(values: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(values, (tensor / world_size).tolist()))
