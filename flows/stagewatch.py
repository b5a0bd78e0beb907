"""Run a command so that it cannot outlive the process that started it.

``python flows/stagewatch.py CMD...`` is what :func:`flows.runner.run_streamed` actually starts,
as the leader of a new process group: it starts CMD in the same group and watches its own
stdin, a pipe whose other end only the parent holds. When the parent exits for any reason
(including SIGKILL, which no handler sees) the kernel closes that end, the read returns EOF,
and the whole group (``dvc repro``, the shell, the trainer) gets SIGTERM, then SIGKILL after a
grace period. Without it, killing ``trimpi run`` left ``dvc repro`` and the trainer running
with the workspace lock released.

It runs as a plain script (stdlib only, no import of the project) so it starts fast and works
from any directory. Exit status: CMD's, or 128+N when CMD died of signal N.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_S = 10.0


def _stop_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(0, signal.SIGTERM)  # the watchdog itself ignores it (see main)
    except ProcessLookupError:
        return
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # anything left, this process included


def _watch(child: subprocess.Popen) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    if child.poll() is None:  # EOF while CMD runs: the parent is gone
        _stop_group(child)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: stagewatch.py CMD [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    # Only now (the child must not inherit it): a group-wide SIGTERM from the parent's own
    # timeout/cancel path stops CMD, and this process then reports CMD's status.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch, args=(child,), daemon=True).start()
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
