"""Our decode loop (stages/generation.py, stages/core/kv_cache.py) against transformers' `model.generate`: the same
greedy tokens, the same seeded samples, stopped rows leaving the batch without changing any answer, answers in the
callers' order. Speed is measured in bench/generation.py, never here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import generation
from stages.core import kv_cache, models
from stages.core.registry import Registry

PROMPTS = [[{"role": "user", "content": text}] for text in ("copy: ab", "reverse: hello world", "x", "upper: abcdefghij", "add 3 and 4")]


@pytest.fixture
def tiny_model():  # noqa: ANN201
    torch.manual_seed(0)
    return models.load_causal_lm(Registry().get("tiny-llama")).eval()


def _plain(model, tokenizer, prompts, max_new_tokens, stop_ids, do_sample=False, temperature=1.0) -> list[list[int]]:  # noqa: ANN001
    """transformers' generate on the same left-padded batch, cut after each row's first stop token."""
    batch = generation.left_padded_prompts(tokenizer, prompts, model.device)
    with torch.no_grad():
        rows = generation._plain_generate(model, batch, max_new_tokens, stop_ids, do_sample, temperature, tokenizer.pad_token_id)
    return [_until_stop(row, stop_ids) for row in rows]


def _ours(model, tokenizer, prompts, max_new_tokens, stop_ids, do_sample=False, temperature=1.0) -> list[list[int]]:  # noqa: ANN001
    batch = generation.left_padded_prompts(tokenizer, prompts, model.device)
    with torch.no_grad():
        return generation._decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens, stop_ids, do_sample, temperature)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    ends = [position for position, token in enumerate(tokens) if token in stop_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def _stops_some_rows_early(model, tokenizer) -> list[int]:  # noqa: ANN001
    """A stop token the random tiny model does emit (it never says its eos): a token row 0 generates at step 3, so
    rows stop at different steps and leave the batch at different times."""
    free = _plain(model, tokenizer, PROMPTS, 12, [])
    stop = [free[0][3]]
    lengths = [len(_until_stop(row, stop)) for row in free]
    assert len(set(lengths)) > 1, f"the chosen stop token ends every row at the same step: {lengths}"
    return stop


def test_greedy_tokens_are_those_of_model_generate_with_rows_stopping_at_different_steps(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    ours = _ours(tiny_model, tiny_tokenizer, PROMPTS, 12, stop)
    assert ours == _plain(tiny_model, tiny_tokenizer, PROMPTS, 12, stop)
    assert min(map(len, ours)) < 12 and max(map(len, ours)) == 12


def test_stopped_rows_leaving_the_batch_change_no_answer(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """Answers with a stop token (rows leave as they stop) = the answers without one (every row runs to the cap,
    the batch never shrinks) cut after the first stop token."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    full = _ours(tiny_model, tiny_tokenizer, PROMPTS, 12, [])
    assert _ours(tiny_model, tiny_tokenizer, PROMPTS, 12, stop) == [_until_stop(row, stop) for row in full]


def test_generate_answers_in_the_callers_order_as_model_generate_does(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """The public entry point, prompts sorted by length into batches of 2: each answer is model.generate's answer
    for that prompt in the same batch, returned in the order of `prompts`."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    lengths = [len(generation.encode_prompt(tiny_tokenizer, prompt)) for prompt in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda index: -lengths[index])
    expected = [""] * len(PROMPTS)
    for start in range(0, len(order), 2):
        batch = order[start : start + 2]
        answers = _plain(tiny_model, tiny_tokenizer, [PROMPTS[index] for index in batch], 12, stop)
        for index, answer in zip(batch, tiny_tokenizer.batch_decode(answers, skip_special_tokens=True)):
            expected[index] = answer
    got = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, 12, batch_size=2, stop_token_ids=stop, sort_by_length=True)
    assert got == expected


def test_sampling_is_seeded_per_batch_and_draws_what_model_generate_draws(tiny_model, tiny_tokenizer) -> None:  # noqa: ANN001
    """Sampled answers: those of model.generate under the same seed (rows stopping early included), the same for
    the same seed, different for another, and the caller's global RNG untouched."""
    stop = _stops_some_rows_early(tiny_model, tiny_tokenizer)
    for temperature in (1.0, 0.7):
        torch.manual_seed(3)
        plain = _plain(tiny_model, tiny_tokenizer, PROMPTS, 12, stop, do_sample=True, temperature=temperature)
        torch.manual_seed(3)
        assert _ours(tiny_model, tiny_tokenizer, PROMPTS, 12, stop, do_sample=True, temperature=temperature) == plain

    state = torch.random.get_rng_state()
    first = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, do_sample=True, seed=1, stop_token_ids=stop)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generation.generate(tiny_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, do_sample=True, seed=1, stop_token_ids=stop) == first
    assert generation.generate(tiny_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, do_sample=True, seed=2, stop_token_ids=stop) != first
    with generation.batch_rng(tiny_model, 1, 0):  # batch 0 of seed 1: model.generate's draw
        expected = _plain(tiny_model, tiny_tokenizer, PROMPTS, 12, stop, do_sample=True)
    assert first == tiny_tokenizer.batch_decode(expected, skip_special_tokens=True)


def test_models_with_sliding_window_layers_keep_transformers_loop() -> None:
    """Our cache reproduces full-attention layers only; a sliding-window model gets None (generate's own loop)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, sliding_window=4)
    assert kv_cache.preallocated_cache(MistralForCausalLM(config), 16) is None


def test_smollm2_greedy_tokens_are_those_of_model_generate(smollm2: Path) -> None:
    """The real model (BPE, `<|im_end|>` as end of turn, pad = eos, default system prompt): 4 prompts of different
    lengths in one left-padded batch, 24 new tokens, token ids equal to model.generate's."""
    entry = Registry().get("smollm2-135m-instruct")
    model, tokenizer = models.load_causal_lm(entry).eval(), models.load_tokenizer(entry)
    prompts = [[{"role": "user", "content": text}] for text in (
        "What is 2 + 2? Answer with the number only.",
        "Write one sentence about the sea. Do not use any commas.",
        "List three colours.",
        "Explain in two sentences why the sky is blue, and end your answer with the word 'done'.",
    )]
    stop = generation.end_of_turn_ids(model, tokenizer)
    ours = _ours(model, tokenizer, prompts, 24, stop)
    assert ours == _plain(model, tokenizer, prompts, 24, stop)
    assert all(len(answer) > 0 for answer in ours)
