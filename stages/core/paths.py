"""Where the files that ship with the package are, found through importlib.resources so that a
non-editable install (`pip install .`, a wheel) finds them as a checkout does.

`REPO_ROOT` is the checkout's root and means something only in a checkout: the recipe puts it on the
stages' PYTHONPATH there, and relative DeepSpeed config paths fall back to it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resource(package: str, *parts: str) -> Path:
    """A file or folder shipped inside `package` (e.g. resource("stages.core", "resources", "tiny_tokenizer")).

    The package is installed as plain files (not zipped), so the path is a real one that
    `from_pretrained` and `yaml` can read."""
    return Path(str(resources.files(package).joinpath(*parts)))


BUILTIN_MODELS_DIR = resource("stages.core", "resources", "models")
