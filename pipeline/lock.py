"""The workspace lock: one pipeline run per checkout at a time.

Two ``trimpi run`` (or a cron run landing on a manual one) in the same workspace would
interleave ``dvc repro`` on the same outputs, so :class:`WorkspaceLock` takes an exclusive
``fcntl.flock`` on ``<workspace>/.trimpi/run.lock`` for the whole run. A second run waits up
to ``timeout`` seconds and then refuses with :class:`LockBusy`, whose message says who holds
the lock (pid, host, command, since when).

Where it departs from the obvious:

* flock, not a pid file: the kernel drops the lock when the holder dies, even on SIGKILL,
  so there is never a stale lock to clean up by hand. The holder's JSON in the file is only
  information for the message, never the lock itself.
* Re-entrant within a process: ``trimpi run`` takes the lock and then calls the flow, which
  takes it again (a served deployment has no outer holder). Two ``flock`` calls on separate
  descriptors conflict even inside one process, so a per-path hold count is kept here.
* A free lock is not enough: a stage process group can outlive its runner (the runner was
  SIGKILLed and its stage watchdog too). The runner records the running stage's process
  group in ``.trimpi/stage.json`` (:func:`record_stage`); acquiring the lock while that group
  is still alive refuses, naming it, instead of starting a second writer on the same outputs.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from pipeline.io import TransientError

LOCK_NAME = ".trimpi/run.lock"
STAGE_NAME = ".trimpi/stage.json"

# path -> [file object, hold count]; guarded by _guard (flows may run tasks in threads).
_held: dict[str, list] = {}
_guard = threading.Lock()


class LockBusy(TransientError):
    """Another process holds the workspace lock and ``timeout`` ran out (try again later: exit 75)."""


def lock_path(workspace: str | os.PathLike = ".") -> Path:
    return Path(workspace).resolve() / LOCK_NAME


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (Linux /proc), to tell a live group from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def record_stage(workspace: str | os.PathLike, pgid: int, command: str) -> Path:
    """Note the process group of the stage now running in ``workspace`` (see the module docstring)."""
    from pipeline.io import atomic_write_json

    path = Path(workspace).resolve() / STAGE_NAME
    atomic_write_json(path, {"pgid": pgid, "start": _start_time(pgid), "command": command,
                             "runner": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    return path


def clear_stage(workspace: str | os.PathLike, pgid: int) -> None:
    path = Path(workspace).resolve() / STAGE_NAME
    if read_holder(path).get("pgid") == pgid:
        path.unlink(missing_ok=True)


def live_stage(workspace: str | os.PathLike) -> dict | None:
    """The recorded stage if its process group is still alive on this host, else None (record removed)."""
    path = Path(workspace).resolve() / STAGE_NAME
    rec = read_holder(path)
    pgid = rec.get("pgid")
    if not isinstance(pgid, int) or rec.get("host") not in (None, socket.gethostname()):
        return None
    try:
        os.killpg(pgid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:  # another user's group: alive
        alive = True
    started = _start_time(pgid)
    if alive and rec.get("start") is not None and started is not None and started != rec["start"]:
        alive = False  # the leader's pid was reused by an unrelated process
    if not alive:
        path.unlink(missing_ok=True)
        return None
    return rec


def read_holder(path: str | os.PathLike) -> dict:
    """The holder's self-description, or ``{}`` when the file is empty or being rewritten."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (no details recorded)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')!r}, since {since})"


class WorkspaceLock:
    """Exclusive, re-entrant lock on a workspace; use as a context manager.

    ``timeout`` is how long to wait for a busy lock: 0 refuses at once, ``None`` waits forever.
    ``on_wait`` is called once, with a sentence naming the holder, when the lock is busy and
    this call is going to wait (so a queued run says in its log what it is waiting for).
    """

    def __init__(self, workspace: str | os.PathLike = ".", timeout: float | None = 0.0,
                 poll: float = 0.5, command: str | None = None, on_wait: Callable[[str], None] | None = None):
        self.path = lock_path(workspace)
        self.timeout = timeout
        self.poll = poll
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.on_wait = on_wait

    def acquire(self) -> "WorkspaceLock":
        key = str(self.path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        try:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told and self.on_wait is not None and (deadline is None or time.monotonic() < deadline):
                        told = True
                        limit = "as long as it takes" if self.timeout is None else f"up to {self.timeout:g} s"
                        self.on_wait(f"waiting ({limit}) for the workspace lock {self.path}: in use by "
                                     f"{_describe(read_holder(self.path))}")
                    if deadline is not None and time.monotonic() >= deadline:
                        waited = f" after waiting {self.timeout:g} s" if self.timeout else ""
                        raise LockBusy(
                            f"{self.path}: the workspace is in use by {_describe(read_holder(self.path))}"
                            f"{waited}; wait for it to finish (or pass a longer --wait)") from None
                    time.sleep(self.poll)
        except BaseException:
            f.close()
            raise
        orphan = live_stage(self.path.parent.parent)
        if orphan is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(orphan.get("since", 0)))
            raise LockBusy(f"{self.path.parent.parent}: a stage from an earlier run is still running: process group "
                           f"{orphan['pgid']} ({orphan.get('command')!r}, since {since}), left behind when its runner "
                           f"(pid {orphan.get('runner')}) died; stop it with `kill -- -{orphan['pgid']}` or wait for it")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": self.command, "since": time.time()}))
        f.flush()
        with _guard:
            _held[key] = [f, 1]
        return self

    def release(self) -> None:
        key = str(self.path)
        with _guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        f = entry[0]
        # Clear the description before unlocking so a waiter never reports a finished holder.
        f.seek(0)
        f.truncate()
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()

    def __enter__(self) -> "WorkspaceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
