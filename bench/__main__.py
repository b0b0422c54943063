"""python -m bench {all,sft,reward,dpo,ppo,mfu,smollm2,smollm2-ppo,generation} [--quick] [--repeats N] [--threads N] [--json PATH]

Our stages side by side with plain TRL on the same models, data and work, and the SFT step against the
machine's own matmul peak (MFU). Every arm runs in its own process with pinned threads; arms alternate;
ratios are taken within a repeat. See bench/README.md for what each suite measures and the last results.
"""

from __future__ import annotations

import os
import sys

from bench.environment import arm_environment


def _threads(argv: list[str]) -> int:
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv[:-1] else 1


# Before torch and transformers are imported: arms are forked from this process and inherit what they read.
os.environ.update(arm_environment(_threads(sys.argv)))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import common, dpo, generation, mfu, ppo, reward, sft, smollm2, smollm2_ppo  # noqa: E402
from bench.runner import format_outcome, preload, run_comparison  # noqa: E402

SUITES = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "mfu": mfu, "smollm2": smollm2, "smollm2-ppo": smollm2_ppo,
          "generation": generation}
# `all`: the byte-level suites; smollm2 (~24 min: SFT + MFU ~3.5, DPO and reward ~20), smollm2-ppo (~20 min) and
# generation (24 min on a loaded machine) run on their own
ALL = ["sft", "reward", "dpo", "ppo", "mfu"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["all", *SUITES], help="what to measure")
    parser.add_argument("--quick", action="store_true", help="tiny workloads (seconds per arm): for development")
    parser.add_argument("--repeats", type=int, default=None, help="runs of every arm (default: 3; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every arm (default 1)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names to keep (default: all)")
    parser.add_argument("--comparisons", default=None, metavar="WORDS",
                        help="comma-separated words: keep only the comparisons whose title holds one (any case), e.g. DPO,reward")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before an arm is abandoned")
    parser.add_argument("--ppo-before", default=None, metavar="REVISION",
                        help="also run stages/ and reward/ as of this git revision (arm ours@REVISION): before/after in one run")
    parser.add_argument("--ppo-models", default="tiny", metavar="SIZES",
                        help="PPO comparisons on these models: tiny (the default model), 0.67m (the 0.67 M PPO anchor shape);"
                             " default tiny, which keeps `all` under 15 minutes")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's raw result here")
    args = parser.parse_args(argv)
    if args.json:  # before the runs, so a long run never fails at the very end on a missing folder
        args.json.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(args.ppo_models.split(",")) - set(common.MODEL_SHAPES)
    if unknown:
        parser.error(f"--ppo-models: unknown {', '.join(sorted(unknown))}; known: {', '.join(common.MODEL_SHAPES)}")
    repeats = args.repeats or (1 if args.quick else 3)
    keep = set(args.arms.split(",")) if args.arms else None
    titles = [word.lower() for word in args.comparisons.split(",")] if args.comparisons else None

    print(f"bench: {args.suite}{' --quick' if args.quick else ''}, {repeats} repeat(s), {args.threads} thread(s) per arm;"
          f" {platform.processor() or platform.machine()}, {_cpu_count()} CPUs visible, load average {_load()}", flush=True)
    started, outcomes = time.perf_counter(), []
    preload()
    for name in ALL if args.suite == "all" else [args.suite]:
        options = {"before": args.ppo_before, "models": args.ppo_models.split(",")} if name == "ppo" else {}
        for comparison in SUITES[name].comparisons(args.quick, **options):
            if titles is not None and not any(word in comparison.title.lower() for word in titles):
                continue
            if keep is not None:
                comparison.arms = [arm for arm in comparison.arms if arm.name in keep]
                if not comparison.arms:
                    continue
                if comparison.baseline not in {arm.name for arm in comparison.arms}:
                    comparison.baseline = None
            outcomes.append(run_comparison(comparison, repeats, args.threads, args.timeout))
    print(f"\n# Results ({time.perf_counter() - started:.0f} s; load average now {_load()})\n")
    for outcome in outcomes:
        print(format_outcome(outcome) + "\n")
    if args.json:
        args.json.write_text(json.dumps([{"title": o.comparison.title, "results": o.results, "problems": o.problems}
                                         for o in outcomes], indent=1))
    problems = [problem for outcome in outcomes for problem in outcome.problems]
    return 1 if problems else 0


def _cpu_count() -> int:
    return len(__import__("os").sched_getaffinity(0))


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in __import__("os").getloadavg())


if __name__ == "__main__":
    torch.set_num_threads(1)  # the parent only starts processes
    sys.exit(main())
