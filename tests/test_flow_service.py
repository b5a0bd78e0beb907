"""(slow) The service path: Prefect server + process worker (infra/worker.sh, as the systemd unit runs it).

Issue 15: nightly retraining needed a foreground ``trimpi serve`` kept alive by hand. Here the
server runs as ``trimpi ui`` (infra/systemd/trimpi-server.service) and the worker as
``infra/worker.sh`` (infra/systemd/trimpi-worker.service), which registers the work pool and
the deployment from prefect.yaml. The test triggers two overlapping runs (Prefect's deployment
concurrency queues the second, which then finds nothing to do), restarts the worker, edits a
policy, and sees the next run complete with the policy diff in its summary artifact — which a
headless Chromium then renders from the Prefect UI.

Everything Prefect runs in subprocesses with their own PREFECT_HOME/PREFECT_API_URL on a free
port, so this test never touches the ephemeral API the other flow tests use.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
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
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
WORKER_STARTED = "started!"  # `prefect worker start` prints "Worker '...' started!" once it polls


def _api(url, path, body=None, method="POST"):
    data = None if method == "GET" else json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout  # a deadline against hanging, not a timed assertion
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def unit(name: str) -> dict[str, list[str]]:
    """The [Service]/[Unit] settings of ``infra/systemd/<name>`` (repeated keys keep every value)."""
    out: dict[str, list[str]] = {}
    for line in (REPO / "infra" / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def unit_command(name: str, checkout: Path) -> list[str]:
    """A unit's ExecStart for a checkout at ``checkout`` whose venv is this interpreter's."""
    cmd = unit(name)["ExecStart"][0].replace("%h/trimpi/.venv/bin", str(BIN)).replace("%h/trimpi", str(checkout))
    return shlex.split(cmd)


def test_systemd_units_run_the_commands_the_service_test_runs():
    from test_docs_commands import orchestration_section

    from flows.cli import load_deployment

    home = "%h/trimpi"
    server, worker = unit("trimpi-server.service"), unit("trimpi-worker.service")
    assert shlex.split(server["ExecStart"][0]) == [f"{home}/.venv/bin/trimpi", "ui", "--workspace", home,
                                                   "--port", "4200"]
    assert shlex.split(worker["ExecStart"][0]) == [f"{home}/infra/worker.sh", home]
    env = dict(kv.split("=", 1) for line in worker["Environment"] for kv in shlex.split(line))
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api" and env["TRIMPI_WORKSPACE"] == home
    assert worker["Restart"] == ["always"] and "trimpi-server.service" in worker["After"][0]
    assert worker["EnvironmentFile"] == ["-%h/.config/trimpi/worker.env"]  # credentials live outside the repo
    assert subprocess.run(["bash", "-n", str(REPO / "infra" / "worker.sh")]).returncode == 0
    assert 'POOL="${TRIMPI_POOL:-trimpi}"' in (REPO / "infra" / "worker.sh").read_text()
    assert load_deployment(REPO / "prefect.yaml")["work_pool"]["name"] == "trimpi"
    readme = orchestration_section()
    assert "cp infra/systemd/trimpi-*.service ~/.config/systemd/user/" in readme
    assert "systemctl --user daemon-reload && systemctl --user enable --now trimpi-server trimpi-worker" in readme


def _log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.mark.slow
def test_worker_service_queues_overlapping_runs_survives_a_restart_and_shows_the_policy_diff(dvc_repo, tmp_path):
    from test_flow import DVC_YAML, PARAMS
    from test_flow_notify import _scene_records

    root = dvc_repo(DVC_YAML, PARAMS.replace("watch_params: [base.seed]", "watch_params: [base.seed], diff_data: [scenes]"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    # prefect.yaml's entrypoint is flows/reinternalize.py inside the checkout the worker runs in
    (root / "flows").symlink_to(REPO / "flows")
    _scene_records(root)
    port = free_ports(1)[0]
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api, "TRIMPI_BIN": str(BIN),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1",
           # shorter than the defaults (30 s / 10 s) so the queued run is retried sooner; same behaviour
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "3"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name, cmd):
        out = open(logs / f"{name}.log", "ab")
        procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=root)
        out.close()

    def worker_online():
        ws = _api(api, "/work_pools/trimpi/workers/filter")
        return [w for w in ws if w["status"] == "ONLINE"]

    def trigger(dep_id, params=None):
        return _api(api, f"/deployments/{dep_id}/create_flow_run", {"parameters": params or {}})["id"]

    def finished(run_id):
        fr = _api(api, f"/flow_runs/{run_id}", method="GET")
        return fr if fr["state_type"] in TERMINAL else None

    def summary(run_id):
        arts = _api(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                             "key": {"any_": ["reinternalize-summary"]}}})
        return arts[0] if arts else None

    try:
        # the server unit: `trimpi ui` (it also notes its URL for `trimpi run` in the checkout)
        start("server", [*unit_command("trimpi-server.service", root)[:-1], str(port)])  # its port: a free one
        _wait(lambda: urllib.request.urlopen(api + "/health", timeout=2).status == 200, 240, "prefect server")
        # the worker unit: pool + deployment from prefect.yaml, then `prefect worker start`
        (root / "infra").symlink_to(REPO / "infra")  # the unit runs the checkout's own infra/worker.sh
        start("worker", unit_command("trimpi-worker.service", root))
        _wait(worker_online, 300, "an online worker:\n" + _log_tail(logs / "worker.log"))
        (dep,) = _api(api, "/deployments/filter")
        assert dep["name"] == "reinternalize-nightly" and dep["work_pool_name"] == "trimpi"
        assert {s["slug"] for s in dep["schedules"]} == {"nightly", "weekly-forced"}
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        # 1. two overlapping triggers (the nightly run and the weekly forced one landing together)
        first, second = trigger(dep["id"]), trigger(dep["id"])
        runs = [_wait(lambda r=r: finished(r), 600, f"flow run {r}:\n" + _log_tail(logs / "worker.log"))
                for r in (first, second)]
        assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], _log_tail(logs / "worker.log")
        outcomes = sorted(summary(r)["description"] for r in (first, second))
        assert outcomes == ["completed", "skipped"]  # never a failure: the later one found v1 promoted
        states = [s["name"] for r in (first, second)
                  for s in _api(api, f"/flow_run_states/?flow_run_id={r}", method="GET")]
        assert "AwaitingConcurrencySlot" in states  # Prefect queued it (the workspace lock is the backstop)

        # 2. restart the worker (a deploy, a reboot): the next run is still picked up and completes
        stop_server(procs.pop("worker"))
        starts = (logs / "worker.log").read_text(errors="replace").count(WORKER_STARTED)
        assert starts == 1, _log_tail(logs / "worker.log")
        start("worker", unit_command("trimpi-worker.service", root))
        _wait(lambda: (logs / "worker.log").read_text(errors="replace").count(WORKER_STARTED) == 2, 300,
              "the restarted worker:\n" + _log_tail(logs / "worker.log"))
        pol = root / "policies" / "clevr" / "L1-Tistu.yaml"
        pol.write_text(pol.read_text().replace("value: cube", "value: sphere"))
        third = trigger(dep["id"])
        run = _wait(lambda: finished(third), 600, "the run after the restart:\n" + _log_tail(logs / "worker.log"))
        assert run["state_type"] == "COMPLETED", _log_tail(logs / "worker.log")
        art = summary(third)
        assert art["description"] == "completed"
        md = art["data"]
        assert "## Policy changes (production v1 -> this run)" in md
        assert "condition 1: shape=cube -> shape=sphere" in md and "2 of 3 (66.7 %)" in md
        assert (root / "registry" / "tst" / "aliases" / "production.json").exists()

        # 3. the Prefect UI renders that summary, policy diff included (headless Chromium; the
        #    screenshot script installs Debian's chromium when it is missing and apt-get is there)
        if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("apt-get")):
            pytest.skip("no chromium and no apt-get to install it: UI rendering not checked")
        page = f"http://127.0.0.1:{port}/artifacts/artifact/{art['id']}"
        shot = tmp_path / "policy-diff.png"
        r = subprocess.run([str(REPO / "scripts" / "ui_screenshot.sh"), page, str(shot)], capture_output=True,
                           text=True, timeout=600, env={**env, "UI_SCREENSHOT_SIZE": "1440,1800"})
        assert r.returncode == 0, r.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=20000", "--dump-dom",
                              page], capture_output=True, text=True, timeout=300).stdout
        # the text of what the screenshot shows: the rendered artifact, not the raw markdown
        assert re.search(r"markdown-renderer__heading[^>]*>Policy changes \(production v1 -&gt; this run\)<", dom), \
            dom[-3000:]
        assert re.search(r"markdown-renderer__heading[^>]*>Labels moved", dom)
        assert "shape=cube -&gt; shape=sphere" in dom and "2 of 3 (66.7 %)" in dom
        if os.environ.get("TRIMPI_KEEP_SCREENSHOT"):
            shutil.copy(shot, os.environ["TRIMPI_KEEP_SCREENSHOT"])
    finally:
        for name in ("worker", "server"):
            if name in procs:
                stop_server(procs[name])
        # flow-run processes the worker started are in its process group; make sure none is left
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
