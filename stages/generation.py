"""Generation shared by every stage and our PPO: chat prompts encoded and left padded, greedy or sampled
answers, each sampled prompt seeded on its own.

Decoding is our own loop with continuous batching (stages/core/continuous.py), not `model.generate`: the KV
cache is written in place (stages/core/kv_cache.py), a row that has stopped leaves the batch and the next
waiting prompt takes its slot. Greedy answers are those of `model.generate` on each prompt alone, up to fp32
near-ties (tests/stages/test_generation.py); bench/generation.py measures the speed. Models whose cache is not
plain full attention (sliding windows...) keep `model.generate`, in fixed batches.

Under the deepspeed launcher `generate` is collective: every rank calls it, answers its share of the
prompts (core.distributed.map_shards) and gets every answer. Each sampled prompt draws from a generator
seeded by (seed, its index in the caller's list) (`batch_seed`), so on-policy samples are the same at any
number of ranks and any batch size. `generate_ids` is the same loop on one process's token ids, not
collective (with nucleus sampling, for a rollout; our PPO still samples with `model.generate`, see
PPOTrainer.generate_responses).

May import: `stages.core` and torch; nothing above (checked by import-linter).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from stages.core import continuous, distributed

Messages = list[dict[str, str]]
# Rows decoding at once in sampled generation (`sample_responses`) and in the KL estimate's batches
# (stages/evaluation.py). The samples do not depend on it (each prompt has its own generator).
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
    """The seed of item `batch_index` (a sampled prompt's index in the caller's list, a batch's index): distinct for
    nearby seeds too (seed 42 item 1 vs seed 43 item 0)."""
    return seed * 100_003 + batch_index


@contextmanager
def batch_rng(model: Any, seed: int, batch_index: int) -> Iterator[None]:
    """The global RNG (CPU, and the model's GPU) seeded for one batch, and restored afterwards."""
    with _seeded(model, batch_seed(seed, batch_index)):
        yield


def generate(model: Any, tokenizer: Any, prompts: list[Messages], max_new_tokens: int, batch_size: int, **options: Any) -> list[str]:
    """Answer chat prompts; returns decoded responses without special tokens, in the order of `prompts`: the answers of
    `generate_ended`, whose keyword `options` it takes (do_sample, temperature, seed, stop_token_ids, sort_by_length,
    max_batch_tokens, progress). Collective under the launcher."""
    return generate_ended(model, tokenizer, prompts, max_new_tokens, batch_size, **options)[0]


def generate_ended(
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
) -> tuple[list[str], list[bool]]:
    """Answer chat prompts: decoded responses without special tokens, in the order of `prompts`, and for each whether
    the model ended it with a stop token (False: cut at `max_new_tokens`, mid-sentence or in a loop). Collective under
    the launcher.

    Continuous batching (stages.core.continuous): up to `batch_size` rows decode at once and a stopped row's slot
    goes to the next waiting prompt. Under the launcher each rank takes every world_size-th prompt of the
    admission order. Greedy answers are each prompt's own (model.generate's on the prompt alone, up to fp32
    near-ties). Sampled: prompt i of `prompts` draws from its own generator seeded `batch_seed(seed, i)`, so its
    sample depends on (seed, i, prompt) only: not on the batch size, the other prompts or the number of ranks; the
    caller's global RNG is not moved. `stop_token_ids`: the tokens that end an answer (default the tokenizer's eos;
    see `end_of_turn_ids`). `sort_by_length`: admit prompts longest first (less padding in each prefill; a batch
    too large for memory fails at once). `max_batch_tokens`: prompts join the running batch only while it then holds
    at most this many positions (rows x width, padding included; a long prompt decodes with few others), and a
    batch of the `model.generate` fallback holds at most this many prompt tokens once padded. `progress`: a
    progress bar with this title (main process).
    """
    token_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda index: -len(token_ids[index]))  # stable: equal lengths keep their order
    size = distributed.world_size()
    bar = _progress_bar(progress, len(prompts))

    def answer(_: int, share: list[list[int]]) -> list[list[tuple[str, bool]]]:
        """One rank's share of the prompts (their indices in `prompts`, in admission order), answered."""
        on_finished = None if bar is None else lambda count: bar.update(min(count * size, bar.total - bar.n))
        indices = share[0]
        return [_generate_share(model, tokenizer, [token_ids[i] for i in indices], indices, max_new_tokens, batch_size,
                                do_sample, temperature, seed, stop_token_ids, max_batch_tokens, on_finished)]

    try:
        # One share per rank (map_shards deals item r to rank r): every rank runs its own continuous batch.
        shares = distributed.map_shards(answer, [order[rank::size] for rank in range(size)], 1)
    finally:
        if bar is not None:
            bar.close()
    responses, ended = [""] * len(prompts), [False] * len(prompts)
    for rank, answers in enumerate(shares):
        for index, (text, stopped) in zip(order[rank::size], answers):
            responses[index], ended[index] = text, stopped
    return responses, ended


def _length_sorted_chunks(lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Consecutive positions of the prompts (lengths in admission order, longest first when sorted), cut into batches
    of at most `batch_size` prompts and at most `max_batch_tokens` once padded to the batch's longest prompt."""
    chunks: list[list[int]] = []
    for position, length in enumerate(lengths):
        chunk = chunks[-1] if chunks else None
        fits = chunk is not None and len(chunk) < batch_size and (
            max_batch_tokens is None or (len(chunk) + 1) * max(length, *(lengths[p] for p in chunk)) <= max_batch_tokens
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
def _generate_share(
    model: Any, tokenizer: Any, token_ids: list[list[int]], indices: list[int], max_new_tokens: int, batch_size: int,
    do_sample: bool, temperature: float, seed: int, stop_token_ids: list[int] | None, max_batch_tokens: int | None,
    on_finished: Any,
) -> list[tuple[str, bool]]:
    """One process's prompts (token ids; `indices`: their places in the caller's list, which seed their samples)
    answered and decoded, each with whether it ended with a stop token."""
    seeds = [batch_seed(seed, index) for index in indices] if do_sample else None
    stops = stop_token_ids or _as_list(tokenizer.eos_token_id)
    answers = generate_ids(model, token_ids, max_new_tokens, batch_size, tokenizer.pad_token_id, stops, seeds, temperature,
                           max_batch_tokens=max_batch_tokens, on_finished=on_finished)
    # Any stop token, not the last one: `model.generate`'s batches pad an ended row after it (pad may be eos).
    ended = [any(token in stops for token in answer) for answer in answers]
    return list(zip(tokenizer.batch_decode(answers, skip_special_tokens=True), ended))


@torch.no_grad()
def generate_ids(
    model: Any, token_ids: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int, stop_ids: list[int],
    seeds: list[int] | None = None, temperature: float = 1.0, top_p: float = 1.0, max_batch_tokens: int | None = None,
    on_finished: Any = None,
) -> list[list[int]]:
    """Each prompt's new token ids (up to and including its stop token), in the order of `token_ids`, which is the
    order they join the batch. Not collective: this process's prompts only (`generate` deals prompts to ranks and
    calls this). Greedy when `seeds` is None; sampled, prompt i draws from a generator seeded
    `seeds[i]`, from softmax(logits / temperature) cut to its `top_p` nucleus.

    Continuous batching (stages.core.continuous), or `model.generate` in fixed batches where our cache does not fit
    the model (each batch's draws then seeded by its first prompt's seed: there the samples depend on the batching)."""
    was_training = model.training
    model.eval()
    try:
        sampling = None
        if seeds is not None:
            generators = [torch.Generator(device=model.device).manual_seed(prompt_seed) for prompt_seed in seeds]
            sampling = continuous.Sampling(generators, temperature, top_p)
        answers = continuous.decode(model, token_ids, max_new_tokens, stop_ids, batch_size, pad_id, sampling,
                                    max_batch_tokens=max_batch_tokens, on_finished=on_finished)
        if answers is not None:
            return answers
        answers = []  # a cache layout our loop does not reproduce (sliding windows...): transformers' loop
        for chunk in _length_sorted_chunks([len(ids) for ids in token_ids], batch_size, max_batch_tokens):
            ids, mask = left_pad([token_ids[position] for position in chunk], pad_id, model.device)
            with _seeded(model, None if seeds is None else seeds[chunk[0]]):
                answers += _plain_generate(model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens, stop_ids,
                                           seeds is not None, temperature, pad_id, top_p)
            if on_finished is not None:
                on_finished(len(chunk))
        return answers
    finally:
        model.train(was_training)


@contextmanager
def _seeded(model: Any, seed: int | None) -> Iterator[None]:
    """The global RNG (CPU, and the model's GPU) seeded with `seed` and restored afterwards; nothing when None."""
    if seed is None:
        yield
        return
    device = model.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _plain_generate(
    model: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, stop_ids: list[int], do_sample: bool,
    temperature: float, pad_token_id: int, top_p: float = 1.0,
) -> list[list[int]]:
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample and top_p < 1.0 else None,
        top_k=None,
        pad_token_id=pad_token_id,
        eos_token_id=stop_ids,
    )
    return output[:, batch["input_ids"].shape[1] :].tolist()  # (batch, generated_len); padding decodes to nothing


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    return [] if token_ids is None else token_ids if isinstance(token_ids, list) else [token_ids]
