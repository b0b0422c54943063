"""Length-bucketed sampling (stages/batching.py): a permutation per epoch, less padding than random
batches, batch order not sorted by length, reproducible from (seed, epoch) alone, and wired into the
TRL trainers by `length_grouping`."""

from __future__ import annotations

import random

import torch
from datasets import Dataset

from stages.data.batching import LengthBucketSampler, length_grouped, row_lengths


def _lengths(count: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(16, 122) for _ in range(count)]


def _padding(order: list[int], lengths: list[int], batch_size: int) -> float:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / padded


def test_each_epoch_is_a_permutation_with_the_short_batch_last() -> None:
    lengths = _lengths(1000)  # 1000 = 31 batches of 32 + 8
    sampler = LengthBucketSampler(lengths, batch_size=32, group_batches=4, seed=1)
    order = sampler.indices()
    assert sorted(order) == list(range(1000)) and len(sampler) == 1000
    # Every full batch is one sorted slice of a group (a short batch in the middle would shift them all):
    # a slice of a sorted 128-row group spans about a quarter of the 16-122 range, a random batch nearly all of it.
    spreads = [max(lengths[i] for i in order[b : b + 32]) - min(lengths[i] for i in order[b : b + 32]) for b in range(0, 992, 32)]
    assert sum(spreads) / len(spreads) < 45, spreads


def test_less_padding_than_random_batches() -> None:
    lengths = _lengths(2048)
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    bucketed = LengthBucketSampler(lengths, batch_size=32, group_batches=4, seed=0).indices()
    assert _padding(bucketed, lengths, 32) < 0.5 * _padding(random_order, lengths, 32)


def test_batch_order_is_shuffled_not_sorted_by_length() -> None:
    lengths = _lengths(3200)
    order = LengthBucketSampler(lengths, batch_size=32, group_batches=8, seed=0).indices()
    means = [sum(lengths[i] for i in order[b : b + 32]) / 32 for b in range(0, len(order), 32)]
    ranks = torch.tensor(means).argsort().argsort().float()
    position = torch.arange(len(means)).float()
    correlation = torch.corrcoef(torch.stack([ranks, position]))[0, 1].item()
    assert abs(correlation) < 0.25, correlation
    # Consecutive batches are not neighbours in length either (group_by_length walks long -> short).
    steps = [abs(a - b) for a, b in zip(means, means[1:])]
    assert sum(steps) / len(steps) > 10


def test_order_depends_on_seed_and_epoch_only() -> None:
    lengths = _lengths(500)
    sampler = LengthBucketSampler(lengths, 16, 4, seed=7)
    torch.manual_seed(123)
    first = sampler.indices()
    torch.manual_seed(456)  # the global RNG must not matter (resume restores a different state)
    assert sampler.indices() == first
    sampler.set_epoch(1)
    assert sampler.indices() != first
    assert LengthBucketSampler(lengths, 16, 4, seed=8).indices() != first


def test_row_lengths_of_sft_and_pair_datasets() -> None:
    sft = Dataset.from_dict({"input_ids": [[1, 2, 3], [1]]})
    pairs = Dataset.from_dict({"prompt_ids": [[1, 2], [1]], "chosen_ids": [[3], [4, 5, 6]], "rejected_ids": [[3, 4, 5], [6]]})
    reward = Dataset.from_dict({"chosen_ids": [[1, 2], [1]], "rejected_ids": [[1], [1, 2, 3]]})
    assert row_lengths(sft) == [3, 1]
    assert row_lengths(pairs) == [5, 4]
    assert row_lengths(reward) == [2, 3]


def test_length_grouped_trainer_uses_the_sampler(tiny_tokenizer, tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    from stages.core import models
    from stages.core.registry import Registry

    tokenizer, model = tiny_tokenizer, models.load_causal_lm(Registry().get("tiny-llama"))
    rows = [{"prompt": [{"role": "user", "content": "x" * n}], "completion": [{"role": "assistant", "content": "y"}]} for n in range(5, 69)]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, report_to=[], bf16=False, seed=3)
    assert length_grouped(SFTTrainer, 0) is SFTTrainer
    trainer = length_grouped(SFTTrainer, 2)(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthBucketSampler) and sampler.seed == 3 and sampler.batch_size == 8
    _assert_less_padding_than_random(sampler.indices(), row_lengths(trainer.train_dataset))


def test_length_grouped_reward_trainer_reads_trls_own_pair_columns(tiny_tokenizer, tmp_path) -> None:
    """On the dataset RewardTrainer itself tokenized (not hand-named columns): the sampler finds the lengths."""
    from trl import RewardConfig, RewardTrainer

    from stages.core import models
    from stages.core.registry import Registry

    model = models.load_sequence_classifier(Registry().get("tiny-llama"))
    rows = [
        {"prompt": [{"role": "user", "content": "x" * n}], "chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "zz"}]}
        for n in range(5, 69)
    ]
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, report_to=[], bf16=False, seed=3)
    trainer = length_grouped(RewardTrainer, 2)(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    lengths = row_lengths(trainer.train_dataset)
    assert lengths == sorted(lengths) and lengths[-1] - lengths[0] == 63  # one more prompt character per row
    _assert_less_padding_than_random(trainer._get_train_sampler().indices(), lengths)


def _assert_less_padding_than_random(order: list[int], lengths: list[int]) -> None:
    """Batches of 8 in `order` carry under 0.7x the padding of batches of 8 in a random order."""
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert _padding(order, lengths, 8) < 0.7 * _padding(random_order, lengths, 8)
