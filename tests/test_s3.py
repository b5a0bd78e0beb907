"""DVC on an S3 remote: a fast round trip on moto, and (slow) the real thing on SeaweedFS.

Credentials only ever travel through the AWS_* environment: every test also checks that no
key reached ``.dvc/config``.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

from s3server import S3Server, free_ports


def dvc(root, *args, check=True, env=None):
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def add_s3_remote(root, name, url, endpoint):
    dvc(root, "remote", "add", "-d", name, url)
    dvc(root, "remote", "modify", name, "endpointurl", endpoint)
    config = (root / ".dvc" / "config").read_text()
    assert "secret" not in config and "access_key" not in config


def test_dvc_push_pull_round_trip_on_moto(dvc_repo, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bkt")
        root = dvc_repo("stages: {}\n", remote=None)
        add_s3_remote(root, "s3", "s3://bkt/store", f"http://127.0.0.1:{port}")
        (root / "data").mkdir()
        (root / "data" / "blob.bin").write_bytes(bytes(range(256)) * 400)
        want = md5(root / "data" / "blob.bin")
        dvc(root, "add", "data")
        assert "pushed" in dvc(root, "push").stdout
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
                .list_objects_v2(Bucket="bkt")["Contents"]]
        assert keys and all(k.startswith("store/files/md5/") for k in keys)
        import shutil

        shutil.rmtree(root / ".dvc" / "cache")
        shutil.rmtree(root / "data")
        dvc(root, "pull")
        assert md5(root / "data" / "blob.bin") == want
    finally:
        server.stop()


@pytest.mark.slow
def test_seaweedfs_enforces_keys_and_persists_across_restart(tmp_path):
    import boto3
    from botocore.exceptions import ClientError

    with S3Server(data_dir=tmp_path / "d", buckets=["persist-me"]) as s3:
        s3.client().put_object(Bucket="persist-me", Key="a/b.txt", Body=b"kept")
        port = s3.port
        bad = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="wrong", aws_secret_access_key="wrong",
                           region_name="us-east-1")
        with pytest.raises(ClientError):
            bad.list_buckets()
        pid = s3.proc.pid
    with pytest.raises(ProcessLookupError):  # stop() waited for the process to exit
        import os

        os.kill(pid, 0)
    with S3Server(data_dir=tmp_path / "d", port=port) as s3:
        assert s3.client().get_object(Bucket="persist-me", Key="a/b.txt")["Body"].read() == b"kept"


@pytest.mark.slow
def test_flow_on_real_s3_fresh_clone_pull_skip_and_transient_push_retry(dvc_repo, prefect_home, s3_server, monkeypatch):
    """The issue's end-to-end check, on a fake pipeline: S3 remote + S3 registry on SeaweedFS."""
    from test_flow import DVC_YAML, PARAMS

    from flows.reinternalize import reinternalize

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast against the dead endpoint below
    params = PARAMS.replace("registry: {root: registry, model: tst}",
                            f"registry: {{root: 's3://trimpi-test/registry', model: tst, "
                            f"endpoint_url: '{s3_server.endpoint}', retries: 2, backoff_s: 0.1}}")
    root = dvc_repo(DVC_YAML, params, remote=None)
    add_s3_remote(root, "s3", "s3://trimpi-test/dvc", s3_server.endpoint)

    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trimpi-test").get("Contents", [])]
    assert any(k.startswith("dvc/files/md5/") for k in keys), keys
    assert "registry/tst/v1/COMPLETE.json" in keys and "registry/tst/aliases/production.json" in keys

    # a fresh clone restores data and models from the bucket
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    clone = root.parent / "clone"
    git(root.parent, "clone", "-q", str(root), str(clone))
    assert not (clone / "data").exists()
    dvc(clone, "pull")
    assert (clone / "data" / "d.txt").read_text() == "d"
    assert md5(clone / "models" / "m" / "model.safetensors") == md5(root / "models" / "m" / "model.safetensors")

    # unchanged policies: skipped in seconds, production read from the S3 registry
    t0 = time.monotonic()
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.result()["status"] == "skipped" and time.monotonic() - t0 < 30

    # a transient S3 failure (nothing listening) is retried, for pull and for push
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    dvc(root, "remote", "add", "dead", "s3://trimpi-test/dvc")
    dvc(root, "remote", "modify", "dead", "endpointurl", dead)
    state = reinternalize(workspace=str(root), force=True, remote="dead", overrides=["retries=1"], return_state=True)
    assert state.is_failed()
    from test_flow import _task_runs

    tasks, _ = _task_runs(state.state_details.flow_run_id)
    pulls = [t for n, t in tasks.items() if n.startswith("dvc-pull")]
    pushes = [t for n, t in tasks.items() if n.startswith("dvc-push")]
    assert pulls[0].run_count == 2 and pushes[0].run_count == 2
    summary = (root / "reports" / "reinternalize.md").read_text()
    assert "`dvc push -r dead` FAILED" in summary and "built locally instead" in summary
