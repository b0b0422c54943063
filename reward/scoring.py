"""Score responses with a reward model, through the same chat template the policy was trained with."""

from __future__ import annotations

from typing import Any

import torch

from stages.core import distributed
from stages.core.errors import UserError


def render(tokenizer: Any, prompt: list[dict[str, str]], response: str) -> str:
    """The full conversation text a reward model sees: prompt turns + the assistant response."""
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)


@torch.no_grad()
def score(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Scalar reward per (prompt, response); shape (len(prompts),).

    Right padding: the sequence-classification head reads the last non-pad token, which is the
    turn's end token, exactly as in RM training.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score() got {len(prompts)} prompts but {len(responses)} responses")
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    scores = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = prompts[start : start + batch_size]
            texts = [render(tokenizer, p, r) for p, r in zip(batch_prompts, responses[start : start + batch_size])]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            if hasattr(model, "token_scores"):  # likelihood head: the reply starts where the rendered prompt ends
                batch["response_start"] = torch.tensor([_prompt_length(tokenizer, p) for p in batch_prompts], device=model.device)
            scores.append(model(**batch).logits.squeeze(-1).float().cpu())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def score_across_ranks(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], responses: list[str], batch_size: int = 64
) -> torch.Tensor:
    """score(), with the batches dealt out to the launcher's ranks; every rank gets every score.
    Collective: call it on every rank (outside the launcher it is score())."""
    if len(prompts) != len(responses):
        raise ValueError(f"score() got {len(prompts)} prompts but {len(responses)} responses")
    chunk_size = distributed.spread_chunk_size(len(prompts), at_most=batch_size)

    def score_chunk(_: int, chunk: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        return score(model, tokenizer, [prompt for prompt, _ in chunk], [response for _, response in chunk], batch_size).tolist()

    return torch.tensor(distributed.map_shards(score_chunk, list(zip(prompts, responses)), chunk_size))


def _prompt_length(tokenizer: Any, prompt: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class TokenizerMismatchError(UserError, ValueError):
    """Two models that must share a tokenizer (policy and reward model) do not; the message names both."""


def check_same_tokenizer(first: Any, second: Any, first_name: str, second_name: str) -> None:
    """Refuse to pair models whose tokenizers differ: PPO and reward scoring feed one model's token ids
    (or its chat-formatted text) to the other, so any difference makes the scores meaningless."""
    checks = {
        "vocabulary": first.get_vocab() == second.get_vocab(),
        "pad/eos tokens": (first.pad_token_id, first.eos_token_id) == (second.pad_token_id, second.eos_token_id),
        "chat template": first.chat_template == second.chat_template,
    }
    differences = [what for what, same in checks.items() if not same]
    if differences:
        raise TokenizerMismatchError(
            f"tokenizers of {first_name} and {second_name} differ in: {', '.join(differences)}; "
            "train the reward model from the policy's SFT model so both share one tokenizer and template"
        )
