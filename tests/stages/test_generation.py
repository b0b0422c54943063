"""Our decode loop with continuous batching (stages/generation.py, stages/core/continuous.py, kv_cache.py) against
transformers' `model.generate`: each prompt's greedy tokens are those of generate on the prompt alone, whatever
joins or leaves the batch; each prompt's sample depends on the seed and its index only, and follows
softmax(logits / temperature); answers in the callers' order. Speed is measured in bench/generation.py, never here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import generation
from stages.core import continuous, kv_cache, models
from stages.core.registry import Registry

PROMPTS = [[{"role": "user", "content": text}] for text in ("copy: ab", "reverse: hello world", "x", "upper: abcdefghij", "add 3 and 4")]


@pytest.fixture
def tiny_model():  # noqa: ANN201
    """The tiny Llama, its matrices scaled up 4x: at the default init (std 0.02) its greedy answers repeat one token
    from the first step, which would test little; scaled, they vary from step to step and between prompts."""
    torch.manual_seed(0)
    model = models.load_causal_lm(Registry().get("tiny-llama")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4)
    return model


def _plain(model, tokenizer, prompts, max_new_tokens, stop_ids, do_sample=False, temperature=1.0) -> list[list[int]]:  # noqa: ANN001
    """transformers' generate on the same left-padded batch, cut after each row's first stop token."""
    batch = generation.left_padded_prompts(tokenizer, prompts, model.device)
    with torch.no_grad():
        rows = generation._plain_generate(model, batch, max_new_tokens, stop_ids, do_sample, temperature, tokenizer.pad_token_id)
    return [_until_stop(row, stop_ids) for row in rows]


def _alone(model, tokenizer, prompts, max_new_tokens, stop_ids) -> list[list[int]]:  # noqa: ANN001
    """transformers' greedy generate on each prompt alone (batch 1, no padding), cut after the first stop token."""
    return [row for prompt in prompts for row in _plain(model, tokenizer, [prompt], max_new_tokens, stop_ids)]


def _ours(model, tokenizer, prompts, max_new_tokens, stop_ids, batch_size=2) -> list[list[int]]:  # noqa: ANN001
    """Our continuous batching on the prompts in this order, at most `batch_size` rows at once."""
    token_ids = [generation.encode_prompt(tokenizer, prompt) for prompt in prompts]
    return continuous.decode(model, token_ids, max_new_tokens, stop_ids, batch_size, tokenizer.pad_token_id)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    ends = [position for position, token in enumerate(tokens) if token in stop_ids]
    return tokens[: ends[0] + 1] if ends else tokens


# Prompts of very different lengths: the long one pads the others by dozens of columns, so once it stops the
# leading padding columns go (trims), and with more prompts than rows the next ones join the running batch (merges).
MANY = PROMPTS + [[{"role": "user", "content": text}] for text in ("sort: dcba", "repeat after me " * 8, "lower: ABC", "copy: xyz")]


def _stops_some_rows_early(model, tokenizer) -> list[int]:  # noqa: ANN001
    """A stop token the random tiny model does emit (it never says its eos), chosen so that the answers of MANY
    stop at as many different steps as possible: rows leave the batch at different times."""
    free = _alone(model, tokenizer, MANY, 12, [])

    def distinct_lengths(token: int) -> int:
        return len({len(_until_stop(row, [token])) for row in free})

    stop = max(sorted({token for row in free for token in row}), key=distinct_lengths)
    assert distinct_lengths(stop) >= 3, free
    return [stop]


def _count_merges_and_trims(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"merges": 0, "trims": 0}
    select_rows, append_rows = kv_cache.select_rows, kv_cache.append_rows

    def counting_select_rows(cache, indices, drop_columns=0) -> None:  # noqa: ANN001
        counts["trims"] += drop_columns > 0
        select_rows(cache, indices, drop_columns)

    def counting_append_rows(cache, joining, capacity) -> None:  # noqa: ANN001
        counts["merges"] += 1
        append_rows(cache, joining, capacity)

    monkeypatch.setattr(kv_cache, "select_rows", counting_select_rows)
    monkeypatch.setattr(kv_cache, "append_rows", counting_append_rows)
    monkeypatch.setattr(continuous, "TRIM_AT", 4)  # these short prompts leave a few columns of padding, not 32
    return counts


