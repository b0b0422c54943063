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
The math lives in `stages/ppo_math.py`; this module orchestrates.

Simplifications, on purpose:
- Log-probs apply the temperature but not top-p: with top_p < 1 the ratio is taken under the temperature-scaled
  softmax, as most RLHF PPO implementations do. Keep top_p = 1 for an exactly on-policy ratio.
- Dropout is off in every model (eval mode), so the first mini-batch's ratio is exactly 1.
- Advantages are whitened per process, not across processes.
- The critic is a plain sequence-classification model (no peft). With a peft actor and no reference model,
  reference log-probs come from the actor with its adapters disabled.

Used by `stages/policy.py` (`algorithm: ppo`); under DeepSpeed the stage runs as
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

RewardFunction = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> (batch,) scores
LogHook = Callable[[int, dict[str, float], "list[dict[str, Any]] | None"], None]  # (step, metrics, samples)
# Every step's metrics, one JSON object a line, written into each checkpoint: a resumed run carries the
# steps before the crash, and the stage keeps the newest checkpoint's copy for `rlhf report` (no W&B needed).
HISTORY_FILE = "history.jsonl"
Messages = list[dict[str, str]]


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class PPOConfig:
    """Everything PPO needs besides the models and prompts; validated once, in __post_init__."""

    # Schedule
    seed: int = _help("Seed of sampling, mini-batch shuffling and prompt order.", 42)
    num_steps: int | None = _help("PPO steps (rollout + update). Set to null to use total_episodes.", 100)
    total_episodes: int | None = _help("Instead of num_steps: steps = ceil(total_episodes / (batch_size x processes)).", None)
    batch_size: int = _help("Prompts rolled out per PPO step on each process.", 64)
    mini_batch_size: int = _help("Episodes per optimiser step on each process; must divide batch_size.", 16)
    ppo_epochs: int = _help("Passes over each rollout; more reuse is more off-policy (watch ppo/clip_fraction).", 4)
    # Optimisation
    actor_learning_rate: float = _help("AdamW learning rate of the actor.", 3e-6)
    critic_learning_rate: float = _help("AdamW learning rate of the critic.", 1e-5)
    weight_decay: float = _help("AdamW weight decay, both models.", 0.0)
    lr_scheduler: Literal["constant", "linear"] = _help("'linear' decays both learning rates to 0 over the run.", "constant")
    max_grad_norm: float = _help("Gradient-norm clip, per model.", 1.0)
    bf16: bool = _help("Fills DeepSpeed's bf16.enabled 'auto'. Without DeepSpeed, load the models in bf16 yourself.", False)
    # Generation
    max_new_tokens: int = _help("Response length limit; responses cut there have no eos (see missing_eos_penalty).", 64)
    temperature: float = _help("Sampling temperature; log-probs use the same scaling.", 1.0)
    top_p: float = _help("Nucleus sampling; below 1 the PPO ratio is only approximately on-policy.", 1.0)
    missing_eos_penalty: float | None = _help("Subtracted from the (normalised) score of responses without eos.", None)
    reward_model_coef: float = _help(
        "Weight of the reward model's score in the episode score (the reward function, if any, has weight 1). "
        "Below 1 leans on a verifiable reward when the reward model is weak.", 1.0
    )
    gather_params_for_generation: bool = _help(
        "ZeRO-3: gather the whole actor for generate (fast; needs the actor in memory) instead of layer by layer.", True
    )
    # KL penalty
    kl_coef: float = _help("Coefficient of the per-token KL penalty (the initial one with adaptive_kl).", 0.05)
    kl_estimator: Literal["k1", "k3"] = _help("Per-token KL in the reward: k1 = logp - ref_logp; k3 = (r-1) - log r >= 0.", "k1")
    adaptive_kl: bool = _help("Steer kl_coef towards target_kl (Ziegler et al. 2019).", False)
    target_kl: float = _help("Adaptive KL: target KL per episode (summed over its tokens).", 6.0)
    kl_horizon: int = _help("Adaptive KL: episodes over which the coefficient may move by a factor of about e^0.2.", 10000)
    # Advantages and losses
    gamma: float = _help("Discount per token.", 1.0)
    lam: float = _help("GAE lambda: lower leans on the critic (less variance, more bias).", 0.95)
    cliprange: float = _help("Policy ratio clip epsilon.", 0.2)
    cliprange_value: float = _help("Value clip around the rollout's values.", 0.2)
    vf_coef: float = _help("Value-loss weight. The critic has its own Adam, so this mostly moves its gradient clip.", 0.1)
    entropy_coef: float = _help("Entropy bonus weight; above 0 costs a full softmax per training forward.", 0.0)
    whiten_rewards: bool = _help("Scale per-token rewards to unit variance (mean kept) before GAE.", False)
    whiten_advantages: bool = _help("Whiten the advantages of each rollout before the PPO epochs.", True)
    reward_normalisation: Literal["none", "running", "batch"] = _help(
        "Normalise scores with a running mean/std over the run, or with each batch's.", "none"
    )
    reward_clip: float | None = _help("Clip (normalised) scores to [-reward_clip, reward_clip].", None)
    early_stop_approx_kl: float | None = _help(
        "Skip a step's remaining PPO epochs once an epoch's mean approx KL (old || new policy) exceeds this.", None
    )
    # Logging and checkpoints
    logging_steps: int = _help("Call the log hook every this many steps.", 1)
    sample_table_every: int | None = _help("Pass (prompt, response, reward) samples to the log hook every N steps.", 10)
    sample_table_size: int = _help("Samples per table.", 8)
    save_steps: int | None = _help("Checkpoint every this many steps; the last step is always checkpointed.", 50)
    save_total_limit: int | None = _help("Keep only the newest N checkpoints; null keeps all.", None)

    def __post_init__(self) -> None:
        def require(condition: bool, name: str, expectation: str) -> None:
            if not condition:
                raise ValueError(f"PPOConfig.{name} must be {expectation}, got {getattr(self, name)!r}")

        if (self.num_steps is None) == (self.total_episodes is None):
            raise ValueError("PPOConfig: set exactly one of num_steps and total_episodes (num_steps: null to use the other)")
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon", "logging_steps",
                     "sample_table_size", "actor_learning_rate", "critic_learning_rate", "max_grad_norm", "temperature",
                     "target_kl", "cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, name, "positive")
        for name in ("num_steps", "total_episodes", "missing_eos_penalty", "reward_clip", "early_stop_approx_kl",
                     "sample_table_every", "save_steps", "save_total_limit"):
            require(getattr(self, name) is None or getattr(self, name) > 0, name, "positive or null")
        for name in ("weight_decay", "kl_coef", "vf_coef", "entropy_coef", "reward_model_coef"):
            require(getattr(self, name) >= 0, name, ">= 0")
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        require(self.batch_size % self.mini_batch_size == 0, "mini_batch_size", f"a divisor of batch_size={self.batch_size}")
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", "'k1' or 'k3'")
        require(self.reward_normalisation in ("none", "running", "batch"), "reward_normalisation", "'none', 'running' or 'batch'")
        require(self.lr_scheduler in ("constant", "linear"), "lr_scheduler", "'constant' or 'linear'")


