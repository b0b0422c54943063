"""The instruction-following recipe (configs/recipes/smollm2_if.yaml) on the real model, CI-sized, under the launcher:
sample + repair -> LoRA SFT -> sample pairs -> DPO, each stage reading the previous one's registered output, every
training stage scoring the held-out prompt files and IFBench (seeded subsets); the shipped prompt files are what the
generator writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.tasks import instructions

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_prompt_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    """data/instructions/ is `rlhf instructions data/instructions` (seed and counts in its manifest), byte for byte."""
    shipped = REPO_ROOT / "data" / "instructions"
    manifest = json.loads((shipped / "manifest.json").read_text())
    settings = instructions.InstructionSet(heldout_types=manifest["heldout_types"], heldout_templates=manifest["heldout_templates"])
    written = instructions.write(tmp_path, manifest["counts"], manifest["seed"], settings)
    for split, path in written.items():
        assert path.read_bytes() == (shipped / f"{split}.jsonl").read_bytes(), f"{split}: regenerate with `rlhf instructions data/instructions`"
    assert settings.heldout_types == list(instructions.DEFAULT_HELDOUT_TYPES)


def _shrunk_recipe(tmp_path: Path) -> Path:
    """The shipped recipe with a handful of prompts, short answers and one optimiser step or two per stage. Rows keep
    any answer (keep_threshold 0, require_ended false): 24-token answers rarely follow every constraint or end, and
    the chain needs rows."""
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "configs/recipes/smollm2_if.yaml").read_text())
    few_prompts = {"datasets": [{"source": "data/instructions/train.jsonl", "num_examples": 4, "eval_fraction": 0}],
                   "num_samples": 2, "max_new_tokens": 24, "keep_threshold": 0.0,
                   "require_ended": False}
    benchmarks = {"benchmark_limit": 2, "benchmark_max_new_tokens": 16}
    sizes = {
        "if_samples": few_prompts,
        "if_sft": {"train": {"max_steps": 2, "max_length": 256}, "eval": benchmarks},
        "if_pairs": few_prompts,
        "policy": {"dpo": {"max_steps": 1, "max_length": 256}, "eval": benchmarks},
    }
    for step in recipe["steps"]:
        for key, value in sizes[step["name"]].items():
            step[key] = step.get(key, {}) | value if isinstance(value, dict) else value
    path = tmp_path / "smollm2_if_ci.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_the_instruction_recipe_runs_under_the_launcher(smollm2: Path, isolated_home: Path, tmp_path: Path) -> None:
    from stages.core.registry import Registry

    environment = dict(os.environ, RLHF_HOME=str(isolated_home), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, "-m", "stages.cli", "run", str(_shrunk_recipe(tmp_path)), "run_name=ifr", "report_to=none"],
        capture_output=True, text=True, env=environment, timeout=1800, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    registry = Registry(isolated_home)
    entries = {name: registry.get(f"ifr/{name}") for name in ("if_samples", "if_sft", "if_pairs", "policy")}
    assert [entry.kind for entry in entries.values()] == ["samples", "sft", "samples", "policy"]
    assert entries["if_sft"].parent == entries["if_samples"].parent == "smollm2-135m-instruct"
    assert entries["if_pairs"].parent == entries["if_sft"].ref and entries["policy"].parent == entries["if_sft"].ref
    assert entries["if_samples"].metrics["samples/repaired"] > 0  # repair: true in the shipped sampling config
    sft, policy = entries["if_sft"].metrics, entries["policy"].metrics
    for name in ("if_heldout_tasks", "if_heldout_constraints", "ifbench"):
        for key in ("prompt_loose", "answer_words", "repetitive", "cut"):
            assert f"eval/{name}/{key}" in sft and f"eval/{name}/{key}" in policy, (name, key)
        assert f"eval/ref_{name}/prompt_loose" in sft  # the base, scored by the SFT stage
        assert f"eval/ref_{name}/prompt_loose" not in policy  # benchmark_start: false, the SFT stage scored it
    pairs = [json.loads(line) for line in (Path(entries["if_pairs"].path) / "pairs.jsonl").read_text().splitlines()]
    assert all("instruction_id_list" in pair and "kwargs" in pair for pair in pairs)  # GRPO/PPO can score these prompts
