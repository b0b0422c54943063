"""PPO: episodes/s and the generation / scoring / training split, our stages/ppo/ against TRL 1.11's PPOTrainer.

Same work in every PPO arm: the same models (policy and reference from one init, reward model and critic
random sequence classifiers), the same prompts, `steps` PPO steps of 64 episodes, responses of at most 10
tokens (stopping at eos; random weights seldom sample it), 4 PPO epochs x 4 mini-batches of 16, fp32, no
checkpoints written, no sample generations. The setting of the project's first PPO speed anchor (TRL 1.11, 0.67 M model).
- ours: stages/ppo/ (PPOTrainer) with that PPOConfig;
- trl111: trl.experimental.ppo.PPOTrainer 1.11 (bench/.venv-trl111) with its defaults, except the shape above,
  bf16=False/use_cpu=True (CPU), num_sample_generations=0 (no extra generation), stop_token="eos" (as ours);
- trl111_no_gc: the same with gradient checkpointing off, as ours (TRL 1.11's PPOConfig turns it on).
For reference (not the same work: no critic, group sampling), TRL 1.16's GRPO and RLOO on the same prompts,
model and reward model, 64 completions (8 prompts x 8) per generation, 4 iterations x 4 steps of 16.
Timed: `trainer.train()`; the split: our trainer's time/* metrics; for TRL, its batch_generation (generation)
and the no-grad forwards that follow (scoring), the rest being training.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.runner import Arm, Comparison

BATCH, MINI_BATCH, PPO_EPOCHS, RESPONSE_LENGTH, PROMPTS = 64, 16, 4, 10, 512


def _models(size: str) -> tuple[Any, Any, Any, Any]:
    actor, reference = common.causal_lm(size, seed=0), common.causal_lm(size, seed=0)
    return actor, reference, common.classifier(size, seed=1), common.classifier(size, seed=2)


def run(params: dict[str, Any]) -> dict[str, Any]:
    if params["arm"] == "ours":
        return _run_ours(params)
    return _run_group_relative(params)


def _run_ours(params: dict[str, Any]) -> dict[str, Any]:
    if params.get("source"):  # an earlier revision's stages/ and reward/ (--ppo-before REVISION): before/after in one run
        # The arm is a forked child: dropping our packages and importing the old tree in their place touches
        # nothing outside this process. `stages.ppo` is a module before the layout change and a package after.
        for name in [name for name in sys.modules if name.split(".")[0] in ("stages", "reward")]:
            del sys.modules[name]
        sys.path.insert(0, params["source"])
    from stages.ppo import PPOConfig, PPOTrainer

    actor, reference, reward_model, critic = _models(params["model"])
    tokenizer = common.tokenizer()
    config = PPOConfig(num_steps=params["steps"], batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=PPO_EPOCHS,
                       max_new_tokens=RESPONSE_LENGTH, temperature=1.0, save_steps=None, sample_table_every=None, seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = PPOTrainer(actor, reference, reward_model, critic, tokenizer, common.prompts(PROMPTS), config, output_dir)
        trainer._save_checkpoint = lambda step: None  # no checkpoint I/O: TRL's arms write none either
        with common.Timer() as timer:
            history = trainer.train()
    split = {name: sum(metrics[f"time/{name}"] for metrics in history) for name in ("generation", "scoring", "training")}
    episodes = len(history) * BATCH
    return {
        "amount": episodes,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        **_shares(split, timer.seconds),
        "response_length": sum(metrics["ppo/response_length"] for metrics in history) / len(history),
        "first_step_seconds": BATCH / history[0]["ppo/episodes_per_second"],
        "work": _work(params, len(history)),
    }


def _shares(split: dict[str, float], total: float) -> dict[str, float]:
    other = max(0.0, total - sum(split.values()))
    return {f"{name}_share": seconds / total for name, seconds in (split | {"other": other}).items()}


def _work(params: dict[str, Any], steps: int) -> dict[str, Any]:
    return {"episodes": steps * BATCH, "steps": steps, "max_response_tokens": RESPONSE_LENGTH,
            "optimizer_steps_per_model": steps * PPO_EPOCHS * (BATCH // MINI_BATCH), "model": params["model"]}


def _run_group_relative(params: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.16 GRPO or RLOO, shaped like the PPO arms (reference numbers, not the same work)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if params["arm"] == "trl_grpo" else (RLOOConfig, RLOOTrainer)
    actor, _, reward_model, _ = _models(params["model"])
    tokenizer = common.tokenizer()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as output_dir:
        args = config_class(
            output_dir=output_dir, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, bf16=False, use_cpu=True,
            gradient_checkpointing=False, per_device_train_batch_size=MINI_BATCH, steps_per_generation=BATCH // MINI_BATCH,
            num_generations=8, num_iterations=PPO_EPOCHS, max_completion_length=RESPONSE_LENGTH, temperature=1.0,
            max_steps=params["steps"] * PPO_EPOCHS * (BATCH // MINI_BATCH), logging_steps=1_000_000,
        )
        # A saved model, as the stage passes: RLOO (beta 0.05 by default) loads its reference from the model's path.
        actor.save_pretrained(f"{output_dir}/actor")
        trainer = trainer_class(model=f"{output_dir}/actor", reward_funcs=[reward_model], args=args,
                                train_dataset=Dataset.from_list([{"prompt": p} for p in common.prompts(PROMPTS)]),
                                processing_class=tokenizer, reward_processing_classes=[tokenizer])
        with common.Timer() as timer:
            trainer.train()
    return {"amount": params["steps"] * BATCH, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds,
            "work": _work(params, params["steps"]), "beta": args.beta}


def _source_at(revision: str) -> str:
    """The `stages/` and `reward/` packages as they were at a git revision, extracted into a temporary folder."""
    import io
    import subprocess
    import tarfile

    archive = subprocess.run(["git", "archive", revision, "stages", "reward"], cwd=common.ROOT, check=True, capture_output=True).stdout
    directory = Path(tempfile.mkdtemp(prefix=f"bench_ppo_{revision.replace('/', '_')}_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    return str(directory)


def comparisons(quick: bool, before: str | None = None, models: list[str] | None = None) -> list[Comparison]:
    from bench import trl111_env

    steps = 2 if quick else 3
    python = str(trl111_env.ensure())
    columns = [("generation_share", "generation", "{:.0%}"), ("scoring_share", "scoring", "{:.0%}"),
               ("training_share", "training", "{:.0%}"), ("response_length", "resp. len", "{:.1f}"),
               ("peak_rss_mb", "peak RSS MB", "{:.0f}")]
    result = []
    # "tiny": the repo's default model (bench/ppo_speed.py's old setting); "0.67m": the 0.67 M anchor model.
    for model in ["tiny"] if quick else (models or ["tiny"]):
        params = {"model": model, "steps": steps}
        arms = [Arm("trl111_no_gc", "trl111_ppo", params | {"arm": "trl111_no_gc", "gradient_checkpointing": False},
                    python=python),
                Arm("ours", "ppo", params | {"arm": "ours"})]
        # TRL 1.11's gradient_checkpointing=True default is a no-op in its PPOTrainer (never enabled), so the
        # default and no-checkpointing runs are the same program: only one is run (bench/README.md).
        if before:
            arms.append(Arm(f"ours@{before}", "ppo", params | {"arm": "ours", "source": _source_at(before)}))
        title = (f"PPO, {model} model, {steps} steps x {BATCH} episodes, responses <= {RESPONSE_LENGTH},"
                 f" {PPO_EPOCHS} epochs x {BATCH // MINI_BATCH} mini-batches")
        result.append(Comparison(title=title, arms=arms, baseline="trl111_no_gc", unit="episodes", columns=columns))
    if not quick:
        model, params = "tiny", {"model": "tiny", "steps": steps}
        reference_arms = [Arm(name, "ppo", params | {"arm": name}) for name in ("trl_grpo", "trl_rloo")]
        result.append(Comparison(
            title=f"For reference: TRL 1.16 GRPO / RLOO, {model} model, same prompts and shape (no critic: not the same work)",
            arms=reference_arms, baseline=None, unit="episodes", columns=[("peak_rss_mb", "peak RSS MB", "{:.0f}")],
            check_work=False,
        ))
    return result
