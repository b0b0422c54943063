"""Our PPO trainer for RLHF (TRL 1.x ships none): InstructGPT-style PPO with a learned critic.

One PPO step (Ouyang et al. 2022; "Secrets of RLHF" part I; "The N implementation details of RLHF with PPO"):
1. rollout: `batch_size` prompts per process, responses sampled by the actor (KV cache, temperature/top-p);
   a response ends at its first eos, which counts as one of its tokens;
2. scoring, one no-grad forward per model: actor and reference log-probs of the response tokens (at the
   sampling temperature), critic values per token, and a sequence score from the reward model (read at the
   last real response token) and/or a reward function;
3. per-token reward = -kl_coef * KL(actor || reference), plus the score on the last token; GAE; whitening;
4. `ppo_epochs` passes over shuffled mini-batches: clipped surrogate (+ entropy bonus) for the actor,
   clipped value loss for the critic, each with its own AdamW and gradient clipping.
The math lives in `stages/ppo/math.py` (log-probs in `stages/logprobs.py`), the DeepSpeed plumbing in
`stages/ppo/engine.py`, checkpoints and the exported model in `stages/ppo/checkpoint.py`; this module
orchestrates.

Simplifications, on purpose:
- Log-probs apply the temperature but not top-p: with top_p < 1 the ratio is taken under the temperature-scaled
  softmax, as most RLHF PPO implementations do. Keep top_p = 1 for an exactly on-policy ratio.
- Dropout is off in every model (eval mode), so the first mini-batch's ratio is exactly 1.
- Advantages are whitened per process, not across processes.
- The critic is a plain sequence-classification model (no peft). With a peft actor and no reference model,
  reference log-probs come from the actor with its adapters disabled.

Used by the policy stage (`algorithm: ppo`, stages/algorithms.py); under DeepSpeed the stage runs as
`deepspeed --num_gpus N --module stages.policy --config X.yaml`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from stages import generation
from stages.logprobs import entropy_from_logits, last_token_index, response_mask_from_eos, token_logprobs
from stages.core.protocols import Messages, RewardFunction
from stages.ppo import checkpoint, engine
from stages.ppo import math as ppo_math
from stages.ppo.config import PPOConfig
from stages.ppo.rollout import Rollout, check_finite, sequence_inputs

LogHook = Callable[[int, dict[str, float], "list[dict[str, Any]] | None"], None]  # (step, metrics, samples)


class PPOTrainer:
    """PPO with a learned critic; see the module docstring. `train()` runs it, `save_model()` exports the actor."""

    def __init__(
        self,
        actor: PreTrainedModel,
        reference: PreTrainedModel | None,
        reward_model: PreTrainedModel | None,
        critic: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Messages],
        config: PPOConfig,
        output_dir: str | os.PathLike,
        *,
        reward_fn: RewardFunction | None = None,
        gold_fn: RewardFunction | None = None,
        deepspeed_config: str | os.PathLike | dict | None = None,
        log_hook: LogHook | None = None,
        step_hook: Callable[[int], None] | None = None,
        reward_fn_metrics: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        # --- setup: checks ---------------------------------------------------------------------------------
        self.is_peft = hasattr(actor, "disable_adapter")
        if reference is None and not self.is_peft:
            raise ValueError("reference=None needs a peft actor (reference log-probs come from its disabled adapters)")
        if reward_model is None and reward_fn is None:
            raise ValueError("give a reward_model, a reward_fn, or both (their scores are summed)")
        if config.reward_model_baseline == "reference" and not hasattr(reward_model, "token_scores"):
            raise ValueError("reward_model_baseline: reference needs a likelihood-head reward model (its score is a log-likelihood)")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an eos token")
        self.config, self.tokenizer, self.reward_fn, self.log_hook = config, tokenizer, reward_fn, log_hook
        self.step_hook = step_hook  # called after every step on rank 0 (the stage's heartbeat; may raise to stop)
        self.reward_fn_metrics = reward_fn_metrics  # each reward function's mean/std of the step, merged into its metrics
        # A gold reward (e.g. the verifier) logged beside the reward model's proxy and never optimised: the two
        # against KL are the over-optimisation curve (Gao et al. 2022).
        self.gold_fn = gold_fn
        self.actor, self.reference, self.critic, self.reward_model = actor, reference, critic, reward_model
        self.output_dir = Path(output_dir)
        self.step_history: list[dict[str, float]] = []  # {"step": N, **metrics} for every step so far

        # --- setup: processes and devices --------------------------------------------------------------------
        self.deepspeed, self.zero_stage, self.rank, self.world_size = None, 0, 0, 1
        self.device = next(actor.parameters()).device
        if deepspeed_config is not None:
            import deepspeed  # lazily: plain runs and the math tests never pay for it

            if not torch.distributed.is_initialized():
                # No accelerator: gloo is the CPU backend (DeepSpeed's ZeRO runs over it on CPU ranks; stages/core/distributed.py).
                deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
            self.deepspeed = deepspeed
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            accelerator = deepspeed.get_accelerator()
            if accelerator.device_name() != "cpu":
                accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device(accelerator.current_device_name())
        self.num_steps = config.num_steps or math.ceil(config.total_episodes / (config.batch_size * self.world_size))

        # --- setup: prompts (each process samples its own shard) ------------------------------------------
        self.prompt_shard = list(prompts)[self.rank :: self.world_size]
        if not self.prompt_shard:
            raise ValueError(f"process {self.rank} has no prompts: {len(prompts)} prompts for {self.world_size} processes")
        self.prompt_token_ids = [generation.encode_prompt(tokenizer, messages) for messages in self.prompt_shard]

        # --- setup: models and optimisers ---------------------------------------------------------------------
        for model in (actor, reference, reward_model, critic):
            if model is not None:
                model.eval()  # no dropout: the ratio must compare the same function of the weights
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.requires_grad_(False)
        value_model = engine.TokenScores(critic)
        reward_scorer = engine.TokenScores(reward_model) if reward_model is not None else None
        optimizer_steps = self.num_steps * config.ppo_epochs * (config.batch_size // config.mini_batch_size)

        def lr_factor(done: int) -> float:
            return max(0.0, 1.0 - done / optimizer_steps) if config.lr_scheduler == "linear" else 1.0

        def make_scheduler(optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

        def make_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.AdamW:
            # Our own torch AdamW, also as DeepSpeed's client optimiser (not DeepSpeed's FusedAdam, which needs a GPU).
            # Without DeepSpeed, torch's fused kernel (CPU or CUDA; transformers' Trainer default too) updates all
            # tensors at once instead of ~10 ops per tensor: an optimiser step 2.8x (1.4 M model) to 5x (5 M) faster,
            # a PPO step ~11% on the 0.67 M model (`python -m bench ppo`, bench/README.md).
            trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
            fused = self.deepspeed is None and self.device.type in ("cpu", "cuda")
            return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=config.weight_decay, fused=fused or None)

        actor_optimizer = make_optimizer(actor, config.actor_learning_rate)
        critic_optimizer = make_optimizer(critic, config.critic_learning_rate)
        if self.deepspeed is None:
            self.trained_actor = engine.Trained(actor, actor_optimizer, make_scheduler(actor_optimizer))
            self.trained_critic = engine.Trained(value_model, critic_optimizer, make_scheduler(critic_optimizer))
            self.reference_forward, self.reward_forward = reference, reward_scorer
        else:
            ds_config = engine.fill_deepspeed_config(deepspeed_config, config, self.world_size, actor.config)
            self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
            trained = []
            for module, optimizer in ((actor, actor_optimizer), (value_model, critic_optimizer)):
                model_engine, engine_optimizer, _, scheduler = deepspeed.initialize(
                    model=module, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config
                )
                trained.append(engine.Trained(module, engine_optimizer, scheduler, model_engine))
            self.trained_actor, self.trained_critic = trained
            self.reference_forward = engine.frozen_for_deepspeed(reference, ds_config, self.zero_stage, self.device)
            self.reward_forward = engine.frozen_for_deepspeed(reward_scorer, ds_config, self.zero_stage, self.device)

        if config.adaptive_kl:
            self.kl_controller = ppo_math.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_controller = ppo_math.FixedKLController(config.kl_coef)
        self.score_moments = ppo_math.RunningMoments()
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=config.temperature, top_p=config.top_p,
            top_k=0,  # 0 switches off transformers' default top-k of 50: sample from the policy being trained
            max_new_tokens=config.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )

    # --------------------------------------------------------------------------------------------------------
    # Rollout
    # --------------------------------------------------------------------------------------------------------
    def _prompt_indices(self, step: int) -> list[int]:
        """Indices into this process's prompt shard for `step` (1-based). The order is a pure function of the
        seed and the pass over the data, so a resumed run draws exactly the prompts an uninterrupted one would."""
        shard_size, indices, permutations = len(self.prompt_shard), [], {}
        for position in range((step - 1) * self.config.batch_size, step * self.config.batch_size):
            data_pass, offset = divmod(position, shard_size)
            if data_pass not in permutations:
                generator = torch.Generator().manual_seed(generation.batch_seed(self.config.seed, data_pass))
                permutations[data_pass] = torch.randperm(shard_size, generator=generator).tolist()
            indices.append(permutations[data_pass][offset])
        return indices

    @torch.no_grad()
    def rollout(self, prompt_indices: Sequence[int], step: int = 0) -> Rollout:
        """Generate responses to the given prompts of this process's shard, score them, estimate advantages."""
        config, pad_id, eos_id = self.config, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        started = time.perf_counter()
        prompt_ids, prompt_mask = generation.left_pad([self.prompt_token_ids[i] for i in prompt_indices], pad_id, self.device)
        prompt_len = prompt_ids.shape[1]
        gathered = engine.gathered_for_generation(
            self.actor, self.trained_actor.engine, self.zero_stage, config.gather_params_for_generation
        )
        with gathered:
            generated = self.generate_responses(prompt_ids, prompt_mask)
        response_mask = response_mask_from_eos(generated, eos_id)  # (batch, response_len)
        response_ids = generated.masked_fill(response_mask == 0, pad_id)
        generation_seconds, started = time.perf_counter() - started, time.perf_counter()

        inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        logprobs, entropy = self._response_logprobs(self.trained_actor, inputs, prompt_len, with_entropy=True)
        if self.reference_forward is None:
            with self.actor.disable_adapter():
                ref_logprobs, _ = self._response_logprobs(self.trained_actor, inputs, prompt_len)
        else:
            ref_logprobs, _ = self._response_logprobs(self.reference_forward, inputs, prompt_len)
        # Position prompt_len - 1 + t holds the state before response token t.
        values = self.trained_critic(**inputs)[:, prompt_len - 1 : -1] * response_mask
        prompts = [self.prompt_shard[index] for index in prompt_indices]
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        raw_scores = torch.zeros(len(prompt_indices), device=self.device)
        proxy_scores = None
        if self.reward_forward is not None:
            last_positions = prompt_len + last_token_index(response_mask)
            rows = torch.arange(len(raw_scores), device=self.device)
            proxy_scores = self.reward_forward(**inputs, response_start=prompt_len)[rows, last_positions]
            if config.reward_model_baseline == "reference":  # log p_RM(y) - log p_ref(y): what RM training changed
                proxy_scores = proxy_scores - (ref_logprobs * response_mask).sum(dim=1)
            raw_scores += config.reward_model_coef * proxy_scores
        if self.reward_fn is not None:
            raw_scores += self._function_scores(self.reward_fn, "reward_fn", prompts, responses)
        gold_scores = self._function_scores(self.gold_fn, "gold_fn", prompts, responses) if self.gold_fn is not None else None
        check_finite(step, "reward", raw_scores)
        check_finite(step, "value", values)

        scores = self._normalise_scores(raw_scores, has_eos=(response_ids == eos_id).any(dim=1))
        kl = ppo_math.kl_per_token(logprobs, ref_logprobs, config.kl_estimator) * response_mask
        rewards = ppo_math.per_token_rewards(scores, kl, response_mask, self.kl_controller.value)
        if config.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = ppo_math.gae_advantages_and_returns(rewards, values, response_mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, response_mask)
        check_finite(step, "advantage", advantages)
        return Rollout(
            prompts=prompts, responses=responses, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=response_ids, response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, entropy=entropy, raw_scores=raw_scores, scores=scores, kl=kl, rewards=rewards,
            advantages=advantages, returns=returns, generation_seconds=generation_seconds,
            scoring_seconds=time.perf_counter() - started, proxy_scores=proxy_scores, gold_scores=gold_scores,
        )

    def generate_responses(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Sampled responses to the left-padded prompts, (batch, longest response),
        right padded, by `model.generate` from the global RNG (seeded per process; a checkpoint restores it).
        Un-gathered ZeRO-3 over several processes generates with synced_gpus: each forward all-gathers the layers, so
        every rank must run as many forwards as the slowest.

        Not yet the shared continuous-batching loop (`stages.generation.generate_ids`, which samples the same
        distribution and supports top_p): switched to it on 2026-12-07, the annotator-world test's PPO gain fell below
        its bar (+0.27 against +0.3) together with the padding-free SFT fixture, and passed with either change alone;
        kept on `model.generate` until the gain is measured over several seeds with the loop."""
        generated = self.actor.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config,
            synced_gpus=self.zero_stage == 3 and not self.config.gather_params_for_generation and self.world_size > 1,
        )
        return generated[:, prompt_ids.shape[1]:]

    def _function_scores(self, function: RewardFunction, name: str, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        scores = torch.as_tensor(function(prompts, responses), dtype=torch.float32).to(self.device)
        if scores.shape != (len(responses),):
            raise ValueError(f"{name} returned shape {tuple(scores.shape)}, expected ({len(responses)},)")
        return scores

    def _response_logprobs(
        self, forward: Callable, inputs: dict[str, torch.Tensor], prompt_len: int, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) at the response tokens, 0 on padding; the logits at i predict token i + 1."""
        response_ids, response_mask = inputs["input_ids"][:, prompt_len:], inputs["attention_mask"][:, prompt_len:]
        # Only the last response_len + 1 positions go through the LM head: prompt logits would cost
        # (batch, prompt_len, vocab) memory for nothing.
        logits = forward(**inputs, logits_to_keep=response_ids.shape[1] + 1).logits[:, :-1]  # (batch, response_len, vocab)
        response_logprobs = token_logprobs(logits, response_ids, self.config.temperature) * response_mask
        if not with_entropy:
            return response_logprobs, None
        return response_logprobs, entropy_from_logits(logits, self.config.temperature) * response_mask

    def _normalise_scores(self, raw_scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        config, scores = self.config, raw_scores
        if config.reward_normalisation != "none":
            all_scores = engine.gather(raw_scores, self.world_size)  # statistics over every process's episodes
            if config.reward_normalisation == "running":
                self.score_moments.update(all_scores)
                mean, std = self.score_moments.mean, self.score_moments.std
            else:
                mean, std = all_scores.mean().item(), all_scores.std(unbiased=False).item()
            scores = (raw_scores - mean) / (std + 1e-8)
        if config.reward_clip is not None:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~has_eos).float()
        return scores

    # --------------------------------------------------------------------------------------------------------
    # PPO update
    # --------------------------------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO step (1-based): a rollout, then ppo_epochs over its mini-batches. Returns metrics, samples."""
        config = self.config
        started = time.perf_counter()
        prompt_indices = self._prompt_indices(step)
        rollout = self.rollout(prompt_indices, step)
        training_started = time.perf_counter()
        batch, prompt_len = rollout.prompt_ids.shape
        inputs = sequence_inputs(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
        updates: dict[str, list[float]] = {
            name: [] for name in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "value_clip_fraction")
        }
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch).to(self.device)
            for start in range(0, batch, config.mini_batch_size):
                rows = order[start : start + config.mini_batch_size]
                mini_batch = {name: tensor[rows] for name, tensor in inputs.items()}
                mask = rollout.response_mask[rows]
                logprobs, entropy = self._response_logprobs(
                    self.trained_actor, mini_batch, prompt_len, with_entropy=config.entropy_coef > 0
                )
                policy = ppo_math.clipped_policy_loss(
                    logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask, config.cliprange
                )
                actor_loss = policy.loss
                if entropy is not None:
                    actor_loss = actor_loss - config.entropy_coef * ppo_math.entropy_bonus(entropy, mask)
                check_finite(step, "policy loss", actor_loss)
                self.trained_actor.step(actor_loss, config.max_grad_norm)

                values = self.trained_critic(**mini_batch)[:, prompt_len - 1 : -1]
                value = ppo_math.clipped_value_loss(
                    values, rollout.values[rows], rollout.returns[rows], mask, config.cliprange_value
                )
                check_finite(step, "value loss", value.loss)
                self.trained_critic.step(config.vf_coef * value.loss, config.max_grad_norm)

                for name, tensor in (("policy_loss", policy.loss), ("value_loss", value.loss),
                                     ("clip_fraction", policy.clip_fraction), ("approx_kl", policy.approx_kl),
                                     ("value_clip_fraction", value.clip_fraction)):
                    updates[name].append(tensor.item())
            if config.early_stop_approx_kl is not None:
                # All processes decide together: ZeRO needs the same number of optimiser steps everywhere.
                epoch_kl = float(np.mean(updates["approx_kl"][-(batch // config.mini_batch_size) :]))
                if engine.mean_across_processes({"kl": epoch_kl}, self.world_size, self.device)["kl"] > config.early_stop_approx_kl:
                    break
        training_seconds = time.perf_counter() - training_started

        mask = rollout.response_mask
        metrics = engine.mean_across_processes({
            "ppo/reward_raw": rollout.raw_scores.mean().item(),
            "ppo/reward_normalised": rollout.scores.mean().item(),
            "ppo/kl": rollout.kl.sum(dim=1).mean().item(),  # per episode, with the estimator of the reward
            "ppo/kl_coef": self.kl_controller.value,
            "ppo/entropy": ppo_math.masked_mean(rollout.entropy, mask).item(),
            **{f"ppo/{name}": float(np.mean(values)) for name, values in updates.items()},
            "ppo/explained_variance": ppo_math.explained_variance(rollout.values, rollout.returns, mask).item(),
            "ppo/response_length": mask.sum(dim=1).mean().item(),
            "ppo/eos_fraction": (rollout.response_ids == self.tokenizer.eos_token_id).any(dim=1).float().mean().item(),
            **({"ppo/proxy_reward": rollout.proxy_scores.mean().item()} if rollout.proxy_scores is not None else {}),
            **({"ppo/gold_reward": rollout.gold_scores.mean().item()} if rollout.gold_scores is not None else {}),
        }, self.world_size, self.device)
        self.kl_controller.update(metrics["ppo/kl"], n_steps=batch * self.world_size)
        metrics.update({
            "time/generation": rollout.generation_seconds,
            "time/scoring": rollout.scoring_seconds,
            "time/training": training_seconds,
            "ppo/episodes_per_second": batch * self.world_size / (time.perf_counter() - started),
        })
        samples = [  # the prompt as the actor read it: chat-templated text
            {"prompt": self.tokenizer.decode(self.prompt_token_ids[index]), "response": response, "reward": score}
            for index, response, score in zip(prompt_indices, rollout.responses, rollout.raw_scores.tolist())
        ]
        return metrics, samples[: config.sample_table_size]

    # --------------------------------------------------------------------------------------------------------
    # Train, checkpoint, save
    # --------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict[str, float]]:
        """Run the PPO steps; with resume=True continue from the newest checkpoint in output_dir, if any.
        Refuses an output_dir that already holds checkpoints unless resuming. Returns each step's metrics."""
        config, history = self.config, []
        found = checkpoint.checkpoints(self.output_dir)
        latest = found[-1] if found else None
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.output_dir} already holds {latest.name}: pass resume=True to continue it, or use another output_dir"
            )
        self.step_history = []
        if latest is not None:
            start_step = checkpoint.load_checkpoint(self, latest)
        else:
            start_step = 0
            checkpoint.seed_everything(config.seed + self.rank)  # each process samples different responses
        progress = tqdm(range(start_step + 1, self.num_steps + 1), initial=start_step, total=self.num_steps,
                        desc="PPO", disable=self.rank != 0)
        for step in progress:
            metrics, samples = self.step(step)
            if self.reward_fn_metrics is not None:
                metrics |= self.reward_fn_metrics()
            history.append(metrics)
            self.step_history.append({"step": step, **metrics})
            progress.set_postfix(reward=f"{metrics['ppo/reward_raw']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
            samples_due = config.sample_table_every is not None and step % config.sample_table_every == 0
            if self.log_hook is not None and self.rank == 0 and (step % config.logging_steps == 0 or samples_due):
                self.log_hook(step, metrics, samples if samples_due else None)
            if (config.save_steps is not None and step % config.save_steps == 0) or step == self.num_steps:
                self._save_checkpoint(step)
            if self.step_hook is not None and self.rank == 0:
                self.step_hook(step)
        return history

    def _save_checkpoint(self, step: int) -> None:
        checkpoint.save_checkpoint(self, step)

    def save_model(self, path: str | os.PathLike, overwrite: bool = False, merge_scale: float = 1.0) -> None:
        """Write the actor as a plain Hugging Face model (safetensors; LoRA adapters merged, their update times
        `merge_scale`) with the tokenizer; never over an existing model unless `overwrite`. Under DeepSpeed every
        process must call it."""
        checkpoint.export_model(self, path, overwrite, merge_scale)
