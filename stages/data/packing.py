"""Padding-free preference pairs: a batch's sequences (each pair's chosen and rejected) packed end to end.

TRL's DPOTrainer and RewardTrainer stack a batch's chosen and rejected sequences and pad them, on the right,
to the longest; a step then spends compute on padding (TRL 1.16's DPOTrainer turns its own `padding_free`
off with a warning). `padding_free(trainer_class)` runs the model's backbone (the decoder under the LM or
score head: `model.base_model`, e.g. LlamaModel) on the batch's real tokens only, concatenated (`pack`), and
puts its hidden states back in the padded layout before any head reads them. Everything above the
backbone is TRL's and ours unchanged: the fused LM head and every DPO loss type (sigmoid, sft, ipo, ...), the
reference log-probs (the reference's backbone is packed too, and so is TRL's precompute pass), the reward
classifier's last-token score and the `margin` column, the likelihood head and its chosen-NLL term. Hidden
states at padding positions are zeros; every head masks them out.

How attention stays within a sequence: transformers 5 reads packed sequences from `position_ids` that
restart at 0 (`masking_utils.find_packed_sequence_indices`), only when the 2-D attention mask is None and
there is no KV cache, so the packed call passes `attention_mask=None, use_cache=False` (with a cache the
positions are ignored and the sequences attend to each other). For sdpa and eager attention it then builds a
block-diagonal causal mask (checked here, on CPU, with the tiny Llama); flash attention reads the same
positions as variable-length sequences (not run here: no GPU; the first-batch check below covers it). A right-
padded row's tokens sit at positions 0..n-1 in the padded forward too, so each real token sees the same
tokens at the same positions: the two paths agree to fp32 rounding (tests/stages/test_packing.py).

Where it is not exact, it falls back to padding with a message: an attention implementation outside
`PACKED_ATTENTION`, a backbone without `base_model`, or a model whose packed hidden states differ from
its padded ones on the first batch (checked once per backbone, in eval mode, on up to `PROBE_ROWS` rows).
A left-padded batch (TRL pads on the right) is an error. A batch without padding runs as it is.

One row or several: with flash attention (variable-length kernels, cost linear in the tokens) the whole batch
is one row. sdpa and eager attend through a dense (row x row) mask, so one row would cost (all tokens)^2 in
attention: on CPU that made a DPO epoch 0.63x as fast as padded (bench/README.md). There the sequences are
packed first-fit into rows as wide as the longest one: attention costs at most the padded batch's, and the
linear layers and MLPs see a little filler at the rows' ends instead of the batch's padding.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from stages.core.errors import UserError

# Attention implementations for which transformers 5 builds per-sequence attention from restarting positions.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Variable-length kernels: attention cost linear in the tokens, so the whole batch goes in one row. The others
# attend through a dense mask: rows as wide as the longest sequence (see `pack`).
ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3")
PROBE_ROWS = 4  # rows of the first batch compared packed against padded, per backbone


class PackingError(UserError, ValueError):
    """A batch the packed forward cannot reproduce exactly (left padding, from a data collator of the user's)."""


@dataclass
class PackedRows:
    """A right-padded batch's sequences packed into rows; `slots` says where each packed token came from."""

    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width): 0..n-1 on each sequence; a row's filler at its end counts from 0 too
    slots: torch.Tensor  # (rows * width,): each packed token's index in the flattened (batch * length) batch; -1: filler


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, one_row: bool = False) -> PackedRows:
    """The real tokens of a right-padded (batch, length) batch, without padding between sequences.

    one_row: every sequence in one row. Otherwise rows as wide as the longest sequence, filled first-fit in order of
    decreasing length: with a dense attention mask (sdpa, eager on CPU) the attention cost is rows x width^2, never
    more than the padded batch's, where one row would cost (all tokens)^2. A row's unused end is filler: a sequence of
    its own (positions from 0), which no real token attends to, and which `unpack` drops.
    """
    real = attention_mask.bool()  # (batch, length)
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise PackingError("padding_free: a row has a padding token before a real one (left padding); TRL pads on the right. "
                           "Set padding_free: false for this data collator")
    batch, length = real.shape
    lengths = real.sum(-1).tolist()
    width = sum(lengths) if one_row else max(lengths)
    slots, positions = first_fit_rows(lengths, [sequence * length for sequence in range(batch)], width)
    slot_index = torch.tensor(slots, device=input_ids.device)
    packed_ids = input_ids.reshape(-1)[slot_index.clamp(min=0)]  # filler: any token id, never attended to
    position_ids = torch.tensor(positions, device=input_ids.device)
    return PackedRows(packed_ids.view(-1, width), position_ids.view(-1, width), slot_index)


