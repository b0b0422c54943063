"""Files written whole or not at all: a reader never sees half a file, and a failed write keeps the old one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any) -> None:
    """A JSON file written atomically (see atomic_write)."""
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file, and a failed write leaves the old one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
