"""A reward model read from a causal LM's own likelihood of the response (`head: likelihood`).

score(prompt, response) = Σ_t log p(response token t | prompt, earlier response tokens), the sum over
every token after the prompt (the reply, and whatever the template renders after it: its end token), under
a copy of the SFT model trained with the same Bradley-Terry loss as the classifier head (plus, with
`chosen_nll_coefficient`, the chosen reply's negative log-likelihood: `with_chosen_nll`). It is the "your language model
is secretly a reward model" reading (DPO's implicit reward, with the SFT model as its own start and
no reference term).

Why it exists: the classifier head reads one hidden state, the last token's, so it must check the whole
answer in the layers it has left after reading it. The embedded 2-layer default cannot: its held-out
pairwise accuracy stays near 0.60, while the same SFT model's likelihood ranks the same pairs at
0.82-0.89 before any training (configs/reward/tiny.yaml has the measurements). The likelihood head
compares each answer token with the model's prediction, position by position, which is what
generating the answer needs anyway.

The output is a plain causal-LM checkpoint: `AutoModelForCausalLM` loads it; its config.json carries
`reward_head` (kind and the assistant marker's token ids), which `reward.models.load_reward` uses to read
it as a reward model. Scores are log-likelihoods (<= 0); PPO whitens rewards, and the pairwise loss
ignores any offset.

Where the response starts: callers that know it pass `response_start` (our PPO: the prompt's padded
length; `reward.scoring.score`: the rendered prompt's length). Otherwise (TRL's RewardTrainer and
GRPO/RLOO, which call `forward(input_ids, attention_mask)`) it is the token after the last occurrence of
the assistant marker. That search trusts the text: a completion that spells the marker out would be
scored from there on, and a BPE template that merges the marker's last token with the reply's first
(a reply starting with a newline after Qwen's "assistant\n") has no match, which is an error naming the row.

"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from stages.core.files import write_json
from stages.logprobs import last_token_index

HEAD_KEY = "reward_head"
KIND = "likelihood"


class LikelihoodHeadError(ValueError):
    """The likelihood head cannot find the response in a sequence (or its tokenizer has no marker)."""


def response_marker(tokenizer: Any) -> list[int]:
    """Token ids the chat template puts right before an assistant reply (its generation prompt)."""
    conversation = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    if not with_prompt.startswith(without) or with_prompt == without:
        raise LikelihoodHeadError(
            "the tokenizer's chat template adds no generation prompt, so the likelihood head cannot tell where "
            "a response starts; use `head: classifier`"
        )
    return tokenizer(with_prompt[len(without) :], add_special_tokens=False)["input_ids"]


def head_config(tokenizer: Any) -> dict[str, Any]:
    """What config.json records of the head: its kind and the marker that precedes a reply."""
    return {"kind": KIND, "response_marker": response_marker(tokenizer)}


def response_token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    marker: list[int],
    response_start: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, seq) log-probability of each response token (0 elsewhere): position p holds log p(token p).

    The response is every attended token from `response_start` (a position, or one per row) on, or, without
    it, after the last occurrence of `marker` in its row; padding may sit on either side.
    """
    batch, length = input_ids.shape
    starts = _marker_ends(input_ids, attention_mask, marker) if response_start is None else torch.as_tensor(response_start, device=input_ids.device).expand(batch)
    positions = torch.arange(length, device=input_ids.device)
    response_mask = (positions[None, :] >= starts[:, None]) & attention_mask.bool()  # (batch, seq)
    logprobs = torch.zeros(batch, length, device=logits.device, dtype=torch.float32)
    # The logits at p - 1 predict token p. Gather first, normalise with logsumexp: no second (batch, seq, vocab) tensor.
    shifted = logits[:, :-1].float()
    logprobs[:, 1:] = shifted.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - shifted.logsumexp(-1)
    return logprobs * response_mask


