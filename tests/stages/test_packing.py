"""Padding-free preference pairs (stages/data/packing.py) on the tiny Llama, random init, with pairs of
different lengths: the packed step's loss and gradients equal the padded step's (TRL's own path) to fp32
rounding for DPO's sigmoid, sigmoid + SFT and IPO losses and for the reward model (classifier head with
margins; likelihood head with the chosen-NLL term); a pair never attends to another; and each comparison
checks that the packed forward really ran on one row of real tokens (the padded path is isolated anyway).
"""

from __future__ import annotations

import os
import random
import string
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from stages.core import models
from stages.core.registry import Registry
from stages.data import packing
from stages.data.packing import PackingError, backbone_of, pack, padding_free, unpack

PAIRS = 4
RELATIVE = 1e-5  # fp32 rounding: packed and padded add the same terms in another order


def _entry() -> Any:
    return Registry(os.devnull).get("tiny-llama")


def _pairs(count: int = PAIRS, seed: int = 0, margins: bool = False) -> list[dict[str, Any]]:
    """Copy-a-string pairs of different prompt and answer lengths; the rejected answer drops or adds letters."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(3 + 7 * index))
        wrong = text[: len(text) // 2] if index % 2 else text + "xyz" * (index + 1)
        row = {"prompt": [{"role": "user", "content": f"copy: {text}"}], "chosen": [{"role": "assistant", "content": text}],
               "rejected": [{"role": "assistant", "content": wrong}]}
        rows.append(row | ({"margin": 0.5 * index} if margins else {}))
    return rows


@contextmanager
def _backbone_rows(model: Any) -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the input ids every forward of `model`'s backbone embeds (the probe's included)."""
    shapes: list[tuple[int, ...]] = []
    handle = backbone_of(model).embed_tokens.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        yield shapes
    finally:
        handle.remove()


def _loss_and_grads(model: Any, compute: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute(model, dict(batch))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(packed: tuple[torch.Tensor, dict[str, torch.Tensor]], padded: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    (packed_loss, packed_grads), (padded_loss, padded_grads) = packed, padded
    assert abs(packed_loss.item() - padded_loss.item()) <= RELATIVE * abs(padded_loss.item()), (packed_loss, padded_loss)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        error = (packed_grads[name] - grad).abs().max().item()
        assert error <= RELATIVE * grad.abs().max().item() + 1e-12, (name, error, grad.abs().max().item())


def _packed_shape(attention_mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(pack(torch.zeros_like(attention_mask), attention_mask).input_ids.shape)


def _assert_packed_once(shapes: list[tuple[int, ...]], attention_mask: torch.Tensor) -> None:
    """Some forward ran on the packed rows (fewer than the batch's, no wider); none on the full padded batch."""
    rows, width = _packed_shape(attention_mask)
    assert rows < attention_mask.shape[0] and width <= attention_mask.shape[1]
    assert (rows, width) in shapes, shapes
    assert tuple(attention_mask.shape) not in shapes, shapes


def _dpo(tmp_path: Path, tokenizer: Any, loss_type: list[str], lora: bool = False, checkpointing: bool = False) -> tuple[Any, dict[str, Any]]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=0.1, per_device_train_batch_size=PAIRS, report_to=[],
                       use_cpu=True, bf16=False, gradient_checkpointing=checkpointing)
    # With LoRA there is no reference model: TRL runs the policy with its adapters disabled (init_lora_weights=False:
    # adapters that already change the policy, so that the two differ).
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False) if lora else None
    trainer = padding_free(DPOTrainer)(model=models.load_causal_lm(_entry()), ref_model=None if lora else models.load_causal_lm(_entry()),
                                       args=config, train_dataset=Dataset.from_list(_pairs()), processing_class=tokenizer,
                                       peft_config=peft_config)
    if checkpointing:  # what Trainer.train() does first with gradient_checkpointing=True
        trainer.model.activation_checkpointing_enable()
        assert trainer.model.is_activation_checkpointing
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(PAIRS)])
    assert not batch["attention_mask"].all(), "the pairs must need padding, or the comparison shows nothing"
    return trainer, batch


