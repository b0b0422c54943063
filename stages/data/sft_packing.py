"""Padding-free SFT batches in rows as wide as the longest sequence (`train.padding_free: true`).

TRL's SFTTrainer with `padding_free` collates a batch into ONE row (trl.trainer.sft_trainer.
DataCollatorForLanguageModeling): the sequences end to end, positions restarting at 0 on each, no attention mask, and
label -100 on each sequence's first token (the token before it belongs to another sequence). transformers 5 reads
the restarting positions as separate sequences (`masking_utils.find_packed_sequence_indices`, only when the attention
mask is None and there is no cache: SFTTrainer's training forwards). Flash attention's variable-length kernels then
cost attention linear in the tokens, but sdpa and eager (CPU) attend through a dense (row x row) block-diagonal mask,
so one row costs (all tokens)^2 in attention: on CPU that ate most of the gain (bench/README.md: 1.24-1.49x TRL's
defaults, where the same pairs packed in rows gave 1.86x, stages/data/packing.py).

`padding_free_rows(SFTTrainer)` re-lays each batch TRL collates, exactly the rows the sampler drew (same loss, same
steps), first-fit into rows as wide as its longest sequence (`packing.first_fit_rows`, shared with the preference
pairs). A row's unused end is filler: the pad token, label -100, positions from 0 again, a sequence of its own that no
real token attends to (it comes last in its row, and attention looks back only). With flash attention (and any other
implementation outside `DENSE_ATTENTION`, e.g. a hub kernel) TRL's one row stays as it is.

Why the loss is the padded batch's to rounding: every real token sees the same tokens at the same positions as in its
padded row. The LM head scores position i against label i + 1 within a row; a sequence's first label and all filler
labels are -100, so the scored tokens are exactly the padded batch's, and `num_items_in_batch` (transformers counts
`labels[..., 1:] != -100`) is the same number. Tested in tests/stages/test_sft_packing.py.

May import (stages/data/__init__.py): torch, TRL; `trl` is imported here at import time, so the stage imports this
module where it imports TRL (inside `run`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from stages.data.packing import ONE_ROW_ATTENTION, PACKED_ATTENTION, first_fit_rows

# Attention implementations that attend through a dense (row x row) mask: these get rows as wide as the longest
# sequence. Flash attention's variable-length kernels (and hub kernels) keep TRL's one row.
DENSE_ATTENTION = tuple(attention for attention in PACKED_ATTENTION if attention not in ONE_ROW_ATTENTION)
# The keys of TRL's padding-free batch. The cu_seq_lens / max_length / seq_idx keys describe the one row (for varlen
# kernels and linear attention); the rows drop them. A batch with any other key stays one row.
_ONE_ROW_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
_KEYS = {"input_ids", "labels", "position_ids"} | _ONE_ROW_KEYS


def trl_section(train: dict[str, Any]) -> dict[str, Any]:
    """The SFT stage's `train:` section as SFTTrainer gets it. padding_free without packing: TRL refuses a
    max_length it would not enforce, but the stage has already dropped every row longer than train.max_length
    (stages/sft.py), so TRL gets None and the unpadded batches hold the same rows."""
    return train | ({"max_length": None} if train.get("padding_free") and not train.get("packing") else {})


def in_rows(batch: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """TRL's one-row padding-free batch laid out in rows as wide as its longest sequence (see the module docstring)."""
    if set(batch) - _KEYS or batch["input_ids"].shape[0] != 1:
        return batch
    positions = batch["position_ids"][0]  # (tokens,)
    starts = torch.nonzero(positions == 0).flatten().tolist()
    lengths = [end - start for start, end in zip(starts, starts[1:] + [positions.numel()])]
    width = max(lengths)
    slots, row_positions = first_fit_rows(lengths, starts, width)
    slot_index = torch.tensor(slots, device=positions.device)
    filler, source = slot_index < 0, slot_index.clamp(min=0)
    rows = {
        "input_ids": batch["input_ids"][0][source].masked_fill(filler, pad_token_id),
        "labels": batch["labels"][0][source].masked_fill(filler, -100),
        "position_ids": torch.tensor(row_positions, dtype=positions.dtype, device=positions.device),
    }
    return {key: value.view(-1, width) for key, value in rows.items()}  # (rows, width)


def filler_mask(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(rows, width) True on the rows' filler: a row's last sequence (positions restarting at 0) when it is all pad
    tokens and follows a real one. For counting real tokens (TRL's num_tokens metric, the bench); never for the loss."""
    segment = (position_ids == 0).cumsum(-1)  # (rows, width): which sequence of its row each token is
    last = segment == segment[:, -1:]
    all_pad = ((input_ids != pad_token_id) & last).sum(-1, keepdim=True) == 0
    return last & all_pad & (segment[:, -1:] > 1)


@dataclass
class RowsCollator(DataCollatorForLanguageModeling):
    """TRL's padding-free collator, its one row re-laid in rows as wide as the longest sequence (`in_rows`)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return in_rows(super().torch_call(examples), self.pad_token_id)


def padding_free_rows(trainer_class: type) -> type:
    """`trainer_class` (trl.SFTTrainer or a subclass) whose padding-free batches come in rows as wide as the longest
    sequence when the model attends through a dense mask (`DENSE_ATTENTION`); otherwise it trains as TRL does."""

    class PaddingFreeRows(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            collator = self.data_collator
            attention = getattr(self.model.config, "_attn_implementation", None)
            parallel = getattr(self.accelerator, "parallelism_config", None)  # sequence parallelism shards TRL's one row
            if (type(collator) is DataCollatorForLanguageModeling and collator.padding_free and attention in DENSE_ATTENTION
                    and not (parallel is not None and (parallel.sp_enabled or parallel.cp_enabled))):
                self.data_collator = RowsCollator(**{field.name: getattr(collator, field.name) for field in fields(collator)})

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            counted = getattr(self, "_total_train_tokens", None)
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if counted is not None and self.model.training and isinstance(self.data_collator, RowsCollator) and "position_ids" in inputs:
                # TRL counts a padding-free batch's tokens as position_ids.size(1), its one row's width: count the real ones.
                real = (~filler_mask(inputs["input_ids"], inputs["position_ids"], self.data_collator.pad_token_id)).sum()
                self._total_train_tokens = counted + self.accelerator.gather_for_metrics(real).sum().item() // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    PaddingFreeRows.__name__ = PaddingFreeRows.__qualname__ = trainer_class.__name__
    return PaddingFreeRows
