"""Held-out evaluation on the user's own data: the rows and pairs each source holds out of training
(`DatasetSpec.eval_split`, or `eval_fraction` of its rows chosen by a hash of the row).

Metrics, the same keys whatever the source (`prefix` is `eval/`, or `eval/data/` next to embedded tasks):
- SFT rows: `loss` (token-level NLL of the held-out completions, as TRL's SFT trains: completion tokens
  only), `token_accuracy` (argmax = the next completion token), `exact_match` (greedy answer = the
  reference after whitespace trim); each also for the starting model (`ref_*`) on the same rows.
- DPO pairs: the implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of both sides: `rewards/accuracies`
  (chosen above rejected), `rewards/margins`, and the summed log-probs of each side under policy and reference.
Collective under the launcher: every rank calls these and takes its share of the rows.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.core import distributed
from stages.generation import generate
from stages.logprobs import token_logprobs
from stages.tasks.verifier import is_correct


def encode(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(context ids, full ids) of a row: the chat prompt ready for the reply and prompt + completion, as TRL's
    SFT tokenizes conversational prompt/completion rows; a `text` row is all completion."""
    if "text" in row:
        return [], tokenizer(row["text"])["input_ids"]
    prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
    return list(prompt_ids), list(full_ids)


@torch.no_grad()
def completion_scores(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int) -> list[tuple[float, int, int]]:
    """Per row: the completion tokens' summed log-probability, their number, and how many of them the model's
    argmax predicts. Collective under the launcher."""

    def score(_: int, chunk: list[dict[str, Any]]) -> list[tuple[float, int, int]]:
        encoded = [encode(tokenizer, row) for row in chunk]
        width = max(len(full) for _, full in encoded)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        completion_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for index, (context, full) in enumerate(encoded):
            input_ids[index, : len(full)] = torch.tensor(full)
            attention_mask[index, : len(full)] = 1
            completion_mask[index, max(len(context), 1) : len(full)] = True  # the first token has no prediction
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits[:, :-1]
        finally:
            model.train(was_training)
        targets, mask = input_ids[:, 1:].to(logits.device), completion_mask[:, 1:].to(logits.device)  # (batch, width - 1)
        logprobs = token_logprobs(logits, targets) * mask
        correct = (logits.argmax(-1) == targets) & mask
        return list(zip(logprobs.sum(-1).tolist(), mask.sum(-1).tolist(), correct.sum(-1).tolist()))

    return distributed.map_shards(score, rows, distributed.spread_chunk_size(len(rows), at_most=batch_size))


def sft_metrics(
    model: Any, reference: Any | None, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int, prefix: str = "eval/"
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Loss, token accuracy and exact match of `model` and, unless None, of `reference` (the starting model) on held-out rows."""
    metrics: dict[str, float] = {f"{prefix}num_rows": float(len(rows))}
    chat_rows = [row for row in rows if "prompt" in row]
    answers: dict[str, list[str]] = {}
    for who, scored in (("", model), ("ref_", reference)):
        if scored is None:
            continue
        scores = completion_scores(scored, tokenizer, rows, batch_size)
        tokens = sum(count for _, count, _ in scores)
        metrics[f"{prefix}{who}loss"] = -sum(logprob for logprob, _, _ in scores) / max(tokens, 1)
        metrics[f"{prefix}{who}token_accuracy"] = sum(correct for _, _, correct in scores) / max(tokens, 1)
        if chat_rows:
            answers[who] = generate(scored, tokenizer, [row["prompt"] for row in chat_rows], max_new_tokens, batch_size)
            hits = [is_correct(answer, row["completion"][-1]["content"]) for answer, row in zip(answers[who], chat_rows)]
            metrics[f"{prefix}{who}exact_match"] = sum(hits) / len(hits)
    samples = [
        {"prompt": row["prompt"][-1]["content"], "response": response, "answer": row["completion"][-1]["content"], "reference_response": reference_response}
        for row, response, reference_response in list(zip(chat_rows, answers.get("", []), answers.get("ref_", [])))[:8]
    ]
    return metrics, samples


def dpo_pair_metrics(policy: Any, reference: Any, tokenizer: Any, pairs: list[dict[str, Any]], beta: float, batch_size: int, prefix: str = "eval/") -> dict[str, float]:
    """DPO's implicit reward on held-out pairs, and each side's log-probability under policy and reference."""
    sides = {side: [{"prompt": pair["prompt"], "completion": pair[side]} for pair in pairs] for side in ("chosen", "rejected")}
    logps = {
        (who, side): torch.tensor([logprob for logprob, _, _ in completion_scores(model, tokenizer, rows, batch_size)])
        for who, model in (("policy", policy), ("reference", reference)) for side, rows in sides.items()
    }
    chosen_rewards = beta * (logps["policy", "chosen"] - logps["reference", "chosen"])
    rejected_rewards = beta * (logps["policy", "rejected"] - logps["reference", "rejected"])
    return {
        f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}logps/chosen": logps["policy", "chosen"].mean().item(),
        f"{prefix}logps/rejected": logps["policy", "rejected"].mean().item(),
        f"{prefix}ref_logps/chosen": logps["reference", "chosen"].mean().item(),
        f"{prefix}ref_logps/rejected": logps["reference", "rejected"].mean().item(),
        f"{prefix}num_pairs": float(len(pairs)),
    }
