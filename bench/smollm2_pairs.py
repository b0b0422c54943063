"""The real model's preference stages: DPO and the reward model on SmolLM2-135M-Instruct with LoRA, pairs/s, our
settings (padding-free pairs as shipped) against TRL's defaults. Part of the `smollm2` suite (bench/smollm2.py).

Arms (one epoch over the same pairs, the same LoRA adapters: the `lora:` section of the stage's SmolLM2 config; the
model is the built-in's safetensors conversion, as in bench/smollm2.py):
- trl_defaults: `DPOConfig()` / `RewardConfig()` as TRL ships them plus bf16=False, use_cpu=True (the byte-level
  suites' definition), with the same adapters (peft_config);
- ours: the `dpo:` section of configs/policy/smollm2.yaml / the `train:` section of configs/reward/smollm2.yaml,
  read at run time (schedule and I/O keys dropped), and the config's top-level `padding_free` (absent there: the
  stage's default, on): each batch's sequences packed without padding (stages/data/packing.py);
- ours+padded: ours with `padding_free: false` (TRL's padded batches).
DPO is built as the policy stage builds it with LoRA (no reference model: TRL's reference is the policy with its
adapters off) and times constructor + train, as bench/dpo.py does. The reward arms train the classifier head (LoRA on
the backbone, the score layer in full, as the stage's `head: classifier`): they compare trainer settings, not the
shipped config's `head: likelihood`, as bench/reward.py does; timed: `trainer.train()`.

Pairs (`preference_pairs`): variable-length, from the repository's two real sources for this model, alternately
- a word task of data/word_tasks_alpaca.jsonl (the SmolLM2 recipe's kind of task) read through the SFT stage's
  loader: its answer chosen, the next row's answer rejected;
- an instruction-following prompt of data/instructions/train.jsonl (a task and 1-3 constraints) read through the
  prompt loader; the reply is a stand-in of real text (the repository has no answers to these prompts, and what
  the words say does not change the work): the next prompt's task sentence, chosen in full, rejected cut to its
  first half of words.
SmolLM2's chat template adds its default system prompt (32 tokens with the turn markers). Only pairs whose both
sequences fit the shipped configs' max_length (96) are kept, so no arm truncates or drops a pair and TRL's
max_length of 1024 changes nothing: 43-95 tokens a sequence, mean 57-58 at the bench's sizes. Padded batches of
16 pairs are 34-39% padding; packed, the reward comparison's two batches 24% filler, DPO's one batch still 34%:
in rows as wide as the batch's longest sequence (stages/data/packing.py, sdpa on CPU) two sequences share a row
only when their lengths add up to at most that, and the system prompt puts every sequence over 40 tokens. Either
source alone would pack nothing (word tasks alone: 43-52 tokens, 7% padding; instruction prompts: 52-96, 19%).
"""

from __future__ import annotations

import tempfile
from dataclasses import fields
from typing import Any

import yaml

from bench import common
from bench.runner import Arm, Comparison
from bench.smollm2 import SCHEDULE_KEYS

DPO_CONFIG, REWARD_CONFIG = "policy/smollm2.yaml", "reward/smollm2.yaml"
WORD_TASKS = common.ROOT / "data" / "word_tasks_alpaca.jsonl"
INSTRUCTIONS = common.ROOT / "data" / "instructions" / "train.jsonl"
ARMS = ("trl_defaults", "ours", "ours+padded")


def _shipped(config: str) -> dict[str, Any]:
    return yaml.safe_load((common.ROOT / "configs" / config).read_text())


def _settings(stage: str, arm: str) -> dict[str, Any]:
    """The TRL arguments of one arm, plus `length_grouping` and `padding_free` (ours, popped by pair_trainer_class)."""
    if arm == "trl_defaults":
        return {"bf16": False, "use_cpu": True}
    config, section = (DPO_CONFIG, "dpo") if stage == "dpo" else (REWARD_CONFIG, "train")
    padding_free = _shipped(config).get("padding_free", _stage_default(stage, "padding_free")) and arm == "ours"
    return common.stage_settings(config, section, SCHEDULE_KEYS) | {"padding_free": padding_free}


def _stage_default(stage: str, name: str) -> Any:
    """A field's default in the stage's config class: what a config that leaves the key out gets."""
    if stage == "dpo":
        from stages.policy import PolicyStageConfig as config_class
    else:
        from stages.reward_model import RewardStageConfig as config_class
    return next(field.default for field in fields(config_class) if field.name == name)


def _lora(stage: str) -> Any:
    from stages.lifecycle import LoraSection

    section = _shipped(DPO_CONFIG if stage == "dpo" else REWARD_CONFIG)["lora"]
    lora = LoraSection(**{key: value for key, value in section.items() if key not in {"enabled", "merge_on_save"}})
    # As the stages build them: the policy's adapters on the causal LM; the reward classifier's score layer in full.
    return lora.peft_config("CAUSAL_LM") if stage == "dpo" else lora.peft_config("SEQ_CLS", modules_to_save=["score"])


def max_length() -> int:
    """The shorter of the two shipped configs' max_length: pairs longer than that would be truncated by ours only."""
    return min(_settings("dpo", "ours")["max_length"], _settings("reward", "ours")["max_length"])


