"""Shared fixtures. Keep this small; append new fixtures at the end with a one-line docstring.

* ``dvc_repo`` — factory: a throw-away git + DVC workspace with a given ``dvc.yaml`` and params.
* ``prefect_home`` — one fresh, isolated Prefect home per test session (ephemeral API server,
  analytics off, the long startup timeout a fresh SQLite home needs on 2 cores).
* ``s3_server`` — a real SeaweedFS S3 server on 127.0.0.1 for the session (slow tests only).

``infra/s3server.py`` (the dev/test S3 server behind ``make s3``, not part of the package) is
importable from every test as ``s3server``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))

TEST_POLICY = """kind: clevr
name: L1-Tistu
depth: 1
tree:
- id: '1'
  attribute: shape
  value: cube
  if_true: Case 0
  if_false: Case 1
"""


def _dvc(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True, text=True)


@pytest.fixture
def dvc_repo(tmp_path):
    """make(dvc_yaml: str, params: str = "", remote: str | None = "local") -> workspace Path."""

    def make(dvc_yaml: str, params: str = "", remote: str | None = "local", name: str = "ws") -> Path:
        root = tmp_path / name
        root.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        _dvc(root, "init", "-q")
        _dvc(root, "config", "core.analytics", "false")
        if remote == "local":
            _dvc(root, "remote", "add", "-d", "localdir", str(tmp_path / f"{name}-remote"))
        (root / "dvc.yaml").write_text(dvc_yaml)
        (root / "params.yaml").write_text(params)
        (root / "policies" / "clevr").mkdir(parents=True)
        (root / "policies" / "clevr" / "L1-Tistu.yaml").write_text(TEST_POLICY)
        return root

    return make


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    keys = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "DO_NOT_TRACK": "1"}
    old = {k: os.environ.get(k) for k in [*keys, "PREFECT_API_URL"]}
    os.environ.update(keys)
    os.environ.pop("PREFECT_API_URL", None)  # never record test runs on a developer's server
    yield home
    # Flush Prefect's log/event workers, then stop the ephemeral API server now, while pytest's
    # output is still open; left to atexit, the workers retry a dead server for over a minute.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running ``s3server.S3Server`` (``infra/s3server.py``: SeaweedFS ``weed mini``) with bucket ``trimpi-test``."""
    from s3server import S3Server

    with S3Server(data_dir=tmp_path_factory.mktemp("seaweed"), buckets=["trimpi-test"]) as server:
        yield server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """An in-process moto S3 endpoint on 127.0.0.1 (fast unit tests; SeaweedFS is ``s3_server``)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
