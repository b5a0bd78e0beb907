"""``trimpi run | serve | ui``: the main job, its local schedule, and the Prefect UI.

* ``trimpi run`` runs the ``reinternalize`` flow once in this process, on the embedded
  default: the DVC remote and registry from the workspace config, and Prefect in ephemeral
  mode (no server) unless ``PREFECT_API_URL`` is set or a ``trimpi ui`` server is up on
  127.0.0.1:4200, in which case the run is recorded there and visible in the browser.
* ``trimpi serve`` serves the deployment declared in ``prefect.yaml`` (its cron schedules and
  per-schedule parameters) from this machine with ``flow.serve``; it needs a Prefect server
  and starts one as a child process when none is reachable.
* ``trimpi ui`` runs ``prefect server start --host 127.0.0.1`` (API + UI on port 4200).

All three set Prefect's environment before Prefect is imported: ``PREFECT_HOME`` defaults to
``<workspace>/.trimpi/prefect`` (run history stays with the checkout; a user-set value wins),
analytics off (there is no network), and a 180 s ephemeral-server startup timeout (the first
start on a fresh home runs migrations for ~30 s on 2 cores; the 20 s default fails).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_UI = ("127.0.0.1", 4200)


def prefect_env(workspace: str | os.PathLike = ".") -> dict:
    """Set (as defaults) the Prefect environment this project relies on; returns what applies."""
    home = Path(workspace).resolve() / ".trimpi" / "prefect"
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
                                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}


def api_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _local_api(host: str = DEFAULT_UI[0], port: int = DEFAULT_UI[1]) -> str:
    return f"http://{host}:{port}/api"


def use_running_server() -> str | None:
    """PREFECT_API_URL if set; else the local ``trimpi ui`` server if it answers; else None (ephemeral)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = _local_api()
    if api_healthy(url, timeout=0.5):
        os.environ["PREFECT_API_URL"] = url
        return url
    return None


def _server_env(host: str, port: int) -> dict:
    # The browser UI asks this URL for its data; Prefect's default is :4200 whatever --port says.
    return {**os.environ, "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", _local_api(host, port))}


def start_server(host: str, port: int, wait: float = 180.0, log_path: Path | None = None) -> subprocess.Popen:
    """``prefect server start`` as a child process; returns once /api/health answers."""
    prefect = str(Path(sys.executable).parent / "prefect")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([prefect, "server", "start", "--host", host, "--port", str(port)],
                            env=_server_env(host, port), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = _local_api(host, port)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}" + (f"; see {log_path}" if log_path else ""))
        if api_healthy(url):
            return proc
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"prefect server not healthy at {url} after {wait:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a service manager, `kill PID`) stops like Ctrl-C, so child servers are stopped too."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _stop_stages_on_signal() -> dict:
    """SIGTERM/SIGINT to ``trimpi run``: kill the running stage's process group at once, then stop
    like Ctrl-C (the stage may run on a Prefect worker thread that the interrupt never reaches).
    Returns the previous handlers."""
    from flows import runner

    def handler(signum, frame):
        runner.terminate_all()
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


# ----------------------------------------------------------------------------- trimpi run


def configure_run(p) -> None:
    p.add_argument("--workspace", default=".", help="the checkout to run in (default: current directory)")
    p.add_argument("--force", action="store_true", help="run even if the policies did not change")
    p.add_argument("--stage", dest="stages", action="append", default=None,
                   help="run only this DVC stage (repeatable; graph order is kept)")
    p.add_argument("--remote", default=None, help="DVC remote (default: orchestrate.remote, else the default remote)")
    p.add_argument("--no-pull", dest="pull", action="store_false", default=None, help="skip dvc pull")
    p.add_argument("--no-push", dest="push", action="store_false", default=None, help="skip dvc push")
    p.add_argument("--wait", type=float, default=None,
                   help="seconds to wait if another run holds this workspace (default: orchestrate.lock_wait_s)")


