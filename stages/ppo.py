"""Our PPO trainer for RLHF (TRL 1.x ships none): InstructGPT-style PPO with a learned critic.

What one PPO step does (Ouyang et al. 2022; "Secrets of RLHF" part I; "The N implementation details of
RLHF with PPO"):
1. rollout: sample `batch_size` prompts (per process), generate responses with the actor (KV cache,
   temperature/top-p sampling, stop at eos); a response ends at its first eos, which counts as a token;
2. scoring, one no-grad forward per model: actor and reference log-probs of the response tokens (at the
   sampling temperature), critic values per token, and a sequence score from the reward model (read at the
   last real response token) and/or a reward function;
3. per-token reward = -kl_coef * KL(actor || reference) + score on the last token; GAE; whitened advantages;
4. `ppo_epochs` passes over shuffled mini-batches: clipped surrogate (+ entropy bonus) for the actor,
   clipped value loss for the critic, each with its own AdamW and gradient clipping.
The math lives in `stages/ppo_math.py`.

Simplifications, on purpose:
- Log-probs use the temperature but not top-p: the ratio is taken under the temperature-scaled softmax, as
  most RLHF PPO implementations do; keep top_p = 1 for the exact on-policy ratio.
- Dropout is switched off in every model (eval mode), so the first epoch's ratio is exactly 1.
- Advantages are whitened over the rollout of each process, not across processes.
- The critic must be a plain (non-peft) sequence-classification model; with a peft actor and no reference,
  reference log-probs come from the actor with its adapters disabled.

Used by `stages/policy.py` (`algorithm: ppo`); under DeepSpeed, launch that stage with
`deepspeed --num_gpus N --module stages.policy --config X.yaml`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from stages import ppo_math

RewardFunction = Callable[[list[str], list[str]], torch.Tensor]
LogHook = Callable[[int, dict[str, float], "list[dict[str, Any]] | None"], None]
Messages = list[dict[str, str]]


@dataclass
class PPOConfig:
    """Everything PPO needs beyond the models; validated once, in __post_init__."""

    # Schedule
    seed: int = field(default=42, metadata={"help": "Seed of sampling, shuffling and prompt order."})
    num_steps: int | None = field(default=100, metadata={"help": "PPO steps (rollout + update). Set null to use total_episodes."})
    total_episodes: int | None = field(default=None, metadata={"help": "Alternative to num_steps: steps = ceil(total_episodes / (batch_size * processes))."})
    batch_size: int = field(default=64, metadata={"help": "Prompts rolled out per PPO step on each process."})
    mini_batch_size: int = field(default=16, metadata={"help": "Episodes per optimiser step on each process; divides batch_size."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout; more reuses data harder (watch ppo/clip_fraction)."})
    # Optimisation
    actor_learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate of the actor."})
    critic_learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the critic."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of both models."})
    lr_scheduler: Literal["constant", "linear"] = field(default="constant", metadata={"help": "'linear' decays both learning rates to 0 over the run."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip, per model."})
    bf16: bool = field(default=False, metadata={"help": "Fills DeepSpeed's bf16.enabled 'auto'; without DeepSpeed, load the models in bf16 yourself."})
    # Generation
    max_new_tokens: int = field(default=64, metadata={"help": "Response length limit; responses cut there have no eos (see missing_eos_penalty)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; log-probs use the same scaling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; below 1 the PPO ratio is only approximately on-policy."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the (normalised) score of responses cut at max_new_tokens."})
    gather_params_for_generation: bool = field(default=True, metadata={"help": "ZeRO-3: gather the full actor for generate (fast, needs the whole actor in memory)."})
    # KL penalty
    kl_coef: float = field(default=0.05, metadata={"help": "Initial coefficient of the per-token KL penalty."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimator in the reward: k1 = logp - ref_logp; k3 = (r - 1) - log r, always >= 0."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards target_kl (Ziegler et al. 2019)."})
    target_kl: float = field(default=6.0, metadata={"help": "Adaptive KL: target per-episode KL (summed over tokens)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL: episodes over which the coefficient may change by about e^0.2."})
    # Advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount per token."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: lower trusts the critic more (less variance, more bias)."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (scales the critic's gradient)."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight; > 0 costs a full softmax per training forward."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance (mean kept) before GAE."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the rollout before the PPO epochs."})
    reward_normalisation: Literal["none", "running", "batch"] = field(default="none", metadata={"help": "Normalise scores: by running mean/std over the run, or per batch."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip (normalised) scores to [-reward_clip, reward_clip]."})
    early_stop_approx_kl: float | None = field(default=None, metadata={"help": "Stop a step's updates once a mini-batch's approx KL (old || new) exceeds this."})
    # Logging and checkpoints
    logging_steps: int = field(default=1, metadata={"help": "Call the log hook every this many steps."})
    sample_table_every: int | None = field(default=10, metadata={"help": "Pass (prompt, response, reward) samples to the log hook every this many steps; null never."})
    sample_table_size: int = field(default=8, metadata={"help": "Samples per table."})
    save_steps: int | None = field(default=50, metadata={"help": "Checkpoint every this many steps (and at the last); null only at the last."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints; null keeps all."})

    def __post_init__(self) -> None:
        def require(condition: bool, name: str, expectation: str) -> None:
            if not condition:
                raise ValueError(f"PPOConfig.{name} must be {expectation}, got {getattr(self, name)!r}")

        if (self.num_steps is None) == (self.total_episodes is None):
            raise ValueError("PPOConfig: set exactly one of num_steps and total_episodes (set num_steps: null to use total_episodes)")
        for name in ("num_steps", "total_episodes"):
            require(getattr(self, name) is None or getattr(self, name) > 0, name, "positive")
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon", "logging_steps", "sample_table_size"):
            require(getattr(self, name) > 0, name, "positive")
        require(self.batch_size % self.mini_batch_size == 0, "mini_batch_size", f"a divisor of batch_size={self.batch_size}")
        for name in ("actor_learning_rate", "critic_learning_rate", "max_grad_norm", "temperature", "target_kl", "cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, name, "positive")
        for name in ("weight_decay", "kl_coef", "vf_coef", "entropy_coef"):
            require(getattr(self, name) >= 0, name, ">= 0")
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        for name in ("missing_eos_penalty", "reward_clip", "early_stop_approx_kl", "sample_table_every", "save_steps", "save_total_limit"):
            require(getattr(self, name) is None or getattr(self, name) > 0, name, "positive or null")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", "'k1' or 'k3'")
        require(self.reward_normalisation in ("none", "running", "batch"), "reward_normalisation", "'none', 'running' or 'batch'")
        require(self.lr_scheduler in ("constant", "linear"), "lr_scheduler", "'constant' or 'linear'")


@dataclass
class Rollout:
    """One batch of episodes with everything the PPO epochs need. Per-token tensors are
    (batch, response_len), aligned on response tokens and 0 where response_mask is 0."""

    prompts: list[str]  # chat-templated prompt text, as the actor saw it
    responses: list[str]  # decoded response, special tokens removed
    prompt_ids: torch.Tensor  # (batch, prompt_len), left padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # (batch, response_len), pad after the first eos
    response_mask: torch.Tensor  # (batch, response_len), float
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    raw_scores: torch.Tensor  # (batch,) reward model + reward function
    scores: torch.Tensor  # (batch,) after normalisation, clipping and the missing-eos penalty
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    generation_seconds: float
    scoring_seconds: float


class _TokenScores(torch.nn.Module):
    """A sequence-classification model read at every position: score(backbone hidden state).
    The critic's value per token, and the reward model's score wherever the sequence really ends."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"critic and reward model need num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()  # (batch, seq)


