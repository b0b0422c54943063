"""The separate virtual environment holding TRL 1.11, the last TRL release that ships a PPOTrainer
(`trl.experimental.ppo`). Created on first use under bench/.venv-trl111 (gitignored): TRL 1.11 alone
(no dependencies) in its own site-packages, and every other package from this environment through a .pth
file read after it. So torch, transformers, accelerate and datasets are ours by construction, TRL is the
only difference, and creating it takes seconds instead of re-installing torch.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-trl111"
PYTHON = VENV / "bin" / "python"
TRL_VERSION = "1.11.0"


def ensure() -> Path:
    """Path of the environment's interpreter, creating the environment if it is missing or incomplete."""
    check = [str(PYTHON), "-c", f"import trl; assert trl.__version__ == {TRL_VERSION!r}; import trl.experimental.ppo"]
    if PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return PYTHON
    print(f"bench: creating {VENV} (TRL {TRL_VERSION} over this environment's packages; once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(VENV)], check=True)
    # TRL first, without dependencies; the .pth after it, so pip never sees (or touches) our TRL 1.16.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(PYTHON), "install", "-q", "--no-deps", f"trl=={TRL_VERSION}"], check=True
    )
    ours = sysconfig.get_paths()["purelib"]
    theirs = subprocess.run([str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir appends (after the venv's own site-packages) and reads that folder's .pth files too.
    (Path(theirs) / "_rlhf_stages_packages.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run(check, check=True)
    return PYTHON
