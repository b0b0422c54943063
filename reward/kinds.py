"""What a model reference is, checked before a stage loads it in a role.

Loading the wrong kind of model often "works", which is the worst way to fail: an SFT checkpoint loaded as a
sequence classifier gets a freshly initialised score head, so PPO would train on a random reward and register
the result. So each stage names the role of every reference it takes and `require` checks it first, from the
registry's kind where there is one and from the checkpoint's own files where the reference is a path:

| role | accepts | refuses |
| --- | --- | --- |
| `policy` (SFT start, DPO/PPO/GRPO/RLOO policy and reference, on-policy sampler) | causal LMs: base, sft, policy entries, causal-LM checkpoints, GGUF files, Hub ids | reward models, datasets, classifiers |
| `reward_init` (where the reward stage starts) | causal LMs and reward models (further training) | datasets, untrained classifiers |
| `reward_model` | reward entries and checkpoints with a reward head: a classifier whose head weights are saved, or the likelihood-head marker | everything else |
| `critic` (PPO's value model) | reward models, and causal LMs (a fresh value head, as documented) | datasets |

A Hub id is not downloaded to be checked: it is accepted as what the role needs. `check_model_kinds: false`
in a stage config turns a refusal into a warning, for research that wants an unusual combination.

May import: `stages.core` and this package (see reward/__init__.py).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from reward import likelihood
from stages.core.errors import UserError
from stages.core.registry import Entry

# Names under which transformers' *ForSequenceClassification models keep their head (Llama, Qwen, Mistral, GPT-2:
# `score`; BERT-like: `classifier`).
HEAD_PREFIXES = ("score.", "classifier.")
# `unknown`: an architecture this check does not know (custom code, say): accepted where a causal LM will do.
ROLES = {
    "policy": ("causal_lm", "hub", "unknown"),
    "reward_init": ("causal_lm", "reward_model", "hub", "unknown"),
    "reward_model": ("reward_model", "hub"),
    "critic": ("causal_lm", "reward_model", "untrained_classifier", "hub", "unknown"),
}
NEEDS = {
    "policy": "a causal language model (a base, SFT or policy model)",
    "reward_init": "a causal language model (usually the SFT model) or a reward model to train further",
    "reward_model": "a reward model: a reward-stage output, or a checkpoint with a trained reward head (classifier head weights or the likelihood-head marker)",
    "critic": "a reward model (the default) or a causal language model",
}


class ModelKindError(UserError, TypeError):
    """A model reference of the wrong kind for its role; the message names it, what it is and what is needed."""


@dataclass
class ModelKind:
    kind: str  # causal_lm | reward_model | untrained_classifier | hub | not_a_model | unknown
    description: str


def identify(entry: Entry) -> ModelKind:
    """What `entry` is, from the registry kind and, for a local checkpoint, its config.json and weights."""
    if entry.builtin:
        return ModelKind("causal_lm", "a built-in base model")
    if entry.kind not in ("base", "sft", "reward", "policy"):
        return ModelKind("not_a_model", f"a registry entry of kind {entry.kind!r} (a dataset, not a model)")
    path = Path(entry.path)
    if entry.kind == "base" and path.suffix == ".gguf":
        return ModelKind("causal_lm", "a GGUF model file")
    if not path.is_dir():
        return ModelKind("hub", "a Hub model") if entry.kind == "base" else ModelKind("not_a_model", f"a registry entry whose files are missing ({path})")
    found = _from_files(path)
    registered = {"sft": "an SFT model", "policy": "a policy model", "reward": "a reward model"}.get(entry.kind)
    if registered is None:
        return found
    if entry.kind == "reward" and found.kind not in ("reward_model", "unknown"):
        return ModelKind(found.kind, f"registered as a reward model but its checkpoint is {found.description}")
    if entry.kind != "reward" and found.kind == "reward_model":
        return ModelKind("reward_model", f"registered as {registered} but its checkpoint is {found.description}")
    return ModelKind("reward_model" if entry.kind == "reward" else found.kind if found.kind != "unknown" else "causal_lm", registered)


def require(entry: Entry, role: str, key: str, stage: str, check: bool = True) -> None:
    """Raise ModelKindError unless `entry` fits `role` (module docstring); with `check=False` print a warning
    instead. `key` is the config key that named it, for the message."""
    found = identify(entry)
    if found.kind in ROLES[role]:
        return
    message = (
        f"{stage}: {key}={entry.name if entry.builtin or entry.version == 0 else entry.ref!r} is {found.description}; "
        f"{key} needs {NEEDS[role]}."
        + _hint(role, found.kind)
    )
    if check:
        raise ModelKindError(message + " (check_model_kinds=false accepts it anyway, for research that means it.)")
    print(f"warning: {message} Accepted: check_model_kinds is false.", flush=True)


def _hint(role: str, kind: str) -> str:
    if role == "reward_model" and kind == "causal_lm":
        return " Loaded as a reward model it would get a freshly initialised, random score head. Train one with the reward stage first."
    if role == "policy" and kind == "reward_model":
        return " Give the SFT model the reward model was trained from (e.g. RUN/sft or sft:latest)."
    return ""


def _from_files(path: Path) -> ModelKind:
    config_file = path / "config.json"
    if not config_file.is_file():
        return ModelKind("not_a_model", f"a directory without config.json ({path})")
    if likelihood.is_likelihood_head(path):
        return ModelKind("reward_model", "a checkpoint with the likelihood reward head")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (ValueError, UnicodeDecodeError):
        return ModelKind("unknown", f"a checkpoint whose config.json cannot be read ({config_file})")
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        if any(name.startswith(HEAD_PREFIXES) for name in _weight_names(path)):
            return ModelKind("reward_model", f"a sequence classifier with its head weights ({architectures[0]})")
        return ModelKind("untrained_classifier", f"a sequence classifier without saved head weights ({architectures[0]})")
    if any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in architectures):
        return ModelKind("causal_lm", f"a causal language model checkpoint ({architectures[0]}, no reward head)")
    return ModelKind("unknown", f"a checkpoint of architecture {architectures or 'unknown'}")


def _weight_names(path: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint, from the headers only (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    names = []
    for file in path.glob("*.safetensors"):
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                names += [name for name in json.loads(handle.read(length)) if name != "__metadata__"]
        except (OSError, ValueError, struct.error):
            continue  # a damaged file is reported where the weights are loaded (core/models.py)
    return names