@pytest.mark.parametrize(
    "loss_type, lora, checkpointing",
    [(["sigmoid"], False, False), (["sigmoid", "sft"], False, False), (["ipo"], False, False), (["sigmoid", "sft"], True, False),
     (["sigmoid"], False, True)],
    ids=["sigmoid", "sigmoid+sft", "ipo", "sigmoid+sft-lora", "sigmoid-checkpointing"],
)
def test_dpo_packed_step_equals_padded(tmp_path: Path, tiny_tokenizer: Any, loss_type: list[str], lora: bool, checkpointing: bool) -> None:
    """Policy and reference log-probs from the packed forward: loss and every gradient as TRL's padded step (also with
    LoRA, whose reference is the policy with adapters off, and with gradient checkpointing, TRL's default)."""
    from trl import DPOTrainer

    trainer, batch = _dpo(tmp_path, tiny_tokenizer, loss_type, lora, checkpointing)
    trainer.model.train()
    with _backbone_rows(trainer.model) as policy_shapes:
        if lora:  # one backbone: the policy's forward, then the reference's with adapters off
            packed = _loss_and_grads(trainer.model, trainer.compute_loss, batch)
            assert policy_shapes.count(_packed_shape(batch["attention_mask"])) >= 2, policy_shapes
        else:
            with _backbone_rows(trainer.ref_model) as reference_shapes:
                packed = _loss_and_grads(trainer.model, trainer.compute_loss, batch)
            _assert_packed_once(reference_shapes, batch["attention_mask"])
    _assert_packed_once(policy_shapes, batch["attention_mask"])
    with _backbone_rows(trainer.model) as padded_shapes:
        padded = _loss_and_grads(trainer.model, lambda model, inputs: DPOTrainer.compute_loss(trainer, model, inputs), batch)
    assert set(padded_shapes) == {tuple(batch["attention_mask"].shape)}
    _assert_same(packed, padded)


