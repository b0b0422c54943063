"""Generation shared by every stage and our PPO: chat prompts encoded and left padded, greedy or sampled
answers, each sampled batch seeded on its own.

Decoding is our own loop (`_decode`), not `model.generate`: the KV cache is written in place
(stages/core/kv_cache.py) and a row that has stopped leaves the batch. It gives the tokens `model.generate`
gives for the same batch, greedy and sampled (tests/stages/test_generation.py); bench/generation.py measures it.
Models whose cache is not plain full attention (sliding windows...) keep `model.generate`.

Under the deepspeed launcher `generate` is collective: every rank calls it, answers its share of the
batches (core.distributed.map_shards) and gets every answer. Sampled batches have a fixed size and a
seed of their own (`batch_seed`), so on-policy samples are the same at any number of ranks.

May import: `stages.core` and torch; nothing above (checked by import-linter).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from stages.core import distributed, kv_cache

Messages = list[dict[str, str]]
# Sampled generation runs in batches of this size, each with its own seed: the samples then do not depend
# on how many ranks share the batches (64: even 200 prompts still give every rank of 2-4 some work).
SAMPLE_BATCH_SIZE = 64


def encode_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    """The token ids of a chat prompt ready for the assistant's reply (no extra special tokens: the chat
    template already holds every one)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded (batch, max_len) ids and mask: every prompt ends in the last column, where
    generation continues."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def left_padded_prompts(tokenizer: Any, prompts: list[Messages], device: torch.device) -> dict[str, torch.Tensor]:
    """The chat-formatted prompts as one left-padded batch: `input_ids` and `attention_mask`, (batch, max_len)."""
    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one sampled batch: distinct for nearby seeds too (seed 42 batch 1 vs seed 43 batch 0)."""
    return seed * 100_003 + batch_index


@contextmanager
def batch_rng(model: Any, seed: int, batch_index: int) -> Iterator[None]:
    """The global RNG (CPU, and the model's GPU) seeded for one batch, and restored afterwards."""
    device = model.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(batch_seed(seed, batch_index))
        yield


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Messages],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    stop_token_ids: list[int] | None = None,
    sort_by_length: bool = False,
    max_batch_tokens: int | None = None,
    progress: str | None = None,
) -> list[str]:
    """Answer chat prompts; returns decoded responses without special tokens, in the order of `prompts`.
    Collective under the launcher.

    Greedy: the prompts are spread over the ranks in batches of at most `batch_size`. Sampled: batches of
    exactly `batch_size`, batch i drawn with its own seed (from `seed` and i), without moving the caller's
    global RNG. `stop_token_ids`: the tokens that end an answer (default the tokenizer's eos; see
    `end_of_turn_ids`). `sort_by_length` (greedy): batches of prompts of similar length, longest first (less
    padding; a batch too large for memory fails at once), each also holding at most `max_batch_tokens` prompt
    tokens once padded (a batch ends early where one long prompt would pad the others to its length).
    `progress`: a progress bar with this title (main process).
    """
    chunk_size = batch_size if do_sample else distributed.spread_chunk_size(len(prompts), at_most=batch_size)
    order = list(range(len(prompts)))
    if sort_by_length:
        lengths = [len(encode_prompt(tokenizer, prompt)) for prompt in prompts]
        order.sort(key=lambda index: -lengths[index])  # stable: equal lengths keep their order
    bar = _progress_bar(progress, len(prompts))

    def answer(index: int, batch_prompts: list[Messages]) -> list[str]:
        with batch_rng(model, seed, index):  # only sampling draws from it
            responses = _generate_batch(model, tokenizer, batch_prompts, max_new_tokens, do_sample, temperature, stop_token_ids)
        if bar is not None:
            bar.update(min(len(batch_prompts) * distributed.world_size(), bar.total - bar.n))  # the other ranks answer alike
        return responses

    try:
        if sort_by_length and not do_sample:
            chunks = _length_sorted_chunks([lengths[index] for index in order], chunk_size, max_batch_tokens)
            ordered = [[prompts[order[position]] for position in chunk] for chunk in chunks]
            # One chunk per item: map_shards deals the (unequal) batches out to the ranks as it deals equal ones.
            answers = [r for batch in distributed.map_shards(lambda i, one: [answer(i, one[0])], ordered, 1) for r in batch]
        else:
            answers = distributed.map_shards(answer, [prompts[index] for index in order], chunk_size)
    finally:
        if bar is not None:
            bar.close()
    responses = [""] * len(prompts)
    for position, index in enumerate(order):
        responses[index] = answers[position]
    return responses


