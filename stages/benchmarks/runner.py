"""Run a benchmark on a model: generate, score with the official checkers, aggregate, write the files.

Generation (stages/generation.py, the one place a faster engine would replace): the model's own chat
template, one user turn ready for the reply (`add_generation_prompt`), greedy, continuously batched with left
padding, prompts admitted longest first, stopping at the model's end of turn (`generation.end_of_turn_ids`).
Settings: `max_new_tokens` (default 384, as shared/DESIGN.md measured IFEval), `batch_size` (rows decoding at
once: 64), `max_batch_tokens` (32768 positions, rows x width, when a prompt joins: a long prompt decodes with
fewer others), `dtype` (`auto`:
bfloat16 on a GPU, float32 on a CPU), `limit` (a seeded subset, for quick looks).

Files (`write_files`), next to the scores: `responses.jsonl` (`key`, `prompt`, `response`: the input of the
packages' own `read_prompt_to_response_dict`, so anyone can re-score it with the official scripts),
`results.jsonl` (per prompt: each instruction's strict and loose verdict and status) and `scores.json` (the
numbers, per type, what was unavailable, the settings, seconds, the model).
Collective under the launcher, as generation is; only the main process writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reward import checkers
from reward.functions import repetition
from stages.benchmarks import scores, suites
from stages.core import distributed
from stages.core.files import atomic_write, write_json

DEFAULT_MAX_NEW_TOKENS = 384
REPETITIVE = 0.3  # an answer with more than this share of repeated word 4-grams loops (eval/NAME/repetitive)
# Rows decoding at once (continuous batching): on SmolLM2, 48 IFBench prompts, 64 rows gave 1.3x the generated
# tokens per CPU-second of 16 (bench/README.md, "Generation on the real model").
DEFAULT_BATCH_SIZE = 64
# Positions (rows x width, padding included) the running batch may hold when a prompt joins: IFBench's longest
# prompt (2591 SmolLM2 tokens; the next 757, the median ~100) then decodes with at most 11 others instead of
# widening every row to its length (a padded batch of 16 at its length once took over 25 minutes here). SmolLM2's
# fp32 cache: 46 KB a position, 1.5 GB for this many.
DEFAULT_MAX_BATCH_TOKENS = 32768


@dataclass(frozen=True)
class Settings:
    """How a benchmark is run; recorded with its scores."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # batch positions when a prompt joins; more on a GPU
    limit: int | None = None  # a seeded subset of this many prompts (None: all)
    seed: int = 1234  # the subset's seed
    dtype: str = "auto"  # auto | float32 | bfloat16

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_batch_tokens"):
            if getattr(self, name) <= 0:
                raise suites.BenchmarkError(f"benchmark {name} must be positive, not {getattr(self, name)}")
        if self.limit is not None and self.limit <= 0:
            raise suites.BenchmarkError(f"benchmark limit must be positive, not {self.limit}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise suites.BenchmarkError(f"benchmark dtype must be auto, float32 or bfloat16, not {self.dtype!r}")

    def folder(self, name: str) -> str:
        """e.g. `ifbench-all-t384` or `ifbench-n50-s1234-t384`: runs with other settings keep their own files."""
        subset = "all" if self.limit is None else f"n{self.limit}-s{self.seed}"
        return f"{name}-{subset}-t{self.max_new_tokens}"


@dataclass
class BenchmarkRun:
    """What one benchmark run of one model gives."""

    benchmark: suites.Benchmark
    settings: Settings
    scores: dict[str, Any]
    results: list[scores.PromptResult]
    seconds: float
    ended: list[bool]  # per prompt: did the model end its answer (False: cut at max_new_tokens)

    @property
    def cut(self) -> float:
        """The share of answers cut at max_new_tokens (not ended by the model): loops, mostly, on a small model."""
        return sum(not ended for ended in self.ended) / max(len(self.ended), 1)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Registry metrics: the numbers, per type, and the generation settings (`eval/NAME/max_new_tokens` ...)."""
        base = f"{prefix}{self.benchmark.name}/"
        words = [len(result.response.split()) for result in self.results]
        return scores.as_metrics(self.benchmark.name, self.scores, prefix) | {
            # Does the model still answer? Mean answer length, and the share of answers that loop (reward/functions.py).
            base + "answer_words": sum(words) / max(len(words), 1),
            base + "repetitive": sum(repetition(result.response) > REPETITIVE for result in self.results) / max(len(self.results), 1),
            base + "cut": self.cut,
            base + "max_new_tokens": float(self.settings.max_new_tokens),
            base + "batch_size": float(self.settings.batch_size),
            base + "max_batch_tokens": float(self.settings.max_batch_tokens),
            base + "seconds": round(self.seconds, 1),
        }


def run(model: Any, tokenizer: Any, benchmark: suites.Benchmark, settings: Settings, title: str | None = None) -> BenchmarkRun:
    """Answer every prompt of `benchmark` greedily and score the answers with its checkers."""
    from stages import generation

    started = time.time()
    checkers.setup_offline(benchmark.suite)
    model = _in_dtype(model, settings.dtype)
    messages = [[{"role": "user", "content": prompt.prompt}] for prompt in benchmark.prompts]
    responses, ended = generation.generate_ended(
        model, tokenizer, messages, settings.max_new_tokens, settings.batch_size,
        stop_token_ids=generation.end_of_turn_ids(model, tokenizer), sort_by_length=True,
        max_batch_tokens=settings.max_batch_tokens, progress=title or benchmark.name,
    )
    results = score_responses(benchmark, responses)
    return BenchmarkRun(benchmark, settings, scores.aggregate(results), results, time.time() - started, ended)


def score_responses(benchmark: suites.Benchmark, responses: list[str]) -> list[scores.PromptResult]:
    """Each prompt's instructions scored on its response (the same order as `benchmark.prompts`)."""
    return [
        scores.PromptResult(
            prompt.key, prompt.prompt, response,
            [
                checkers.score_instruction(benchmark.suite, prompt.key, prompt.prompt, index, instruction_id, arguments, response)
                for index, (instruction_id, arguments) in enumerate(zip(prompt.instruction_id_list, prompt.kwargs))
            ],
        )
        for prompt, response in zip(benchmark.prompts, responses)
    ]


def write_files(result: BenchmarkRun, directory: Path, model_ref: str) -> Path:
    """responses.jsonl, results.jsonl and scores.json in `directory` (main process only); returns scores.json's path."""
    path = directory / "scores.json"
    if not distributed.is_main_process():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    import json

    rows = [{"key": r.key, "prompt": r.prompt, "response": r.response, "ended": ended} for r, ended in zip(result.results, result.ended)]
    atomic_write(directory / "responses.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write(directory / "results.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in result.results))
    write_json(path, {
        "model": model_ref,
        "benchmark": result.benchmark.name,
        "checkers": result.benchmark.suite,
        "prompt_file": result.benchmark.source,
        "prompts_in_file": result.benchmark.total,
        "settings": asdict(result.settings) | {"greedy": True, "chat_template": "one user turn, add_generation_prompt"},
        "seconds": round(result.seconds, 1),
        "cut": result.cut,
        **result.scores,
    })
    return path


