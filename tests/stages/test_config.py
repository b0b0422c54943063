"""Strict config parsing: YAML + key=value overrides; unknown keys, wrong types and missing values fail by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stages.core.config import ConfigError, load_config


@dataclass
class _Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    required: str
    steps: int = 3
    flag: bool = False
    choice: str | None = None
    inner: _Inner = field(default_factory=_Inner)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "required: x\nsteps: 5\ninner:\n  rate: 0.5\n")
    config = load_config(_Outer, ["--config", path, "inner.rate=3e-4", "flag=true", "--local_rank=1", "inner.names=[a, b]"])
    assert config.steps == 5
    assert config.inner.rate == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; the float field converts it
    assert config.flag is True
    assert config.inner.names == ["a", "b"]


def test_launcher_local_rank_is_accepted(tmp_path: Path) -> None:
    config = load_config(_Outer, ["--local_rank", "0", "--config", _write(tmp_path, "required: y\n")])
    assert config.required == "y"


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'inner.raet' \(did you mean 'rate'\?\)"):
        load_config(_Outer, ["--config", _write(tmp_path, "required: x\n"), "inner.raet=1"])


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="steps must be an integer"):
        load_config(_Outer, ["--config", _write(tmp_path, "required: x\nsteps: many\n")])
    with pytest.raises(ConfigError, match="flag must be true or false"):
        load_config(_Outer, ["--config", _write(tmp_path, "required: x\n"), "flag=maybe"])


def test_missing_required_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required value for required"):
        load_config(_Outer, ["--config", _write(tmp_path, "steps: 1\n")])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(_Outer, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Outer, ["--config", _write(tmp_path, "required: [unclosed\n")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_Outer, ["--config", _write(tmp_path, "- a list\n")])


def test_trl_section_is_checked_against_trl_fields(tmp_path: Path) -> None:
    from stages.sft import SFTStageConfig

    path = _write(tmp_path, "train:\n  learning_rate: 1.0e-3\n")
    assert load_config(SFTStageConfig, ["--config", path]).train["learning_rate"] == 1e-3
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config(SFTStageConfig, ["--config", path, "train.learning_rat=1"])
    with pytest.raises(ConfigError, match="train.num_train_epochs must be a number"):
        load_config(SFTStageConfig, ["--config", path, "train.num_train_epochs=lots"])
    with pytest.raises(ConfigError, match="train.output_dir is set by the stage"):
        load_config(SFTStageConfig, ["--config", path, "train.output_dir=/tmp/x"])


def test_unquoted_no_means_the_no_strategy(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as false; HF's interval strategies spell "off" as "no"."""
    from stages.sft import SFTStageConfig

    path = _write(tmp_path, "train:\n  eval_strategy: no\n")
    config = load_config(SFTStageConfig, ["--config", path, "train.save_strategy=no"])
    assert config.train["save_strategy"] == "no"
    assert config.train["eval_strategy"] == "no"
    with pytest.raises(ConfigError, match="train.save_strategy=True"):
        load_config(SFTStageConfig, ["--config", path, "train.save_strategy=yes"])


@pytest.mark.parametrize("path", sorted(str(p) for p in Path(__file__).resolve().parents[2].glob("configs/sft/*.yaml")))
def test_every_shipped_sft_yaml_parses(path: str) -> None:
    from stages.sft import SFTStageConfig

    config = load_config(SFTStageConfig, ["--config", path])
    assert config.datasets, path


@pytest.mark.parametrize("path", sorted(str(p) for p in Path(__file__).resolve().parents[2].glob("configs/sample/*.yaml")))
def test_every_shipped_sample_yaml_parses(path: str) -> None:
    from stages.sample import SampleStageConfig

    config = load_config(SampleStageConfig, ["--config", path])
    assert config.datasets and config.reward_functions, path


def test_every_yaml_opens_with_its_command() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in [path for stage in ("sft", "reward", "policy", "sample", "recipes") for path in root.glob(f"{stage}/*.yaml")]:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# rlhf "), f"{path} should open with the command that runs it"


def test_help_lists_the_keys_instead_of_failing(capsys: pytest.CaptureFixture[str]) -> None:
    from stages import cli

    assert cli.main(["run", "--help"]) == 0
    recipe_help = capsys.readouterr().out
    assert "usage: rlhf run RECIPE.yaml" in recipe_help and "resume" in recipe_help and "hostfile" in recipe_help
    with pytest.raises(SystemExit) as exited:
        cli.main(["reward", "-h"])
    assert exited.value.code == 0
    stage_help = capsys.readouterr().out
    assert "heldout_pairs" in stage_help and "length_grouping" in stage_help
