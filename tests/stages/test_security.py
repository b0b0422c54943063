"""Security: secrets never reach what a run writes; weights load from safetensors only; remote code stays off
unless asked for, per model."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest

from stages import cli
from stages.core import models
from stages.core.registry import Registry
from stages.core.secrets import REDACTED, scrub, scrub_argv

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_SECRETS = {
    "HF_TOKEN": "hf_EnvironmentTokenAAAAAAAAAAAAAAAAAAAA",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "MY_SERVICE_API_KEY": "service-key-that-is-secret",
}
HUB_TOKEN = "hf_ConfigTokenBBBBBBBBBBBBBBBBBBBBBBB"  # under a secret-looking key
TAG_TOKEN = "sk-LooksLikeAnApiKeyCCCCCCCCCCCCCCCC"  # a key pasted into an ordinary field


def test_secrets_never_reach_logs_configs_registry_or_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """A tiny SFT run, started as from the command line, with credentials in the environment and two
    in its config; then every byte written under the output directory, RLHF_HOME, the W&B directory and the
    working directory (and the console output, kept as a log file) is searched for them."""
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [
        "sft", "--config", str(REPO_ROOT / "configs/sft/tiny.yaml"), f"output_dir={out}", "run_name=secret-test",
        "datasets=[{source: embedded, num_examples: 32}]", "train.num_train_epochs=1", "train.per_device_train_batch_size=8",
        "train.save_steps=2", "train.logging_steps=1", "eval.num_prompts=4", "eval.max_new_tokens=4",
        f"train.hub_token={HUB_TOKEN}", f"tracking.tags=[{TAG_TOKEN}]",
    ]
    monkeypatch.setattr(sys, "argv", ["rlhf", *argv])  # W&B records the command line
    assert cli.main(argv) == 0
    captured = capfd.readouterr()
    (tmp_path / "console.log").write_text(captured.out + captured.err)

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "the W&B offline run is among the files searched"
    assert (tmp_path / "rlhf_home" / "registry.sqlite").exists()
    for secret in [*ENV_SECRETS.values(), HUB_TOKEN, TAG_TOKEN]:
        leaks = [str(path.relative_to(tmp_path)) for path in written if secret.encode() in path.read_bytes()]
        assert not leaks, f"{secret[:6]}... found in {leaks}"
    config = Registry().get("sft:1").config
    assert config["train"]["hub_token"] == REDACTED and config["tracking"]["tags"] == [REDACTED]
    assert not list(out.rglob("training_args.bin")), "a pickle of the arguments (hub_token included) is not kept"


def test_scrub_rules() -> None:
    secrets = ["s3cr3t-value"]
    assert scrub({"hub_token": "abc", "pad_token": "<pad>", "note": "x s3cr3t-value y", "max_new_tokens": 16}, secrets) == {
        "hub_token": REDACTED, "pad_token": "<pad>", "note": f"x {REDACTED} y", "max_new_tokens": 16,
    }
    assert scrub(["hf_" + "a" * 34, "hf_short", "commit 0123456789abcdef0123456789abcdef01234567"], []) == [
        REDACTED, "hf_short", "commit 0123456789abcdef0123456789abcdef01234567",  # a git hash is not a key
    ]


def test_scrub_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_EnvironmentTokenAAAAAAAAAAAAAAAAAAAA")
    arguments = ["--config", "x.yaml", "train.hub_token=abc123", "--api_key", "k-123", "note=hf_EnvironmentTokenAAAAAAAAAAAAAAAAAAAA", "seed=3"]
    assert scrub_argv(arguments) == ["--config", "x.yaml", f"train.hub_token={REDACTED}", "--api_key", REDACTED, f"note={REDACTED}", "seed=3"]


@pytest.fixture()
def saved_model(tmp_path: Path) -> Path:
    builtin = Registry().get("tiny-llama")
    directory = tmp_path / "model"
    models.load_causal_lm(builtin).save_pretrained(directory)
    models.load_tokenizer(builtin).save_pretrained(directory)
    return directory


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_weights_load_from_safetensors_and_a_pickle_is_never_opened(saved_model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    (saved_model / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    model = models.load_causal_lm(Registry().get(str(saved_model)))
    assert model is not None and not marker.exists()
    (saved_model / "model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match="only pickle weights .*safetensors only"):
        models.load_causal_lm(Registry().get(str(saved_model)))
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_and_recorded_per_model(saved_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from stages import lifecycle, policy, reward_model, sft

    for config_class in (lifecycle.StageConfig, sft.SFTStageConfig, reward_model.RewardStageConfig, policy.PolicyStageConfig):
        assert config_class().trust_remote_code is False, config_class
    registry = Registry()
    plain = registry.begin("plain/sft", "sft", saved_model)
    trusted = registry.begin("trusted/sft", "sft", shutil.copytree(saved_model, saved_model.parent / "trusted"), trust_remote_code=True)
    for entry in (plain, trusted):
        registry.mark_ready(entry.ref)
    asked = []
    real = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    models.load_causal_lm(registry.get("plain/sft"))
    models.load_causal_lm(registry.get("trusted/sft"))
    assert asked == [False, True]
    assert registry.get("plain/sft").trust_remote_code is False and registry.get("trusted/sft").trust_remote_code is True
