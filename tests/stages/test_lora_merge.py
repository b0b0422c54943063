"""lora.merge_scale: the merged model is the start plus that share of the adapters' update (WiSE-FT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _trained_adapter(tmp_path: Path) -> tuple[object, dict[str, torch.Tensor], Path]:
    from peft import get_peft_model

    from stages.core import models
    from stages.core.registry import Registry
    from stages.lifecycle import LoraSection

    base = Registry().get("tiny-llama")
    start = {name: tensor.clone() for name, tensor in models.load_causal_lm(base).state_dict().items()}
    adapted = get_peft_model(models.load_causal_lm(base), LoraSection(enabled=True).peft_config("CAUSAL_LM"))
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an update to merge
            parameter.data.normal_(std=0.05)
    adapted.save_pretrained(tmp_path / "out")
    return base, start, tmp_path / "out"


def _merged(base: object, adapter_dir: Path, target: Path, scale: float) -> dict[str, torch.Tensor]:
    import shutil

    from safetensors.torch import load_file

    from stages.core import checkpoints

    shutil.copytree(adapter_dir, target)
    checkpoints.merge_adapters(base, target, trust_remote_code=False, scale=scale)
    assert not (target / "adapter_model.safetensors").exists()
    return load_file(target / "model.safetensors")


def test_merge_scale_moves_the_weights_that_share_of_the_way(tmp_path: Path) -> None:
    base, start, adapter_dir = _trained_adapter(tmp_path)
    full = _merged(base, adapter_dir, tmp_path / "full", 1.0)
    half = _merged(base, adapter_dir, tmp_path / "half", 0.5)
    changed = [name for name in full if name in start and not torch.equal(full[name], start[name])]
    assert len(changed) >= 4  # the q/k/v/o projections of every layer
    for name in changed:
        torch.testing.assert_close(half[name] - start[name], 0.5 * (full[name] - start[name]), atol=1e-6, rtol=1e-4)


def test_merge_scale_is_checked_when_the_config_is_read() -> None:
    from stages.core.config import ConfigError, build
    from stages.lifecycle import LoraSection

    assert build(LoraSection, {"enabled": True, "merge_scale": 0.5}, "x.yaml").merge_scale == 0.5
    with pytest.raises(ConfigError, match="x.yaml.*merge_scale must be in"):
        build(LoraSection, {"merge_scale": 0.0}, "x.yaml")
    with pytest.raises(ConfigError, match="merge_scale needs lora.merge_on_save"):
        build(LoraSection, {"merge_scale": 0.5, "merge_on_save": False}, "x.yaml")
