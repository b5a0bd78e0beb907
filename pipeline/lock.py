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

from pipeline.io import TransientError

LOCK_NAME = ".trimpi/run.lock"

# path -> [file object, hold count]; guarded by _guard (flows may run tasks in threads).
_held: dict[str, list] = {}
_guard = threading.Lock()


class LockBusy(TransientError):
    """Another process holds the workspace lock and ``timeout`` ran out (try again later: exit 75)."""


def lock_path(workspace: str | os.PathLike = ".") -> Path:
    return Path(workspace).resolve() / LOCK_NAME


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
    """

    def __init__(self, workspace: str | os.PathLike = ".", timeout: float | None = 0.0,
                 poll: float = 0.5, command: str | None = None):
        self.path = lock_path(workspace)
        self.timeout = timeout
        self.poll = poll
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

    def acquire(self) -> "WorkspaceLock":
        key = str(self.path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        waited = f" after waiting {self.timeout:g} s" if self.timeout else ""
                        raise LockBusy(
                            f"{self.path}: the workspace is in use by {_describe(read_holder(self.path))}"
                            f"{waited}; wait for it to finish (or pass a longer --wait)") from None
                    time.sleep(self.poll)
        except BaseException:
            f.close()
            raise
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
