"""Parent side: run every arm in a fresh subprocess with pinned threads, alternate arms, repeat, summarise.

Each arm run is a fresh process: forked from the parent after the heavy imports (see `preload`), or
started from scratch when the arm has its own interpreter. Each repeat runs every arm of a comparison
once, in a rotated order (A B C, B C A, ...), so slow drift of a shared machine's load falls on every arm alike; ratios are taken within a repeat, then summarised (median
and min-max over repeats). Arms of one comparison must report the same `work` (checked; a mismatch is
printed and makes the command exit non-zero), or their ratio would mean nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.common import RESULT_MARKER, ROOT
from bench.environment import arm_environment


@dataclass
class Arm:
    name: str
    suite: str  # bench module whose run(params) the child calls
    params: dict[str, Any]
    python: str | None = None  # another interpreter (TRL 1.11's virtual environment); None: this one


@dataclass
class Comparison:
    title: str
    arms: list[Arm]
    baseline: str | None  # arm name the ratios divide by; None: no ratios
    unit: str  # of the results' "amount" (tokens, pairs, episodes): rates are amount / seconds
    columns: list[tuple[str, str, str]] = field(default_factory=list)  # (result key, header, format)
    check_work: bool = True
    rate_format: str = "{:.1f}"  # of the rates (amount/s, amount/CPU-s): more decimals where they are below 1
    # Adds keys to the runs once every repeat is in (arm name -> runs): measures that compare arms within a
    # repeat beyond the rate ratio (the generation suite's identical answers and share of the limit).
    derive: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None


@dataclass
class Outcome:
    comparison: Comparison
    results: dict[str, list[dict[str, Any]]]  # arm name -> one result per repeat
    problems: list[str]


def preload() -> None:
    """Import what our arms import, once, in the parent, so that each forked arm starts with them loaded.

    Importing torch + transformers + TRL costs 8-12 s per process on this machine; with ~70 arm runs that
    alone would take over the bench's 15-minute budget. The parent runs no tensor work (so no OpenMP
    thread pool exists to be broken by fork) and must have arm_environment() in os.environ before this.
    """
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import DPOConfig, DPOTrainer, GRPOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer  # noqa: F401

    import stages.ppo  # noqa: F401


def run_arm(arm: Arm, threads: int, timeout: float) -> dict[str, Any]:
    """One run of one arm in a fresh process: forked from this (preloaded) one, or, for an arm with its own
    interpreter (TRL 1.11's virtual environment), started from scratch."""
    started = time.perf_counter()
    if arm.python is None:
        returncode, output = _forked(arm, threads, timeout)
    else:
        env = dict(os.environ, **arm_environment(threads))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        command = [arm.python, "-m", "bench.child", arm.suite, json.dumps(arm.params)]
        process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, output = process.returncode, process.stdout + process.stderr
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARKER)]
    if returncode != 0 or not lines:
        tail = "\n".join(output.splitlines()[-25:])
        raise RuntimeError(f"arm {arm.name} ({arm.suite}) failed with exit code {returncode}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _forked(arm: Arm, threads: int, timeout: float) -> tuple[int, str]:
    """Run `arm` in a forked child (fresh allocator, caches and thread pool; imports shared); its output."""
    import importlib
    import signal
    import tempfile
    import traceback

    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as log:
        pid = os.fork()
        if pid == 0:  # the arm
            code = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os.environ.update(arm_environment(threads))
                from bench import common

                common.set_threads(threads)
                common.emit(importlib.import_module(f"bench.{arm.suite}").run(arm.params))
                code = 0
            except BaseException:  # noqa: BLE001 - reported to the parent through the log
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(f"arm {arm.name}", timeout)
            time.sleep(0.05)
        log.seek(0)
        return os.waitstatus_to_exitcode(status), log.read()


def run_comparison(comparison: Comparison, repeats: int, threads: int, timeout: float) -> Outcome:
    results: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in comparison.arms}
    problems: list[str] = []
    print(f"\n== {comparison.title}", flush=True)
    for repeat in range(repeats):
        shift = repeat % len(comparison.arms)
        for arm in comparison.arms[shift:] + comparison.arms[:shift]:
            try:
                result = run_arm(arm, threads, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                problems.append(f"{arm.name}: {error}")
                print(f"   repeat {repeat + 1}: {arm.name}: FAILED ({str(error).splitlines()[0]})", flush=True)
                continue
            result["rate"] = result["amount"] / result["seconds"]
            result["cpu_rate"] = result["amount"] / result["cpu_seconds"]
            results[arm.name].append(result)
            rate, cpu_rate = (comparison.rate_format.format(result[key]) for key in ("rate", "cpu_rate"))
            print(f"   repeat {repeat + 1}: {arm.name:<22} {rate:>9} {comparison.unit}/s"
                  f" ({cpu_rate} per CPU-s; {result['seconds']:.1f} s timed,"
                  f" {result['process_seconds']:.0f} s process)", flush=True)
    if comparison.derive is not None:
        comparison.derive(results)
    if comparison.check_work:
        problems += _work_mismatches(results)
    return Outcome(comparison, results, problems)


def _work_mismatches(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    works = {name: json.dumps(result["work"], sort_keys=True) for name, runs in results.items() for result in runs}
    distinct = set(works.values())
    if len(distinct) <= 1:
        return []
    return ["unequal work: " + "; ".join(f"{name}={work}" for name, work in works.items())]


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    median = statistics.median(values)
    if len(values) == 1:
        return fmt.format(median)
    return f"{fmt.format(median)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratios(outcome: Outcome, arm_name: str, key: str = "rate") -> list[float]:
    """rate(arm) / rate(baseline) within each repeat (the i-th run of each; both finished)."""
    comparison = outcome.comparison
    arm_runs, base_runs = outcome.results.get(arm_name, []), outcome.results.get(comparison.baseline or "", [])
    return [arm[key] / base[key] for arm, base in zip(arm_runs, base_runs) if base[key] > 0]


def format_outcome(outcome: Outcome) -> str:
    """The comparison's table: median [min-max] over repeats of each rate, its ratio and each column."""
    comparison = outcome.comparison
    header = ["arm", f"{comparison.unit}/s"] + ([f"x {comparison.baseline}"] if comparison.baseline else [])
    header += [f"{comparison.unit}/CPU-s"] + ([f"x {comparison.baseline} (CPU)"] if comparison.baseline else [])
    header += [title for _, title, _ in comparison.columns]
    rows = [header]
    for arm in comparison.arms:
        runs = outcome.results[arm.name]
        row = [arm.name]
        for key in ("rate", "cpu_rate"):
            row.append(_spread([run[key] for run in runs], comparison.rate_format))
            if comparison.baseline:
                row.append(_spread(ratios(outcome, arm.name, key), "{:.2f}"))
        for key, _, fmt in comparison.columns:
            values = [run[key] for run in runs if key in run]
            row.append(_spread(values, fmt) if values and not fmt.endswith("d}") else
                       (fmt.format(int(statistics.median(values))) if values else "-"))
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [f"### {comparison.title}"]
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    works = {json.dumps(run["work"], sort_keys=True) for runs in outcome.results.values() for run in runs}
    if comparison.check_work and len(works) == 1:
        lines.append(f"work per arm (equal, checked): {works.pop()}")
    repeats = max((len(runs) for runs in outcome.results.values()), default=0)
    lines.append(f"median [min-max] over {repeats} repeat(s); ratios taken within each repeat")
    lines += [f"PROBLEM: {problem}" for problem in outcome.problems]
    return "\n".join(lines)