def preference_pairs(tokenizer: Any, count: int) -> list[dict[str, Any]]:
    """`count` conversational prompt/chosen/rejected pairs, alternately a word task and an instruction-following
    prompt (see the module docstring), each sequence at most `max_length()` tokens under the chat template."""
    limit, pairs = max_length(), []
    for pair in (pair for both in zip(_word_task_pairs(), _instruction_pairs()) for pair in both):
        lengths = [len(tokenizer.apply_chat_template(pair["prompt"] + pair[side], return_dict=True)["input_ids"])
                   for side in ("chosen", "rejected")]
        if max(lengths) <= limit:
            pairs.append(pair)
        if len(pairs) == count:
            return pairs
    raise ValueError(f"only {len(pairs)} pairs of at most {limit} tokens; {count} asked")


def _word_task_pairs() -> list[dict[str, Any]]:
    """data/word_tasks_alpaca.jsonl through the SFT stage's loader: the row's answer over the next row's."""
    from stages.data import DatasetSpec, load_sft_rows

    rows = load_sft_rows(DatasetSpec(source=str(WORD_TASKS), eval_fraction=0), seed=0)
    pairs = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": following["completion"]}
             for row, following in zip(rows, rows[1:] + rows[:1])]
    return [pair for pair in pairs if pair["chosen"] != pair["rejected"]]


def _instruction_pairs() -> list[dict[str, Any]]:
    """data/instructions/train.jsonl through the prompt loader; as the reply, the next prompt's task sentence in full
    (chosen) and cut to its first half of words (rejected)."""
    from stages.data import DatasetSpec
    from stages.data.prompts import load_prompt_rows

    rows = load_prompt_rows(DatasetSpec(source=str(INSTRUCTIONS), eval_fraction=0), seed=0, count=None)
    pairs = []
    for row, following in zip(rows, rows[1:] + rows[:1]):
        words = following["prompt"][-1]["content"].split("\n\n")[0].split()
        if len(words) > 1:
            pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": " ".join(words)}],
                          "rejected": [{"role": "assistant", "content": " ".join(words[: len(words) // 2])}]})
    return pairs


def _entry() -> Any:
    from stages.core.registry import Registry

    return Registry().get("smollm2-135m-instruct")


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: one epoch of DPO or reward-model training with one arm's settings; pairs/s."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from stages.core import models

    stage, settings = params["stage"], _settings(params["stage"], params["arm"])
    entry = _entry()
    tokenizer = models.load_tokenizer(entry)
    dataset = Dataset.from_list(preference_pairs(tokenizer, params["pairs"]))
    torch.manual_seed(0)  # the classifier's new score layer and the adapters: the same start in every arm
    if stage == "dpo":
        trl_class, config_class, model = DPOTrainer, DPOConfig, models.load_causal_lm(entry)
    else:
        trl_class, config_class, model = RewardTrainer, RewardConfig, models.load_sequence_classifier(entry)
        model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token (as the stage does)
    trainer_class = common.pair_trainer_class(trl_class, settings)  # takes length_grouping and padding_free out of settings
    with tempfile.TemporaryDirectory() as output_dir:
        with common.Timer() as setup:
            args = config_class(output_dir=output_dir, report_to=[], save_strategy="no", num_train_epochs=1, seed=0,
                                disable_tqdm=True, **settings)
            trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=_lora(stage))
        # On the trained (PEFT) model, after the constructor: only training forwards count (see TokenCounter).
        counter, embedded = common.TokenCounter(trainer.model), common.BackbonePositions(trainer.model)
        with common.Timer() as timer:
            trainer.train()
    counts = counter.summary()
    timed = [setup, timer] if stage == "dpo" else [timer]  # DPO: constructor (tokenisation) + train, as bench/dpo.py
    return {
        "amount": counts["sequences"] / 2,
        "seconds": sum(clock.seconds for clock in timed),
        "cpu_seconds": sum(clock.cpu_seconds for clock in timed),
        "setup_seconds": setup.seconds,
        "train_seconds": timer.seconds,
        "padding_waste": 1 - counts["real_tokens"] / embedded.positions,  # padding, or the packed rows' filler
        "optimizer_steps": trainer.state.global_step,
        # padding_free arms: whether it fell back to padded batches (the first-batch check, stages/data/packing.py)
        "padding_free_fell_back": getattr(trainer, "_padding_free_off", None),
        "work": {"pairs": counts["sequences"] / 2, "real_tokens": counts["real_tokens"]},
        "counts": counts,
    }


def comparisons(quick: bool) -> list[Comparison]:
    # Full batches of ours (16): DPO one step of ours, two of TRL's default 8; reward two and four. ~45-65 CPU-s an
    # arm on this machine (bench/README.md); --quick: one batch of 8 in every arm.
    sizes = {"dpo": 8 if quick else 16, "reward": 8 if quick else 32}
    columns = [("padding_waste", "pad waste", "{:.0%}"), ("optimizer_steps", "steps", "{:d}"), ("cpu_seconds", "CPU s", "{:.0f}"),
               ("peak_rss_mb", "peak RSS MB", "{:.0f}")]
    timing = [("setup_seconds", "setup s", "{:.1f}"), ("train_seconds", "train s", "{:.1f}")]
    titles = {"dpo": "SmolLM2-135M LoRA DPO, {} pairs x 1 epoch (constructor + train): pairs/s",
              "reward": "SmolLM2-135M LoRA reward model, {} pairs x 1 epoch: pairs/s"}
    return [Comparison(title=titles[stage].format(pairs), baseline="trl_defaults", unit="pairs",
                       arms=[Arm(arm, "smollm2_pairs", {"stage": stage, "arm": arm, "pairs": pairs}) for arm in ARMS],
                       columns=(timing if stage == "dpo" else []) + columns, rate_format="{:.3f}")
            for stage, pairs in sizes.items()]
