"""The model registry every stage reads from and writes to.

An entry is a model a stage can load: a built-in base model (a config in `stages/core/resources/models/`), or a
stage output registered by a run. Storage is one SQLite file under `RLHF_HOME`: every write is a
transaction, so several processes can register at once without losing or corrupting anything.
A stage registers its output as `incomplete` when it starts and flips it to `ready` only after the
output directory is completely written, or to `failed` when the stage raises (a killed process leaves it
`incomplete`); nothing ever reads an entry that is not ready as a model (stages/lifecycle.py). Until then
the entry names its owner process and carries its heartbeat, so `list` tells a running stage from one
that died, and `gc` (`collect`) never removes a live one (stages/core/ownership.py).

References: `NAME` or `NAME:latest` (newest ready version), `NAME:VERSION`, `KIND:latest` (newest
ready entry of kind sft/reward/policy when no entry is called that), a built-in base name such as
`tiny-llama`, or a path to a model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from stages.core import ownership
from stages.core.errors import UserError
from stages.core.paths import BUILTIN_MODELS_DIR
from stages.core.secrets import scrub

KINDS = ("base", "sft", "reward", "policy", "samples")  # samples: a dataset the sampling stage wrote (stages/sample.py)
Kind = Literal["base", "sft", "reward", "policy", "samples"]
Status = Literal["incomplete", "ready", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL,
    parent TEXT,
    record TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (name, version)
)
"""


class RegistryError(UserError, LookupError):
    """A reference that resolves to nothing loadable; the message says what was looked for."""


class EntryLostError(RegistryError):
    """The entry a stage is writing was removed or taken over by another process: the stage must stop."""


class EntryBusyError(UserError, RuntimeError):
    """The entry is being written by a live process; nothing may take it over or delete it."""


@dataclass
class Entry:
    """One registered model."""

    name: str
    version: int
    kind: str
    path: str
    status: str = "ready"
    parent: str | None = None
    stage: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wandb_run: str | None = None
    run: str | None = None
    trust_remote_code: bool = False
    source_sha256: str | None = None  # of the GGUF file the model (or the base it was trained from) came from
    owner: dict[str, Any] | None = None  # the process writing it (host, pid, process_start): core/ownership.py
    heartbeat: float | None = None  # when the owner last said it is working
    created: float = 0.0
    builtin: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ref": self.ref}


def rlhf_home() -> Path:
    """Where runs and the registry live: `RLHF_HOME`, default `./runs`."""
    return Path(os.environ.get("RLHF_HOME", "runs")).resolve()