def test_continuous_batching_gives_each_prompt_its_greedy_answer_alone(tiny_model, tiny_tokenizer, monkeypatch) -> None:  # noqa: ANN001
    """9 prompts, at most 3 rows at once, rows stopping at different steps: stopped rows leave, the next prompts
    join the running batch (merged: the narrower side left padded) and all-padding columns are dropped. Each answer
    is model.generate's on that prompt alone (batch 1, no padding), token for token.

    Why against the prompt alone: with continuous batching a prompt shares its steps with changing rows, so no
    single `generate` batch computes what it computes; the prompt alone is what it must equal. Not bitwise: matmul
    blocking and the sums over masked padding can round differently in fp32, so a near-tie could flip; this tiny
    model has none on these prompts, so the test asks for exact tokens."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    counts = _count_merges_and_trims(monkeypatch)
    ours = _ours(tiny_model, tiny_tokenizer, MANY, 12, stop, batch_size=3)
    assert counts["merges"] >= 3 and counts["trims"] >= 1, counts
    assert ours == _alone(tiny_model, tiny_tokenizer, MANY, 12, stop)
    assert min(map(len, ours)) < 12 and max(map(len, ours)) == 12


def test_a_long_prompt_decodes_with_fewer_rows_under_max_batch_tokens(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """max_batch_tokens = 300: while the 131-token prompt is in the batch (every row then at least that wide), at most
    2 rows decode at once (3 x 131 > 300); the short prompts fill the batch before and after it; same answers."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    long_width = max(len(generation.encode_prompt(tiny_tokenizer, prompt)) for prompt in MANY)
    assert long_width == 131
    shapes: list[tuple[int, int]] = []
    hook = tiny_model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["attention_mask"].shape)), with_kwargs=True)
    try:
        token_ids = [generation.encode_prompt(tiny_tokenizer, prompt) for prompt in MANY]
        ours = continuous.decode(tiny_model, token_ids, 12, stop, 9, tiny_tokenizer.pad_token_id, max_batch_tokens=300)
    finally:
        hook.remove()
    assert ours == _alone(tiny_model, tiny_tokenizer, MANY, 12, stop)
    assert max(rows for rows, width in shapes if width >= long_width) <= 2
    assert max(rows for rows, _ in shapes) >= 4


