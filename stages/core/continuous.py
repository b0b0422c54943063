"""Continuous batching: our decode loop over a stream of prompts, keeping up to `batch_size` rows decoding at once.

A decode step's cost on a CPU (and a GPU at these sizes) is mostly streaming the weights, not the rows: SmolLM2
at 4, 16 and 64 rows took 113, 216 and 487 ms a step (bench/README.md). So a stopped row's slot is refilled: once
`refill_at` slots are free, the next waiting prompts are prefilled (left padded among themselves, which gives
their first token) and merged into the running batch.

How the merge works with transformers' model call: one KV cache (stages/core/kv_cache.py) of width W, every row
left padded to it; a 2-D attention mask per row (0 = padding) and explicit position ids per row (the number of
real tokens before it, as `generate` derives them from the mask), so a row's padding never shifts its positions.
Merging left pads the narrower side with zero keys and values and concatenates rows; leading columns that are
padding in every row are dropped once there are `TRIM_AT` of them, so W stays about the longest live row. Rows
that are done stay in the batch, ignored, until an eighth of it is done: dropping rows copies the whole cache.
A row computes the same numbers whatever it shares the batch with, up to fp32 rounding (matmul blocking
and attention's sums over a longer, masked width can round differently): greedy answers equal those of
`model.generate` on the prompt alone except at fp32 near-ties (tests/stages/test_generation.py).

Sampling draws each row's token from its own `torch.Generator` (argmax of probs / Exp(1) noise, what
`torch.multinomial` computes), so a prompt's sample does not depend on the other rows, the batch size or
when it joined.

May import: torch, transformers and `stages.core` (checked by import-linter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from stages.core import kv_cache

# Leading all-padding columns dropped from the cache once there are this many: each trim copies the cache
# (riding on the copy that dropping done rows makes), so a handful of columns is not worth it.
TRIM_AT = 32
# Padded prompt tokens of one prefill at most: the matmuls are compute-bound well below this, while one prefill of
# every row of a large batch pads them all to the longest and grows the activations out of the caches (SmolLM2,
# 48 IFBench prompts in one prefill: 44 CPU-s; in four prefills of at most this size: 24 CPU-s; bench/README.md).
PREFILL_TOKENS = 2048


@dataclass
class Sampling:
    """Sampled decoding: `generators[i]` draws prompt i's noise (on the model's device); `top_p` below 1 samples from
    the nucleus: the most likely tokens whose probabilities first reach `top_p` (transformers' TopPLogitsWarper)."""

    generators: list[torch.Generator]
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class _Rows:
    """Rows decoding together; `mask` has one column per cache position (cache length = mask width)."""

    cache: Any  # transformers Cache of PreallocatedLayer
    prompts: torch.Tensor  # (rows,) the index of each row's prompt in the admission list
    mask: torch.Tensor  # (rows, width) 1 = a real token
    positions: torch.Tensor  # (rows,) the position of each row's next input token
    tokens: torch.Tensor  # (rows,) each row's last generated token: the next input
    live: torch.Tensor  # (rows,) False once the row's answer is complete (the row stays, ignored, until `_compact`)


@torch.no_grad()
def decode(
    model: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], batch_size: int, pad_id: int,
    sampling: Sampling | None = None, refill_at: int | None = None, max_batch_tokens: int | None = None,
    on_finished: Callable[[int], None] | None = None,
) -> list[list[int]] | None:
    """Each prompt's new tokens, up to and including its stop token, in the order of `prompts`, which is the order
    they are admitted in (longest first keeps each prefill's padding low). None where the model's cache layout is
    not plain full attention (see stages.core.kv_cache): the caller then uses `model.generate`.

    `refill_at`: free slots that trigger a prefill of waiting prompts (default a quarter of the batch; an empty
    batch always refills); they join in prefills of at most PREFILL_TOKENS prompt tokens once padded, one after
    the other. `max_batch_tokens`: a prompt joins only while the batch would then hold at most this many positions
    (rows x width, padding included): a long prompt widens every row, so it decodes with fewer others (and a
    prompt longer than that alone).
    `on_finished(count)`: called as rows finish (a progress bar)."""
    if kv_cache.preallocated_cache(model, 1) is None:
        return None
    refill_at = max(1, batch_size // 4) if refill_at is None else max(1, refill_at)
    device = model.device
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    admitted = 0
    running: _Rows | None = None
    while admitted < len(prompts) or running is not None:
        free = batch_size - (0 if running is None else int(running.live.sum()))
        count = 0  # prompts joining now
        if admitted < len(prompts) and (running is None or free >= refill_at):
            if running is not None and not bool(running.live.all()):
                running = _compact(running)
            rows, width = (0, 0) if running is None else (len(running.prompts), running.mask.shape[1])
            count = _join_count([len(prompt) for prompt in prompts[admitted : admitted + free]], rows, width, max_batch_tokens)
        if count:
            joining = _prefill(model, prompts, range(admitted, admitted + count), max_new_tokens, pad_id, sampling, device)
            admitted += count
            joining = _record(joining, answers, stop, max_new_tokens, on_finished)
            running = joining if running is None else running if joining is None else _merge(running, joining, max_new_tokens)
        else:
            running = _record(_step(model, running, sampling), answers, stop, max_new_tokens, on_finished)
    return answers


def _join_count(lengths: list[int], rows: int, width: int, max_batch_tokens: int | None) -> int:
    """How many of the next prompts (`lengths`: those offered) one prefill takes: as many as fit PREFILL_TOKENS once
    padded to the longest, and `max_batch_tokens` with the `rows` running at `width`; always one into an empty batch."""

    def fits(count: int) -> bool:
        longest = max(lengths[:count])
        within_budget = max_batch_tokens is None or (rows + count) * max(width, longest) <= max_batch_tokens
        return count * longest <= PREFILL_TOKENS and within_budget

    count = 0
    while count < len(lengths) and (fits(count + 1) or (rows == 0 and count == 0)):
        count += 1
    return count


def _prefill(
    model: Any, prompts: list[list[int]], indices: range, max_new_tokens: int, pad_id: int, sampling: Sampling | None,
    device: torch.device,
) -> _Rows:
    """The joining prompts, left padded among themselves, through the model: their cache and first tokens."""
    width = max(len(prompts[index]) for index in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, index in enumerate(indices):
        ids[row, width - len(prompts[index]) :] = torch.tensor(prompts[index], dtype=torch.long)
        mask[row, width - len(prompts[index]) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = kv_cache.preallocated_cache(model, width + max_new_tokens)
    # Positions as generate derives them from the mask: left padding shifts no prompt (pads sit at position 1).
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].float()  # (rows, vocab)
    prompt_indices = torch.tensor(list(indices), dtype=torch.long, device=device)
    tokens = _next_tokens(logits, sampling, prompt_indices)
    return _Rows(cache, prompt_indices, mask, mask.sum(-1), tokens, torch.ones_like(prompt_indices, dtype=torch.bool))


def _step(model: Any, rows: _Rows, sampling: Sampling | None) -> _Rows:
    """One decode step of every running row: its last token in, its next token out."""
    mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.prompts), 1))], dim=1)
    logits = model(input_ids=rows.tokens[:, None], attention_mask=mask, position_ids=rows.positions[:, None],
                   cache=rows.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()  # (rows, vocab)
    return _Rows(rows.cache, rows.prompts, mask, rows.positions + 1, _next_tokens(logits, sampling, rows.prompts), rows.live)


def _record(
    rows: _Rows, answers: list[list[int]], stop: torch.Tensor, max_new_tokens: int, on_finished: Callable[[int], None] | None,
) -> _Rows | None:
    """Appends each live row's new token to its answer; a row that stopped (stop token or `max_new_tokens`) is done.
    None when no live row remains; the batch is compacted (see `_compact`) once an eighth of its rows are done or
    `TRIM_AT` leading columns are padding in every live row."""
    for prompt, token, live in zip(rows.prompts.tolist(), rows.tokens.tolist(), rows.live.tolist()):
        if live:
            answers[prompt].append(token)
    lengths = torch.tensor([len(answers[prompt]) for prompt in rows.prompts.tolist()], device=rows.tokens.device)
    finished = rows.live & (torch.isin(rows.tokens, stop) | (lengths >= max_new_tokens))
    done = int(finished.sum())
    if done and on_finished is not None:
        on_finished(done)
    live = rows.live & ~finished
    remaining = int(live.sum())
    if remaining == 0:
        return None
    rows = _Rows(rows.cache, rows.prompts, rows.mask, rows.positions, rows.tokens, live)
    dead = len(rows.prompts) - remaining
    if dead >= max(1, len(rows.prompts) // 8) or _leading_padding(rows.mask[live]) >= TRIM_AT:
        return _compact(rows)
    return rows


def _leading_padding(mask: torch.Tensor) -> int:
    """Columns before the first one any row uses."""
    return int(mask.any(dim=0).int().argmax())


def _compact(rows: _Rows) -> _Rows:
    """Only the live rows, without the leading columns that are padding in all of them (once there are `TRIM_AT`).

    Done rows stay in the batch until then, their tokens ignored: removing a row copies the whole cache (SmolLM2,
    48 rows: about 0.2 s), while keeping it costs one more row of a step (a few ms; a step's cost is mostly the weights)."""
    keep = rows.live.nonzero().flatten()
    mask = rows.mask[keep]
    leading = _leading_padding(mask)
    drop = leading if leading >= TRIM_AT else 0
    kv_cache.select_rows(rows.cache, keep, drop)
    return _Rows(rows.cache, rows.prompts[keep], mask[:, drop:], rows.positions[keep], rows.tokens[keep], rows.live[keep])


def _merge(running: _Rows, joining: _Rows, max_new_tokens: int) -> _Rows:
    """The joining rows below the (compacted) running ones, the narrower side left padded: one batch of the longer
    width, with room for every row's remaining tokens."""
    width = max(running.mask.shape[1], joining.mask.shape[1])
    kv_cache.append_rows(running.cache, joining.cache, width + max_new_tokens)
    masks = [torch.nn.functional.pad(rows.mask, (width - rows.mask.shape[1], 0)) for rows in (running, joining)]
    return _Rows(running.cache, torch.cat([running.prompts, joining.prompts]), torch.cat(masks),
                 torch.cat([running.positions, joining.positions]), torch.cat([running.tokens, joining.tokens]),
                 torch.cat([running.live, joining.live]))


def _next_tokens(logits: torch.Tensor, sampling: Sampling | None, prompts: torch.Tensor) -> torch.Tensor:
    """Greedy: the argmax. Sampled: a draw from softmax(logits / temperature), as `torch.multinomial(probs, 1)`
    computes it (the argmax of probs / Exp(1) noise), each row's noise from its prompt's own generator; with
    `top_p` < 1 from that distribution cut to its nucleus (zeroing the rest; renormalising would not move the argmax)."""
    if sampling is None:
        return logits.argmax(dim=-1)
    temperature = sampling.temperature
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # (rows, vocab)
    if sampling.top_p < 1.0:
        probs = _nucleus(probs, sampling.top_p)
    noise = torch.stack([
        torch.empty(probs.shape[-1], device=probs.device).exponential_(1, generator=sampling.generators[prompt])
        for prompt in prompts.tolist()
    ])
    return (probs / noise).argmax(dim=-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (rows, vocab) with every token outside its row's nucleus set to 0: a token is kept while the tokens
    more likely than it hold less than `top_p` (so the most likely token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each
    return probs.scatter(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))
