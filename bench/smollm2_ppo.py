"""The real model online: one PPO step of ours on SmolLM2-135M-Instruct split into generation, scoring and
training, next to TRL 1.16's GRPO at the same episodes (`python -m bench smollm2-ppo`).

Work of every arm: the first `steps x BATCH` prompts of data/instructions/train.jsonl (the instruction-following
recipe's own prompts, SmolLM2's chat template), sampled at temperature 0.7 up to RESPONSE_LENGTH tokens (stopping at
`<|im_end|>`), LoRA adapters on the actor (the `lora:` section of configs/policy/smollm2_if.yaml), PPO_EPOCHS passes
over each batch in mini-batches of MINI_BATCH, fp32, nothing saved. The reward is a cheap function of the text (the
share of lowercase letters: the checkers' own cost is milliseconds, and random weights do not matter for speed).
- ours: stages/ppo/ with the recipe's PPO settings (the `ppo:` section of that config: critic from the same model with
  a fresh value head, trained in full; reference = the actor with its adapters off; rollout through the shared
  continuous-batching loop);
- trl_grpo: TRL 1.16's GRPOTrainer as the policy stage builds it (the `grpo:` section: num_generations 2, beta 0.04,
  so a reference forward too), the same episodes (BATCH completions a generation), num_iterations = PPO_EPOCHS. No
  critic and half the prompts (two completions each): not the same work, so the table prints no ratio.
Timed: `trainer.train()`. The split of ours: its time/generation, time/scoring, time/training metrics.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import yaml

from bench import common
from bench.runner import Arm, Comparison

CONFIG = "policy/smollm2_if.yaml"
BATCH, MINI_BATCH, PPO_EPOCHS, RESPONSE_LENGTH, TEMPERATURE = 8, 4, 2, 96, 0.7


def _prompts(count: int) -> list[list[dict[str, str]]]:
    lines = (common.ROOT / "data" / "instructions" / "train.jsonl").read_text().splitlines()[:count]
    return [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in lines]


def _lowercase_share(responses: list[str]) -> list[float]:
    return [sum(character.islower() for character in text) / max(len(text), 1) for text in responses]


def _lowercase_reward(completions: list[Any], **_: Any) -> list[float]:
    """TRL's reward-function signature (keyword arguments; plain-text completions or chat messages)."""
    return _lowercase_share([c if isinstance(c, str) else c[-1]["content"] for c in completions])


def _section(name: str) -> dict[str, Any]:
    return yaml.safe_load((common.ROOT / "configs" / CONFIG).read_text())[name]


def _lora() -> Any:
    from stages.lifecycle import LoraSection

    section = _section("lora")
    return LoraSection(**{key: value for key, value in section.items() if key not in {"enabled", "merge_on_save"}})


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: `steps` steps of one arm; episodes/s and, for ours, the split of the time."""
    from stages.core import models
    from stages.core.registry import Registry

    entry = Registry().get("smollm2-135m-instruct")
    tokenizer = models.load_tokenizer(entry)
    prompts = _prompts(params["steps"] * BATCH)
    work = {"episodes": params["steps"] * BATCH, "max_response_tokens": params["response_length"], "steps": params["steps"]}
    if params["arm"] == "ours":
        return _run_ours(params, entry, tokenizer, prompts) | {"work": work}
    return _run_grpo(params, entry, tokenizer, prompts) | {"work": work}


def _run_ours(params: dict[str, Any], entry: Any, tokenizer: Any, prompts: list[Any]) -> dict[str, Any]:
    from peft import get_peft_model

    from stages.core import models
    from stages.ppo import PPOConfig, PPOTrainer

    actor = get_peft_model(models.load_causal_lm(entry), _lora().peft_config("CAUSAL_LM"))
    critic = models.load_sequence_classifier(entry)
    section = {key: value for key, value in _section("ppo").items() if key not in {"save_steps"}}
    config = PPOConfig(**section | {"num_steps": params["steps"], "batch_size": BATCH, "mini_batch_size": MINI_BATCH,
                                    "ppo_epochs": PPO_EPOCHS, "max_new_tokens": params["response_length"], "temperature": TEMPERATURE,
                                    "save_steps": None, "sample_table_every": None, "seed": 0})
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = PPOTrainer(actor, None, None, critic, tokenizer, prompts, config, output_dir,
                             reward_fn=lambda prompts, responses: _lowercase_share(responses))
        trainer._save_checkpoint = lambda step: None  # no checkpoint I/O, as TRL's arm
        with common.Timer() as timer:
            history = trainer.train()
    split = {name: sum(metrics[f"time/{name}"] for metrics in history) for name in ("generation", "scoring", "training")}
    other = max(0.0, timer.seconds - sum(split.values()))
    return {
        "amount": len(history) * BATCH, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
        **{f"{name}_share": seconds / timer.seconds for name, seconds in (split | {"other": other}).items()},
        "seconds_per_step": timer.seconds / len(history),
        "response_length": sum(metrics["ppo/response_length"] for metrics in history) / len(history),
    }


def _run_grpo(params: dict[str, Any], entry: Any, tokenizer: Any, prompts: list[Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stages.core import models

    section = _section("grpo")
    generations = section["num_generations"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = GRPOConfig(
            output_dir=output_dir, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, bf16=False, use_cpu=True,
            gradient_checkpointing=False, per_device_train_batch_size=MINI_BATCH, steps_per_generation=BATCH // MINI_BATCH,
            num_generations=generations, num_iterations=PPO_EPOCHS, max_completion_length=params["response_length"],
            temperature=TEMPERATURE, beta=section["beta"], learning_rate=section["learning_rate"],
            max_steps=params["steps"] * PPO_EPOCHS * (BATCH // MINI_BATCH), logging_steps=1_000_000,
        )
        trainer = GRPOTrainer(model=models.load_causal_lm(entry), reward_funcs=[_lowercase_reward], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts[: len(prompts) // generations]]),
                              processing_class=tokenizer, peft_config=_lora().peft_config("CAUSAL_LM"))
        with common.Timer() as timer:
            trainer.train()
    return {"amount": params["steps"] * BATCH, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
            "seconds_per_step": timer.seconds / params["steps"]}


def comparisons(quick: bool) -> list[Comparison]:
    # One step is minutes on this CPU (2026-12-06, loaded: ours 354 s, TRL's GRPO 220 s for 8 episodes of <= 96 tokens).
    steps = 1
    params = {"steps": steps, "response_length": 24 if quick else RESPONSE_LENGTH}
    columns = [("seconds_per_step", "s / step", "{:.1f}"), ("generation_share", "generation", "{:.0%}"),
               ("scoring_share", "scoring", "{:.0%}"), ("training_share", "training", "{:.0%}"),
               ("other_share", "other", "{:.0%}"), ("response_length", "resp. len", "{:.1f}"),
               ("peak_rss_mb", "peak RSS MB", "{:.0f}")]
    return [Comparison(
        title=(f"SmolLM2-135M online RL, LoRA, {steps} step x {BATCH} episodes, responses <= {params['response_length']}, "
               f"{PPO_EPOCHS} epochs x {BATCH // MINI_BATCH} mini-batches: our PPO's split; TRL GRPO at the same episodes "
               "(no critic: not the same work)"),
        arms=[Arm(name, "smollm2_ppo", params | {"arm": name}) for name in ("ours", "trl_grpo")],
        baseline=None, unit="episodes", columns=columns, check_work=False, rate_format="{:.3f}",
    )]
