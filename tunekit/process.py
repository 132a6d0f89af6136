"""What every stage process does for itself: stop when the `dvc` that ran it is gone, publish an output only
while that `dvc` still holds it, and report expected errors as one message (tunekit.io and tunekit.tracking
clear what killed runs left behind).

`dvc repro` runs a stage's command as its child (through the user's shell) and write-locks the stage's
outputs in `.dvc/tmp/rwlock` under its own pid. After `kill -9` of that `dvc`, the stage would carry on as
an orphan while a new `dvc repro` takes the dead lock over, restores the outputs, and is then overwritten by
the orphan. So a stage started by DVC (`DVC_STAGE` set) finds the `dvc` process that holds its lock, gets
SIGTERM when its parent dies (PR_SET_PDEATHSIG; the shell may sit between, so a thread also watches that
`dvc`), unwinds on SIGTERM (temp dirs removed, MLflow run FAILED), and checks the owner again before each
publish (atomic_dir, write_json).
Leaf module: no tunekit imports.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tunekit")

DVC_STAGE_ENV, DVC_ROOT_ENV = "DVC_STAGE", "DVC_ROOT"  # set by DVC for every stage command it runs
TRACEBACK_ENV = "TUNEKIT_TRACEBACK"  # 1: expected errors too come with their traceback
WATCH_INTERVAL = 2.0  # seconds between checks that the owning dvc is alive
KILL_GRACE = 30.0  # seconds the main thread gets to unwind (temp dirs, MLflow run) before SIGKILL
PR_SET_PDEATHSIG = 1


class OutputNotOwned(Exception):
    """The `dvc` process that ran this stage is gone, or another one holds the output now."""


@dataclass(frozen=True)
class Owner:
    pid: int
    started: str  # /proc start time: a reused pid is not the same process


_owner: Owner | None = None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22, starttime in clock ticks since boot


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs (and, given `started`, is still the process that started then); zombies count as gone."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return False
    return started is None or fields[19] == started


def ancestors(pid: int | None = None) -> list[int]:
    """Parent, grandparent, ... of `pid` (default: this process), up to init."""
    chain, pid = [], os.getpid() if pid is None else pid
    while pid > 1:
        fields = _stat(pid)
        if fields is None:
            break
        pid = int(fields[1])
        chain.append(pid)
    return chain


def _rwlock_path() -> Path:
    return Path(os.environ.get(DVC_ROOT_ENV) or Path.cwd()) / ".dvc" / "tmp" / "rwlock"


def _write_locks() -> dict[str, int]:
    """Path -> pid of every write lock in DVC's rwlock file ({} when there is none)."""
    try:
        lock = json.loads(_rwlock_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {path: int(info["pid"]) for path, info in (lock.get("write") or {}).items()}


def find_owner() -> Owner | None:
    """The `dvc` process that runs this stage: the nearest ancestor holding a write lock in DVC's rwlock
    (its shell may sit between). None when DVC did not start this process."""
    if not os.environ.get(DVC_STAGE_ENV):
        return None
    holders = set(_write_locks().values())
    chain = ancestors()
    for pid in chain:
        if pid in holders:
            started = start_time(pid)
            if started is not None:
                return Owner(pid, started)
    # No lock found (an older DVC, or a lock directory elsewhere): the parent stands in for dvc.
    parent = chain[0] if chain else os.getppid()
    started = start_time(parent)
    return Owner(parent, started) if started is not None and parent > 1 else None


def check_owner(target: Path) -> None:
    """Raise OutputNotOwned unless this process may publish `target`: always outside DVC; under DVC while
    the `dvc` that ran it is alive and no other process holds a write lock over `target`."""
    if _owner is None:
        return
    if not process_alive(_owner.pid, _owner.started):
        raise OutputNotOwned(f"{target}: not published: the dvc process (pid {_owner.pid}) that ran this stage "
                             "is gone, so another `dvc repro` may own this output now; run the stage again")
    target = Path(target).resolve()
    for path, pid in _write_locks().items():
        locked = Path(path)
        if pid != _owner.pid and (locked == target or locked in target.parents or target in locked.parents):
            raise OutputNotOwned(f"{target}: not published: dvc process {pid} holds it now, not the dvc "
                                 f"(pid {_owner.pid}) that ran this stage")


def _watch(owner: Owner) -> None:
    while process_alive(owner.pid, owner.started):
        time.sleep(WATCH_INTERVAL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(KILL_GRACE)  # the main thread is stuck (a signal handler runs between bytecodes only)
    os.kill(os.getpid(), signal.SIGKILL)


def _stop(signum, frame) -> None:
    """SIGTERM (from the kernel when the parent dies, the watch thread, or anyone): unwind, so that atomic_dir
    drops its temp dir and the MLflow run ends FAILED, instead of vanishing mid-write."""
    if _owner is not None and not process_alive(_owner.pid, _owner.started):
        raise SystemExit(f"the dvc process (pid {_owner.pid}) that ran this stage is gone: stopped, nothing published")
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux); False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def guard_stage() -> Owner | None:
    """Under DVC: tie this stage's life to the `dvc` that runs it (see the module docstring)."""
    global _owner
    _owner = find_owner()
    if _owner is None:
        return None
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _stop)
    die_with_parent()
    if os.getppid() != parent or not process_alive(_owner.pid, _owner.started):  # it died before prctl took effect
        raise SystemExit(f"the dvc process (pid {_owner.pid}) that ran this stage is gone; not starting")
    threading.Thread(target=_watch, args=(_owner,), name="dvc-owner-watch", daemon=True).start()
    return _owner


def is_expected(error: BaseException) -> bool:
    """Errors this project raises on purpose (bad params, model source, data): their message is the report.
    They are the exception classes defined in tunekit/ and stages/."""
    return any(cls.__module__.split(".")[0] in ("tunekit", "stages") for cls in type(error).__mro__)


def _excepthook(kind, error, tb) -> None:
    if is_expected(error) and os.environ.get(TRACEBACK_ENV, "") in ("", "0"):
        print(f"error: {error}", file=sys.stderr)
        return
    traceback.print_exception(kind, error, tb)


def start_stage_process() -> None:
    """Called once when a stage runs as `python -m stages.<name>`."""
    sys.excepthook = _excepthook
    guard_stage()