class _Trained:
    """A trained model with its optimiser: plain PyTorch, or a DeepSpeed engine that owns both."""

    def __init__(self, forward_module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any = None) -> None:
        self.forward_module, self.optimizer, self.scheduler, self.engine = forward_module, optimizer, scheduler, engine

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return (self.engine or self.forward_module)(**inputs)

    def step(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        if self.engine is not None:  # the engine clips (gradient_clipping), steps and zeroes
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.forward_module.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def check_same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, names: tuple[str, str]) -> None:
    """Raise ValueError naming what differs (vocabulary, special tokens, chat template) between two tokenizers:
    PPO feeds the actor's token ids straight to the reference, critic and reward model."""
    differences = [
        what
        for what, differs in (
            ("vocabulary", first.get_vocab() != second.get_vocab()),
            ("pad/eos tokens", (first.pad_token_id, first.eos_token_id) != (second.pad_token_id, second.eos_token_id)),
            ("chat template", first.chat_template != second.chat_template),
        )
        if differs
    ]
    if differences:
        raise ValueError(f"tokenizers of {names[0]} and {names[1]} differ in: {', '.join(differences)}")


class PPOTrainer:
    """PPO with a learned critic. See the module docstring for the algorithm; `train()` runs it."""

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
        deepspeed_config: str | os.PathLike | dict | None = None,
        log_hook: LogHook | None = None,
    ) -> None:
        # --- setup: checks --------------------------------------------------------------------------
        is_peft = hasattr(actor, "disable_adapter")
        if reference is None and not is_peft:
            raise ValueError("reference=None needs a peft actor (its adapters are disabled for reference log-probs)")
        if reward_model is None and reward_fn is None:
            raise ValueError("give a reward_model, a reward_fn, or both (their scores are summed)")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an eos token")
        self.config, self.tokenizer, self.reward_fn, self.log_hook = config, tokenizer, reward_fn, log_hook
        self.output_dir, self.is_peft = Path(output_dir), is_peft
        self.actor, self.reference, self.critic, self.reward_model = actor, reference, critic, reward_model

        # --- setup: processes and devices -------------------------------------------------------------
        self.deepspeed = None
        self.zero_stage = 0
        self.rank, self.world_size = 0, 1
        if deepspeed_config is not None:
            import deepspeed  # lazily: plain runs and the math tests never pay for it

            if not torch.distributed.is_initialized():
                # No accelerator: gloo is the CPU backend (DESIGN.md, "DeepSpeed on machines without a GPU").
                deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
            self.deepspeed = deepspeed
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            accelerator = deepspeed.get_accelerator()
            if accelerator.device_name() != "cpu":
                accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device(accelerator.current_device_name())
        else:
            self.device = next(actor.parameters()).device
        self.num_steps = config.num_steps or math.ceil(config.total_episodes / (config.batch_size * self.world_size))
        self.prompt_shard = list(prompts)[self.rank :: self.world_size]  # each process samples its own shard
        if not self.prompt_shard:
            raise ValueError(f"process {self.rank} has no prompts: {len(prompts)} prompts for {self.world_size} processes")
        self.prompt_token_ids = [
            tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
            for messages in self.prompt_shard
        ]

        # --- setup: models and optimisers ---------------------------------------------------------------
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.requires_grad_(False)
        for model in (actor, reference, reward_model, critic):
            if model is not None:
                model.eval()  # no dropout: the ratio must compare the same function of the weights
        value_model = _TokenScores(critic)
        reward_scorer = _TokenScores(reward_model) if reward_model is not None else None
        optimizer_steps = self.num_steps * config.ppo_epochs * (config.batch_size // config.mini_batch_size)

        def optimiser_and_scheduler(model: torch.nn.Module, learning_rate: float) -> tuple[torch.optim.Optimizer, Callable]:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=config.weight_decay)
            decay = (lambda done: max(0.0, 1.0 - done / optimizer_steps)) if config.lr_scheduler == "linear" else (lambda done: 1.0)
            return optimizer, lambda wrapped_optimizer: torch.optim.lr_scheduler.LambdaLR(wrapped_optimizer, decay)

        actor_optimizer, actor_scheduler = optimiser_and_scheduler(actor, config.actor_learning_rate)
        critic_optimizer, critic_scheduler = optimiser_and_scheduler(critic, config.critic_learning_rate)
        if self.deepspeed is None:
            self.trained_actor = _Trained(actor, actor_optimizer, actor_scheduler(actor_optimizer))
            self.trained_critic = _Trained(value_model, critic_optimizer, critic_scheduler(critic_optimizer))
            self.reference_forward, self.reward_forward = reference, reward_scorer
        else:
            ds_config = _resolve_deepspeed_config(deepspeed_config, config, self.world_size, actor.config)
            self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
            self.trained_actor = self._deepspeed_trained(actor, actor_optimizer, actor_scheduler, ds_config)
            self.trained_critic = self._deepspeed_trained(value_model, critic_optimizer, critic_scheduler, ds_config)
            self.reference_forward = self._deepspeed_frozen(reference, ds_config)
            self.reward_forward = self._deepspeed_frozen(reward_scorer, ds_config)

        self.kl_controller = (
            ppo_math.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon) if config.adaptive_kl else ppo_math.FixedKLController(config.kl_coef)
        )
        self.score_moments = ppo_math.RunningMoments()
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,  # top_k=0: no default top-k of 50
            max_new_tokens=config.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )

    def _deepspeed_trained(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Callable, ds_config: dict) -> _Trained:
        # Our own torch AdamW as the client optimiser: no fused or compiled ops, so it also runs on CPU.
        engine, engine_optimizer, _, engine_scheduler = self.deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        return _Trained(model, engine_optimizer, engine_scheduler, engine)

    def _deepspeed_frozen(self, model: torch.nn.Module | None, ds_config: dict) -> torch.nn.Module | None:
        if model is None:
            return None
        if self.zero_stage != 3:  # ZeRO-0/2 shard only optimiser state and gradients: a frozen model is replicated
            return model.to(self.device)
        # ZeRO-3 shards parameters: an optimiser-less engine gathers each layer as it runs.
        inference_config = {key: value for key, value in ds_config.items() if key != "gradient_clipping"}
        engine, *_ = self.deepspeed.initialize(model=model, config=inference_config)
        engine.eval()
        return engine

    # ----------------------------------------------------------------------------------------------
    # Rollout
    # ----------------------------------------------------------------------------------------------
    def _prompt_indices(self, step: int) -> list[int]:
        """Indices into this process's prompt shard for `step` (1-based). The order is a pure function of
        (seed, pass over the data), so a resumed run draws exactly the prompts an uninterrupted one would."""
        shard_size, indices, permutations = len(self.prompt_shard), [], {}
        for position in range((step - 1) * self.config.batch_size, step * self.config.batch_size):
            data_pass, offset = divmod(position, shard_size)
            if data_pass not in permutations:
                generator = torch.Generator().manual_seed(self.config.seed * 100_003 + data_pass)
                permutations[data_pass] = torch.randperm(shard_size, generator=generator).tolist()
            indices.append(permutations[data_pass][offset])
        return indices

    @contextlib.contextmanager
    def _generation_context(self) -> Iterator[None]:
        """Under ZeRO-3 with gather_params_for_generation: the whole actor on every process, and ZeRO-3's
        per-layer hooks off. Those hooks release each layer after its forward, which would re-shard the
        gathered weights at every token and leave some in flight when the gather ends (DeepSpeed asserts
        "Cannot partition a param in flight"). They are private DeepSpeed state (0.19.8): drop this once
        DeepSpeed offers a public "generate with gathered parameters" switch."""
        if self.zero_stage != 3 or not self.config.gather_params_for_generation:
            yield
            return
        offload = self.trained_actor.engine.optimizer.parameter_offload  # owns the ZeRO-3 module hooks
        with self.deepspeed.zero.GatheredParameters(list(self.actor.parameters())):
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                for parameter in self.actor.parameters():
                    parameter.ds_active_sub_modules.clear()
                offload._register_deepspeed_module(offload.module)  # re-adds the hooks, invalidates the trace

    @torch.no_grad()
    def rollout(self, prompt_indices: Sequence[int], step: int = 0) -> Rollout:
        """Generate, score and compute advantages for the given prompts of this process's shard."""
        config, pad_id, eos_id = self.config, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        started = time.perf_counter()
        prompt_ids, prompt_mask = _left_pad([self.prompt_token_ids[i] for i in prompt_indices], pad_id, self.device)
        with self._generation_context():
            generated = self.actor.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config,
                # Un-gathered ZeRO-3 all-gathers at every forward: ranks must run as many forwards as the slowest.
                synced_gpus=self.zero_stage == 3 and not config.gather_params_for_generation and self.world_size > 1,
            )
        response_mask = ppo_math.response_mask_from_eos(generated[:, prompt_ids.shape[1] :], eos_id)  # (batch, response_len)
        response_ids = generated[:, prompt_ids.shape[1] :].masked_fill(response_mask == 0, pad_id)
        generation_seconds, started = time.perf_counter() - started, time.perf_counter()

        # Prompt (left padded) + response (right padded): one contiguous run of real tokens per row, and
        # positions counted from the first real token, as during generation.
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask))
        logprobs, entropy = self._actor_logprobs(inputs, prompt_ids.shape[1], with_entropy=True)
        if self.reference_forward is None:
            with self.actor.disable_adapter():
                ref_logprobs, _ = self._actor_logprobs(inputs, prompt_ids.shape[1], forward=self.trained_actor)
        else:
            ref_logprobs, _ = self._actor_logprobs(inputs, prompt_ids.shape[1], forward=self.reference_forward)
        values = self.trained_critic(**inputs)[:, prompt_ids.shape[1] - 1 : -1] * response_mask  # V(state before token t)
        prompts = [self.tokenizer.decode(self.prompt_token_ids[index]) for index in prompt_indices]
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        raw_scores = torch.zeros(len(prompt_indices), device=self.device)
        if self.reward_forward is not None:
            last_positions = prompt_ids.shape[1] + ppo_math.last_token_index(response_mask)
            token_scores = self.reward_forward(**inputs)  # (batch, seq)
            raw_scores += token_scores[torch.arange(len(raw_scores), device=self.device), last_positions]
        if self.reward_fn is not None:
            function_scores = torch.as_tensor(self.reward_fn(prompts, responses), dtype=torch.float32).to(self.device)
            if function_scores.shape != raw_scores.shape:
                raise ValueError(f"reward_fn returned shape {tuple(function_scores.shape)}, expected ({len(raw_scores)},)")
            raw_scores += function_scores
        _check_finite(step, "reward", raw_scores)
        _check_finite(step, "value", values)

        scores = self._normalise_scores(raw_scores, has_eos=(response_ids == eos_id).any(dim=1))
        kl = ppo_math.kl_per_token(logprobs, ref_logprobs, config.kl_estimator) * response_mask
        rewards = ppo_math.per_token_rewards(scores, kl, response_mask, self.kl_controller.value)
        if config.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = ppo_math.gae_advantages_and_returns(rewards, values, response_mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, response_mask)
        _check_finite(step, "advantage", advantages)
        return Rollout(
            prompts=prompts, responses=responses, prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy,
            raw_scores=raw_scores, scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns,
            generation_seconds=generation_seconds, scoring_seconds=time.perf_counter() - started,
        )

    def _actor_logprobs(self, inputs: dict, prompt_len: int, forward: Callable | None = None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the response tokens; 0 on padding. Logits at position i predict token i + 1."""
        logits = (forward or self.trained_actor)(**inputs).logits[:, prompt_len - 1 : -1]  # (batch, response_len, vocab)
        response_ids, response_mask = inputs["input_ids"][:, prompt_len:], inputs["attention_mask"][:, prompt_len:]
        logprobs = ppo_math.token_logprobs(logits, response_ids, self.config.temperature) * response_mask
        entropy = ppo_math.entropy_from_logits(logits, self.config.temperature) * response_mask if with_entropy else None
        return logprobs, entropy

    def _normalise_scores(self, raw_scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        config, scores = self.config, raw_scores
        if config.reward_normalisation != "none":
            all_scores = self._gather(raw_scores)  # statistics over every process's episodes
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

    # ----------------------------------------------------------------------------------------------
    # PPO update
    # ----------------------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO step (1-based): rollout, then ppo_epochs of mini-batch updates. Returns metrics, samples."""
        config = self.config
        started = time.perf_counter()
        rollout = self.rollout(self._prompt_indices(step), step)
        training_started = time.perf_counter()
        prompt_len, batch = rollout.prompt_ids.shape[1], rollout.prompt_ids.shape[0]
        input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
        attention_mask = torch.cat([rollout.prompt_mask, rollout.response_mask.long()], dim=1)
        position_ids = _position_ids(attention_mask)
        updates: dict[str, list[float]] = {name: [] for name in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "value_clip_fraction")}
        stop = False
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch)
            for start in range(0, batch, config.mini_batch_size):
                rows = order[start : start + config.mini_batch_size].to(self.device)
                inputs = dict(input_ids=input_ids[rows], attention_mask=attention_mask[rows], position_ids=position_ids[rows])
                mask = rollout.response_mask[rows]
                logprobs, entropy = self._actor_logprobs(inputs, prompt_len, with_entropy=config.entropy_coef > 0)
                policy = ppo_math.clipped_policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask, config.cliprange)
                actor_loss = policy.loss - config.entropy_coef * ppo_math.entropy_bonus(entropy, mask) if entropy is not None else policy.loss
                _check_finite(step, "policy loss", actor_loss)
                self.trained_actor.step(actor_loss, config.max_grad_norm)

                values = self.trained_critic(**inputs)[:, prompt_len - 1 : -1]
                value = ppo_math.clipped_value_loss(values, rollout.values[rows], rollout.returns[rows], mask, config.cliprange_value)
                _check_finite(step, "value loss", value.loss)
                self.trained_critic.step(config.vf_coef * value.loss, config.max_grad_norm)

                for name, tensor in (("policy_loss", policy.loss), ("value_loss", value.loss), ("clip_fraction", policy.clip_fraction),
                                     ("approx_kl", policy.approx_kl), ("value_clip_fraction", value.clip_fraction)):
                    updates[name].append(tensor.item())
                # Every process takes the same decision (ZeRO needs the same number of steps everywhere).
                if config.early_stop_approx_kl is not None and self._mean_across_processes(policy.approx_kl.item()) > config.early_stop_approx_kl:
                    stop = True
                    break
            if stop:
                break
        training_seconds = time.perf_counter() - training_started

        mask, episodes_kl = rollout.response_mask, rollout.kl.sum(dim=1)
        metrics = {
            "ppo/reward_raw": rollout.raw_scores.mean().item(),
            "ppo/reward_normalised": rollout.scores.mean().item(),
            "ppo/kl": episodes_kl.mean().item(),
            "ppo/kl_coef": self.kl_controller.value,
            "ppo/entropy": ppo_math.masked_mean(rollout.entropy, mask).item(),
            **{f"ppo/{name}": float(np.mean(values)) for name, values in updates.items()},
            "ppo/explained_variance": ppo_math.explained_variance(rollout.values, rollout.returns, mask).item(),
            "ppo/response_length": mask.sum(dim=1).mean().item(),
            "ppo/eos_fraction": (rollout.response_ids == self.tokenizer.eos_token_id).any(dim=1).float().mean().item(),
        }
        metrics = {name: self._mean_across_processes(value) for name, value in metrics.items()}
        self.kl_controller.update(metrics["ppo/kl"], n_steps=batch * self.world_size)
        metrics.update({
            "time/generation": rollout.generation_seconds,
            "time/scoring": rollout.scoring_seconds,
            "time/training": training_seconds,
            "ppo/episodes_per_second": batch * self.world_size / (time.perf_counter() - started),
        })
        samples = [
            {"prompt": prompt, "response": response, "reward": score}
            for prompt, response, score in zip(rollout.prompts, rollout.responses, rollout.raw_scores.tolist())
        ][: config.sample_table_size]
        return metrics, samples

    # ----------------------------------------------------------------------------------------------
    # Train, checkpoint, save
    # ----------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict[str, float]]:
        """Run num_steps PPO steps; with resume=True continue from the newest checkpoint in output_dir.
        Refuses to start over an output_dir that already holds checkpoints unless resuming."""
        config, history = self.config, []
        latest = self._latest_checkpoint()
        if latest is not None and not resume:
            raise FileExistsError(f"{self.output_dir} already holds {latest.name}: pass resume=True to continue it, or choose another output_dir")
        if latest is not None:
            start_step = self._load_checkpoint(latest)
        else:
            start_step = 0
            _seed_everything(config.seed + self.rank)  # each process samples differently
        progress = tqdm(range(start_step + 1, self.num_steps + 1), initial=start_step, total=self.num_steps, desc="PPO", disable=self.rank != 0)
        for step in progress:
            metrics, samples = self.step(step)
            history.append(metrics)
            progress.set_postfix(reward=f"{metrics['ppo/reward_raw']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
            samples_due = config.sample_table_every is not None and step % config.sample_table_every == 0
            if self.log_hook is not None and self.rank == 0 and (step % config.logging_steps == 0 or samples_due):
                self.log_hook(step, metrics, samples if samples_due else None)
            if (config.save_steps is not None and step % config.save_steps == 0) or step == self.num_steps:
                self._save_checkpoint(step)
        return history

    def _latest_checkpoint(self) -> Path | None:
        checkpoints = sorted(self.output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        return checkpoints[-1] if checkpoints else None

    def _save_checkpoint(self, step: int) -> None:
        """Write checkpoint-{step} atomically: everything goes to a temporary directory renamed at the end,
        so a crash mid-write leaves the previous checkpoint the newest complete one."""
        final, temporary = self.output_dir / f"checkpoint-{step}", self.output_dir / f".checkpoint-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self._barrier()
        if self.deepspeed is not None:  # each process writes its shards of weights and optimiser state
            self.trained_actor.engine.save_checkpoint(temporary / "actor", tag="state")
            self.trained_critic.engine.save_checkpoint(temporary / "critic", tag="state")
        elif self.rank == 0:
            save_model(self.actor, str(temporary / "actor.safetensors"))
            save_model(self.critic, str(temporary / "critic.safetensors"))
            for name, trained in (("actor", self.trained_actor), ("critic", self.trained_critic)):
                torch.save(trained.optimizer.state_dict(), temporary / f"{name}_optimizer.pt")
                torch.save(trained.scheduler.state_dict(), temporary / f"{name}_scheduler.pt")
        torch.save(
            {"step": step, "kl_controller": self.kl_controller.state_dict(), "score_moments": self.score_moments.state_dict(), "rng": _rng_state()},
            temporary / f"trainer_state_rank{self.rank}.pt",
        )
        self._barrier()
        if self.rank == 0:
            os.replace(temporary, final)
            if self.config.save_total_limit is not None:
                checkpoints = sorted(self.output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
                for old in checkpoints[: -self.config.save_total_limit]:
                    shutil.rmtree(old)
        self._barrier()

    def _load_checkpoint(self, checkpoint: Path) -> int:
        if self.deepspeed is not None:
            for name, trained in (("actor", self.trained_actor), ("critic", self.trained_critic)):
                load_path, _ = trained.engine.load_checkpoint(checkpoint / name, tag="state")
                if load_path is None:
                    raise FileNotFoundError(f"no DeepSpeed {name} checkpoint in {checkpoint / name}")
        else:
            load_model(self.actor, checkpoint / "actor.safetensors", device=str(self.device))
            load_model(self.critic, checkpoint / "critic.safetensors", device=str(self.device))
            for name, trained in (("actor", self.trained_actor), ("critic", self.trained_critic)):
                trained.optimizer.load_state_dict(torch.load(checkpoint / f"{name}_optimizer.pt", weights_only=True))
                trained.scheduler.load_state_dict(torch.load(checkpoint / f"{name}_scheduler.pt", weights_only=True))
        state = torch.load(checkpoint / f"trainer_state_rank{self.rank}.pt", weights_only=True)
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        _set_rng_state(state["rng"])
        return int(state["step"])

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the actor as a plain Hugging Face checkpoint (safetensors, adapters merged) with the tokenizer.
        Under ZeRO-3 every process must call it (the weights are gathered); process 0 writes. Refuses an
        existing path; written to a temporary directory and renamed."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists: save_model never overwrites a model")
        temporary = path.with_name(f".{path.name}.tmp")
        gather = self.deepspeed.zero.GatheredParameters(list(self.actor.parameters())) if self.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            if self.rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
                model = copy.deepcopy(self.actor).merge_and_unload() if self.is_peft else self.actor
                state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
                model.save_pretrained(temporary, state_dict=state_dict)
                self.tokenizer.save_pretrained(temporary)
                os.replace(temporary, path)
        self._barrier()

    # ----------------------------------------------------------------------------------------------
    # Processes
    # ----------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def _mean_across_processes(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size


def _left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (batch, max_len) ids and attention mask: generation continues every row
    from the same column, so the prompt must end at the right edge."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on left padding), as generate() does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _check_finite(step: int, quantity: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"PPO step {step}: non-finite {quantity}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's state is made of plain types so the file loads with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _resolve_deepspeed_config(source: str | os.PathLike | dict, config: PPOConfig, world_size: int, model_config: Any) -> dict:
    """Fill the "auto" values of a DeepSpeed config from PPOConfig; an explicit value that contradicts it,
    an optimiser section (we build one AdamW per model) or an "auto" we cannot fill is an error naming it."""
    ds_config = copy.deepcopy(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(f"deepspeed config: remove '{section}': PPOTrainer builds the actor's and critic's optimisers from PPOConfig")
    required = {
        "train_micro_batch_size_per_gpu": config.mini_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.mini_batch_size * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in required.items():
        if ds_config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"deepspeed config: {key}={ds_config[key]!r} contradicts PPOConfig ({value!r}); set it to \"auto\"")
        ds_config[key] = value
    for precision, enabled in (("bf16", config.bf16), ("fp16", False)):
        if ds_config.get(precision, {}).get("enabled") == "auto":
            ds_config[precision]["enabled"] = enabled
    hidden = getattr(model_config, "hidden_size", None)
    zero = ds_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden and hidden * hidden), ("stage3_prefetch_bucket_size", hidden and int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", hidden and 10 * hidden)):
        if zero.get(key) == "auto" and value:
            zero[key] = value  # the sizes Hugging Face's integration derives from the hidden size

    def find_auto(node: Any, path: str) -> None:
        if node == "auto":
            raise ValueError(f"deepspeed config: cannot fill \"auto\" at {path}")
        if isinstance(node, dict):
            for key, child in node.items():
                find_auto(child, f"{path}.{key}" if path else key)

    find_auto(ds_config, "")
    return ds_config
