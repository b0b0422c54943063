"""DPO: preference pairs/s per epoch, precompute included, our stage's settings against trl.DPOTrainer's.

Arms (one epoch over the same pairs; policy and an explicit reference model, as stages/policy.py builds them):
- trl_defaults: `DPOConfig()` (batch 8, gradient checkpointing on, sigmoid loss) with bf16=False, use_cpu=True;
- ours: the `dpo:` section of configs/policy/tiny.yaml (batch 32, checkpointing off, sigmoid + SFT loss);
- ours+precompute: the same with precompute_ref_log_probs=True: one no-grad reference pass over the data in
  the trainer's constructor, then no reference forward per step.
ours and ours+precompute run padding-free pairs, as the stage does by default (`padding_free: true`,
stages/data/packing.py); ours+padded is ours with `padding_free: false` (TRL's padded batches).
Timed: constructor (tokenisation, and the precompute where on) + `trainer.train()`; both are reported.
"""

from __future__ import annotations

import tempfile
from typing import Any

from bench import common
from bench.runner import Arm, Comparison
from bench.sft import SCHEDULE_KEYS


def our_settings() -> dict[str, Any]:
    return common.stage_settings("policy/tiny.yaml", "dpo", SCHEDULE_KEYS)


ARM_SETTINGS = {
    "trl_defaults": lambda: {"bf16": False, "use_cpu": True},
    "ours": lambda: our_settings() | {"padding_free": True},  # the stage's default
    "ours+precompute": lambda: our_settings() | {"padding_free": True, "precompute_ref_log_probs": True},
    "ours+padded": lambda: our_settings() | {"padding_free": False},
}


def run(params: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    settings = ARM_SETTINGS[params["arm"]]()
    trainer_class = common.pair_trainer_class(DPOTrainer, settings)  # takes length_grouping and padding_free out of settings
    model, reference = common.causal_lm(params["model"], seed=0), common.causal_lm(params["model"], seed=0)
    rows = common.preference_rows(params["pairs"], seed=0)
    counter, embedded = common.TokenCounter(model), common.BackbonePositions(model)
    with tempfile.TemporaryDirectory() as output_dir:
        with common.Timer() as setup:
            args = DPOConfig(output_dir=output_dir, report_to=[], save_strategy="no", num_train_epochs=1, seed=0,
                             disable_tqdm=True, **settings)
            trainer = trainer_class(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=common.tokenizer())
        with common.Timer() as timer:
            trainer.train()
    counts = counter.summary()
    return {
        "amount": counts["sequences"] / 2,
        "seconds": setup.seconds + timer.seconds,
        "cpu_seconds": setup.cpu_seconds + timer.cpu_seconds,
        "setup_seconds": setup.seconds,
        "train_seconds": timer.seconds,
        "padding_waste": 1 - counts["real_tokens"] / embedded.positions,  # padding, or the packed rows' filler
        "optimizer_steps": trainer.state.global_step,
        "work": {"pairs": counts["sequences"] / 2, "real_tokens": counts["real_tokens"]},
        "counts": counts,
    }


def comparisons(quick: bool) -> list[Comparison]:
    pairs = 32 if quick else 64
    arms = [Arm(name, "dpo", {"arm": name, "model": "5m", "pairs": pairs}) for name in ARM_SETTINGS]
    return [Comparison(
        title=f"DPO, 5m model, {pairs} pairs x 1 epoch (constructor incl. precompute + train)", arms=arms,
        baseline="trl_defaults", unit="pairs",
        columns=[("setup_seconds", "setup s", "{:.1f}"), ("train_seconds", "train s", "{:.1f}"),
                 ("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:d}"),
                 ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
    )]
