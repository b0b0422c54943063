"""Model kinds (reward/kinds.py): every reference the README documents is accepted in its role, the wrong
kinds are refused naming what they are (the stage-level refusals are rows of tests/stages/test_bad_input.py),
and `check_model_kinds: false` turns a refusal into a warning. Also: `rlhf eval` of a damaged registered
model is one clear line, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reward import kinds
from stages import cli
from stages.core.registry import Entry, Registry


@pytest.fixture
def registered(model_dirs: dict[str, Path]) -> dict[str, Entry]:
    """Registry entries of each kind a recipe writes, over the fixture's checkpoints."""
    registry = Registry()

    def ready(name: str, kind: str, directory: str) -> Entry:
        return registry.mark_ready(registry.begin(name, kind, model_dirs[directory]).ref)

    return {
        "sft": ready("run/sft", "sft", "good"),
        "policy": ready("run/policy", "policy", "good"),
        "reward (likelihood head)": ready("run/reward", "reward", "likelihood_rm"),
        "reward (classifier head)": ready("qwen-style/reward", "reward", "classifier_rm"),
    }


def _entry(reference: str) -> Entry:
    return Registry().get(reference)


# What the README documents: policies from SFT outputs, policies, paths, built-ins, Hub ids; reward models of
# both heads (registered or a path); critics from a reward model or an SFT model.
VALID = [
    ("policy", "run/sft"), ("policy", "run/policy"), ("policy", "tiny-llama"), ("policy", "smollm2-135m-instruct"),
    ("policy", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("policy", "@good"),
    ("reward_model", "run/reward"), ("reward_model", "qwen-style/reward"), ("reward_model", "@likelihood_rm"), ("reward_model", "@classifier_rm"),
    ("reward_model", "OpenAssistant/reward-model-deberta-v3-large"),
    ("critic", "run/reward"), ("critic", "run/sft"), ("critic", "@classifier_no_head"), ("critic", "tiny-llama"),
    ("reward_init", "run/sft"), ("reward_init", "run/reward"), ("reward_init", "tiny-llama"),
]
INVALID = [
    ("policy", "run/reward", "is a reward model"), ("policy", "@classifier_rm", "a sequence classifier with its head weights"),
    ("policy", "@likelihood_rm", "likelihood reward head"),
    ("reward_model", "run/sft", "is an SFT model"), ("reward_model", "run/policy", "is a policy model"),
    ("reward_model", "tiny-llama", "is a built-in base model"), ("reward_model", "@good", "a causal language model checkpoint"),
    ("reward_model", "@classifier_no_head", "without saved head weights"),
    ("reward_init", "@classifier_no_head", "without saved head weights"),
]


def _resolve(reference: str, model_dirs: dict[str, Path]) -> Entry:
    return _entry(str(model_dirs[reference[1:]]) if reference.startswith("@") else reference)


@pytest.mark.parametrize("role, reference", VALID)
def test_every_documented_reference_is_accepted_in_its_role(role: str, reference: str, registered: dict, model_dirs: dict[str, Path]) -> None:
    kinds.require(_resolve(reference, model_dirs), role, role, "test")


@pytest.mark.parametrize("role, reference, needle", INVALID)
def test_the_wrong_kind_is_refused_naming_what_it_is(role: str, reference: str, needle: str, registered: dict, model_dirs: dict[str, Path],
                                                     capsys: pytest.CaptureFixture) -> None:
    entry = _resolve(reference, model_dirs)
    with pytest.raises(kinds.ModelKindError) as caught:
        kinds.require(entry, role, "the_key", "stage")
    assert needle in str(caught.value) and "the_key needs" in str(caught.value) and "check_model_kinds=false" in str(caught.value)
    kinds.require(entry, role, "the_key", "stage", check=False)  # the opt-in: a warning, no error
    assert "warning: stage: the_key=" in capsys.readouterr().out


def test_a_dataset_entry_is_no_model_in_any_role() -> None:
    samples = Entry(name="run/samples", version=1, kind="samples", path="/nowhere")
    for role in kinds.ROLES:
        with pytest.raises(kinds.ModelKindError, match="of kind 'samples' \\(a dataset, not a model\\)"):
            kinds.require(samples, role, "model", "stage")


def test_a_registered_model_whose_files_are_missing_is_no_model(tmp_path: Path) -> None:
    gone = Registry().mark_ready(Registry().begin("moved/sft", "sft", tmp_path / "moved").ref)
    with pytest.raises(kinds.ModelKindError, match="whose files are missing"):
        kinds.require(gone, "policy", "model", "sft")


def test_rlhf_eval_of_a_damaged_model_is_one_clear_line(tmp_path: Path, model_dirs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(model_dirs["truncated"], tmp_path / "damaged")
    entry = Registry().mark_ready(Registry().begin("damaged/sft", "sft", tmp_path / "damaged").ref)
    assert cli.main(["eval", entry.ref, "--num-prompts", "4"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("rlhf: error: the model directory") and "is damaged: weights file" in error and "model.safetensors is truncated" in error
    assert error.count("\n") == 1 and "Traceback" not in error
