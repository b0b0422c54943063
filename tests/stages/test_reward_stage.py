"""The reward-model stage end to end on a tiny SFT model: learns, registers with lineage, LoRA scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import evaluation, reward_model
from stages.core.config import load_config
from stages.core.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--config", str(REPO_ROOT / "configs/reward/tiny.yaml"),
    "model=sft:latest",
    "datasets=[{source: embedded, num_examples: 1500, tasks: [upper, copy]}]",
    "eval.tasks=[upper, copy]", "heldout_pairs=200",
    "train.num_train_epochs=2", "train.save_steps=1000", "tracking.report_to=none",
]


def _config(tmp_path: Path, *extra: str) -> reward_model.RewardStageConfig:
    return load_config(reward_model.RewardStageConfig, [*SMALL, f"output_dir={tmp_path / 'rm'}", "run_name=t", *extra])


@pytest.mark.slow
def test_reward_model_learns_and_registers(tmp_path: Path, registered_sft: str, tiny_sft_dir: Path) -> None:
    """The classifier head: a fresh score head must learn the preference from the pairs alone."""
    torch.set_num_threads(2)
    metrics = reward_model.run(_config(tmp_path, "head=classifier", "chosen_nll_coefficient=0", "train.learning_rate=2e-4"))
    entry = Registry().get("reward:latest")
    assert entry.status == "ready" and entry.kind == "reward" and entry.parent == registered_sft
    # Held-out pairs (eval-split prompts, negatives sampled afresh): well above chance (0.5), and
    # the chosen answers score higher on average.
    assert metrics["eval/num_pairs"] == 200
    assert metrics["eval/pairwise_accuracy"] >= 0.56, metrics  # 200 pairs: chance is 0.50 +- 0.035
    assert metrics["eval/reward_margin"] > 0
    # The whole network trained: the new score head and the SFT backbone both moved.
    trained = load_file(Path(entry.path) / "model.safetensors")
    sft_weights = load_file(tiny_sft_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(trained[name], sft_weights[name])


@pytest.mark.slow
def test_lora_reward_model_trains_only_adapters_and_score_head(
    tmp_path: Path, registered_sft: str, tiny_sft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapters on the attention projections + a fully trained score head (peft's modules_to_save). The
    output is saved merged, so every weight outside the attention projections and the head must equal
    the SFT model's, and the head must differ from its value when training started."""
    from trl import RewardTrainer

    seen: dict[str, object] = {}
    original_train = RewardTrainer.train

    def recording_train(self, *args, **kwargs):  # noqa: ANN001, ANN202 - a pass-through spy
        seen["trainable"] = {name for name, param in self.model.named_parameters() if param.requires_grad}
        seen["initial_head"] = next(p for n, p in self.model.named_parameters() if n.endswith("score.modules_to_save.default.weight")).detach().clone()
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(RewardTrainer, "train", recording_train)
    reward_model.run(_config(tmp_path, "head=classifier", "chosen_nll_coefficient=0", "lora.enabled=true", "train.max_steps=8", "train.learning_rate=1e-2", "heldout_pairs=20"))

    trainable = seen["trainable"]
    assert trainable and all("lora_" in name or "score.modules_to_save" in name for name in trainable), sorted(trainable)
    trained = load_file(tmp_path / "rm" / "model.safetensors")
    sft_weights = load_file(tiny_sft_dir / "model.safetensors")
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj")
    changed = {name for name, tensor in trained.items() if name in sft_weights and not torch.equal(tensor, sft_weights[name])}
    assert changed, "LoRA training moved no attention projection"
    assert all(any(module in name for module in adapted) for name in changed), sorted(changed)
    assert not torch.equal(trained["score.weight"], seen["initial_head"]), "the score head did not train"
    assert not (tmp_path / "rm" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_likelihood_head_trains_the_lm_and_saves_a_plain_causal_lm(tmp_path: Path, registered_sft: str, tiny_sft_dir: Path) -> None:
    """`head: likelihood` (the tiny default): the SFT model's own log-likelihood, trained with the pairwise loss.
    Learning shows in the falling loss and the moved weights (the untrained likelihood already ranks most
    pairs right, so held-out accuracy is only checked above chance); the output is a causal LM whose
    config.json names the head."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    # reverse held out of training (as sort is in the SmolLM2 recipe): scored apart, not in eval/pairwise_accuracy.
    metrics = reward_model.run(_config(tmp_path, "head=likelihood", "train.logging_steps=5", "eval.tasks=[upper, copy, reverse]", "eval.heldout_tasks=[reverse]"))
    assert metrics["eval/pairwise_accuracy"] >= 0.56, metrics  # 200 pairs: chance is 0.50 +- 0.035
    families = {key.rsplit("/", 1)[1] for key in metrics if key.startswith("eval/pairwise_accuracy/")}
    assert families == {"upper", "copy"} and metrics["eval/num_pairs"] == 200, metrics
    assert 0 <= metrics["eval/pairwise_accuracy_unseen_tasks/reverse"] == metrics["eval/pairwise_accuracy_unseen_tasks"] <= 1
    # `rlhf eval` of the entry splits the same way, from its recorded config.
    again = evaluation.evaluate_reward_model(Registry().get("reward:latest"), num_pairs=40)
    assert "eval/pairwise_accuracy_unseen_tasks/reverse" in again and "eval/pairwise_accuracy/reverse" not in again, again
    assert metrics["eval/reward_margin"] > 0 and metrics["eval/reward_chosen"] < 0
    entry = Registry().get("reward:latest")
    logged = [row["loss"] for row in json.loads((Path(entry.path) / "trainer_state.json").read_text())["log_history"] if "loss" in row]
    assert len(logged) >= 2 and logged[-1] < logged[0], logged
    trained = load_file(Path(entry.path) / "model.safetensors")
    sft_weights = load_file(tiny_sft_dir / "model.safetensors")
    assert set(trained) == set(sft_weights)  # same tensors as the SFT model: no score head
    assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"], sft_weights["model.layers.1.mlp.down_proj.weight"])
    assert json.loads((Path(entry.path) / "config.json").read_text())["reward_head"]["kind"] == "likelihood"
    assert type(AutoModelForCausalLM.from_pretrained(entry.path)).__name__ == "LlamaForCausalLM"


def test_centring_and_unmerged_lora_are_refused_for_the_likelihood_head(tmp_path: Path) -> None:
    from stages.core.config import ConfigError

    with pytest.raises(ConfigError, match="center_rewards_coefficient does not apply to head: likelihood"):
        _config(tmp_path, "head=likelihood", "train.center_rewards_coefficient=0.01")
    with pytest.raises(ConfigError, match="head: likelihood needs lora.merge_on_save"):
        _config(tmp_path, "head=likelihood", "lora.enabled=true", "lora.merge_on_save=false")
    with pytest.raises(ConfigError, match="chosen_nll_coefficient must be >= 0 and applies to head: likelihood only"):
        _config(tmp_path, "head=classifier", "chosen_nll_coefficient=1.0")
    with pytest.raises(ConfigError, match="chosen_nll_coefficient must be >= 0"):
        _config(tmp_path, "head=likelihood", "chosen_nll_coefficient=-1")


@pytest.mark.slow
def test_lora_likelihood_head_trains_only_adapters_and_keeps_the_head_mark(tmp_path: Path, registered_sft: str, tiny_sft_dir: Path) -> None:
    """LoRA with the likelihood head: adapters only (the LM head is the score), merged on save into a
    checkpoint that still says it is a likelihood-head reward model."""
    reward_model.run(_config(tmp_path, "head=likelihood", "lora.enabled=true", "train.max_steps=4", "train.learning_rate=1e-2", "heldout_pairs=20"))
    trained = load_file(tmp_path / "rm" / "model.safetensors")
    sft_weights = load_file(tiny_sft_dir / "model.safetensors")
    changed = {name for name, tensor in trained.items() if not torch.equal(tensor, sft_weights[name])}
    assert changed and all(any(module in name for module in ("q_proj", "k_proj", "v_proj", "o_proj")) for name in changed), sorted(changed)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["reward_head"]["kind"] == "likelihood"
    assert not (tmp_path / "rm" / "adapter_model.safetensors").exists()
    # The merge rebuilt the config from the SFT model's (num_labels 2); PPO still takes it as a scalar reward.
    from reward.models import load_reward
    from stages.ppo.engine import TokenScores

    TokenScores(load_reward(Registry().get("reward:latest")))
