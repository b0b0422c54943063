"""A KV cache for our decode loop (stages/generation.py): transformers' cache with each layer's keys and values in
a buffer allocated once, rows removable as they finish.

Why not transformers' own caches: `DynamicCache` appends each step's keys with `torch.cat`, which copies the
whole cache every step (a third of SmolLM2's decode step at batch 16 with 150-token prompts, measured);
`StaticCache` preallocates too, but attends over its full length (masked), which is more work and changes the
floating-point sums, so greedy tokens could differ from plain `model.generate`. This layer writes each step in
place and hands attention a view of exactly the filled length: the same tensors (values, shapes) attention sees
under `DynamicCache`, hence the same greedy tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs


class PreallocatedLayer(DynamicLayer):
    """One attention layer's keys and values, (batch, kv_heads, capacity, head_dim), filled left to right."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, key_dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, key_dim))
        self.value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions, capacity {self.capacity}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch): copies the filled part, not the capacity."""
        if not self.is_initialized:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((len(indices), *old.shape[1:]))
            new[:, :, : self.length] = old[indices, :, : self.length]
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for left-to-right decoding only")


def preallocated_cache(model: Any, capacity: int) -> Cache | None:
    """A cache for `model` holding up to `capacity` positions a row (prompt width + new tokens); None where
    `DynamicCache` would hold anything but plain full-attention layers (sliding windows, linear attention),
    which this layer does not reproduce."""
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if any(DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type) is not DynamicLayer for layer_type in layer_types):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in layer_types])


def select_rows(cache: Cache, indices: torch.Tensor) -> None:
    """Keep only the rows `indices` of every layer."""
    for layer in cache.layers:
        layer.batch_select_indices(indices)