def test_dpo_precomputed_reference_log_probs_are_packed(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """precompute_ref_log_probs: TRL's pass over the data in the constructor (compute_ref_log_probs) runs packed and
    stores the padded path's values."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    reference = models.load_causal_lm(_entry())
    config = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=PAIRS, report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, precompute_ref_log_probs=True, precompute_ref_batch_size=PAIRS)
    with _backbone_rows(reference) as shapes:
        trainer = padding_free(DPOTrainer)(model=models.load_causal_lm(_entry()), ref_model=reference, args=config,
                                           train_dataset=Dataset.from_list(_pairs()), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(PAIRS)])  # the pass's first batch
    _assert_packed_once(shapes, batch["attention_mask"])
    padded_chosen, padded_rejected = DPOTrainer.compute_ref_log_probs(trainer, reference, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], padded_chosen, rtol=RELATIVE, atol=1e-6)
    torch.testing.assert_close(batch["ref_rejected_logps"], padded_rejected, rtol=RELATIVE, atol=1e-6)


def test_a_pair_never_attends_to_another(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Change the answers of pair 0 (rows 0 and PAIRS of the stacked batch): the other pairs' per-token log-probs,
    computed in the same packed row, do not move; pair 0's do."""
    trainer, batch = _dpo(tmp_path, tiny_tokenizer, ["sigmoid"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    perturbed = batch["input_ids"].clone()
    for row in (0, PAIRS):
        answer = batch["completion_mask"][row].bool()
        perturbed[row, answer] = (perturbed[row, answer] + 7) % 200 + 2  # other letters, same lengths

    def log_probs(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), trainer._packed_backbones(), _backbone_rows(trainer.model) as shapes:
            out = trainer.model(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
        _assert_packed_once(shapes, batch["attention_mask"])
        return out.log_probs  # (2 * PAIRS, length - 1)

    _assert_shares_a_row(batch["attention_mask"], (0, PAIRS))
    before, after = log_probs(batch["input_ids"]), log_probs(perturbed)
    others = [row for row in range(2 * PAIRS) if row not in (0, PAIRS)]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert (after[[0, PAIRS]] - before[[0, PAIRS]]).abs().max() > 1e-2


def _assert_shares_a_row(attention_mask: torch.Tensor, sequences: tuple[int, ...]) -> None:
    """The packed rows put each of `sequences` beside another sequence, or isolation would be trivially true."""
    packed = pack(torch.zeros_like(attention_mask), attention_mask)
    owners = torch.where(packed.slots >= 0, packed.slots // attention_mask.shape[1], -1).view(packed.input_ids.shape)
    for sequence in sequences:
        row = owners[(owners == sequence).any(-1)][0]
        assert set(row.tolist()) - {sequence, -1}, (sequence, owners)


def _reward(tmp_path: Path, tokenizer: Any, head: str, chosen_nll: float = 0.0) -> tuple[Any, dict[str, Any]]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from reward import likelihood

    if head == "likelihood":
        model = likelihood.as_reward_model(models.load_causal_lm(_entry()), tokenizer)
    else:
        model = models.load_sequence_classifier(_entry())
        model.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=PAIRS, report_to=[], use_cpu=True, bf16=False,
                          gradient_checkpointing=False)
    trainer_class = padding_free(likelihood.with_chosen_nll(RewardTrainer, chosen_nll))
    trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(_pairs(margins=True)), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(PAIRS)])
    assert "margin" in batch and not batch["attention_mask"].all()
    return trainer, batch


@pytest.mark.parametrize("head, chosen_nll", [("classifier", 0.0), ("likelihood", 0.5)], ids=["classifier+margins", "likelihood+chosen_nll"])
def test_reward_packed_step_equals_padded(tmp_path: Path, tiny_tokenizer: Any, head: str, chosen_nll: float) -> None:
    """The score at each sequence's last token from the packed forward: the margin loss (and the chosen-NLL
    term of the likelihood head) and every gradient as the padded step's."""
    trainer, batch = _reward(tmp_path, tiny_tokenizer, head, chosen_nll)
    unpacked_class = type(trainer).__mro__[1]  # what padding_free wrapped: RewardTrainer, or its chosen-NLL subclass
    trainer.model.train()
    with _backbone_rows(trainer.model) as shapes:
        packed = _loss_and_grads(trainer.model, trainer.compute_loss, batch)
    _assert_packed_once(shapes, batch["attention_mask"])
    padded = _loss_and_grads(trainer.model, lambda model, inputs: unpacked_class.compute_loss(trainer, model, inputs), batch)
    _assert_same(packed, padded)


def test_a_pair_never_changes_another_pairs_scores(tmp_path: Path, tiny_tokenizer: Any) -> None:
    trainer, batch = _reward(tmp_path, tiny_tokenizer, "classifier")
    perturbed = batch["input_ids"].clone()
    for row in (0, PAIRS):
        length = int(batch["attention_mask"][row].sum())
        perturbed[row, length // 2 : length] = (perturbed[row, length // 2 : length] + 5) % 200 + 2

    def scores(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), trainer._packed_backbones(), _backbone_rows(trainer.model) as shapes:
            out = trainer.model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False)
        _assert_packed_once(shapes, batch["attention_mask"])
        return out.logits.squeeze(-1)  # (2 * PAIRS,)

    _assert_shares_a_row(batch["attention_mask"], (0, PAIRS))
    before, after = scores(batch["input_ids"]), scores(perturbed)
    others = [row for row in range(2 * PAIRS) if row not in (0, PAIRS)]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert (after[[0, PAIRS]] - before[[0, PAIRS]]).abs().max() > 1e-4


def test_pack_and_unpack_a_right_padded_batch() -> None:
    """Rows as wide as the longest sequence, filled longest first: [5 6 7 | 8 9 1] holds 3, then 2 and 1 tokens; the
    4th sequence (2 tokens) starts a row of its own, whose last slot is filler (position 0, a sequence of its own)."""
    input_ids = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 1, 0], [3, 2, 0]])
    attention_mask = (input_ids != 0).long()
    packed = pack(input_ids, attention_mask)
    assert packed.input_ids[:, :2].tolist() == [[5, 6], [9, 1], [3, 2]] and packed.input_ids[1, 2].item() == 8
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]
    assert packed.slots.tolist() == [0, 1, 2, 6, 7, 3, 9, 10, -1]
    hidden = torch.arange(1.0, 10.0).view(3, 3, 1)  # (rows, width, 1)
    assert unpack(hidden, packed, attention_mask)[..., 0].tolist() == [[1, 2, 3], [6, 0, 0], [4, 5, 0], [7, 8, 0]]
    one_row = pack(input_ids, attention_mask, one_row=True)
    assert one_row.input_ids.tolist() == [[5, 6, 7, 9, 1, 3, 2, 8]] and one_row.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    with pytest.raises(PackingError, match="left padding"):
        pack(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))