def run_run(args) -> int:
    from pipeline.config import load_section
    from pipeline.lock import LockBusy, WorkspaceLock
    from flows.runner import OrchestrateConfig

    root = Path(args.workspace).resolve()
    params = str(root / args.params) if not os.path.isabs(args.params) else args.params
    cfg = load_section(OrchestrateConfig, "orchestrate", params, args.overrides)
    prefect_env(root)
    server = use_running_server()
    print(f"trimpi run: workspace {root}\n  prefect: {server or 'ephemeral (in-process; history in ' + os.environ['PREFECT_HOME'] + ')'}",
          flush=True)
    try:
        lock = WorkspaceLock(root, timeout=cfg.lock_wait_s if args.wait is None else args.wait, command="trimpi run")
        lock.acquire()
    except LockBusy as e:
        from pipeline.io import EX_TEMPFAIL

        print(f"error: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    previous = _stop_stages_on_signal()
    try:
        from flows.reinternalize import reinternalize

        state = reinternalize(workspace=str(root), params=os.path.relpath(params, root), force=args.force,
                              stages=args.stages, remote=args.remote, pull=args.pull, push=args.push,
                              overrides=args.overrides, return_state=True)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        lock.release()
    result = state.result(raise_on_failure=False)
    summary = root / cfg.summary
    print("\n" + "=" * 72)
    if isinstance(result, dict):
        why = result["reason"] if result["status"] == "skipped" else f"ran because: {result['reason']}"
        print(f"reinternalize: {result['status']} ({why})")
    else:
        print(f"reinternalize: FAILED: {str(result).splitlines()[0] if str(result) else type(result).__name__}")
    print(f"  report:   {summary}" if summary.exists() else "  report:   (none written)")
    for rel in ("metrics/eval.json", "metrics/gate.json", "reports/results.md"):
        if (root / rel).exists():
            print(f"  results:  {root / rel}")
    print(f"  model:    {_production_line(root, params)}")
    if not server:
        print(f"  history:  `trimpi ui`, then open http://{DEFAULT_UI[0]}:{DEFAULT_UI[1]} (runs are kept in "
              f"{os.environ['PREFECT_HOME']})")
    return 0 if state.is_completed() else 1


def _production_line(root: Path, params: str) -> str:
    try:
        from flows.change import production

        prod = production(root, params)
    except Exception as e:  # noqa: BLE001 - the report line must not turn a finished run into a crash
        return f"(registry not readable: {e})"
    return f"production {prod['version']} at {prod['url']}" if prod else "(nothing promoted yet)"


# ----------------------------------------------------------------------------- trimpi serve


def load_deployment(path: str | os.PathLike, name: str | None = None) -> dict:
    """One deployment entry of ``prefect.yaml`` (the first, or the one called ``name``)."""
    from pipeline.io import input_error, load_yaml

    spec = load_yaml(path) or {}
    deps = spec.get("deployments") or []
    for d in deps:
        if name is None or d.get("name") == name:
            return d
    raise input_error(path, "deployments", f"a deployment named {name!r}" if name else "at least one deployment",
                      [d.get("name") for d in deps])


def schedules_of(dep: dict) -> list:
    """``prefect.yaml`` cron schedules (with their per-schedule parameters) as Prefect schedule objects."""
    from prefect.schedules import Cron

    out = []
    for s in dep.get("schedules") or []:
        if "cron" in s:
            out.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True),
                            parameters=s.get("parameters") or None, slug=s.get("slug")))
    return out


def configure_serve(p) -> None:
    p.add_argument("--workspace", default=".")
    p.add_argument("--deployment", default=None, help="deployment name in prefect.yaml (default: the first)")
    p.add_argument("--cron", default=None, help="serve with this cron schedule instead of prefect.yaml's")


def run_serve(args) -> int:
    root = Path(args.workspace).resolve()
    prefect_env(root)
    _sigterm_as_interrupt()
    dep = load_deployment(root / "prefect.yaml", args.deployment)
    child = None
    if not use_running_server():
        log = Path(os.environ["PREFECT_HOME"]) / "server.log"
        print(f"trimpi serve: no Prefect server reachable; starting one on 127.0.0.1:{DEFAULT_UI[1]} (log: {log})",
              flush=True)
        child = start_server(*DEFAULT_UI, log_path=log)
        os.environ["PREFECT_API_URL"] = _local_api()
    try:
        from prefect.schedules import Cron

        from flows.reinternalize import reinternalize

        schedules = [Cron(args.cron)] if args.cron else schedules_of(dep)
        params = {"workspace": str(root), **(dep.get("parameters") or {})}
        params["workspace"] = str(root / params["workspace"])
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        print(f"trimpi serve: deployment {dep['name']!r} with {len(schedules)} schedule(s); "
              f"UI at {ui} - Ctrl-C to stop", flush=True)
        reinternalize.serve(name=dep["name"], schedules=schedules, parameters=params,
                            description=dep.get("description"), tags=dep.get("tags"))
    finally:
        if child is not None:
            stop_server(child)
    return 0


# ----------------------------------------------------------------------------- trimpi ui


def configure_ui(p) -> None:
    p.add_argument("--workspace", default=".")
    p.add_argument("--host", default=DEFAULT_UI[0], help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=DEFAULT_UI[1])


def run_ui(args) -> int:
    prefect_env(args.workspace)
    print(f"trimpi ui: Prefect server + UI at http://{args.host}:{args.port} (API /api; history in "
          f"{os.environ['PREFECT_HOME']}). `trimpi run` in this workspace records its runs here. Ctrl-C to stop.",
          flush=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", args.host, "--port", str(args.port)],
                            env=_server_env(args.host, args.port))
    _sigterm_as_interrupt()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
