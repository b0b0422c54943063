"""The separate virtual environment holding TRL 1.11, the last TRL release that ships a PPOTrainer
(`trl.experimental.ppo`). Created on first use under bench/.venv-trl111 (gitignored), with the same torch,
transformers, accelerate and datasets versions as ours, so TRL is the only difference.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-trl111"
PYTHON = VENV / "bin" / "python"
TRL_VERSION = "1.11.0"


def ensure() -> Path:
    """Path of the environment's interpreter, creating the environment if it is missing or incomplete."""
    check = [str(PYTHON), "-c", f"import trl; assert trl.__version__ == {TRL_VERSION!r}; import trl.experimental.ppo"]
    if PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return PYTHON
    print(f"bench: creating {VENV} (TRL {TRL_VERSION}; a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(PYTHON), "-m", "pip", "install", "-q"]
    # torch first, pinned to ours: asking for it through the other packages would resolve a multi-GB CUDA build.
    subprocess.run(pip + [f"torch=={metadata.version('torch').split('+')[0]}"], check=True)
    pinned = [f"{name}=={metadata.version(name)}" for name in ("transformers", "accelerate", "datasets")]
    subprocess.run(pip + [f"trl=={TRL_VERSION}", *pinned], check=True)
    subprocess.run(check, check=True)
    return PYTHON
