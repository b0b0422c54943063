"""Padding-free SFT batches in rows (stages/data/sft_packing.py) on the tiny Llama, random init, with prompt/completion
rows of different lengths: the rows' step (TRL's own compute_loss, fused LM head) has the padded step's loss and
gradients to fp32 rounding, also with LoRA and with gradient checkpointing, and the same per-step losses over a short
run; a sequence never attends to another in its row; and the comparison fails when positions do not restart.
"""

from __future__ import annotations

import os
import random
import string
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.core import models
from stages.core.registry import Registry
from stages.data import sft_packing
from stages.data.sft_packing import RowsCollator, filler_mask, in_rows, padding_free_rows

ROWS = 6
RELATIVE = 1e-5  # fp32 rounding: rows and padded batch add the same terms in another order


def _rows(count: int = ROWS, seed: int = 0) -> list[dict[str, Any]]:
    """Copy-a-string rows, 3 to 3 + 7 * (count - 1) letters: prompt and answer lengths differ by row."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(3 + 7 * index)) for index in range(count)]
    rng.shuffle(texts)
    return [{"prompt": [{"role": "user", "content": f"copy: {text}"}], "completion": [{"role": "assistant", "content": text}]}
            for text in texts]


def _trainer(tmp_path: Path, tokenizer: Any, padding_free: bool = True, lora: bool = False, checkpointing: bool = False,
             **train: Any) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**{"output_dir": str(tmp_path), "per_device_train_batch_size": ROWS, "report_to": [], "use_cpu": True,
                          "bf16": False, "gradient_checkpointing": checkpointing, "padding_free": padding_free, "max_length": None,
                          "seed": 0, "save_strategy": "no", "disable_tqdm": True} | train)
    # init_lora_weights=False: adapters whose B is not zero, so that every adapter weight gets a gradient.
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False) if lora else None
    torch.manual_seed(0)
    model = models.load_causal_lm(Registry(os.devnull).get("tiny-llama"))
    trainer = padding_free_rows(SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_list(_rows()),
                                            processing_class=tokenizer, peft_config=peft_config)
    if checkpointing:  # what Trainer.train() does first with gradient_checkpointing=True
        trainer.model.activation_checkpointing_enable()
        assert trainer.model.is_activation_checkpointing
    return trainer


def _batches(trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same examples collated as rows (the trainer's collator) and padded (TRL's collator without padding_free)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [trainer.train_dataset[index] for index in range(ROWS)]
    assert isinstance(trainer.data_collator, RowsCollator)
    rows = trainer.data_collator(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.data_collator.pad_token_id)(examples)
    lengths = padded["attention_mask"].sum(-1)
    assert "attention_mask" not in rows and rows["input_ids"].shape[1] == lengths.max()  # rows as wide as the longest
    assert 1 < rows["input_ids"].shape[0] < ROWS and rows["input_ids"].numel() < padded["input_ids"].numel()
    return rows, padded


def _loss_and_grads(trainer: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's training loss on `batch`, normalised as Trainer does (num_items_in_batch), and every gradient."""
    trainer.model.train()
    trainer.model.zero_grad()
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _same(rows: tuple[torch.Tensor, dict[str, torch.Tensor]], padded: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> list[str]:
    """What differs beyond fp32 rounding between two (loss, gradients): empty when they agree."""
    (rows_loss, rows_grads), (padded_loss, padded_grads) = rows, padded
    differences = [] if abs(rows_loss.item() - padded_loss.item()) <= RELATIVE * abs(padded_loss.item()) else [f"loss {rows_loss} {padded_loss}"]
    assert rows_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        error = (rows_grads[name] - grad).abs().max().item()
        if error > RELATIVE * grad.abs().max().item() + 1e-12:
            differences.append(f"{name}: {error} (largest {grad.abs().max().item()})")
    return differences


@pytest.mark.parametrize("lora, checkpointing", [(False, False), (True, False), (False, True)], ids=["full", "lora", "checkpointing"])
def test_rows_step_equals_padded(tmp_path: Path, tiny_tokenizer: Any, lora: bool, checkpointing: bool) -> None:
    """Loss and every trainable parameter's gradient of the rows equal the padded batch's (TRL's compute_loss both)."""
    trainer = _trainer(tmp_path, tiny_tokenizer, lora=lora, checkpointing=checkpointing)
    rows, padded = _batches(trainer)
    packed_result = _loss_and_grads(trainer, rows)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(packed_result[1]) == trainable and all(("lora_" in name) == lora for name in trainable)
    assert _same(packed_result, _loss_and_grads(trainer, padded)) == []


def test_the_comparison_fails_when_positions_do_not_restart(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Positions that run on across a row (0..width-1): the sequences sharing a row attend to each other and the
    loss and gradients differ, so the test above would fail."""
    trainer = _trainer(tmp_path, tiny_tokenizer)
    rows, padded = _batches(trainer)
    broken = dict(rows, position_ids=torch.arange(rows["input_ids"].shape[1]).expand_as(rows["input_ids"]))
    assert len(_same(_loss_and_grads(trainer, broken), _loss_and_grads(trainer, padded))) > 1


def test_a_sequence_never_attends_to_another(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Change one sequence's answer: the logits of every other sequence (one of them after it in the same row) do not
    move; the changed sequence's do."""
    trainer = _trainer(tmp_path, tiny_tokenizer)
    examples = [trainer.train_dataset[index] for index in range(ROWS)]
    collator = trainer.data_collator
    one_row = super(RowsCollator, collator).torch_call(examples)  # TRL's batch, before the rows
    sequence_of = (one_row["position_ids"][0] == 0).cumsum(0) - 1  # (tokens,): each token's sequence
    owners = in_rows(dict(one_row, input_ids=sequence_of[None]), pad_token_id=-1)["input_ids"]  # (rows, width); -1: filler
    # The first sequence of a row that holds two: the other one comes after it, so isolation is not trivially true.
    shared = [[s for s in dict.fromkeys(row) if s != -1] for row in owners.tolist()]
    changed = next(sequences[0] for sequences in shared if len(sequences) > 1)

    perturbed = one_row["input_ids"].clone()
    answer = (sequence_of == changed) & (one_row["labels"][0] != -100)
    perturbed[0, answer] = (perturbed[0, answer] + 7) % 200 + 2  # other letters, same length

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        batch = in_rows(dict(one_row, input_ids=input_ids), collator.pad_token_id)
        with torch.no_grad():
            return trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    trainer.model.eval()
    before, after = logits(one_row["input_ids"]), logits(perturbed)
    others = (owners != changed) & (owners != -1)
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert (after[owners == changed] - before[owners == changed]).abs().max() > 1e-2


def test_a_short_run_has_the_padded_runs_losses_and_weights(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Three optimizer steps (2 batches of 3 rows each, accumulated): per-step losses and the final weights of the rows
    run equal the padded run's; the logged token count is the real tokens in both."""
    runs = {}
    for padding_free in (False, True):
        trainer = _trainer(tmp_path / str(padding_free), tiny_tokenizer, padding_free, per_device_train_batch_size=3,
                           gradient_accumulation_steps=2, max_steps=3, logging_steps=1, learning_rate=1e-3)
        assert isinstance(trainer.data_collator, RowsCollator) == padding_free
        trainer.train()
        history = [row for row in trainer.state.log_history if "loss" in row]
        runs[padding_free] = ([row["loss"] for row in history], [row["num_tokens"] for row in history],
                              {name: p.detach().clone() for name, p in trainer.model.named_parameters()})
    (padded_losses, padded_tokens, padded_weights), (rows_losses, rows_tokens, rows_weights) = runs[False], runs[True]
    assert len(rows_losses) == 3 and rows_losses == pytest.approx(padded_losses, rel=RELATIVE), (rows_losses, padded_losses)
    assert rows_tokens == padded_tokens
    for name, weight in padded_weights.items():
        # Adam divides by sqrt(v): where a gradient is ~0, rounding moves that weight's update by a few 1e-6 (lr 1e-3).
        torch.testing.assert_close(rows_weights[name], weight, rtol=1e-4, atol=2e-5)


def test_in_rows_lays_out_a_hand_made_batch() -> None:
    """Sequences of 3, 1, 2 and 2 tokens in one row (TRL's layout; labels -100 at each first token). Rows as wide as
    the longest (3), first-fit longest first: A | C B | D and a filler slot (pad 0, label -100, position 0)."""
    one_row = {
        "input_ids": torch.tensor([[11, 12, 13, 21, 31, 32, 41, 42]]),
        "labels": torch.tensor([[-100, 12, 13, -100, -100, 32, -100, 42]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1]]),
        "cu_seq_lens_q": torch.tensor([0, 3, 4, 6, 8]), "cu_seq_lens_k": torch.tensor([0, 3, 4, 6, 8]),
        "max_length_q": 3, "max_length_k": 3, "seq_idx": torch.tensor([[0, 0, 0, 1, 2, 2, 3, 3]]),
    }
    rows = in_rows(one_row, pad_token_id=0)
    assert set(rows) == {"input_ids", "labels", "position_ids"}  # the one row's varlen keys are gone
    assert rows["input_ids"].tolist() == [[11, 12, 13], [31, 32, 21], [41, 42, 0]]
    assert rows["labels"].tolist() == [[-100, 12, 13], [-100, 32, -100], [-100, 42, -100]]
    assert rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]
    assert filler_mask(rows["input_ids"], rows["position_ids"], 0).tolist() == [[False] * 3, [False] * 3, [False, False, True]]
    assert in_rows(dict(one_row, pixel_values=torch.zeros(1)), 0)["input_ids"].shape == (1, 8)  # other keys: TRL's row as is


def test_rows_only_for_dense_attention_and_max_length_left_to_the_stage(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Flash attention keeps TRL's one row (not run here: set on the config only); padding_free off keeps TRL's
    padded collator; the stage's train section hands TRL max_length None under padding_free without packing."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert sft_packing.DENSE_ATTENTION == ("sdpa", "eager", "flex_attention")
    assert type(_trainer(tmp_path / "padded", tiny_tokenizer, padding_free=False).data_collator) is DataCollatorForLanguageModeling
    trainer = _trainer(tmp_path / "flash", tiny_tokenizer, padding_free=False)
    trainer.model.config._attn_implementation = "flash_attention_2"  # what the constructor reads; no kernel runs here
    trainer.args.padding_free = True
    flash = padding_free_rows(type(trainer).__mro__[1])(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                                                         processing_class=tiny_tokenizer)
    assert type(flash.data_collator) is DataCollatorForLanguageModeling and flash.data_collator.padding_free
    assert sft_packing.trl_section({"padding_free": True, "max_length": 128}) == {"padding_free": True, "max_length": None}
    assert sft_packing.trl_section({"padding_free": True, "packing": True, "max_length": 128})["max_length"] == 128
    assert sft_packing.trl_section({"max_length": 128}) == {"max_length": 128}


def test_every_shipped_sft_config_trains_padding_free() -> None:
    from stages import sft
    from stages.core.config import load_config

    configs = sorted((Path(__file__).resolve().parents[2] / "configs/sft").glob("*.yaml"))
    assert {path.stem for path in configs} >= {"tiny", "tiny_mixture", "smollm2", "smollm2_if", "qwen"}
    for path in configs:
        assert load_config(sft.SFTStageConfig, ["--config", str(path)]).train.get("padding_free") is True, path
