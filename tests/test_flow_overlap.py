"""Two overlapping runs of the reinternalize flow in one workspace: the second waits, never fails.

Issue 15: with ``lock_wait_s: 0`` a scheduled run that started while another was training failed
at once with ``LockBusy`` (the Sunday forced run whenever the nightly one ran long). Here two flow
runs start as a worker or ``trimpi serve`` starts them — separate processes, recorded on one
Prefect API (the session's ephemeral server) — while the first one's training stage is held
open; the second must queue on the workspace lock and then see the policies the first promoted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.lock import lock_path, read_holder

# `train` holds the run open until the test creates ../go (outside the workspace: not a DVC input)
DVC_YAML = """stages:
  train:
    cmd: >-
      python -c "import os,time,json; [time.sleep(0.2) for _ in iter(lambda: os.path.exists('../go'), True)]; os.makedirs('models/m',exist_ok=True); open('models/m/model.safetensors','wb').write(b'w'); os.makedirs('metrics',exist_ok=True); json.dump(dict(main=dict(score=50.0)),open('metrics/eval.json','w')); json.dump(dict(passed=True,checks=[]),open('metrics/gate.json','w'))"
    deps: [policies]
    outs: [models/m]
    metrics:
      - metrics/eval.json: {cache: false}
      - metrics/gate.json: {cache: false}
  promote:
    cmd: trimpi promote --model models/m --metrics metrics/eval.json --gate metrics/gate.json --policies policies --out metrics/promote.json
    deps: [models/m, metrics/gate.json]
    outs: [metrics/promote.json: {cache: false}]
"""
PARAMS = """base: {seed: 0}
registry: {root: registry, model: tst}
orchestrate: {retries: 0, watch_params: [base.seed]}
"""
RUN = """import json, sys
from flows.reinternalize import reinternalize
state = reinternalize(workspace=sys.argv[1], return_state=True)
r = state.result(raise_on_failure=False)
print("RESULT " + json.dumps({"completed": state.is_completed(),
                              "status": r.get("status") if isinstance(r, dict) else repr(r)}), flush=True)
"""


@pytest.fixture
def ephemeral_api(prefect_home):
    """The URL of this session's ephemeral Prefect API, so child processes record on it too."""
    from prefect.client.orchestration import get_client
    from prefect.server.api.server import SubprocessASGIServer

    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    return next(iter(SubprocessASGIServer._instances.values())).api_url


class Run:
    """One flow run in its own process; its output is collected line by line."""

    def __init__(self, root, env):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-c", RUN, str(root)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, pred, what, timeout=300):
        deadline = time.monotonic() + timeout  # a deadline against hanging, not a timed assertion
        while not pred():
            assert self.proc.poll() is None or pred(), f"run exited before {what}:\n" + "".join(self.lines[-40:])
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n" + "".join(self.lines[-40:])
            time.sleep(0.2)

    def result(self) -> dict:
        self.proc.wait(timeout=600)
        time.sleep(0.1)
        line = next((ln for ln in reversed(self.lines) if ln.startswith("RESULT ")), None)
        assert line, "".join(self.lines[-60:])
        return json.loads(line[len("RESULT "):])


def test_overlapping_runs_queue_on_the_workspace_and_the_later_one_skips(dvc_repo, ephemeral_api, tmp_path):
    root = dvc_repo(DVC_YAML, PARAMS, remote=None)
    env = {**os.environ, "PREFECT_API_URL": ephemeral_api}
    first = second = None
    try:
        first = Run(root, env)
        first.wait_for(lambda: read_holder(lock_path(root)).get("pid") == first.proc.pid, "the first run's lock")
        second = Run(root, env)  # fires while the first one trains
        second.wait_for(lambda: any("waiting (up to" in ln for ln in second.lines), "the second run queueing")
        assert any(f"in use by pid {first.proc.pid}" in ln for ln in second.lines)
        (tmp_path / "go").write_text("")  # the first run's training finishes
        a, b = first.result(), second.result()
    finally:
        for r in (first, second):
            if r is not None and r.proc.poll() is None:
                r.proc.kill()
    assert a == {"completed": True, "status": "completed"}, "".join(first.lines[-60:])
    # the second run re-checked after the first promoted the same policies: nothing left to do
    assert b == {"completed": True, "status": "skipped"}, "".join(second.lines[-60:])