class Registry:
    """File-based registry (SQLite) under `home`."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).resolve() if home is not None else rlhf_home()
        self.path = self.home / "registry.sqlite"

    # -- writing -----------------------------------------------------------------------------
    def begin(self, name: str, kind: Kind, path: str | Path, **fields: Any) -> Entry:
        """Allocate the next version of `name` and record it as incomplete, owned by this process (unless
        `owner` is given) with a fresh heartbeat."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        fields.setdefault("owner", ownership.current_owner())
        with self._transaction() as db:
            row = db.execute("SELECT MAX(version) FROM entries WHERE name = ?", (name,)).fetchone()
            version = (row[0] or 0) + 1
            fields.setdefault("heartbeat", time.time())
            entry = Entry(name=name, version=version, kind=kind, path=str(path), status="incomplete", created=time.time(), **fields)
            entry.config = scrub(entry.config)
            db.execute(
                "INSERT INTO entries (name, version, kind, path, status, parent, record, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, kind, entry.path, entry.status, entry.parent, _dump(entry), entry.created),
            )
        return entry

    def update(self, ref: str, owner: dict[str, Any] | None = None, **fields: Any) -> Entry:
        """Change fields of an existing entry (status, metrics, wandb_run, ...). With `owner`, only while that
        process still owns it (else EntryLostError): a stage never writes over an entry that was taken from it."""
        with self._transaction() as db:
            entry = self._owned(db, ref, owner)
            for key, value in fields.items():
                if not hasattr(entry, key):
                    raise ValueError(f"unknown registry field {key!r}")
                setattr(entry, key, scrub(value) if key in ("config", "metrics") else value)
            self._write(db, entry)
        return entry

    def mark_ready(self, ref: str, **fields: Any) -> Entry:
        return self.update(ref, status="ready", **fields)

    def beat(self, ref: str, owner: dict[str, Any]) -> None:
        """The owner's heartbeat: refresh it, or raise EntryLostError if the entry is gone or owned by another."""
        self.update(ref, owner=owner, heartbeat=time.time())

    def take_over(self, ref: str, grace: float = ownership.DEFAULT_GRACE_SECONDS) -> Entry:
        """`resume=true`: this process becomes the owner of an entry that is not ready and continues it
        (status back to incomplete). Refused while another process is writing it (EntryBusyError)."""
        me = ownership.current_owner()
        with self._transaction() as db:
            entry = self._owned(db, ref, None)
            status = ownership.live_status(entry.status, entry.owner, entry.heartbeat, grace)
            if status == "running" and not ownership.same_owner(entry.owner, me):
                raise EntryBusyError(
                    f"{ref} at {entry.path} is being written right now by {ownership.describe_owner(entry.owner)}; "
                    "resume=true continues a run that stopped. Wait for it to finish, or stop that process first."
                )
            if entry.status != "ready":
                entry.owner, entry.heartbeat, entry.status = me, time.time(), "incomplete"
                self._write(db, entry)
        return entry

    def collect(
        self, grace: float = ownership.DEFAULT_GRACE_SECONDS, force: bool = False, delete_files: bool = False
    ) -> tuple[list[Entry], list[tuple[Entry, str]], list[str]]:
        """`rlhf registry gc`: remove the entries that are over (core/ownership.py, `gc_verdict`), and with
        `delete_files` their directories. Returns (removed, skipped with the reason, warnings).

        Decided and done in one write transaction, the directories moved aside inside it: two gc commands at
        once remove each entry once, and a stage taking an entry over (resume) sees it whole or not at all."""
        removed, skipped, warnings, doomed = [], [], [], []
        with self._transaction() as db:
            ready_paths = {entry.path for entry in self._ready(db)}  # a directory a ready entry points to is never deleted
            for (record,) in db.execute("SELECT record FROM entries WHERE status != 'ready' ORDER BY created").fetchall():
                entry = _load(record)
                verdict = ownership.gc_verdict(entry.status, entry.owner, entry.heartbeat, entry.created, grace, force)
                if not verdict.remove:
                    skipped.append((entry, verdict.reason))
                    continue
                if verdict.warning:
                    warnings.append(f"{entry.ref}: {verdict.warning}")
                db.execute("DELETE FROM entries WHERE name = ? AND version = ?", (entry.name, entry.version))
                removed.append(entry)
                if delete_files and Path(entry.path).exists() and entry.path not in ready_paths:
                    aside = Path(entry.path).with_name(f".{Path(entry.path).name}.gc-{os.getpid()}")
                    Path(entry.path).rename(aside)
                    doomed.append(aside)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return removed, skipped, warnings

    def status_of(self, entry: Entry, grace: float = ownership.DEFAULT_GRACE_SECONDS) -> str:
        """ready, running, incomplete or failed (core/ownership.py)."""
        return ownership.live_status(entry.status, entry.owner, entry.heartbeat, grace)

    # -- reading -----------------------------------------------------------------------------
    def list(self, include_builtin: bool = True) -> list[Entry]:
        entries = builtin_entries() if include_builtin else []
        if self.path.exists():
            with self._connect() as db:
                rows = db.execute("SELECT record FROM entries ORDER BY created, name, version").fetchall()
            entries += [_load(row[0]) for row in rows]
        return entries

    def get(self, ref: str) -> Entry:
        """Resolve a reference to an entry (built-in, registered, or a path wrapped as an entry)."""
        name, _, version = ref.partition(":")
        builtins = {entry.name: entry for entry in builtin_entries()}
        if name in builtins and version in ("", "latest", "0"):
            return builtins[name]
        candidates = [entry for entry in self.list(include_builtin=False) if entry.name == name]
        if version and version != "latest":
            if not version.isdigit():
                raise RegistryError(f"bad reference {ref!r}: the version must be a number or 'latest'")
            matches = [entry for entry in candidates if entry.version == int(version)]
            if not matches:
                raise RegistryError(self._not_found(ref))
            return matches[0]
        ready = [entry for entry in candidates if entry.status == "ready"]
        if not ready and not candidates and name in KINDS:
            ready = [entry for entry in self.list(include_builtin=False) if entry.kind == name and entry.status == "ready"]
        if ready:
            return max(ready, key=lambda entry: (entry.created, entry.version))
        if candidates:
            raise RegistryError(f"{ref}: no version of {name!r} is ready (incomplete: {', '.join(e.ref for e in candidates)})")
        path = Path(ref).expanduser()
        if path.is_file() and path.suffix == ".gguf":  # converted to safetensors on first load (stages/core/gguf.py)
            return Entry(name=str(path), version=0, kind="base", path=str(path.resolve()))
        if path.exists():
            if not (path / "config.json").is_file():
                raise RegistryError(f"{path} is not a model directory (no config.json); point `model` at a directory written by save_pretrained or a stage")
            return Entry(name=str(path), version=0, kind="base", path=str(path.resolve()))
        if ref.startswith(("/", ".", "~")):
            raise RegistryError(f"model path {ref} does not exist; give an existing model directory or a registry reference (`rlhf registry list`)")
        runs = {entry.run for entry in self.list(include_builtin=False)}
        if "/" in ref and ref.split("/", 1)[0] in runs:
            raise RegistryError(self._not_found(ref))  # a run's output that does not exist, not a Hub id
        if "/" in ref and not ref.startswith((".", "/")) and ":" not in ref:
            # Looks like a Hub id (org/name): loaded by transformers, offline caches included.
            return Entry(name=ref, version=0, kind="base", path=ref)
        raise RegistryError(self._not_found(ref))

    def by_path(self, path: str | Path) -> Entry | None:
        """The newest ready registered entry whose output folder is `path`; None where no ready entry lives there
        (`get` wraps a bare path as a `base` entry without lineage)."""
        target = Path(path).expanduser().resolve()
        ready = [
            entry for entry in self.list(include_builtin=False)
            if entry.status == "ready" and Path(entry.path).expanduser().resolve() == target
        ]
        return max(ready, key=lambda entry: (entry.created, entry.version)) if ready else None

    def _not_found(self, ref: str) -> str:
        known = sorted({entry.name for entry in self.list()})
        return f"model reference {ref!r} is not in the registry at {self.path} and is not a path (known: {', '.join(known) or 'none'})"

    # -- storage -----------------------------------------------------------------------------
    def _owned(self, db: sqlite3.Connection, ref: str, owner: dict[str, Any] | None) -> Entry:
        """The entry `ref` inside a transaction; with `owner`, only if that process still owns it."""
        name, version = _split_ref(ref)
        row = db.execute("SELECT record FROM entries WHERE name = ? AND version = ?", (name, version)).fetchone()
        if row is None:
            if owner is not None:
                raise EntryLostError(
                    f"registry entry {ref} was removed from {self.path} while this process was writing it (by "
                    "`rlhf registry gc --force`, or by hand); stopping before training further. Rerun the stage."
                )
            raise RegistryError(f"no registry entry {ref}")
        entry = _load(row[0])
        if owner is not None and entry.owner is not None and not ownership.same_owner(entry.owner, owner):
            raise EntryLostError(
                f"registry entry {ref} was taken over by {ownership.describe_owner(entry.owner)} while this process "
                f"was writing it; stopping so that two processes never write {entry.path}."
            )
        return entry

    @staticmethod
    def _write(db: sqlite3.Connection, entry: Entry) -> None:
        db.execute(
            "UPDATE entries SET status = ?, path = ?, record = ? WHERE name = ? AND version = ?",
            (entry.status, entry.path, _dump(entry), entry.name, entry.version),
        )

    @staticmethod
    def _ready(db: sqlite3.Connection) -> list[Entry]:
        return [_load(record) for (record,) in db.execute("SELECT record FROM entries WHERE status = 'ready'").fetchall()]

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.home.mkdir(parents=True, exist_ok=True)
        # A long timeout: concurrent writers wait for each other instead of failing.
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        try:
            _prepare(db)
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock before reading MAX(version)
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _prepare(db: sqlite3.Connection) -> None:
    """WAL mode and the table, on every connection. Switching a new database to WAL can fail at once with
    "database is locked" while another process does the same (SQLite does not wait on its busy timeout for
    it): retried for a while, as the timeout would."""
    for attempt in range(200):
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 199:
                raise
            time.sleep(0.05)


def builtin_entries() -> list[Entry]:
    """The config-only base models shipped in the package (`stages/core/resources/models/`)."""
    entries = []
    for path in sorted(BUILTIN_MODELS_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        entries.append(Entry(name=spec["name"], version=0, kind="base", path=str(path), builtin=True, stage="builtin"))
    return entries


def _split_ref(ref: str) -> tuple[str, int]:
    name, _, version = ref.rpartition(":")
    if not name or not version.isdigit():
        raise RegistryError(f"expected NAME:VERSION, got {ref!r}")
    return name, int(version)


def _dump(entry: Entry) -> str:
    return json.dumps(asdict(entry), sort_keys=True, default=str)


def _load(record: str) -> Entry:
    return Entry(**json.loads(record))
