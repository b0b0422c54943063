"""A KV cache for our decode loop (stages/core/continuous.py): transformers' cache with each layer's keys and values
in a buffer allocated once, rows removable as they finish, rows of another cache appendable (continuous batching).

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

    def batch_select_indices(self, indices: torch.Tensor, drop_columns: int = 0) -> None:
        """Keep only these rows (finished rows leave the batch) and drop the first `drop_columns` positions
        (padding in every kept row): copies the filled part, not the capacity."""
        if not self.is_initialized:
            return
        length = self.length - drop_columns
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((len(indices), *old.shape[1:]))
            new[:, :, :length] = old[indices, :, drop_columns : self.length]
            setattr(self, name, new)
        self._set_length(length)

    def append_rows(self, other: "PreallocatedLayer", capacity: int) -> None:
        """`other`'s rows below these, both sides right-aligned to the longer filled length: the shorter side is
        left padded with zeros (finite, so masked positions add exactly 0 to attention's weighted sum). Room for
        `capacity` positions afterwards."""
        length = max(self.length, other.length)
        self.capacity = max(capacity, length)
        for name in ("key_buffer", "value_buffer"):
            mine, theirs = getattr(self, name), getattr(other, name)
            new = mine.new_empty((mine.shape[0] + theirs.shape[0], mine.shape[1], self.capacity, mine.shape[-1]))
            for rows, part, filled in ((slice(0, mine.shape[0]), mine, self.length), (slice(mine.shape[0], None), theirs, other.length)):
                new[rows, :, : length - filled] = 0
                new[rows, :, length - filled : length] = part[:, :, :filled]
            setattr(self, name, new)
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

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


def select_rows(cache: Cache, indices: torch.Tensor, drop_columns: int = 0) -> None:
    """Keep only the rows `indices` of every layer, without its first `drop_columns` positions."""
    for layer in cache.layers:
        layer.batch_select_indices(indices, drop_columns)


def append_rows(cache: Cache, joining: Cache, capacity: int) -> None:
    """`joining`'s rows appended to `cache`'s (see `PreallocatedLayer.append_rows`); `joining` is left unused."""
    for layer, other in zip(cache.layers, joining.layers):
        layer.append_rows(other, capacity)
