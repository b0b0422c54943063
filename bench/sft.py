"""SFT: real (non-pad) tokens/s and padding waste, our stage's settings against trl.SFTTrainer's defaults.

Arms (each one epoch over the same rows, same model init, same order seed):
- trl_defaults: `SFTConfig()` as shipped (batch 8, gradient checkpointing on, max_length 1024, no packing),
  except bf16=False and use_cpu=True, which a CPU run needs (TRL 1.16 defaults bf16 to True).
- ours: the `train:` section of configs/sft/tiny.yaml, read at run time, so the bench follows the stage.
  With its top-level `length_grouping` (stages/data/batching.py), as the stage applies it.
- ours+length_grouping, ours+packing, ours+padding_free: the same with length-grouped batches
  (`length_grouping: 4`), TRL's BFD packing (which implies padding-free) or padding-free batches alone.
The datasets come from bench/common.py: "variable" (16 to 122 tokens, mean 49, skewed short), "uniform" (60 each), and
"alpaca-file" (the variable rows as a user's Alpaca-format file, read through the stages' loader).
Timed: `trainer.train()` only; the dataset preparation in the constructor is reported as setup_seconds.
"""

from __future__ import annotations

import tempfile
from typing import Any

from bench import common
from bench.runner import Arm, Comparison

SCHEDULE_KEYS = {"num_train_epochs", "max_steps", "save_strategy", "save_steps", "save_total_limit",
                 "logging_steps", "output_dir", "report_to"}  # set equal for every arm, below


def our_settings() -> dict[str, Any]:
    """configs/sft/tiny.yaml's TRL section, without its schedule and I/O keys, plus what stages.trainers.trl_args adds."""
    return common.stage_settings("sft/tiny.yaml", "train", SCHEDULE_KEYS)


def trl_default_settings() -> dict[str, Any]:
    return {"bf16": False, "use_cpu": True}  # the only changes to TRL's defaults: CPU, fp32


ARM_SETTINGS = {
    "trl_defaults": trl_default_settings,
    "ours": our_settings,
    # Ours with length-grouped batches (stages/data/batching.py, groups of 4 batches): what the sampler buys.
    "ours+length_grouping": lambda: our_settings() | {"length_grouping": 4},
    "ours+packing": lambda: our_settings() | {"packing": True},
    # padding-free without packing leaves max_length unenforced: TRL requires max_length=None (every row fits).
    "ours+padding_free": lambda: our_settings() | {"padding_free": True, "max_length": None},
}


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: train one epoch with one arm's settings and report throughput and the work done."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings = ARM_SETTINGS[params["arm"]]()
    trainer_class = common.trainer_class(SFTTrainer, settings)  # takes length_grouping out of settings
    model = common.causal_lm(params["model"], seed=0)
    rows = common.alpaca_file_rows(params["examples"]) if params["data"] == "alpaca-file" else common.sft_rows(params["data"], params["examples"], seed=0)
    with tempfile.TemporaryDirectory() as output_dir, common.Timer() as setup:
        args = SFTConfig(output_dir=output_dir, report_to=[], save_strategy="no", num_train_epochs=1, seed=0,
                         disable_tqdm=True, **settings)
        trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=common.tokenizer())
    counter = common.TokenCounter(model)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer.args.output_dir = output_dir
        with common.Timer() as timer:
            trainer.train()
    counts = counter.summary()
    return {
        "amount": counts["real_tokens"],
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "setup_seconds": setup.seconds,
        "padding_waste": 1 - counts["real_tokens"] / counts["positions"],
        "optimizer_steps": trainer.state.global_step,
        "settings": {key: settings.get(key, getattr(args, key)) for key in
                     ("per_device_train_batch_size", "gradient_checkpointing", "max_length", "packing", "padding_free")},
        "work": {"sequences": counts["sequences"], "real_tokens": counts["real_tokens"]},
        "counts": counts,
        "parameters": common.parameter_counts(model),
    }


def comparisons(quick: bool) -> list[Comparison]:
    result = []
    # Uniform data has no padding to remove: it shows what our settings gain without it.
    # A user's Alpaca-format file (the variable rows, read through stages.data): what padding-free batches buy there.
    for data, examples, names in (("variable", 64 if quick else 128, list(ARM_SETTINGS)),
                                  ("uniform", 64 if quick else 96, ["trl_defaults", "ours"]),
                                  ("alpaca-file", 64 if quick else 128, ["trl_defaults", "ours", "ours+padding_free"])):
        arms = [Arm(name, "sft", {"arm": name, "model": "5m", "data": data, "examples": examples}) for name in names]
        result.append(Comparison(
            title=f"SFT, {data}-length data, 5m model, {examples} examples x 1 epoch",
            arms=arms, baseline="trl_defaults", unit="real tok",
            columns=[("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:d}"),
                     ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
        ))
    return result