def test_falls_back_to_padding_when_packed_differs(tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Positions that do not restart (one long sequence: the pairs attend to each other) fail the first-batch check:
    the trainer says so and trains padded, with the padded loss."""
    from trl import DPOTrainer

    original_pack = packing.pack

    def no_restart(input_ids: torch.Tensor, attention_mask: torch.Tensor, one_row: bool = False) -> packing.PackedRows:
        packed = original_pack(input_ids, attention_mask, one_row)
        packed.position_ids = torch.arange(packed.position_ids.numel()).view(packed.position_ids.shape)
        return packed

    monkeypatch.setattr(packing, "pack", no_restart)
    trainer, batch = _dpo(tmp_path, tiny_tokenizer, ["sigmoid"])
    with _backbone_rows(trainer.model) as shapes:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert "training on padded batches instead" in capsys.readouterr().out
    assert shapes[-1] == tuple(batch["attention_mask"].shape)  # the step itself ran padded
    padded = DPOTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert abs(loss.item() - padded.item()) <= RELATIVE * abs(padded.item())


def test_padding_free_is_on_by_default_in_both_stages_and_trls_switch_is_refused() -> None:
    from stages import policy, reward_model
    from stages.core.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2]
    assert load_config(policy.PolicyStageConfig, ["--config", str(root / "configs/policy/tiny.yaml")]).padding_free
    assert load_config(reward_model.RewardStageConfig, ["--config", str(root / "configs/reward/tiny.yaml")]).padding_free
    assert not load_config(policy.PolicyStageConfig, ["--config", str(root / "configs/policy/tiny.yaml"), "padding_free=false"]).padding_free
    with pytest.raises(ConfigError, match="top-level padding_free"):
        load_config(policy.PolicyStageConfig, ["--config", str(root / "configs/policy/tiny.yaml"), "dpo.padding_free=true"])
    assert padding_free(dict, enabled=False) is dict


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
def test_packed_hidden_states_equal_padded_in_rows_and_in_one_row(one_row: bool, attention: str) -> None:
    """Both layouts (rows as wide as the longest sequence for dense masks; one row for flash attention's variable-length
    kernels, run here with sdpa and eager) give each real token the hidden state of the padded forward."""
    model = models.load_causal_lm(_entry())
    model.set_attn_implementation(attention)
    backbone = backbone_of(model).eval()
    assert backbone.config._attn_implementation == attention
    lengths = [9, 3, 17, 5, 12, 2]
    attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    input_ids = torch.randint(2, 200, attention_mask.shape, generator=torch.Generator().manual_seed(0)) * attention_mask
    with torch.no_grad():
        padded = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        packed = packing.packed_forward(backbone.forward, input_ids, attention_mask, one_row).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(packed[real], padded[real], rtol=RELATIVE, atol=1e-5)
    assert not packed[~real].any()