@dataclass
class Rollout:
    """A batch of episodes with everything the PPO epochs need. Per-token tensors are (batch, response_len),
    aligned on response tokens, and 0 where response_mask is 0."""

    prompts: list[str]  # chat-templated prompt text, as the actor saw it
    responses: list[str]  # decoded responses, special tokens removed
    prompt_ids: torch.Tensor  # (batch, prompt_len), left padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # pad after the first eos
    response_mask: torch.Tensor  # float
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor  # values[:, t] = V(prompt + response[:t])
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
    """A sequence-classification model read at every position: score(backbone hidden state) -> (batch, seq).
    The critic's value of every state; the reward model's score wherever a sequence really ends. A
    likelihood-head reward model (reward/likelihood.py) gives its cumulative log-likelihood of the response,
    counted from `response_start` (the padded prompt length), so generated tokens can't move that start."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"critic and reward model need num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_start: int | None = None) -> torch.Tensor:
        if hasattr(self.model, "token_scores"):
            return self.model.token_scores(input_ids, attention_mask, position_ids, response_start).float()
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return self.model.score(hidden.last_hidden_state).squeeze(-1).float()


class _Trained:
    """A trained model and its optimiser: plain PyTorch, or a DeepSpeed engine that owns both."""

    def __init__(self, module: torch.nn.Module, optimizer: Any, scheduler: Any, engine: Any = None) -> None:
        self.module, self.optimizer, self.scheduler, self.engine = module, optimizer, scheduler, engine

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return (self.engine or self.module)(**inputs)

    def step(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        if self.engine is not None:  # the engine clips (gradient_clipping), steps, schedules and zeroes
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


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
        deepspeed_config: str | os.PathLike | dict | None = None,
        log_hook: LogHook | None = None,
    ) -> None:
        # --- setup: checks ---------------------------------------------------------------------------------
        self.is_peft = hasattr(actor, "disable_adapter")
        if reference is None and not self.is_peft:
            raise ValueError("reference=None needs a peft actor (reference log-probs come from its disabled adapters)")
        if reward_model is None and reward_fn is None:
            raise ValueError("give a reward_model, a reward_fn, or both (their scores are summed)")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an eos token")
        self.config, self.tokenizer, self.reward_fn, self.log_hook = config, tokenizer, reward_fn, log_hook
        self.actor, self.reference, self.critic, self.reward_model = actor, reference, critic, reward_model
        self.output_dir = Path(output_dir)
        self.step_history: list[dict[str, float]] = []  # {"step": N, **metrics} for every step so far

        # --- setup: processes and devices --------------------------------------------------------------------
        self.deepspeed, self.zero_stage, self.rank, self.world_size = None, 0, 0, 1
        self.device = next(actor.parameters()).device
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
        self.num_steps = config.num_steps or math.ceil(config.total_episodes / (config.batch_size * self.world_size))

        # --- setup: prompts (each process samples its own shard) ------------------------------------------
        self.prompt_shard = list(prompts)[self.rank :: self.world_size]
        if not self.prompt_shard:
            raise ValueError(f"process {self.rank} has no prompts: {len(prompts)} prompts for {self.world_size} processes")
        self.prompt_token_ids = [
            tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"]  # the template already holds every special token
            for messages in self.prompt_shard
        ]

        # --- setup: models and optimisers ---------------------------------------------------------------------
        for model in (actor, reference, reward_model, critic):
            if model is not None:
                model.eval()  # no dropout: the ratio must compare the same function of the weights
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.requires_grad_(False)
        value_model = _TokenScores(critic)
        reward_scorer = _TokenScores(reward_model) if reward_model is not None else None
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
            self.trained_actor = _Trained(actor, actor_optimizer, make_scheduler(actor_optimizer))
            self.trained_critic = _Trained(value_model, critic_optimizer, make_scheduler(critic_optimizer))
            self.reference_forward, self.reward_forward = reference, reward_scorer
        else:
            ds_config = _resolve_deepspeed_config(deepspeed_config, config, self.world_size, actor.config)
            self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
            trained = []
            for module, optimizer in ((actor, actor_optimizer), (value_model, critic_optimizer)):
                engine, engine_optimizer, _, scheduler = deepspeed.initialize(
                    model=module, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config
                )
                trained.append(_Trained(module, engine_optimizer, scheduler, engine))
            self.trained_actor, self.trained_critic = trained
            self.reference_forward = self._frozen_for_deepspeed(reference, ds_config)
            self.reward_forward = self._frozen_for_deepspeed(reward_scorer, ds_config)

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

    def _frozen_for_deepspeed(self, model: torch.nn.Module | None, ds_config: dict) -> torch.nn.Module | None:
        if model is None or self.zero_stage != 3:  # ZeRO-0/1/2 shard no parameters: keep a replica
            return None if model is None else model.to(self.device)
        # ZeRO-3: an optimiser-less engine keeps the frozen model sharded and gathers each layer as it runs.
        engine, *_ = self.deepspeed.initialize(model=model, config=ds_config)
        return engine

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
                generator = torch.Generator().manual_seed(self.config.seed * 100_003 + data_pass)
                permutations[data_pass] = torch.randperm(shard_size, generator=generator).tolist()
            indices.append(permutations[data_pass][offset])
        return indices

    @contextlib.contextmanager
    def _generation_context(self) -> Iterator[None]:
        """ZeRO-3 with gather_params_for_generation: the whole actor on every process, ZeRO-3's per-layer hooks
        off. Those hooks release each layer after its forward, which would re-shard the gathered weights at
        every token and leave some in flight when the gather ends (DeepSpeed asserts "Cannot partition a param
        in flight"). The hooks are private DeepSpeed state (0.19.8): drop the surgery once DeepSpeed offers a
        public switch for generating with gathered parameters."""
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
                offload._register_deepspeed_module(offload.module)  # re-adds the hooks and invalidates the trace

    @torch.no_grad()
    def rollout(self, prompt_indices: Sequence[int], step: int = 0) -> Rollout:
        """Generate responses to the given prompts of this process's shard, score them, estimate advantages."""
        config, pad_id, eos_id = self.config, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        started = time.perf_counter()
        prompt_ids, prompt_mask = _left_pad([self.prompt_token_ids[i] for i in prompt_indices], pad_id, self.device)
        prompt_len = prompt_ids.shape[1]
        with self._generation_context():
            generated = self.actor.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config,
                # Un-gathered ZeRO-3 all-gathers at every forward: ranks must run as many forwards as the slowest.
                synced_gpus=self.zero_stage == 3 and not config.gather_params_for_generation and self.world_size > 1,
            )
        response_mask = ppo_math.response_mask_from_eos(generated[:, prompt_len:], eos_id)  # (batch, response_len)
        response_ids = generated[:, prompt_len:].masked_fill(response_mask == 0, pad_id)
        generation_seconds, started = time.perf_counter() - started, time.perf_counter()

        inputs = _sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        logprobs, entropy = self._response_logprobs(self.trained_actor, inputs, prompt_len, with_entropy=True)
        if self.reference_forward is None:
            with self.actor.disable_adapter():
                ref_logprobs, _ = self._response_logprobs(self.trained_actor, inputs, prompt_len)
        else:
            ref_logprobs, _ = self._response_logprobs(self.reference_forward, inputs, prompt_len)
        # Position prompt_len - 1 + t holds the state before response token t.
        values = self.trained_critic(**inputs)[:, prompt_len - 1 : -1] * response_mask
        prompts = [self.tokenizer.decode(self.prompt_token_ids[index]) for index in prompt_indices]
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        raw_scores = torch.zeros(len(prompt_indices), device=self.device)
        if self.reward_forward is not None:
            last_positions = prompt_len + ppo_math.last_token_index(response_mask)
            rows = torch.arange(len(raw_scores), device=self.device)
            raw_scores += config.reward_model_coef * self.reward_forward(**inputs, response_start=prompt_len)[rows, last_positions]
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
            prompts=prompts, responses=responses, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=response_ids, response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, entropy=entropy, raw_scores=raw_scores, scores=scores, kl=kl, rewards=rewards,
            advantages=advantages, returns=returns, generation_seconds=generation_seconds,
            scoring_seconds=time.perf_counter() - started,
        )

    def _response_logprobs(
        self, forward: Callable, inputs: dict[str, torch.Tensor], prompt_len: int, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) at the response tokens, 0 on padding; the logits at i predict token i + 1."""
        response_ids, response_mask = inputs["input_ids"][:, prompt_len:], inputs["attention_mask"][:, prompt_len:]
        # Only the last response_len + 1 positions go through the LM head: prompt logits would cost
        # (batch, prompt_len, vocab) memory for nothing.
        logits = forward(**inputs, logits_to_keep=response_ids.shape[1] + 1).logits[:, :-1]  # (batch, response_len, vocab)
        logprobs = ppo_math.token_logprobs(logits, response_ids, self.config.temperature) * response_mask
        if not with_entropy:
            return logprobs, None
        return logprobs, ppo_math.entropy_from_logits(logits, self.config.temperature) * response_mask

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

    # --------------------------------------------------------------------------------------------------------
    # PPO update
    # --------------------------------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO step (1-based): a rollout, then ppo_epochs over its mini-batches. Returns metrics, samples."""
        config = self.config
        started = time.perf_counter()
        rollout = self.rollout(self._prompt_indices(step), step)
        training_started = time.perf_counter()
        batch, prompt_len = rollout.prompt_ids.shape
        inputs = _sequence_inputs(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
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
                _check_finite(step, "policy loss", actor_loss)
                self.trained_actor.step(actor_loss, config.max_grad_norm)

                values = self.trained_critic(**mini_batch)[:, prompt_len - 1 : -1]
                value = ppo_math.clipped_value_loss(
                    values, rollout.values[rows], rollout.returns[rows], mask, config.cliprange_value
                )
                _check_finite(step, "value loss", value.loss)
                self.trained_critic.step(config.vf_coef * value.loss, config.max_grad_norm)

                for name, tensor in (("policy_loss", policy.loss), ("value_loss", value.loss),
                                     ("clip_fraction", policy.clip_fraction), ("approx_kl", policy.approx_kl),
                                     ("value_clip_fraction", value.clip_fraction)):
                    updates[name].append(tensor.item())
            if config.early_stop_approx_kl is not None:
                # All processes decide together: ZeRO needs the same number of optimiser steps everywhere.
                epoch_kl = float(np.mean(updates["approx_kl"][-(batch // config.mini_batch_size) :]))
                if self._mean_across_processes({"kl": epoch_kl})["kl"] > config.early_stop_approx_kl:
                    break
        training_seconds = time.perf_counter() - training_started

        mask = rollout.response_mask
        metrics = self._mean_across_processes({
            "ppo/reward_raw": rollout.raw_scores.mean().item(),
            "ppo/reward_normalised": rollout.scores.mean().item(),
            "ppo/kl": rollout.kl.sum(dim=1).mean().item(),  # per episode, with the estimator of the reward
            "ppo/kl_coef": self.kl_controller.value,
            "ppo/entropy": ppo_math.masked_mean(rollout.entropy, mask).item(),
            **{f"ppo/{name}": float(np.mean(values)) for name, values in updates.items()},
            "ppo/explained_variance": ppo_math.explained_variance(rollout.values, rollout.returns, mask).item(),
            "ppo/response_length": mask.sum(dim=1).mean().item(),
            "ppo/eos_fraction": (rollout.response_ids == self.tokenizer.eos_token_id).any(dim=1).float().mean().item(),
        })
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
        ]
        return metrics, samples[: config.sample_table_size]

    # --------------------------------------------------------------------------------------------------------
    # Train, checkpoint, save
    # --------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict[str, float]]:
        """Run the PPO steps; with resume=True continue from the newest checkpoint in output_dir, if any.
        Refuses an output_dir that already holds checkpoints unless resuming. Returns each step's metrics."""
        config, history = self.config, []
        latest = self._checkpoints()[-1] if self._checkpoints() else None
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.output_dir} already holds {latest.name}: pass resume=True to continue it, or use another output_dir"
            )
        self.step_history = []
        if latest is not None:
            start_step = self._load_checkpoint(latest)
        else:
            start_step = 0
            _seed_everything(config.seed + self.rank)  # each process samples different responses
        progress = tqdm(range(start_step + 1, self.num_steps + 1), initial=start_step, total=self.num_steps,
                        desc="PPO", disable=self.rank != 0)
        for step in progress:
            metrics, samples = self.step(step)
            history.append(metrics)
            self.step_history.append({"step": step, **metrics})
            progress.set_postfix(reward=f"{metrics['ppo/reward_raw']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
            samples_due = config.sample_table_every is not None and step % config.sample_table_every == 0
            if self.log_hook is not None and self.rank == 0 and (step % config.logging_steps == 0 or samples_due):
                self.log_hook(step, metrics, samples if samples_due else None)
            if (config.save_steps is not None and step % config.save_steps == 0) or step == self.num_steps:
                self._save_checkpoint(step)
        return history

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary directories start with a dot and never match)."""
        found = [path for path in self.output_dir.glob("checkpoint-*") if path.name.split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda path: int(path.name.split("-", 1)[1]))

    def _save_checkpoint(self, step: int) -> None:
        """Write checkpoint-{step} into a temporary directory renamed at the end: a crash mid-write leaves the
        previous checkpoint the newest complete one."""
        final, temporary = self.output_dir / f"checkpoint-{step}", self.output_dir / f".checkpoint-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self._barrier()
        if self.deepspeed is not None:  # each process writes its shards of the weights and optimiser states
            self.trained_actor.engine.save_checkpoint(temporary / "actor", tag="state")
            self.trained_critic.engine.save_checkpoint(temporary / "critic", tag="state")
        elif self.rank == 0:
            save_model(self.actor, str(temporary / "actor.safetensors"))
            save_model(self.critic, str(temporary / "critic.safetensors"))
            for name, trained in (("actor", self.trained_actor), ("critic", self.trained_critic)):
                torch.save(trained.optimizer.state_dict(), temporary / f"{name}_optimizer.pt")
                torch.save(trained.scheduler.state_dict(), temporary / f"{name}_scheduler.pt")
        state = {"step": step, "kl_controller": self.kl_controller.state_dict(),
                 "score_moments": self.score_moments.state_dict(), "rng": _rng_state()}
        torch.save(state, temporary / f"trainer_state_rank{self.rank}.pt")
        if self.rank == 0:  # metrics are already averaged across processes
            (temporary / HISTORY_FILE).write_text("".join(json.dumps(record) + "\n" for record in self.step_history))
        self._barrier()
        if self.rank == 0:
            os.replace(temporary, final)
            if self.config.save_total_limit is not None:
                for old in self._checkpoints()[: -self.config.save_total_limit]:
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
        history_file = checkpoint / HISTORY_FILE  # absent in checkpoints written before it existed
        if history_file.is_file():
            self.step_history = [json.loads(line) for line in history_file.read_text().splitlines() if line]
        return int(state["step"])

    def save_model(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the actor as a plain Hugging Face model (safetensors; LoRA adapters merged) with the tokenizer,
        through a temporary directory whose files are then moved in. `path` may exist (the stage's output
        directory holds its manifest and checkpoints) but must not hold a model already, unless `overwrite`
        (the stage resuming a run that died after saving, before registering). Under DeepSpeed every process
        must call it (ZeRO-3 gathers the weights); process 0 writes."""
        path = Path(path)
        exists = (path / "config.json").exists() and not overwrite
        # Every process looks before process 0 writes: a slower process would otherwise find the new model
        # and refuse (a ZeRO-2 race seen under the launcher). All of them raise, or none.
        self._barrier()
        if exists:
            raise FileExistsError(f"{path} already holds a model: save_model never overwrites a model")
        temporary = path.with_name(f".{path.name}.tmp")
        gathered = (self.deepspeed.zero.GatheredParameters(list(self.actor.parameters())) if self.zero_stage == 3
                    else contextlib.nullcontext())
        with gathered:
            if self.rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
                model = copy.deepcopy(self.actor).merge_and_unload() if self.is_peft else self.actor
                state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
                model.save_pretrained(temporary, state_dict=state_dict)
                self.tokenizer.save_pretrained(temporary)
                path.mkdir(parents=True, exist_ok=True)
                # Weights first, config.json last: a directory with config.json is a complete model.
                files = sorted(temporary.iterdir(), key=lambda file: file.name == "config.json")
                for file in files:
                    os.replace(file, path / file.name)
                temporary.rmdir()
        self._barrier()

    # --------------------------------------------------------------------------------------------------------
    # Processes
    # --------------------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def _mean_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world_size).tolist()))


def _left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded (batch, max_len) ids and mask: every prompt ends in the last column, where
    generation continues."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _sequence_inputs(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Model inputs for left-padded prompt + right-padded response: one contiguous run of real tokens per row,
    positions counted from its first token (0 on padding), as generate() counted them."""
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids}


def _check_finite(step: int, quantity: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"PPO step {step}: non-finite {quantity}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain lists and numbers, so the file loads with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
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
    """Fill a DeepSpeed config's "auto" values from PPOConfig. An explicit value contradicting PPOConfig, an
    optimizer/scheduler section (we build one AdamW per model) or an "auto" left unfilled is an error naming it."""
    ds_config = copy.deepcopy(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(f"deepspeed config: remove '{section}'; PPOTrainer builds the optimisers from PPOConfig")
    derived = {
        "train_micro_batch_size_per_gpu": config.mini_batch_size,
        "gradient_accumulation_steps": 1,  # one optimiser step per mini-batch, as PPO's epochs assume
        "train_batch_size": config.mini_batch_size * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in derived.items():
        if ds_config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"deepspeed config: {key}={ds_config[key]!r} contradicts PPOConfig ({value!r}); use \"auto\"")
        ds_config[key] = value
    for precision, enabled in (("bf16", config.bf16), ("fp16", False)):
        if ds_config.get(precision, {}).get("enabled") == "auto":
            ds_config[precision]["enabled"] = enabled
    hidden = getattr(model_config, "hidden_size", None)
    if hidden:  # the bucket sizes Hugging Face's DeepSpeed integration derives from the hidden size
        zero = ds_config.get("zero_optimization", {})
        sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value

    def refuse_auto(node: Any, path: str) -> None:
        if node == "auto":
            raise ValueError(f"deepspeed config: no value to fill \"auto\" at {path}")
        if isinstance(node, dict):
            for key, child in node.items():
                refuse_auto(child, f"{path}.{key}" if path else key)

    refuse_auto(ds_config, "")
    return ds_config