def describe(result: BenchmarkRun, per_type: bool = True) -> str:
    """The lines `rlhf eval` prints: the four numbers, counts, what could not be scored, and (`per_type`) each type's accuracy."""
    s, settings = result.scores, result.settings
    subset = f"{s['num_prompts']} of {result.benchmark.total} prompts" + (f" (seeded subset, seed {settings.seed})" if settings.limit else "")
    lines = [
        f"{result.benchmark.name}: {subset}, {s['num_instructions']} instructions; greedy, max_new_tokens {settings.max_new_tokens}, "
        f"batch {settings.batch_size}, {result.seconds:.0f} s",
        *[f"  {key:<20} {s[key]:.4f}" for key in scores.HEADLINE],
        f"  {'unavailable':<20} {s['unavailable']}" + (f"  ({_named(s['unavailable_ids'])}: {'; '.join(s['unavailable_why'])}; counted as not followed)" if s["unavailable"] else ""),
        f"  {'checker errors':<20} {s['errors']}" + (f"  ({_named(s['error_ids'])}; counted as not followed)" if s["errors"] else ""),
        f"  {'cut at the cap':<20} {result.cut:.4f}  (answers the model did not end within max_new_tokens)",
    ]
    if per_type:
        lines.append("  per instruction type (strict / loose, instructions):")
        lines += [f"    {instruction_id:<45} {a['strict']:.3f} / {a['loose']:.3f}  ({a['count']})" for instruction_id, a in s["per_type"].items()]
    return "\n".join(lines)


def _named(counts: dict[str, int]) -> str:
    return ", ".join(f"{instruction_id} x{count}" for instruction_id, count in counts.items())


def _in_dtype(model: Any, dtype: str) -> Any:
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if model.device.type == "cuda" else "float32"
    wanted = getattr(torch, dtype)
    return model if model.dtype == wanted else model.to(wanted)


def evaluate_entry(ref: str, spec: str, settings: Settings) -> tuple[BenchmarkRun, Path, str]:
    """`rlhf eval REF --benchmark ...`: run a benchmark on a registered model (or a built-in, a path, a Hub id), write
    its files under RLHF_HOME/evals/MODEL/BENCHMARK-SETTINGS/ and record the metrics in the model's registry entry
    where it has one that can change. Returns the run, the scores file and a line saying where the metrics went."""
    from stages.core import models
    from stages.core.registry import Registry, RegistryError, rlhf_home

    registry = Registry()
    entry = registry.get(ref)
    if entry.kind == "reward":
        raise suites.BenchmarkError(f"{entry.ref} is a reward model: it scores answers and writes none; benchmark the policy or SFT model")
    benchmark = suites.load(spec, settings.limit, settings.seed)  # a bad file stops before the model loads
    tokenizer = models.load_tokenizer(entry)
    if tokenizer.chat_template is None:
        raise models.ModelLoadError(f"model {entry.ref!r} has no chat template; the benchmarks prompt through it")
    model = models.load_causal_lm(entry).to(distributed.device())
    result = run(model, tokenizer, benchmark, settings, title=f"{benchmark.name} {entry.name}")
    directory = rlhf_home() / "evals" / _folder_name(entry.name if entry.builtin else entry.ref) / settings.folder(benchmark.name)
    path = write_files(result, directory, entry.ref)
    if entry.builtin:
        return result, path, f"not recorded in the registry: {entry.name} is built in (its entries cannot change); the files hold the scores"
    try:
        stored = registry.get(entry.ref).metrics
        registry.update(entry.ref, metrics=stored | result.metrics())
    except RegistryError:
        return result, path, f"not recorded in the registry: {entry.ref} is a path or Hub id, not a registry entry; the files hold the scores"
    return result, path, f"recorded in registry entry {entry.ref} (eval/{benchmark.name}/...)"


def _folder_name(ref: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", ref).strip("_") or "model"
