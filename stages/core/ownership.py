"""Who is writing a registry entry, and whether they still are: owners, heartbeats, and what gc may remove.

Every entry that is not ready records its **owner** (host, process id and the process's start time, so a
recycled pid is not mistaken for the owner) and a **heartbeat**, a time the owner refreshes while it works:
on every `record`, every checkpoint, and from a light background timer (`Heartbeat`, every
`RLHF_HEARTBEAT_SECONDS`, default 30). From these, for an entry that is not ready:

- **running**: the owner process is alive on this host, or (owner on another host) its heartbeat is recent;
- **incomplete**: the owner is gone (killed, crashed) and nothing is writing it;
- **failed**: the stage raised and said so itself (the entry is over; `resume=true` takes it back).

`rlhf registry gc` removes a failed entry, or an incomplete one whose owner is gone *and* whose heartbeat
is older than the grace period; never a running one. An entry owned by another host cannot have its
process checked from here: it is removed only with `--force`, once its heartbeat is stale (`gc_verdict`).

May import: the standard library only (the registry commands import this and must start fast).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HEARTBEAT_ENV = "RLHF_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30.0
DEFAULT_GRACE_SECONDS = 600.0  # 20 missed heartbeats: a slow disk or a paused VM does not look dead


def heartbeat_seconds() -> float:
    return float(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS))


def current_owner() -> dict[str, Any]:
    """This process as an entry's owner."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid)}


def same_owner(first: dict[str, Any] | None, second: dict[str, Any] | None) -> bool:
    keys = ("host", "pid", "process_start")
    return bool(first) and bool(second) and all(first.get(key) == second.get(key) for key in keys)


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """True/False for an owner on this host; None where it cannot be told (another host, no owner recorded)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc (not Linux): the pid exists, which is all that can be known
    state, start = stat
    if state == "Z":  # killed and not yet reaped by its parent: gone
        return False
    return owner.get("process_start") in (None, start)


def describe_owner(owner: dict[str, Any] | None) -> str:
    return f"pid {owner['pid']} on {owner['host']}" if owner else "no recorded owner"


def live_status(status: str, owner: dict[str, Any] | None, heartbeat: float | None, grace: float, now: float | None = None) -> str:
    """The status to show: `running` for an incomplete entry whose owner works on it, else the stored one."""
    if status != "incomplete":
        return status
    alive = owner_alive(owner)
    if alive or (alive is None and owner and _age(heartbeat, now) <= grace):
        return "running"
    return status


@dataclass
class Verdict:
    """What gc does with one entry that is not ready, and why."""

    remove: bool
    reason: str
    warning: str | None = None


def gc_verdict(
    status: str, owner: dict[str, Any] | None, heartbeat: float | None, created: float, grace: float, force: bool, now: float | None = None
) -> Verdict:
    """The rule of `rlhf registry gc` (module docstring), for an entry that is not ready."""
    if status == "failed":
        return Verdict(True, "failed")
    age = _age(heartbeat if heartbeat is not None else created, now)
    alive = owner_alive(owner)
    if alive:
        return Verdict(False, f"running: its owner ({describe_owner(owner)}) is alive")
    if alive is None and owner:  # another host: its process cannot be checked from here
        if age <= grace:
            return Verdict(False, f"running on {owner['host']}: heartbeat {age:.0f} s ago")
        if not force:
            return Verdict(False, f"owner on another host ({describe_owner(owner)}), heartbeat {age:.0f} s ago: "
                                  "its process cannot be checked from here; --force removes it")
        return Verdict(True, "stale, on another host", f"removing an entry of another host ({describe_owner(owner)}), "
                                                        f"silent for {age:.0f} s (--force)")
    if age <= grace:
        return Verdict(False, f"owner gone ({describe_owner(owner)}), heartbeat {age:.0f} s ago: within the grace period of {grace:.0f} s")
    return Verdict(True, "incomplete: owner gone")


class Heartbeat:
    """Refreshes an entry's heartbeat every `interval` seconds from a daemon thread, until `stop()`.

    `beat` is the registry's refresh (it raises when the entry was removed or taken over); the first such
    error is kept and re-raised by `check()`, which the stage calls between training steps, so it stops
    before training further."""

    def __init__(self, beat: Callable[[], None], interval: float | None = None) -> None:
        self._beat, self.interval = beat, heartbeat_seconds() if interval is None else interval
        self.error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlhf-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat_now()

    def beat_now(self) -> None:
        if self.error is not None:
            return
        try:
            self._beat()
        except Exception as error:  # noqa: BLE001 - kept for the stage's thread to raise
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stopped.set()


def _age(moment: float | None, now: float | None) -> float:
    return float("inf") if moment is None else (now if now is not None else time.time()) - moment


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a Linux process, from /proc; None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[19])


def _process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None
