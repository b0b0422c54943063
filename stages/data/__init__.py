"""Training data as the stages consume it: formats, mixtures of sources, and length-grouped batches.

- `files`: a local data file checked before it is read (directory, suffix, UTF-8, JSON Lines line by line),
  every fault a DataError naming the file and line;
- `prompts`: prompt rows for the generating stages (messages, answer, the source's other columns);
- `formats`: DatasetSpec (one source: embedded, a local file or a Hub dataset), reading files and Hub
  datasets, converting every supported SFT and preference format to one conversational shape, with
  errors that name the file and row;
- `preferences`: preference pairs (prompt/chosen/rejected, HH-RLHF text) in the same shape;
- `feedback`: unpaired feedback for KTO (prompt/completion/label, TRL's format), pairs unpaired;
- `mixture`: how many rows each source gives (fixed counts or weights), drawn deterministically, and
  the realised mixture report;
- `batching`: length-bucketed, shuffled batches for TRL's trainers (`length_grouping`);
- `packing`: padding-free preference pairs for TRL's DPO and reward trainers (`padding_free`): each batch's
  sequences run through the model's backbone packed without padding, same loss and gradients as padded;
- `unended`: preference pairs and feedback rows whose answers the model did not end (cut at the sampling stage's
  `max_new_tokens`), tokenized for TRL's DPOTrainer and KTOTrainer without the chat template's closing end-of-turn;
- `sft_packing`: padding-free SFT batches (`train.padding_free`): TRL's one-row batch re-laid first-fit into rows as
  wide as the longest sequence (`packing.first_fit_rows`), same loss and gradients as padded; imports TRL.

May import: `stages.core`, `stages.tasks` (the embedded source), `stages.generation` (a tokenizer's end-of-turn
tokens) and third-party packages; nothing above
(checked by import-linter). The package re-exports `formats` and `preferences`, so `from stages import data;
data.load_sft_rows(...)` reads as before.
"""

from stages.data.formats import (
    DataError,
    DatasetSpec,
    check_messages,
    convert_sft_row,
    detect_format,
    embedded_rows,
    embedded_world,
    fingerprint,
    heldout_indices,
    heldout_raw_rows,
    load_sft_heldout,
    load_sft_rows,
    read_rows,
    rename_columns,
    token_count,
    token_counts,
)
from stages.data.preferences import convert_preference_row, load_preference_heldout, load_preference_rows
from stages.data.feedback import convert_feedback_row, load_feedback_heldout, load_feedback_rows, unpair

__all__ = [
    "DataError", "DatasetSpec", "check_messages", "convert_feedback_row", "convert_preference_row", "load_feedback_heldout",
    "load_feedback_rows", "unpair", "convert_sft_row", "detect_format",
    "embedded_rows", "embedded_world", "fingerprint", "heldout_indices", "heldout_raw_rows", "load_preference_heldout", "load_preference_rows", "load_sft_heldout", "load_sft_rows", "read_rows", "rename_columns", "token_count", "token_counts",
]
