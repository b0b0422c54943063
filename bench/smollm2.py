"""The real model: LoRA SFT of SmolLM2-135M-Instruct, our settings against TRL's defaults, and its MFU; the suite
also runs bench/smollm2_pairs.py's DPO and reward-model comparisons on the same model.

Arms (one epoch over the same rows: the first word-task rows of data/word_tasks_alpaca.jsonl read through the
stages' loader, SmolLM2's tokenizer and chat template, default system prompt included; the model is the
built-in's safetensors conversion under RLHF_HOME, converted on first use as the stages do):
- trl_defaults: `SFTConfig()` as shipped plus bf16=False, use_cpu=True (the CPU run's two changes), and the
  same LoRA adapters as ours (peft_config): a TRL user tuning this model passes one too.
- ours: the `train:` and `lora:` sections of configs/sft/smollm2.yaml, read at run time (padding-free rows,
  stages/data/sft_packing.py); ours+padded: the same with `padding_free: false`.
- matmul_peak: torch.mm at the shapes of one step of `ours` (see below): the MFU's denominator.

FLOPs of a LoRA step (useful work only, per real token): the frozen base matmuls run forward and input-gradient
but no weight-gradient products, so 4 x (non-embedding parameters + the tied LM head's 49,152 x 576, which is a
real product at every position), plus 6 x the adapters' parameters, plus attention's 12 x layers x hidden x T
(bench/mfu.py). The LM head is counted here, unlike bench/mfu.py's byte-level models, because at this vocabulary it
is a quarter of the model's matmul work.
"""

from __future__ import annotations

import tempfile
from typing import Any

import yaml

from bench import common, mfu
from bench.runner import Arm, Comparison

CONFIG = "sft/smollm2.yaml"
SCHEDULE_KEYS = {"num_train_epochs", "max_steps", "save_strategy", "save_steps", "save_total_limit",
                 "logging_steps", "output_dir", "report_to", "warmup_steps", "lr_scheduler_type"}


def _load() -> tuple[Any, Any]:
    from stages.core import models
    from stages.core.registry import Registry

    entry = Registry().get("smollm2-135m-instruct")
    return models.load_causal_lm(entry), models.load_tokenizer(entry)


def _rows(count: int) -> list[dict[str, Any]]:
    from stages.data import DatasetSpec, load_sft_rows

    rows = load_sft_rows(DatasetSpec(source=str(common.ROOT / "data" / "word_tasks_alpaca.jsonl"), eval_fraction=0), seed=0)
    return rows[:count]


def _settings(arm: str) -> dict[str, Any]:
    if arm == "trl_defaults":
        return {"bf16": False, "use_cpu": True}
    ours = common.stage_settings(CONFIG, "train", SCHEDULE_KEYS)
    return ours | {"padding_free": False} if arm == "ours+padded" else ours


def _lora() -> Any:
    from stages.lifecycle import LoraSection

    section = yaml.safe_load((common.ROOT / "configs" / CONFIG).read_text())["lora"]
    return LoraSection(**{key: value for key, value in section.items() if key not in {"enabled", "merge_on_save"}})


def training_flops(model: Any, counts: dict[str, int]) -> float:
    config = model.config
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    frozen = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    embedding = model.get_input_embeddings().weight.numel()
    lm_head = config.vocab_size * config.hidden_size  # tied: the embedding's data, used again as a product
    attention = 12 * config.num_hidden_layers * config.hidden_size * counts["squared_lengths"]
    return (4 * (frozen - embedding + lm_head) + 6 * adapters) * counts["real_tokens"] + attention


def _matmul_shapes(config: Any, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of one LoRA step's frozen products: forward and input-gradient of every linear layer
    and of the LM head (the adapters' rank-16 products are too small to set a peak)."""
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    kv = hidden * kv_heads // heads
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
               (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    shapes: dict[tuple[int, int, int], int] = {}
    for inputs, outputs, count in [(i, o, layers) for i, o in linears] + [(hidden, config.vocab_size, 1)]:
        for shape in ((tokens, inputs, outputs), (tokens, outputs, inputs)):
            shapes[shape] = shapes.get(shape, 0) + count
    return [(m, k, n, count) for (m, k, n), count in shapes.items()]


def _matmul_peak(params: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    from stages.core import models
    from stages.core.registry import Registry

    config = AutoConfig.from_pretrained(models.model_dir(Registry().get("smollm2-135m-instruct")))
    return mfu.matmul_peak(_matmul_shapes(config, params["tokens"]), params["seconds_per_shape"])


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: one epoch of LoRA SFT with one arm's settings; tokens/s and model FLOPs."""
    if params["arm"] == "matmul_peak":
        return _matmul_peak(params)
    from datasets import Dataset
    from trl import SFTConfig

    trainer_class, settings = common.sft_trainer_class(_settings(params["arm"]))  # as stages/sft.py builds it
    model, tokenizer = _load()
    with tempfile.TemporaryDirectory() as output_dir, common.Timer() as setup:
        args = SFTConfig(output_dir=output_dir, report_to=[], save_strategy="no", num_train_epochs=1, seed=0,
                         disable_tqdm=True, **settings)
        trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(_rows(params["examples"])),
                                processing_class=tokenizer, peft_config=_lora().peft_config("CAUSAL_LM"))
    counter = common.TokenCounter(trainer.model)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer.args.output_dir = output_dir
        with common.Timer() as timer:
            trainer.train()
    counts = counter.summary()
    flops = training_flops(trainer.model, counts)
    return {
        "amount": flops / 1e9 if params.get("as_flops") else counts["real_tokens"],  # the MFU comparison's unit: GFLOP
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "setup_seconds": setup.seconds,
        "gflops_per_second": flops / 1e9 / timer.seconds,
        "padding_waste": 1 - counts["real_tokens"] / counts["positions"],
        "optimizer_steps": trainer.state.global_step,
        "work": {"sequences": counts["sequences"], "real_tokens": counts["real_tokens"]},
        "counts": counts,
    }


def comparisons(quick: bool) -> list[Comparison]:
    from bench import smollm2_pairs  # it reads this module's SCHEDULE_KEYS

    examples = 16 if quick else 48  # ours: 3 optimizer steps of 16; TRL's default batch of 8: 6
    batch = _settings("ours")["per_device_train_batch_size"]
    arms = [Arm(name, "smollm2", {"arm": name, "examples": examples}) for name in ("trl_defaults", "ours", "ours+padded")]
    # M of the peak's products: one step of `ours` at the rows' mean length (~50 tokens with the system prompt).
    peak = Arm("matmul_peak", "smollm2", {"arm": "matmul_peak", "tokens": batch * 50, "seconds_per_shape": 0.3 if quick else 0.5})
    return [
        Comparison(title=f"SmolLM2-135M LoRA SFT, {examples} word-task rows x 1 epoch: real tokens/s",
                   arms=arms, baseline="trl_defaults", unit="tokens",
                   columns=[("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:.0f}"),
                            ("gflops_per_second", "model GFLOP/s", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]),
        Comparison(title="SmolLM2-135M LoRA SFT MFU: model GFLOP/s of `ours` over the matmul peak at its step's shapes",
                   arms=[peak, Arm("ours", "smollm2", {"arm": "ours", "examples": examples, "as_flops": True})],
                   baseline="matmul_peak", unit="GFLOP", check_work=False),
        *smollm2_pairs.comparisons(quick),  # DPO and the reward model, LoRA, pairs/s
    ]