def _length_sorted_chunks(lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Consecutive positions of length-sorted (longest first) prompts, cut into batches of at most `batch_size`
    prompts and at most `max_batch_tokens` once padded to the batch's longest (its first) prompt."""
    chunks: list[list[int]] = []
    for position, length in enumerate(lengths):
        chunk = chunks[-1] if chunks else None
        fits = chunk is not None and len(chunk) < batch_size and (
            max_batch_tokens is None or (len(chunk) + 1) * lengths[chunk[0]] <= max_batch_tokens
        )
        if fits:
            chunk.append(position)
        else:
            chunks.append([position])
    return chunks


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end the assistant's turn: the tokenizer's eos and every eos of the model's generation
    config (SmolLM2: `<|im_end|>`; Llama 3 lists `<|eot_id|>` there too)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (tiny tokenizer: `<|end|>`; ChatML:
    `<|im_end|>`), read off the template itself; None where the template closes turns with no special token."""
    marker = "MARKER-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that refuses this conversation tells us nothing
        return None
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the template's end-of-turn token first, then `end_of_turn_ids`."""
    turn_end = end_of_turn_token(tokenizer)
    return ([turn_end] if turn_end is not None else []) + [t for t in end_of_turn_ids(model, tokenizer) if t != turn_end]


def sample_responses(
    model: Any, tokenizer: Any, prompts: list[Messages], seed: int, max_new_tokens: int, temperature: float = 1.0
) -> list[str]:
    """One sampled answer per prompt, seeded (on-policy negatives). Collective under the launcher."""
    return generate(model, tokenizer, prompts, max_new_tokens, SAMPLE_BATCH_SIZE, do_sample=True, temperature=temperature, seed=seed)


def _progress_bar(title: str | None, total: int) -> Any:
    if title is None or not distributed.is_main_process():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=title, unit="prompt", dynamic_ncols=True)


@torch.no_grad()
def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[Messages], max_new_tokens: int, do_sample: bool, temperature: float,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    was_training = model.training
    model.eval()
    try:
        batch = left_padded_prompts(tokenizer, prompts, model.device)
        stop_ids = stop_token_ids or _as_list(tokenizer.eos_token_id)
        answers = _decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens, stop_ids, do_sample, temperature)
        if answers is None:  # a cache layout our loop does not reproduce (sliding windows...): transformers' loop
            answers = _plain_generate(model, batch, max_new_tokens, stop_ids, do_sample, temperature, tokenizer.pad_token_id)
        return tokenizer.batch_decode(answers, skip_special_tokens=True)
    finally:
        model.train(was_training)


def _decode(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
    do_sample: bool, temperature: float,
) -> list[list[int]] | None:
    """Our decode loop: each row's new tokens, up to and including its stop token. None where the model's cache
    layout is not plain full attention (see stages.core.kv_cache).

    It computes what `model.generate` computes for this left-padded batch (same inputs, positions, masks and
    attention shapes, logits of the last position only; the cache written in place instead of concatenated),
    except that a row that has stopped leaves the batch instead of generating padding until the longest row ends
    (IFBench's answers run from a few to hundreds of tokens): each remaining row's numbers do not change. Sampling draws what `torch.multinomial` would for the whole batch (see `_next_tokens`),
    so a sampled batch's answers are those of `model.generate` under the same seed too.
    """
    batch, width = input_ids.shape
    cache = kv_cache.preallocated_cache(model, width + max_new_tokens)
    if cache is None:
        return None
    stop = torch.tensor(stop_ids, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)  # the batch row of each active row
    # Positions as generate derives them from the mask: left padding shifts no prompt (pads sit at position 1).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    answers: list[list[int]] = [[] for _ in range(batch)]
    inputs = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (active, vocab)
        tokens = _next_tokens(logits, do_sample, temperature, batch, rows)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            answers[row].append(token)
        finished = torch.isin(tokens, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().flatten()
            rows, tokens, attention_mask, position_ids = rows[keep], tokens[keep], attention_mask[keep], position_ids[keep]
            kv_cache.select_rows(cache, keep)
        inputs = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return answers


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, batch: int, rows: torch.Tensor) -> torch.Tensor:
    """Greedy: the argmax. Sampled: softmax(logits / temperature), drawn as `torch.multinomial(probs, 1)` draws it
    (argmax of probs / Exp(1) noise), with the noise of every row of the batch drawn each step and the active rows'
    taken: the global RNG advances as under `model.generate`, where stopped rows still draw, so the samples match
    its samples and do not depend on which rows have left."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    noise = torch.empty((batch, probs.shape[-1]), device=probs.device).exponential_(1)[rows]
    return (probs / noise).argmax(dim=-1)


def _plain_generate(
    model: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, stop_ids: list[int], do_sample: bool,
    temperature: float, pad_token_id: int,
) -> list[list[int]]:
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_token_id,
        eos_token_id=stop_ids,
    )
    return output[:, batch["input_ids"].shape[1] :].tolist()  # (batch, generated_len); padding decodes to nothing


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    return [] if token_ids is None else token_ids if isinstance(token_ids, list) else [token_ids]
