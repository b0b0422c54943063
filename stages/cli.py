"""The `rlhf` command: stages, the registry, evaluation, recipes.

    rlhf sft --config configs/sft/tiny.yaml [key=value ...]
    rlhf registry list [--json] | show REF [--json] | gc [--delete-files] [--grace SECONDS] [--force]
    rlhf eval REF [--json] [--data FILE [--split S]]
    rlhf eval REF --benchmark ifbench [--limit N] [--max-new-tokens T] [--batch-size B]   (or: --benchmark ifeval --data FILE: metrics eval/ifeval_FILESTEM/...)
    rlhf report RUN [RUN_B] [--out DIR]
    rlhf export REF OUT [--overwrite] [--push-to-hub ORG/NAME [--private]]
    rlhf chat REF [--system S] [--temperature T] [--max-new-tokens N] [--prompt TEXT]

Stage modules are imported only when their command runs, and the registry commands import neither torch nor
transformers (tests/stages/test_layout.py checks it), so they answer at once.
"""

from __future__ import annotations

import argparse
import importlib
from collections import Counter
import json
import re
from pathlib import Path
import sys
import time
from typing import Any

from stages.core.errors import exit_code
from stages.recipe import STAGE_MODULES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STAGE_MODULES:
        module = importlib.import_module(STAGE_MODULES[argv[0]])
        return exit_code(lambda: module.main(argv[1:]))
    if argv and argv[0] == "run":
        module = importlib.import_module("stages.recipe")
        return exit_code(lambda: module.main(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return exit_code(lambda: args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Staged post-training: sft → reward → policy (dpo | ppo | grpo | rloo | kto).")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="{sft,reward,policy,sample,run,registry,eval,instructions,report,export,chat}")
    for stage in STAGE_MODULES:
        commands.add_parser(stage, help=f"run the {stage} stage: --config FILE [key=value ...]")
    commands.add_parser("run", help="run a recipe: RECIPE.yaml [key=value ...] [--dry-run]")

    registry = commands.add_parser("registry", help="list, show or clean the model registry")
    registry_commands = registry.add_subparsers(metavar="{list,show,gc}")
    listing = registry_commands.add_parser("list", help="all entries with status and lineage")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(command="registry", handler=_registry_list)
    show = registry_commands.add_parser("show", help="one entry in full")
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")
    show.set_defaults(command="registry", handler=_registry_show)
    gc = registry_commands.add_parser(
        "gc", help="remove entries that are over: failed, or incomplete with their owner gone (never a running one)"
    )
    gc.add_argument("--delete-files", action="store_true", help="also delete their output directories")
    gc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="an incomplete entry's heartbeat must be this old before it is removed (default 600)")
    gc.add_argument("--force", action="store_true", help="also remove stale entries owned by another host (their process cannot be checked)")
    gc.set_defaults(command="registry", handler=_registry_gc)

    evaluate = commands.add_parser("eval", help="evaluate a registered model or a path on the held-out embedded tasks, or on --data FILE")
    evaluate.add_argument("ref")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--num-prompts", type=int, default=200)
    evaluate.add_argument("--seed", type=int, default=1234, help="held-out draw; any seed stays disjoint from training")
    evaluate.add_argument("--data", help="score on this file or Hub dataset instead (any supported format: SFT rows or pairs)")
    evaluate.add_argument("--split", default="train", help="with --data: the split to read")
    evaluate.add_argument(
        "--benchmark", help="instruction following: ifbench (its 294 test prompts), or ifeval with --data FILE (any IFEval-format file)"
    )
    evaluate.add_argument("--limit", type=int, help="with --benchmark: a seeded subset of N prompts (--seed), for a quick look")
    evaluate.add_argument("--max-new-tokens", type=int, default=384, help="with --benchmark: longest answer (default 384)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="with --benchmark: rows decoding at once (more on a GPU)")
    evaluate.add_argument("--max-batch-tokens", type=int, default=32768, help="with --benchmark: batch positions (rows x width) when a prompt joins (more on a GPU)")
    evaluate.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="with --benchmark: auto = bf16 on a GPU, fp32 on a CPU")
    evaluate.set_defaults(command="eval", handler=_eval)

    prompts = commands.add_parser("instructions", help="write instruction prompts with verifiable constraints (IFEval schema): train and held-out splits")
    prompts.add_argument("out", help="folder for train.jsonl, heldout_tasks.jsonl, heldout_constraints.jsonl and manifest.json")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--train", type=int, default=3000, help="training prompts")
    prompts.add_argument("--heldout-tasks", type=int, default=300, help="held-out base tasks with the training constraint types")
    prompts.add_argument("--heldout-constraints", type=int, default=200, help="held-out base tasks with held-out constraint types only")
    prompts.add_argument("--heldout-types", help="comma-separated IFEval instruction ids held out of training (default: stages/tasks/instructions.py)")
    prompts.add_argument("--heldout-templates", help="comma-separated base-task templates (kind/id) held out of training")
    prompts.set_defaults(command="instructions", handler=_instructions)

    report = commands.add_parser("report", help="offline HTML report of a recipe run, or two runs compared")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run name under RLHF_HOME, or a run directory; give two to compare")
    report.add_argument("--out", help="output folder (default: RLHF_HOME/RUN/report, or RUN/report-vs-RUN_B)")
    report.set_defaults(command="report", handler=_report)

    export = commands.add_parser("export", help="a model as a folder plain transformers loads (merged safetensors, tokenizer, card); or push it to the Hub")
    export.add_argument("ref", help="registry reference, built-in name, model folder or .gguf file")
    export.add_argument("out", help="the folder to write (must not exist or be empty, unless --overwrite)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (only once the new folder is complete)")
    export.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this Hub model repo (needs credentials and network)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    export.set_defaults(command="export", handler=_export)

    chat = commands.add_parser("chat", help="talk to a model in the terminal (its chat template, streamed); --prompt answers once")
    chat.add_argument("ref", help="registry reference, built-in name, model folder or .gguf file")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (the session is reproducible)")
    chat.add_argument("--prompt", help="answer this one message and exit (scriptable)")
    chat.set_defaults(command="chat", handler=_chat)
    return parser


def _registry_list(args: argparse.Namespace) -> int:
    from stages.core.registry import Registry

    registry = Registry()
    entries = registry.list()
    statuses = [registry.status_of(entry) for entry in entries]
    if args.json:
        print(json.dumps([entry.to_dict() | {"live_status": status} for entry, status in zip(entries, statuses)], indent=2, default=str))
        return 0
    header = ("REF", "KIND", "STATUS", "PARENT", "CREATED", "KEY METRIC", "PATH")
    rows = [header] + [
        (
            entry.ref if not entry.builtin else entry.name + " (built-in)",
            entry.kind,
            status.upper() if status != "ready" else status,
            entry.parent or "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created)) if entry.created else "-",
            _key_metric(entry.metrics),
            entry.path,
        )
        for entry, status in zip(entries, statuses)
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    for status, why in (
        ("running", "being written now by a live process; gc never touches them"),
        ("incomplete", "never finished, owner gone; `rlhf registry gc` removes them after the grace period"),
        ("failed", "the stage raised; `rlhf registry gc` removes them, resume=true continues them"),
    ):
        refs = [entry.ref for entry, entry_status in zip(entries, statuses) if entry_status == status]
        if refs:
            print(f"\n{len(refs)} {status} ({why}): {', '.join(refs)}", end="")
    print()
    return 0


def _registry_show(args: argparse.Namespace) -> int:
    from stages.core.registry import Registry

    entry = Registry().get(args.ref)
    record = entry.to_dict()
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        for key, value in record.items():
            shown = json.dumps(value, indent=2, default=str) if isinstance(value, (dict, list)) else value
            print(f"{key}: {shown}")
    return 0


def _registry_gc(args: argparse.Namespace) -> int:
    from stages.core.registry import Registry

    from stages.core import ownership

    grace = ownership.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace
    removed, skipped, warnings = Registry().collect(grace=grace, force=args.force, delete_files=args.delete_files)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"removed {_status_counts(removed) or '0'} entries" + (": " + ", ".join(e.ref for e in removed) if removed else ""))
    for entry, reason in skipped:
        print(f"skipped {entry.ref}: {reason}")
    return 0


def _status_counts(entries: list[Any]) -> str:
    """e.g. '1 incomplete, 2 failed'."""
    return ", ".join(f"{count} {status}" for status, count in Counter(entry.status for entry in entries).items())


def _eval(args: argparse.Namespace) -> int:
    from stages import evaluation
    from stages.core import models
    from stages.core.registry import Registry

    if args.benchmark:
        return _eval_benchmark(args)
    entry = Registry().get(args.ref)
    config = evaluation.for_entry(entry, num_prompts=args.num_prompts, seed=args.seed)  # its held-out families, its phrasings
    if args.data:
        metrics = evaluation.evaluate_file(entry, args.data, args.split, num_rows=args.num_prompts)
    elif entry.kind == "reward":
        metrics = evaluation.evaluate_reward_model(entry, num_pairs=max(args.num_prompts, 500), seed=args.seed)
    else:
        metrics, _ = evaluation.exact_match(models.load_causal_lm(entry), models.load_tokenizer(entry), config)
    if args.json:
        print(json.dumps({"ref": entry.ref, "metrics": metrics}, indent=2))
    else:
        print(f"{entry.ref}")
        for key, value in metrics.items():
            print(f"  {key:<40} {value:.4f}")
    return 0


def _eval_benchmark(args: argparse.Namespace) -> int:
    from stages.benchmarks import runner

    spec = f"{args.benchmark}:{args.data}" if args.data else args.benchmark
    if args.data and "=" not in args.benchmark:
        # Named after the file, so that scoring a second file keeps the first one's folder and registry metrics.
        stem = re.sub(r"[^a-z0-9_]+", "_", Path(args.data).stem.lower()).strip("_") or "data"
        spec = f"{args.benchmark}_{stem}={spec}"
    settings = runner.Settings(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, limit=args.limit,
        seed=args.seed, dtype=args.dtype,
    )
    result, path, recorded = runner.evaluate_entry(args.ref, spec, settings)
    if args.json:
        print(json.dumps({"ref": args.ref, "metrics": result.metrics(), "scores": str(path)}, indent=2))
    else:
        print(runner.describe(result))
        print(f"files: {path.parent} (responses.jsonl, results.jsonl, scores.json)\n{recorded}")
    return 0


def _instructions(args: argparse.Namespace) -> int:
    from stages.core.config import ConfigError
    from stages.tasks import instructions

    chosen = {name: value.split(",") for name, value in (("heldout_types", args.heldout_types), ("heldout_templates", args.heldout_templates)) if value}
    try:
        settings = instructions.InstructionSet(**chosen)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    counts = {"train": args.train, "heldout_tasks": args.heldout_tasks, "heldout_constraints": args.heldout_constraints}
    for split, path in instructions.write(Path(args.out), counts, args.seed, settings).items():
        print(f"{split:<20} {counts[split]:>6} prompts  {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from stages import report

    print(report.write_report(args.runs, args.out))  # a ReportError is a UserError: one line, exit 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from stages import export

    out = export.export(args.ref, args.out, overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private)
    print(f"exported {args.ref} to {out}" + (f" and pushed it to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from stages import chat

    return chat.main(args)


def _key_metric(metrics: dict[str, Any]) -> str:
    for key in ("eval/exact_match", "eval/pairwise_accuracy"):
        if key in metrics:
            return f"{key.split('/')[-1]}={metrics[key]:.3f}"
    if "samples/rows" in metrics:
        return f"rows={metrics['samples/rows']:.0f} pairs={metrics.get('samples/pairs', 0):.0f}"
    return "-"


if __name__ == "__main__":
    sys.exit(main())
