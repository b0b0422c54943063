"""SFT: real (non-pad) tokens/s and padding waste, our stage's settings against trl.SFTTrainer's defaults.

Arms (each one epoch over the same rows, same model init, same order seed):
- trl_defaults: `SFTConfig()` as shipped (batch 8, gradient checkpointing on, max_length 1024, no packing),
  except bf16=False and use_cpu=True, which a CPU run needs (TRL 1.16 defaults bf16 to True).
- ours: the `train:` section of configs/sft/tiny.yaml, read at run time, so the bench follows the stage.
  With its top-level `length_grouping` (stages/data/batching.py), as the stage applies it, and its padding-free
  batches (`padding_free: true`) in rows as wide as the longest sequence (stages/data/sft_packing.py).
- ours+padded, ours+one_row: the same with padded batches (`padding_free: false`), or with TRL's own padding-free
  batches (the whole batch in one row: what `padding_free` did before stages/data/sft_packing.py).
- ours+length_grouping, ours+packing: the same with length-grouped batches (`length_grouping: 4`) or TRL's BFD
  packing (which implies padding-free; its packed examples re-laid in rows like any padding-free batch).
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
    "ours+padded": lambda: our_settings() | {"padding_free": False},
    "ours+one_row": lambda: our_settings() | {"padding_free": True, "padding_free_rows": False},
}


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: train one epoch with one arm's settings and report throughput and the work done."""
    from datasets import Dataset
    from trl import SFTConfig

    # Takes length_grouping and padding_free_rows out of settings; max_length None under padding_free (every row fits).
    trainer_class, settings = common.sft_trainer_class(ARM_SETTINGS[params["arm"]]())
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
    # A user's Alpaca-format file (the variable rows, read through stages.data): what padding-free rows buy there.
    for data, examples, names in (("variable", 64 if quick else 128, list(ARM_SETTINGS)),
                                  ("uniform", 64 if quick else 96, ["trl_defaults", "ours"]),
                                  ("alpaca-file", 64 if quick else 128, ["trl_defaults", "ours", "ours+padded"])):
        arms = [Arm(name, "sft", {"arm": name, "model": "5m", "data": data, "examples": examples}) for name in names]
        result.append(Comparison(
            title=f"SFT, {data}-length data, 5m model, {examples} examples x 1 epoch",
            arms=arms, baseline="trl_defaults", unit="real tok",
            columns=[("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:d}"),
                     ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
        ))
    return result
