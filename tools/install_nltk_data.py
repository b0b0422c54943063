"""Install the NLTK data the instruction-following checkers read (stages/benchmarks), offline at run time.

    python tools/install_nltk_data.py WHEEL DEST      # run by `make setup`

IFEval's and IFBench's checkers split words and sentences with NLTK's `punkt_tab` and count `stopwords`, and
call `nltk.download` for them, which fails offline. NLTK's data is not on PyPI, but the `llama-index-core`
wheel carries NLTK's own `punkt_tab` and `stopwords` (byte-identical to NLTK's archives) under
`llama_index/core/_static/nltk_cache/`. `make setup` downloads that wheel (`pip download --no-deps`, pinned)
and this script copies only those two resources out of it into DEST (`.venv/nltk_data`, on NLTK's default
search path): nothing of llama-index is installed. Directories 0755 and files 0644 (NLTK 3.10 refuses data
that other accounts can write). Written into a temporary folder and renamed, so DEST is complete or absent.
Standard library only: it runs before anything else is importable.
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from pathlib import Path

PREFIX = "llama_index/core/_static/nltk_cache/"
RESOURCES = ("tokenizers/punkt_tab/", "corpora/stopwords/")


def install(wheel: Path, destination: Path) -> list[str]:
    """Copy RESOURCES out of the wheel into `destination`; returns the resources copied."""
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    copied: set[str] = set()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            relative = member.filename.removeprefix(PREFIX)
            resource = next((r for r in RESOURCES if relative.startswith(r)), None)
            if member.filename == relative or resource is None or member.is_dir() or ".." in Path(relative).parts:
                continue
            target = temporary / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
            copied.add(resource)
    missing = [resource for resource in RESOURCES if resource not in copied]
    if missing:
        shutil.rmtree(temporary, ignore_errors=True)
        raise SystemExit(f"install_nltk_data: {wheel} holds no {', '.join(PREFIX + m for m in missing)}; pin the llama-index-core version the Makefile names")
    for directory, subdirectories, files in os.walk(temporary):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(temporary, destination)
    return sorted(copied)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/install_nltk_data.py WHEEL DEST")
    installed = install(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"NLTK data ({', '.join(r.rstrip('/') for r in installed)}) in {sys.argv[2]}")
