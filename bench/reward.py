"""Reward model: preference pairs/s, our stage's settings against trl.RewardTrainer's defaults.

Arms (one epoch over the same pairs, same init): trl_defaults = `RewardConfig()` (batch 8, gradient
checkpointing on) with bf16=False and use_cpu=True; ours = the `train:` section of configs/reward/tiny.yaml
(batch 32, checkpointing off). Both arms train the classifier head: this compares trainer settings, not
the config's `head: likelihood` (reward/likelihood.py). ours runs padding-free pairs, as the stage does by default
(`padding_free: true`, stages/data/packing.py); ours+padded is ours with `padding_free: false`.
Timed: `trainer.train()`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from bench import common
from bench.runner import Arm, Comparison
from bench.sft import SCHEDULE_KEYS


def our_settings() -> dict[str, Any]:
    return common.stage_settings("reward/tiny.yaml", "train", SCHEDULE_KEYS)


ARM_SETTINGS = {
    "trl_defaults": lambda: {"bf16": False, "use_cpu": True},
    "ours": lambda: our_settings() | {"padding_free": True},  # the stage's default
    "ours+padded": lambda: our_settings() | {"padding_free": False},
}


def run(params: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    settings = ARM_SETTINGS[params["arm"]]()
    trainer_class = common.pair_trainer_class(RewardTrainer, settings)  # takes length_grouping and padding_free out of settings
    model = common.classifier(params["model"], seed=0)
    tokenizer = common.tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token (as the stage does)
    rows = common.preference_rows(params["pairs"], seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        with common.Timer() as setup:
            args = RewardConfig(output_dir=output_dir, report_to=[], save_strategy="no", num_train_epochs=1, seed=0,
                                disable_tqdm=True, **settings)
            trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        counter, embedded = common.TokenCounter(model), common.BackbonePositions(model)
        with common.Timer() as timer:
            trainer.train()
    counts = counter.summary()
    return {
        "amount": counts["sequences"] / 2,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "setup_seconds": setup.seconds,
        "padding_waste": 1 - counts["real_tokens"] / embedded.positions,  # padding, or the packed rows' filler
        "optimizer_steps": trainer.state.global_step,
        "work": {"pairs": counts["sequences"] / 2, "real_tokens": counts["real_tokens"]},
        "counts": counts,
    }


def comparisons(quick: bool) -> list[Comparison]:
    pairs = 64 if quick else 96
    arms = [Arm(name, "reward", {"arm": name, "model": "5m", "pairs": pairs}) for name in ARM_SETTINGS]
    return [Comparison(
        title=f"Reward model, 5m model, {pairs} pairs x 1 epoch", arms=arms, baseline="trl_defaults", unit="pairs",
        columns=[("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:d}"),
                 ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
    )]
