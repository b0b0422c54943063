"""MFU: our SFT step's model FLOPs per second over this machine's matmul peak, measured in the same run.

Training FLOPs (PaLM's accounting, Chowdhery et al. 2022, appendix B): 6 x non-embedding parameters per real
token, plus 12 x layers x hidden x T per token of a length-T sequence for attention (QK^T and AV, forward and
backward, counted as if unmasked). Padding, the LM head (tied to the 261 x hidden embedding; ~4% more on the
20m model) and gradient-checkpointing recomputes are not counted: it is useful work only.
Matmul peak ("matmul_peak" arm, a fresh process with the same thread count): torch.mm at exactly the shapes
of one training step of the model (q/k/v/o, gate/up, down; forward, input-gradient and weight-gradient
products, M = the step's tokens), best of several runs each; the peak is their FLOP-weighted rate (what the
step's matmuls could do at best). A large square product is reported alongside for context.
The table's "x matmul_peak" column is the MFU, taken within each repeat.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench import common, sft
from bench.runner import Arm, Comparison

MODEL = "20m"


def training_flops(size: str, counts: dict[str, int]) -> float:
    config = common.model_config(size)
    non_embedding = common.parameter_counts(common.causal_lm(size))["non_embedding"]
    attention = 12 * config.num_hidden_layers * config.hidden_size * counts["squared_lengths"]
    return 6 * non_embedding * counts["real_tokens"] + attention


def _matmul_shapes(size: str, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count per step) of every linear layer's forward, input-grad and weight-grad products."""
    config = common.model_config(size)
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linears = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]  # (in, out)
    shapes: dict[tuple[int, int, int], int] = {}
    for inputs, outputs in linears:
        for shape in ((tokens, inputs, outputs), (tokens, outputs, inputs), (inputs, tokens, outputs)):
            shapes[shape] = shapes.get(shape, 0) + layers
    return [(m, k, n, count) for (m, k, n), count in shapes.items()]


def _best_rate(m: int, k: int, n: int, budget_seconds: float) -> tuple[float, float]:
    """Best GFLOP/s of torch.mm(m x k, k x n) over repeated runs: by wall clock and by CPU time."""
    left, right, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(left, right, out=out)  # warm-up
    best_wall = best_cpu = float("inf")
    deadline = time.perf_counter() + budget_seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        wall, cpu = time.perf_counter(), time.process_time()
        torch.mm(left, right, out=out)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
        runs += 1
    flops = 2 * m * k * n
    return flops / best_wall / 1e9, flops / max(best_cpu, 1e-9) / 1e9


def matmul_peak(shapes: list[tuple[int, int, int, int]], seconds_per_shape: float) -> dict[str, Any]:
    """An arm result for the products `shapes` (M, K, N, count), each timed at its best: rate = the peak."""
    total_flops = sum(2 * m * k * n * count for m, k, n, count in shapes)
    wall_seconds = cpu_seconds = 0.0
    rates = {}
    for m, k, n, count in shapes:
        wall_rate, cpu_rate = _best_rate(m, k, n, seconds_per_shape)
        flops = 2 * m * k * n * count / 1e9
        wall_seconds += flops / wall_rate
        cpu_seconds += flops / cpu_rate
        rates[f"{m}x{k}x{n}"] = round(wall_rate, 1)
    return {
        "amount": total_flops / 1e9,  # GFLOP of one step's matmuls, at their best time: rate = the peak
        "seconds": wall_seconds,
        "cpu_seconds": cpu_seconds,
        "best_shape_gflops": max(rates.values()),
        "shape_gflops": rates,
        "work": {"kind": "matmul"},
    }


def _matmul_peak(params: dict[str, Any]) -> dict[str, Any]:
    result = matmul_peak(_matmul_shapes(params["model"], params["tokens"]), params["seconds_per_shape"])
    square_wall, _ = _best_rate(2048, 2048, 2048, params["seconds_per_shape"])
    return result | {"square_2048_gflops": square_wall}


def run(params: dict[str, Any]) -> dict[str, Any]:
    if params["arm"] == "matmul_peak":
        return _matmul_peak(params)
    result = sft.run(params | {"arm": params["settings"]})
    result["amount"] = training_flops(params["model"], result["counts"]) / 1e9
    result["hardware_utilisation_tokens"] = result["counts"]["positions"]
    return result


def comparisons(quick: bool) -> list[Comparison]:
    examples = 48  # two optimizer steps of our batch of 32: with one, the first-step warm-up is most of the time
    batch = sft.our_settings()["per_device_train_batch_size"]
    # M of the peak's matmuls: one step of `ours` on the uniform data (batch x 60 tokens, no padding).
    tokens = batch * 60
    arms = [Arm("matmul_peak", "mfu", {"arm": "matmul_peak", "model": MODEL, "tokens": tokens,
                                        "seconds_per_shape": 0.3 if quick else 0.5})]
    # Padding-free and TRL's defaults on variable data are in the SFT comparison (same measure, other model).
    for settings, data in (("ours", "uniform"), ("ours", "variable")):
        arms.append(Arm(f"{settings}/{data}", "mfu", {"arm": f"{settings}/{data}", "settings": settings, "model": MODEL,
                                                      "data": data, "examples": examples}))
    return [Comparison(
        title=f"MFU, {MODEL} model, SFT {examples} examples x 1 epoch; 'x matmul_peak' = MFU",
        arms=arms, baseline="matmul_peak", unit="GFLOP", check_work=False,
        columns=[("padding_waste", "pad waste", "{:.0%}"), ("square_2048_gflops", "2048^3 GFLOP/s", "{:.1f}"),
                 ("peak_rss_mb", "peak RSS MB", "{:.0f}")],
    )]
