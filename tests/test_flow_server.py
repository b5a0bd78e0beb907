"""(slow) A real Prefect server: `trimpi ui` + `trimpi serve` of prefect.yaml, a deployment run, a UI screenshot.

Everything Prefect runs in subprocesses with their own PREFECT_HOME/PREFECT_API_URL, so this
test never touches the ephemeral API the other flow tests use.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.cli import stop_server
from s3server import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _api(url, path, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_served_deployment_runs_on_a_real_server_and_shows_in_the_ui(dvc_repo, tmp_path):
    from test_flow import DVC_YAML, PARAMS

    root = dvc_repo(DVC_YAML, PARAMS)
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    port = free_ports(1)[0]
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("ui", "serve")}
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "trimpi"), "ui", "--workspace", str(root), "--port", str(port)],
                                      env=env, stdout=logs["ui"], stderr=subprocess.STDOUT, start_new_session=True))
        _wait(lambda: urllib.request.urlopen(api + "/health", timeout=2).status == 200, 180, "prefect server")
        procs.append(subprocess.Popen([str(BIN / "trimpi"), "serve", "--workspace", str(root)], env=env,
                                      stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True))
        _wait(lambda: _api(api, "/deployments/filter"), 120, "the served deployment")
        (dep,) = _api(api, "/deployments/filter")
        assert dep["name"] == "reinternalize-nightly"
        scheds = {s["schedule"]["cron"]: s["parameters"] for s in dep["schedules"]}
        assert scheds == {"0 2 * * *": {"force": False}, "0 4 * * 0": {"force": True}}
        assert dep["parameters"]["workspace"] == str(root)
        # issue 15: prefect.yaml's concurrency_limit reaches the server ("Concurrency Limit None" before)
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        # trigger it as cron would (the scheduler only fires on minute boundaries)
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "reinternalize/reinternalize-nightly",
                              "--watch", "--watch-timeout", "300"], env=env, capture_output=True, text=True,
                             timeout=360)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # the scheduler has also pre-created SCHEDULED runs for the two crons: take the one that ran
        (fr,) = _api(api, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]},
                                                              "state": {"type": {"not_any_": ["SCHEDULED"]}}}})
        assert fr["state_type"] == "COMPLETED"
        tasks = _api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
        names = {t["name"]: t["state_type"] for t in tasks}
        for stage in ("generate", "validate", "train", "evaluate", "promote"):
            assert names.get(stage) == "COMPLETED", names
        assert (root / "registry" / "tst" / "aliases" / "production.json").exists()

        # issue 15: `trimpi serve --cron` once the deployment exists (was HTTP 422: a schedule without
        # a slug); its schedule replaces prefect.yaml's while it runs and is gone after it stops
        def slugs():
            return {s["slug"]: s["schedule"]["cron"] for s in _api(api, "/deployments/filter")[0]["schedules"]}

        stop_server(procs.pop())
        logs["cron"] = open(tmp_path / "cron.log", "wb")
        procs.append(subprocess.Popen([str(BIN / "trimpi"), "serve", "--workspace", str(root), "--cron",
                                       "*/5 * * * *"], env=env, stdout=logs["cron"], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait(lambda: slugs() == {"cli-cron": "*/5 * * * *"}, 120,
              "the --cron schedule: " + (tmp_path / "cron.log").read_text(errors="replace")[-2000:])
        stop_server(procs.pop())
        assert slugs() == {}
        assert "422" not in (tmp_path / "cron.log").read_text(errors="replace")

        # issue 15: `trimpi run` in the workspace records on the `trimpi ui --port N` server by itself
        env_run = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        manual = {"flow_runs": {"deployment_id": {"is_null_": True}}}  # not the scheduler's pre-created runs
        before = len(_api(api, "/flow_runs/filter", manual))
        r = subprocess.run([str(BIN / "trimpi"), "run", "--workspace", str(root)], env=env_run, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"prefect: {api}" in r.stdout and "reinternalize: skipped" in r.stdout
        assert len(_api(api, "/flow_runs/filter", manual)) == before + 1

        if not (shutil.which("chromium") or shutil.which("apt-get")):
            pytest.skip("no chromium and no apt-get to install it: UI screenshot not taken")
        shot = tmp_path / "ui.png"
        r = subprocess.run([str(REPO / "scripts" / "ui_screenshot.sh"), f"http://127.0.0.1:{port}/runs", str(shot)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        for p in reversed(procs):
            stop_server(p)
        for f in logs.values():
            f.close()