def _marker_ends(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """(batch,) position right after the last `marker` in each row; an error naming a row without one."""
    marker_ids = torch.tensor(marker, device=input_ids.device)
    windows = input_ids.unfold(1, len(marker), 1)  # (batch, length - len(marker) + 1, len(marker))
    hits = (windows == marker_ids).all(-1) & attention_mask[:, : windows.shape[1]].bool()
    after_marker = torch.arange(windows.shape[1], device=input_ids.device) + len(marker)
    starts = torch.where(hits, after_marker, torch.full_like(after_marker, -1)).max(-1).values  # (batch,)
    missing = (starts < 0).nonzero()
    if len(missing):
        raise LikelihoodHeadError(f"row {missing[0].item()} has no assistant-turn marker {marker}: nothing to score as a response")
    return starts


class _LikelihoodRewardMixin:
    """Turns a causal LM class into a reward model with the interface of a sequence classifier.

    Why a subclass of the LM's own class (made in `reward_class`, swapped in by `as_reward_model`) and not a
    wrapper module: TRL's trainers and HF's save/ZeRO-3 paths want the PreTrainedModel itself, and a subclass
    keeps the LM's parameter names, so what it saves is the plain causal LM. Being made at run time, the class
    cannot be pickled by name (`torch.save(model)`); save with `save_pretrained`.
    """

    def token_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        response_start: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq): the score of the response so far at each position (cumulative log-likelihood), so
        that reading it at a sequence's last token gives the sequence score, as PPO reads a classifier."""
        logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        marker = self.config.reward_head["response_marker"]
        return response_token_logprobs(logits, input_ids, attention_mask, marker, response_start).cumsum(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        response_start: int | torch.Tensor | None = None,
        **_: Any,  # what trainers also pass (use_cache, margin, token_type_ids): not used here
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        scores = self.token_scores(input_ids, attention_mask, position_ids, response_start)
        last = last_token_index(attention_mask)  # the last attended token, for either padding side
        return SequenceClassifierOutputWithPast(logits=scores[torch.arange(len(scores)), last][:, None])


@functools.cache
def reward_class(causal_lm_class: type) -> type:
    """`causal_lm_class` with the likelihood reward forward; same weights, so it saves a plain causal LM."""
    return type(f"LikelihoodReward{causal_lm_class.__name__}", (_LikelihoodRewardMixin, causal_lm_class), {})


def as_reward_model(causal_lm: Any, tokenizer: Any) -> Any:
    """Give a loaded causal LM the likelihood reward head (in place; weights untouched)."""
    causal_lm.config.reward_head = head_config(tokenizer)
    return read_as_reward_model(causal_lm)


def read_as_reward_model(causal_lm: Any) -> Any:
    """A causal LM whose config already has `reward_head` (a saved likelihood-head RM), read as a reward model."""
    causal_lm.__class__ = reward_class(type(causal_lm))
    # What RewardTrainer and PPO check for a scalar reward; a LoRA merge rebuilds the config from the SFT
    # model's, which says 2.
    causal_lm.config.num_labels = 1
    return causal_lm


def with_chosen_nll(trainer_class: type, coefficient: float) -> type:
    """`trainer_class` (TRL's RewardTrainer) with `coefficient` x the chosen replies' negative log-likelihood
    (summed over each reply's tokens, averaged over pairs) added to its pairwise loss; logged as `chosen_nll`.

    Why: the pairwise loss alone is free to make both replies of a pair less likely, and a likelihood-head
    score is only as good as the model's grip on the correct answers. The same term as DPO's `rpo_alpha`.
    Measured on the embedded default (lr 3e-4, 1 epoch): held-out accuracy 0.82 without it, 0.87 with it
    (configs/reward/tiny.yaml).
    """
    if not coefficient:
        return trainer_class

    class ChosenNLL(trainer_class):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            # RewardTrainer stacks the chosen replies first; a likelihood-head score is the reply's log-likelihood.
            chosen_nll = -outputs.logits.squeeze(-1).chunk(2)[0].mean()
            mode = "train" if model.training else "eval"
            self._metrics[mode]["chosen_nll"].append(self.accelerator.gather_for_metrics(chosen_nll.detach()).mean().item())
            loss = loss + coefficient * chosen_nll
            return (loss, outputs) if return_outputs else loss

    ChosenNLL.__name__ = ChosenNLL.__qualname__ = trainer_class.__name__
    return ChosenNLL


def is_likelihood_head(path: str | Path) -> bool:
    """Whether the checkpoint at `path` was saved with the likelihood head."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return False  # a damaged config.json is reported where the model is loaded (core/models.py)
    return (config.get(HEAD_KEY) or {}).get("kind") == KIND


def mark_saved_config(path: str | Path, tokenizer: Any) -> None:
    """Rewrite the config.json of the checkpoint saved at `path` with the head recorded (a LoRA merge saves a
    config without it) and the plain LM class as its architecture, so other tools load it as the causal LM it is."""
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    architectures = [name.removeprefix("LikelihoodReward") for name in config.get("architectures") or []]
    write_json(config_file, config | {HEAD_KEY: head_config(tokenizer), "architectures": architectures})
