"""Checking a local data file before `datasets` reads it, so that every way a file can be bad is one clear
DataError naming the file and the line, never a traceback from deep inside pyarrow: a directory or a missing
path, an unsupported suffix, an empty file, bytes that are not UTF-8, a JSON Lines line that is not valid
JSON or not an object, a JSON document that does not parse.

May import: `stages.core` and the standard library (a leaf of the data package: `formats` builds on it).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.core.errors import UserError

SUPPORTED_FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The files of a sampling-stage dataset (registry kind `samples`, stages/sample.py), by the split that reads them.
SAMPLES_SPLITS = {"rows": "rows.jsonl", "pairs": "pairs.jsonl", "samples": "samples.jsonl"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the source (file or dataset) and the row."""


def registered_dataset_file(source: str, split: str) -> Path | None:
    """The file a registry reference to a sampling-stage dataset points at (`RUN/samples`, `samples:latest`,
    `NAME:VERSION`), or None when `source` names no registry entry (a Hub dataset, then). A reference to a model,
    to a dataset that is not ready, or to a split it does not have is a DataError naming it."""
    from stages.core.registry import KINDS, Registry, RegistryError

    registry = Registry()
    name = source.split(":", 1)[0]
    entries = registry.list(include_builtin=False)
    in_a_run = "/" in name and name.split("/", 1)[0] in {entry.run for entry in entries}  # RUN/x: ours, never a Hub id
    if name not in KINDS and not in_a_run and not any(entry.name == name for entry in entries):
        return None
    try:
        entry = registry.get(source)
    except RegistryError as error:
        raise DataError(f"dataset reference {source!r}: {error}") from None
    if entry.kind != "samples":
        raise DataError(f"dataset reference {source!r} is {entry.ref}, a {entry.kind} model, not a dataset (registry datasets are "
                        "sampling-stage outputs, kind samples)")
    if entry.status != "ready":
        raise DataError(f"dataset reference {source!r}: {entry.ref} is {entry.status}; the sampling stage writing it never finished")
    if split not in SAMPLES_SPLITS:
        raise DataError(f"dataset {entry.ref} has the splits {', '.join(SAMPLES_SPLITS)}, not {split!r}: set `split: rows` "
                        "(SFT) or `split: pairs` (DPO, reward model)")
    return Path(entry.path) / SAMPLES_SPLITS[split]


def check_data_file(path: Path) -> None:
    """Raise DataError unless `path` is a readable data file of a supported kind with well-formed text."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file; give one .json, .jsonl or .parquet file")
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.suffix not in SUPPORTED_FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".parquet":
        return  # binary: its reader's own errors are wrapped by the caller
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "data files must be UTF-8: re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            _check_json_line(path, number, line)
    else:
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None


def _check_json_line(path: Path, number: int, line: str) -> None:
    if not line.strip():
        return
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {number}: could not be read as .jsonl, not valid JSON ({error.msg}, column {error.colno}); "
            "each line must be one JSON object"
        ) from None
    if not isinstance(value, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")
        raise DataError(f"{path} line {number}: a JSON {kind}, not an object; each line of a .jsonl file must be one JSON object such as "
                        '{"prompt": ..., "completion": ...}')
