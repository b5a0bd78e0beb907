"""The workspace lock: a second run refuses (naming the holder) or waits; a dead holder frees it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.lock import LockBusy, WorkspaceLock, lock_path, read_holder

HOLDER = """
import sys, time
from pipeline.lock import WorkspaceLock
with WorkspaceLock(sys.argv[1], command="holder-under-test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(ws, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_refuses_then_waits_then_survives_a_killed_holder(tmp_path):
    holder = _start_holder(tmp_path, 30)
    try:
        assert read_holder(lock_path(tmp_path))["pid"] == holder.pid
        t0 = time.monotonic()
        with pytest.raises(LockBusy) as e:
            WorkspaceLock(tmp_path, timeout=0).acquire()
        assert time.monotonic() - t0 < 2
        assert f"pid {holder.pid}" in str(e.value) and "holder-under-test" in str(e.value)
        with pytest.raises(LockBusy, match="after waiting 0.6 s"):
            WorkspaceLock(tmp_path, timeout=0.6, poll=0.1).acquire()
    finally:
        # SIGKILL: no cleanup code runs, the kernel must still release the flock.
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with WorkspaceLock(tmp_path, timeout=0, command="me") as lk:
        assert read_holder(lk.path)["command"] == "me"


def test_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    holder = _start_holder(tmp_path, 1.0)
    try:
        t0 = time.monotonic()
        with WorkspaceLock(tmp_path, timeout=20, poll=0.1):
            waited = time.monotonic() - t0
        assert 0.3 < waited < 15
    finally:
        holder.wait()


def test_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    outer = WorkspaceLock(tmp_path, timeout=0)
    with outer:
        with WorkspaceLock(tmp_path, timeout=0):  # the flow inside `trimpi run` takes it again
            pass
        # still held after the inner release: another process is refused
        probe = subprocess.run([sys.executable, "-c",
                                "import sys; from pipeline.lock import *\n"
                                "try:\n WorkspaceLock(sys.argv[1], timeout=0).acquire()\n"
                                "except LockBusy: sys.exit(7)", str(tmp_path)])
        assert probe.returncode == 7
    assert read_holder(lock_path(tmp_path)) == {}
    probe = subprocess.run([sys.executable, "-c", "import sys; from pipeline.lock import *; "
                            "WorkspaceLock(sys.argv[1], timeout=0).acquire()", str(tmp_path)])
    assert probe.returncode == 0
