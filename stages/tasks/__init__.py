"""The embedded task world, in one place: what a task is, how it is worded, how it is checked, and
the preference pairs built from it.

- `families`: the task families (add, reverse, upper, sort, copy), each with its sampler and solver,
  and the generator with its held-out split (disjoint from training by construction);
- `templates`: phrasing files (per family, `train` and `heldout` phrasings; also used to rephrase a
  user's dataset) and `embedded_tasks.yaml`, the phrasings shipped with the package;
- `verifier`: the exact-answer check and the same check as a reward function;
- `pairs`: preference pairs (the correct answer over a plausible wrong one, or the policy's own
  sampled mistake), for training and for held-out evaluation;
- `world`: the simulated people behind the data: annotators whose demonstrations carry systematic
  habits and mistakes, and a noisy judge whose preferences know better (the default recipe's world);
- `instructions` and `constraints`: the other world, for real models: instruction prompts with verifiable
  constraints (base tasks of instruction_tasks.yaml x IFEval constraint types, in IFEval's schema) with held-out
  tasks and constraint types, and the repairs that rewrite an answer to follow its constraints.

May import: `stages.core`, `stages.generation` (on-policy samples for pairs) and the torch-only math;
nothing above (checked by import-linter). The package re-exports the families' API and the
verifier, so `from stages import tasks; tasks.generate(...)` reads as before.
"""

from stages.tasks.families import (
    DEFAULT_TEMPLATES,
    FAMILIES,
    HELDOUT_PERCENT,
    Split,
    TaskFamily,
    TemplateSet,
    generate,
    instance_split,
    load_templates,
    training_families,
)
from stages.tasks.verifier import answer_reward, is_correct
from stages.tasks.world import World

__all__ = [
    "DEFAULT_TEMPLATES", "FAMILIES", "HELDOUT_PERCENT", "Split", "TaskFamily", "TemplateSet", "answer_reward",
    "generate", "instance_split", "is_correct", "load_templates", "training_families", "World",
]