def first_fit_rows(lengths: list[int], starts: list[int], width: int) -> tuple[list[int], list[int]]:
    """Sequences laid out in rows of `width` tokens, first-fit in order of decreasing length (the preference pairs'
    `pack`, and the SFT rows of stages/data/sft_packing.py).

    Sequence i is tokens starts[i] .. starts[i] + lengths[i] - 1 of a flat source. Returns, slot by slot (rows * width),
    the source index of each token (-1: filler) and its position: 0..n-1 on each sequence; a row's unused end is filler,
    positions from 0 again: a sequence of its own, last in its row, so that no real token attends to it.
    """
    rows: list[list[int]] = []  # sequence indices per row
    free: list[int] = []  # tokens left per row
    for sequence in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        row = next((r for r, room in enumerate(free) if room >= lengths[sequence]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(sequence)
        free[row] -= lengths[sequence]
    slots: list[int] = []
    positions: list[int] = []
    for sequences, room in zip(rows, free):
        for sequence in sequences:
            slots += range(starts[sequence], starts[sequence] + lengths[sequence])
            positions += range(lengths[sequence])
        slots += [-1] * room
        positions += range(room)
    return slots, positions


def unpack(hidden: torch.Tensor, packed: PackedRows, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length, ...) from (rows, width, ...): each sequence back in its row, zeros at padding."""
    batch, length = attention_mask.shape
    flat = hidden.reshape(-1, *hidden.shape[2:])
    kept = packed.slots >= 0
    padded = hidden.new_zeros(batch * length, *hidden.shape[2:])
    padded[packed.slots[kept]] = flat[kept]
    return padded.view(batch, length, *hidden.shape[2:])


def packed_forward(original: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, one_row: bool = False,
                   **kwargs: Any) -> Any:
    """The backbone's output on a right-padded batch, computed on its real tokens packed (see `pack`)."""
    packed = pack(input_ids, attention_mask, one_row)
    # attention_mask=None and no cache: only then does transformers read the restarting positions as sequences.
    outputs = original(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids, use_cache=False, **kwargs)
    outputs.last_hidden_state = unpack(outputs.last_hidden_state, packed, attention_mask)
    return outputs


def _packable(input_ids: Any, attention_mask: Any, position_ids: Any, inputs_embeds: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a backbone call is a padded batch that packing reproduces (else it runs as it is)."""
    if input_ids is None or inputs_embeds is not None or position_ids is not None or attention_mask is None:
        return False
    if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape or bool(attention_mask.all()):
        return False  # a prepared 4-D mask, or nothing to remove
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    return not (kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key != "use_cache"}  # the packed call sets it (packed_forward)


def _same_hidden_states(original: Callable[..., Any], backbone: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        kwargs: dict[str, Any]) -> bool:
    """Packed against padded on the batch's first rows, without gradients and dropout, in both layouts: the rows
    (several of them, batch > 1) and one row, which always puts several sequences side by side."""
    rows = slice(0, PROBE_ROWS)
    ids, mask = input_ids[rows], attention_mask[rows]
    real = mask.bool()
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            padded = original(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state[real]
            packed = [packed_forward(original, ids, mask, one_row, **kwargs).last_hidden_state[real] for one_row in (False, True)]
    finally:
        backbone.train(was_training)
    tolerance = 1e-3 if padded.dtype == torch.float32 else 5e-2  # rounding, not a sequence leaking into another (O(1))
    return all(torch.allclose(layout.float(), padded.float(), rtol=tolerance, atol=tolerance) for layout in packed)


def backbone_of(model: Any) -> Any | None:
    """The decoder under a model's head (LlamaModel under LlamaForCausalLM / ...ForSequenceClassification), through
    PEFT; None where the model has no separate backbone."""
    if hasattr(model, "get_base_model"):  # a PeftModel
        model = model.get_base_model()
    backbone = getattr(model, "base_model", None)
    return None if backbone is None or backbone is model else backbone


def padding_free(trainer_class: type, enabled: bool = True) -> type:
    """`trainer_class` (TRL's DPOTrainer or RewardTrainer, or a subclass) with padding-free forwards when enabled.

    The loss (`compute_loss`) and, for DPO, the precomputed reference log-probs (`compute_ref_log_probs`) run with
    the policy's and the reference's backbones packed; outside them (generation, evaluation) the model is untouched.
    """
    if not enabled:
        return trainer_class

    class PaddingFree(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Before TRL's constructor: with precompute_ref_log_probs it already runs compute_ref_log_probs.
            self._padding_free_off = False  # set by _fall_back: padded batches from then on
            self._padding_free_checked: dict[int, bool] = {}  # id(backbone) -> packed equals padded on its first batch
            super().__init__(*args, **kwargs)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            with self._packed_backbones():
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        if hasattr(trainer_class, "compute_ref_log_probs"):  # DPO: precompute_ref_log_probs's pass over the data

            def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
                with self._packed_backbones():
                    return super().compute_ref_log_probs(model, inputs)

        @contextmanager
        def _packed_backbones(self) -> Iterator[None]:
            models = [self.accelerator.unwrap_model(m) for m in (self.model, getattr(self, "ref_model", None)) if m is not None]
            backbones = {id(b): b for b in map(backbone_of, models) if b is not None}  # one with LoRA and no reference model
            if not backbones:
                self._fall_back("the model has no backbone under its head (model.base_model)")
            installed = [] if self._padding_free_off else list(backbones.values())
            before = [backbone.__dict__.get("forward") for backbone in installed]  # an instance's own forward, if any
            for backbone in installed:
                backbone.forward = self._packing_forward(backbone)
            try:
                yield
            finally:
                for backbone, previous in zip(installed, before):
                    if previous is None:
                        del backbone.forward  # the class's forward again
                    else:
                        backbone.forward = previous

        def _packing_forward(self, backbone: Any) -> Callable[..., Any]:
            original = backbone.forward
            checked = self._padding_free_checked

            def forward(input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None, inputs_embeds: Any = None,
                        **kwargs: Any) -> Any:
                call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
                if self._padding_free_off or not _packable(input_ids, attention_mask, position_ids, inputs_embeds, kwargs):
                    return original(**call, **kwargs)
                rest = _without_cache(kwargs)
                if id(backbone) not in checked:
                    checked[id(backbone)] = self._check_exact(original, backbone, input_ids, attention_mask, rest)
                if not checked[id(backbone)]:
                    return original(**call, **kwargs)
                one_row = backbone.config._attn_implementation in ONE_ROW_ATTENTION
                return packed_forward(original, input_ids, attention_mask, one_row, **rest)

            return forward

        def _check_exact(self, original: Callable[..., Any], backbone: Any, input_ids: Any, attention_mask: Any,
                         kwargs: dict[str, Any]) -> bool:
            attention = getattr(backbone.config, "_attn_implementation", None)
            if attention not in PACKED_ATTENTION:
                supported = ", ".join(PACKED_ATTENTION)
                return self._fall_back(f"attention implementation {attention!r} has no packed-sequence support (supported: {supported})")
            if not _same_hidden_states(original, backbone, input_ids, attention_mask, kwargs):
                return self._fall_back(f"{type(backbone).__name__} ({attention}) gives other hidden states packed than padded")
            return True

        def _fall_back(self, reason: str) -> bool:
            if not self._padding_free_off:
                print(f"padding_free: {reason}; training on padded batches instead (set padding_free: false to silence this)",
                      flush=True)
            self._padding_free_off = True
            return False

    PaddingFree.__name__ = PaddingFree.__qualname__ = trainer_class.__name__
    return PaddingFree
