"""TRL 1.11's PPOTrainer (trl.experimental.ppo) on the bench's PPO setting; runs in bench/.venv-trl111 only.

Started by bench/runner.py as `bench/.venv-trl111/bin/python -m bench.child trl111_ppo PARAMS`; see bench/ppo.py
for the setting shared with our arm. The generation / scoring / training split is measured by wrapping the
trainer module's batch_generation (generation) and timing from its end to the first training forward (scoring).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.ppo import BATCH, MINI_BATCH, PPO_EPOCHS, PROMPTS, RESPONSE_LENGTH, _models, _shares, _work  # noqa: E402


class _Split:
    """Generation: inside batch_generation. Scoring: from its end to the step's first grad-enabled forward."""

    def __init__(self, module: Any) -> None:
        self.generation = self.scoring = 0.0
        self.generation_ended: float | None = None
        self.steps = 0
        original_generation, original_forward = module.batch_generation, module.forward

        def batch_generation(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = original_generation(*args, **kwargs)
            self.generation_ended = time.perf_counter()
            self.generation += self.generation_ended - started
            self.steps += 1
            return result

        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and self.generation_ended is not None:
                self.scoring += time.perf_counter() - self.generation_ended
                self.generation_ended = None
            return original_forward(*args, **kwargs)

        module.batch_generation, module.forward = batch_generation, forward


def run(params: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    actor, reference, reward_model, critic = _models(params["model"])
    tokenizer = common.tokenizer()
    tokenizer.padding_side = "left"  # TRL's collator pads with it; generation continues at the right edge
    for model in (reward_model, critic):
        model.config.pad_token_id = tokenizer.pad_token_id
    rows = [{"input_ids": tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                    add_special_tokens=False)["input_ids"]} for messages in common.prompts(PROMPTS)]
    split = _Split(ppo_trainer)
    with tempfile.TemporaryDirectory() as output_dir:
        args = PPOConfig(
            output_dir=output_dir, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, bf16=False, use_cpu=True,
            gradient_checkpointing=params["gradient_checkpointing"], per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1, num_mini_batches=BATCH // MINI_BATCH, num_ppo_epochs=PPO_EPOCHS,
            response_length=RESPONSE_LENGTH, total_episodes=params["steps"] * BATCH, stop_token="eos",
            temperature=1.0, num_sample_generations=0,
        )
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=actor, ref_model=reference,
                             reward_model=reward_model, value_model=critic, train_dataset=Dataset.from_list(rows))
        lengths: list[float] = []
        original_truncate = ppo_trainer.truncate_response

        def truncate_response(stop_token_id: int, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
            truncated = original_truncate(stop_token_id, pad_token_id, responses)
            # Response length as ours counts it: tokens up to and including the first eos.
            lengths.append(float((truncated != pad_token_id).sum(dim=1).float().mean()))
            return truncated

        ppo_trainer.truncate_response = truncate_response
        with common.Timer() as timer:
            trainer.train()
    training = timer.seconds - split.generation - split.scoring
    return {
        "amount": split.steps * BATCH,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        **_shares({"generation": split.generation, "scoring": split.scoring, "training": training}, timer.seconds),
        "response_length": sum(lengths) / max(1, len(lengths)),
        "work": _work(params, split.steps),
    }