def test_stopped_rows_leaving_and_joining_change_no_answer(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """Answers with a stop token (rows leave as they stop, others join) = the answers without one (every row runs
    to the cap) cut after the first stop token."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    full = _ours(tiny_model, tiny_tokenizer, MANY, 12, [], batch_size=3)
    assert _ours(tiny_model, tiny_tokenizer, MANY, 12, stop, batch_size=3) == [_until_stop(row, stop) for row in full]


def test_generate_answers_in_the_callers_order(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """The public entry point, prompts admitted longest first, 2 rows at once: each answer is model.generate's for
    that prompt alone, returned in the order of `prompts`."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    expected = tiny_tokenizer.batch_decode(_alone(tiny_model, tiny_tokenizer, MANY, 12, stop), skip_special_tokens=True)
    for sort_by_length in (True, False):
        got = generation.generate(tiny_model, tiny_tokenizer, MANY, 12, batch_size=2, stop_token_ids=stop, sort_by_length=sort_by_length)
        assert got == expected


def test_generate_ended_says_which_answers_the_model_ended(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """An answer is ended when the model emitted a stop token before the cap, cut otherwise: the same flags from our
    loop and from model.generate's padded batches (where a stopped row goes on with padding, here the stop token)."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    alone = _alone(tiny_model, tiny_tokenizer, MANY, 12, stop)
    expected = [any(token in stop for token in row) for row in alone]
    assert 0 < sum(expected) < len(expected), expected  # both kinds present: the flags can be wrong either way
    texts, ended = generation.generate_ended(tiny_model, tiny_tokenizer, MANY, 12, batch_size=3, stop_token_ids=stop)
    assert ended == expected
    assert texts == tiny_tokenizer.batch_decode(alone, skip_special_tokens=True)


def _sampled(model, tokenizer, prompts, batch_size, seed=1, temperature=1.0, stop=None, sort_by_length=False) -> list[str]:  # noqa: ANN001
    return generation.generate(model, tokenizer, prompts, 12, batch_size=batch_size, do_sample=True, temperature=temperature,
                               seed=seed, stop_token_ids=stop, sort_by_length=sort_by_length)


def test_a_prompts_sample_depends_on_the_seed_and_its_index_only(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """Prompt i of the caller's list samples from its own generator seeded by (seed, i): its answer is the same at
    1, 3 or 16 rows at once, admitted longest first or in order, and when the other prompts are permuted or more
    are appended; the caller's global RNG does not move."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    for temperature in (1.0, 0.7):
        state = torch.random.get_rng_state()
        alone = _sampled(tiny_model, tiny_tokenizer, MANY, 1, temperature=temperature, stop=stop)
        assert torch.equal(torch.random.get_rng_state(), state)
        for batch_size in (3, 16):
            assert _sampled(tiny_model, tiny_tokenizer, MANY, batch_size, temperature=temperature, stop=stop) == alone
        assert _sampled(tiny_model, tiny_tokenizer, MANY, 3, temperature=temperature, stop=stop, sort_by_length=True) == alone
        kept = [0, 4, 7]  # these stay at their index; the others are shuffled, and three prompts appended
        shuffled = [MANY[index] for index in (0, 2, 3, 1, 4, 8, 5, 7, 6)] + MANY[:3]
        assert [shuffled[index] for index in kept] == [MANY[index] for index in kept]
        got = _sampled(tiny_model, tiny_tokenizer, shuffled, 3, temperature=temperature, stop=stop)
        assert [got[index] for index in kept] == [alone[index] for index in kept]


def test_other_seeds_and_other_indices_draw_other_samples(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    first = _sampled(tiny_model, tiny_tokenizer, MANY, 3)
    other = _sampled(tiny_model, tiny_tokenizer, MANY, 3, seed=2)
    assert sum(a != b for a, b in zip(first, other)) >= len(MANY) // 2
    assert first != generation.generate(tiny_model, tiny_tokenizer, MANY, 12, batch_size=3)  # not the greedy answers
    repeated = _sampled(tiny_model, tiny_tokenizer, [PROMPTS[1]] * 4, 3)  # one prompt 4 times: 4 draws
    assert len(set(repeated)) == 4


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, tokens expected fewer than 5 times pooled into one cell."""
    expected = probs * counts.sum()
    small = expected < 5
    if not small.any():
        return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1


def test_the_first_sampled_token_follows_softmax_of_the_logits_over_the_temperature(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """4,000 draws of one prompt's first token (the prompt 4,000 times, draw i from generator seed `batch_seed(0, i)`)
    at temperature 0.5 against softmax(logits / 0.5), the logits from a forward of the prompt alone.

    Pearson's chi-square (cells expected < 5 pooled) against its 0.999 quantile, from the Wilson-Hilferty
    approximation k (1 - 2/(9k) + z sqrt(2/(9k)))^3 with z = 3.09: a correct sampler fails with probability 0.001
    over seed sets, and the seed set is fixed, so the test is deterministic. It has power: the same draws against
    softmax(logits) (the temperature ignored) must fail by far, or the test could not tell a wrong sampler."""
    draws, temperature = 4000, 0.5
    prompt = generation.encode_prompt(tiny_tokenizer, PROMPTS[1])
    sampling = continuous.Sampling([torch.Generator().manual_seed(generation.batch_seed(0, i)) for i in range(draws)], temperature)
    answers = continuous.decode(tiny_model, [prompt] * draws, 1, [], 500, tiny_tokenizer.pad_token_id, sampling)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
    counts = torch.bincount(torch.tensor([answer[0] for answer in answers]), minlength=logits.shape[-1]).double()

    def quantile_999(k: int) -> float:
        return k * (1 - 2 / (9 * k) + 3.09 * (2 / (9 * k)) ** 0.5) ** 3

    statistic, degrees = _chi_square(counts, torch.softmax(logits.double() / temperature, dim=-1))
    assert statistic < quantile_999(degrees), (statistic, degrees)
    untempered, degrees = _chi_square(counts, torch.softmax(logits.double(), dim=-1))
    assert untempered > 3 * quantile_999(degrees), (untempered, degrees)


def test_top_p_samples_from_the_nucleus_of_transformers_top_p_warper(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """4,000 first tokens at top_p 0.3 (our PPO's nucleus sampling): never a token that transformers' own
    TopPLogitsWarper removes, and the kept ones at the frequencies of its renormalised distribution (the chi-square
    of the temperature test). The same draws against the uncut softmax must fail: the test can tell."""
    from transformers.generation.logits_process import TopPLogitsWarper

    draws, top_p = 4000, 0.3
    prompt = generation.encode_prompt(tiny_tokenizer, PROMPTS[1])
    sampling = continuous.Sampling([torch.Generator().manual_seed(generation.batch_seed(1, i)) for i in range(draws)], 1.0, top_p)
    answers = continuous.decode(tiny_model, [prompt] * draws, 1, [], 500, tiny_tokenizer.pad_token_id, sampling)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
    nucleus = torch.softmax(TopPLogitsWarper(top_p)(None, logits[None].clone())[0].double(), dim=-1)
    assert 2 <= int((nucleus > 0).sum()) < 40, "choose a prompt whose nucleus holds a few tokens"
    counts = torch.bincount(torch.tensor([answer[0] for answer in answers]), minlength=logits.shape[-1]).double()
    assert counts[nucleus == 0].sum() == 0

    def quantile_999(k: int) -> float:
        return k * (1 - 2 / (9 * k) + 3.09 * (2 / (9 * k)) ** 0.5) ** 3

    kept = nucleus > 0
    statistic, degrees = _chi_square(counts[kept], nucleus[kept])
    assert statistic < quantile_999(degrees), (statistic, degrees)
    uncut, degrees = _chi_square(counts, torch.softmax(logits.double(), dim=-1))
    assert uncut > 3 * quantile_999(degrees), (uncut, degrees)


def test_models_with_sliding_window_layers_keep_transformers_loop() -> None:
    """Our cache reproduces full-attention layers only; a sliding-window model gets None (generate's own loop)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, sliding_window=4)
    assert kv_cache.preallocated_cache(MistralForCausalLM(config), 16) is None


def test_a_sliding_window_model_answers_through_model_generate(tiny_tokenizer) -> None:  # noqa: ANN001
    """generate() on such a model falls back to model.generate in fixed, length-sorted batches: the same answers."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4, pad_token_id=tiny_tokenizer.pad_token_id)
    model = MistralForCausalLM(config).eval()
    lengths = [len(generation.encode_prompt(tiny_tokenizer, prompt)) for prompt in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda index: -lengths[index])
    expected = [""] * len(PROMPTS)
    for start in range(0, len(order), 2):
        batch = order[start : start + 2]
        answers = _plain(model, tiny_tokenizer, [PROMPTS[index] for index in batch], 6, [tiny_tokenizer.eos_token_id])
        for index, answer in zip(batch, tiny_tokenizer.batch_decode(answers, skip_special_tokens=True)):
            expected[index] = answer
    assert generation.generate(model, tiny_tokenizer, PROMPTS, 6, batch_size=2, sort_by_length=True) == expected
    # Ended flags from the padded batches: a stop token some answers emit and others do not (a row that stops goes
    # on with padding, so the flag is "any stop token", not "the last token").
    free = _alone(model, tiny_tokenizer, PROMPTS, 6, [])
    stop = [next(token for row in free for token in row if 0 < sum(token in other for other in free) < len(free))]
    _, ended = generation.generate_ended(model, tiny_tokenizer, PROMPTS, 6, batch_size=2, stop_token_ids=stop, sort_by_length=True)
    assert ended == [stop[0] in row for row in free]


def test_smollm2_greedy_tokens_are_those_of_model_generate(smollm2: Path) -> None:
    """The real model (BPE, `<|im_end|>` as end of turn, pad = eos, default system prompt): 4 prompts of different
    lengths, 2 rows at once (the third and fourth join as rows stop), 24 new tokens: token ids equal to those of
    model.generate on each prompt alone. No fp32 near-tie tolerance is needed here."""
    entry = Registry().get("smollm2-135m-instruct")
    model, tokenizer = models.load_causal_lm(entry).eval(), models.load_tokenizer(entry)
    prompts = [[{"role": "user", "content": text}] for text in (
        "What is 2 + 2? Answer with the number only.",
        "Write one sentence about the sea. Do not use any commas.",
        "List three colours.",
        "Explain in two sentences why the sky is blue, and end your answer with the word 'done'.",
    )]
    stop = generation.end_of_turn_ids(model, tokenizer)
    ours = _ours(model, tokenizer, prompts, 24, stop, batch_size=2)
    assert ours == _alone(model, tokenizer, prompts, 24, stop)
    assert all(len(answer) > 0 for answer in ours)
