"""`trimpi serve` against a Prefect API (the session's ephemeral one): schedules, concurrency, the UI record.

Defects of issue 15: ``--cron`` on an existing deployment was refused (HTTP 422: a schedule
without a slug) and left its schedule attached; prefect.yaml's ``concurrency_limit`` was not
applied by ``trimpi serve``; ``trimpi ui --port N`` was not found by ``trimpi run``.
"""
from __future__ import annotations

import http.server
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import cli

REPO = Path(__file__).resolve().parents[1]


def _read(name):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_serve_registers_slugged_schedules_with_queueing_concurrency_and_cron_replaces_them(dvc_repo, prefect_home):
    root = dvc_repo("stages: {}\n")
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    dep = cli.load_deployment(root / "prefect.yaml")

    def register(cron=None):
        deployment, dropped = cli.prepare_serve(root, dep, cron)
        deployment.apply()  # what Prefect's runner does when `trimpi serve` starts it
        d = _read(f"reinternalize/{dep['name']}")
        return d, {s.slug: s.schedule.cron for s in d.schedules}, dropped

    d, scheds, _ = register()
    assert scheds == {"nightly": "0 2 * * *", "weekly-forced": "0 4 * * 0"}
    assert d.parameters["workspace"] == str(root)
    # the UI showed "Concurrency Limit None": the limit and its queueing strategy must reach the server
    assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1
    assert d.concurrency_options is not None and d.concurrency_options.collision_strategy == "ENQUEUE"

    # `trimpi serve --cron` once the deployment exists: was HTTP 422 "Please provide a slug for each schedule"
    _, scheds, dropped = register("*/5 * * * *")
    assert scheds == {cli.CLI_CRON_SLUG: "*/5 * * * *"} and sorted(dropped) == ["nightly", "weekly-forced"]
    # ... and the temporary schedule does not stay attached once prefect.yaml's are served again
    _, scheds, dropped = register()
    assert scheds == {"nightly": "0 2 * * *", "weekly-forced": "0 4 * * 0"} and dropped == [cli.CLI_CRON_SLUG]


def test_prefect_yaml_schedules_need_slugs_and_a_sane_concurrency_limit(tmp_path):
    from pipeline.io import InputError

    dep = {"name": "d", "schedules": [{"cron": "0 2 * * *"}], "concurrency_limit": 1}
    with pytest.raises(InputError, match=r"schedules\[0\]\.slug.*unique slug"):
        cli.schedules_of(dep, tmp_path / "prefect.yaml")
    assert cli.concurrency_of(dep).collision_strategy == "ENQUEUE"  # a bare int queues, never cancels
    with pytest.raises(InputError, match="concurrency_limit.*positive integer"):
        cli.concurrency_of({"name": "d", "concurrency_limit": {"limit": 0}})
    with pytest.raises(InputError, match="collision_strategy.*ENQUEUE or CANCEL_NEW"):
        cli.concurrency_of({"name": "d", "concurrency_limit": {"limit": 1, "collision_strategy": "wait"}})


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_server():
    """Something answering /api/health on 127.0.0.1 at a free port other than 4200."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_trimpi_ui_on_another_port_is_where_trimpi_run_in_the_workspace_records(tmp_path, monkeypatch, fake_server):
    port = fake_server
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    ws, other = tmp_path / "ws", tmp_path / "other"
    ws.mkdir(), other.mkdir()
    seen = {}

    class Server:  # stands in for `prefect server start`: while it "runs", ask what `trimpi run` would use
        def __init__(self, cmd, env):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            seen["ws"] = cli.use_running_server(ws)
            monkeypatch.delenv("PREFECT_API_URL", raising=False)
            seen["other"] = cli.use_running_server(other)
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", Server)
    assert cli.run_ui(SimpleNamespace(workspace=str(ws), host="0.0.0.0", port=port)) == 0
    url = f"http://127.0.0.1:{port}/api"
    assert seen["cmd"][-4:] == ["--host", "0.0.0.0", "--port", str(port)]
    assert seen["ws"] == url                    # was None: only 127.0.0.1:4200 was ever looked at
    assert seen["other"] != url                 # another workspace is not this UI's
    assert not (ws / cli.UI_RECORD).exists()    # the note goes away with the server
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli.use_running_server(ws) != url
