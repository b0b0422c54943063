"""The layout's promises: the stage lifecycle (metrics merged, `failed` on an exception), a CLI that answers
registry questions without torch, and a wheel that carries the built-in default and runs it when installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stages import cli
from stages.core.config import build
from stages.core.registry import Registry, RegistryError
from stages.lifecycle import StageConfig, StageRun

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DATA = (
    "stages/core/resources/models/tiny-llama.yaml",
    "stages/core/resources/tiny_tokenizer/tokenizer.json",
    "stages/core/resources/tiny_tokenizer/tokenizer_config.json",
    "stages/core/resources/tiny_tokenizer/chat_template.jinja",
    "stages/tasks/embedded_tasks.yaml",
)


def _config(tmp_path: Path, **values: object) -> StageConfig:
    return build(StageConfig, {"output_dir": str(tmp_path / "out"), "run_name": "layout", "tracking": {"report_to": "none"}} | values)


# -- the lifecycle -------------------------------------------------------------------------------------

def test_metrics_recorded_before_finish_reach_the_registry(tmp_path: Path) -> None:
    """The policy stage records which reward model it used before training; `finish` used to replace the
    whole metrics dict, so that value never reached the registry. Now every recorded value is merged."""
    with StageRun.open(_config(tmp_path), stage="policy") as run:
        run.begin(parent=None)
        run.record(reward_model="run/reward:1")
        assert Registry().get(run.entry.ref).metrics == {"reward_model": "run/reward:1"}  # kept at once
        run.record(**{"eval/exact_match": 0.5})
    entry = Registry().get("policy:latest")
    assert entry.status == "ready"
    assert entry.metrics["reward_model"] == "run/reward:1" and entry.metrics["eval/exact_match"] == 0.5
    assert entry.metrics["seconds"] >= 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["reward_model"] == "run/reward:1"


def test_an_exception_inside_the_lifecycle_marks_the_entry_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Failed: listed as such, never what NAME:latest resolves to, continued by resume=true, removed by gc."""
    with pytest.raises(RuntimeError, match="boom"):
        with StageRun.open(_config(tmp_path), stage="sft") as run:
            run.begin(parent=None)
            raise RuntimeError("boom")
    (entry,) = Registry().list(include_builtin=False)
    assert entry.status == "failed"
    with pytest.raises(RegistryError, match="no version of 'sft' is ready"):
        Registry().get("sft:latest")
    capsys.readouterr()
    assert cli.main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert "FAILED" in listing and "1 failed" in listing and entry.ref in listing.split("failed")[-1]

    with StageRun.open(_config(tmp_path, resume=True), stage="sft") as run:  # resume=true finishes the same entry
        run.begin(parent=None)
        run.record(**{"train/loss": 1.0})
    assert Registry().get("sft:latest").ref == entry.ref and Registry().get(entry.ref).status == "ready"
    assert [e.ref for e in Registry().list(include_builtin=False)] == [entry.ref]


def test_gc_removes_failed_entries_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        with StageRun.open(_config(tmp_path), stage="sft") as run:
            run.begin(parent=None)
            raise ValueError("a bug")
    assert [e.status for e in Registry().list(include_builtin=False)] == ["failed"]
    assert cli.main(["registry", "gc"]) == 0
    assert "removed 1 failed entries" in capsys.readouterr().out
    assert Registry().list(include_builtin=False) == []


def test_an_error_before_begin_records_nothing(tmp_path: Path) -> None:
    """Bad input is found before `begin`: no registry entry, and the directory holds only the manifest."""
    with pytest.raises(RuntimeError):
        with StageRun.open(_config(tmp_path), stage="sft"):
            raise RuntimeError("bad data")
    assert Registry().list(include_builtin=False) == []
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["stage_config.json"]


# -- the light CLI --------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "trl", "deepspeed", "wandb")


@pytest.mark.parametrize("argv", [["--help"], ["registry", "list"], ["registry", "list", "--json"], ["registry", "show", "tiny-llama"], ["registry", "gc"]])
def test_registry_commands_import_neither_torch_nor_transformers(argv: list[str], tmp_path: Path) -> None:
    script = (
        "import sys\nfrom stages.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        f"heavy = sorted(name for name in sys.modules if name.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr.splitlines()[-1]
    assert ("tiny-llama" in result.stdout) or argv[0] in ("--help", "registry") and result.stdout


# -- the wheel ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the sources: setuptools' in-tree build/ keeps files of earlier builds.
    source, out = tmp_path_factory.mktemp("source") / "rlhf-stages", tmp_path_factory.mktemp("wheel")
    skipped = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "wandb", "__pycache__", ".*cache", "bench")
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=skipped)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (built,) = out.glob("rlhf_stages-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_the_built_in_default(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    for package in ("stages", "stages/core", "stages/data", "stages/tasks", "stages/ppo", "reward"):
        assert f"{package}/__init__.py" in names, package
    assert not any(name.startswith(("tests/", "configs/", "bench/")) for name in names)


@pytest.mark.slow
def test_a_non_editable_install_runs_the_built_in_default(wheel: Path, tmp_path: Path) -> None:
    """`pip install` of the wheel into a fresh virtual environment (its dependencies read from ours), then
    from an empty directory `rlhf sft --config <repo>/configs/sft/tiny.yaml train.max_steps=2` trains and
    registers a model: the model config, tokenizer and phrasings come from the installed package."""
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies only: a path line does not run the .pth files there, so our editable install stays out.
    (fresh_site / "dependencies.pth").write_text(f"{ours}\n")
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {
        "RLHF_HOME": str(home), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(python), "-c", "import stages, sys; print(stages.__file__)"], cwd=empty, env=environment,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(fresh_site)), where  # the installed copy, not the checkout
    result = subprocess.run(
        [str(fresh / "bin" / "rlhf"), "sft", "--config", str(REPO_ROOT / "configs" / "sft" / "tiny.yaml"), "train.max_steps=2",
         "datasets=[{source: embedded, num_examples: 256}]", "eval.num_prompts=8", "tracking.report_to=none", "run_name=wheel"],
        cwd=empty, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entry = Registry(home).get("sft:latest")
    assert entry.status == "ready" and entry.parent == "tiny-llama"
    assert (Path(entry.path) / "model.safetensors").is_file() and Path(entry.path).is_relative_to(home)
    assert "eval/exact_match" in entry.metrics
    assert list(empty.iterdir()) == []  # nothing written relative to the working directory
