"""``trimpi run | serve | ui``: the main job, its local schedule, and the Prefect UI.

* ``trimpi run`` runs the ``reinternalize`` flow once in this process, on the embedded
  default: the DVC remote and registry from the workspace config, and Prefect in ephemeral
  mode (no server) unless ``PREFECT_API_URL`` is set, or ``trimpi ui`` runs for this workspace
  (it notes its URL, whatever the port, in ``.trimpi/ui.json``), or a server answers on
  127.0.0.1:4200; then the run is recorded there and visible in the browser.
* ``trimpi serve`` serves the deployment declared in ``prefect.yaml`` (its cron schedules with
  their slugs, per-schedule parameters and ``concurrency_limit``) from this machine; it needs a
  Prefect server and starts one as a child process when none is reachable. The server keeps
  exactly the schedules being served: others (an old ``--cron``) are removed. For a service
  that outlives the terminal, use the work-pool path instead (``infra/systemd/``).
* ``trimpi ui`` runs ``prefect server start --host 127.0.0.1`` (API + UI on port 4200).

All three set Prefect's environment before Prefect is imported: ``PREFECT_HOME`` defaults to
``<workspace>/.trimpi/prefect`` (run history stays with the checkout; a user-set value wins),
analytics off (there is no network), and a 180 s ephemeral-server startup timeout (the first
start on a fresh home runs migrations for ~30 s on 2 cores; the 20 s default fails).
"""
from __future__ import annotations

import json
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


UI_RECORD = ".trimpi/ui.json"
"""Where ``trimpi ui`` notes its API URL, so ``trimpi run``/``serve`` in the workspace find it on any port."""


def _client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host`` (0.0.0.0 -> 127.0.0.1)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def remember_ui(workspace: str | os.PathLike, host: str, port: int) -> Path:
    """Record ``trimpi ui``'s API URL (and pid) in ``<workspace>/.trimpi/ui.json``."""
    from pipeline.io import atomic_write_text

    path = Path(workspace).resolve() / UI_RECORD
    atomic_write_text(path, json.dumps({"api_url": _local_api(_client_host(host), port), "pid": os.getpid()}) + "\n")
    return path


def forget_ui(workspace: str | os.PathLike) -> None:
    """Remove the record if this process wrote it (a second ``trimpi ui`` may have replaced it)."""
    path = Path(workspace).resolve() / UI_RECORD
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def recorded_ui(workspace: str | os.PathLike) -> str | None:
    """The API URL ``trimpi ui`` recorded for this workspace, or None."""
    try:
        url = json.loads((Path(workspace).resolve() / UI_RECORD).read_text(encoding="utf-8")).get("api_url")
    except (OSError, ValueError):
        return None
    return url if isinstance(url, str) and url.startswith("http") else None


def use_running_server(workspace: str | os.PathLike = ".") -> str | None:
    """The Prefect API to record runs on; sets ``PREFECT_API_URL`` to it. None means ephemeral.

    In order: ``PREFECT_API_URL`` if set; the server ``trimpi ui`` started for this workspace
    (``.trimpi/ui.json``, any port) if it answers; a server on 127.0.0.1:4200 if it answers.
    A record whose server is gone (``trimpi ui`` was killed) is ignored.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    for url in (recorded_ui(workspace), _local_api()):
        if url and api_healthy(url, timeout=0.5):
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
    """A Prefect server or worker: its group gets 30 s after SIGTERM (SQLite and the API shut down)."""
    from flows.runner import stop_group

    stop_group(proc, grace=30)


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
    from pipeline.io import read_json
    from pipeline.lock import LockBusy, WorkspaceLock
    from flows.runner import OrchestrateConfig, record_path, stage_table

    root = Path(args.workspace).resolve()
    params = str(root / args.params) if not os.path.isabs(args.params) else args.params
    cfg = load_section(OrchestrateConfig, "orchestrate", params, args.overrides)
    prefect_env(root)
    server = use_running_server(root)
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
    record = record_path(summary)
    if summary.exists() and record.exists():
        print("\n".join("  " + line for line in stage_table(read_json(record).get("stages", []))))
    for rel in ("metrics/eval.json", "metrics/gate.json", "reports/ablations.md"):
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


def schedules_of(dep: dict, where: str | os.PathLike = "prefect.yaml") -> list:
    """``prefect.yaml`` cron schedules (with their per-schedule parameters) as Prefect schedule objects.

    Every schedule needs a ``slug``: once a deployment's schedules have slugs, the Prefect API
    updates them by slug and refuses (HTTP 422) a request with a schedule that has none.
    """
    from prefect.schedules import Cron

    from pipeline.io import input_error

    out = []
    for i, s in enumerate(dep.get("schedules") or []):
        if "cron" in s:
            if not s.get("slug"):
                raise input_error(where, f"deployments[{dep.get('name')}].schedules[{i}].slug",
                                  "a unique slug (Prefect updates a deployment's schedules by slug)", s.get("slug"))
            out.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True),
                            parameters=s.get("parameters") or None, slug=s["slug"]))
    return out


CLI_CRON_SLUG = "cli-cron"
"""Slug of the temporary schedule ``trimpi serve --cron`` serves instead of prefect.yaml's."""


def serve_schedules(dep: dict, cron: str | None = None, where: str | os.PathLike = "prefect.yaml") -> list:
    """What ``trimpi serve`` registers: prefect.yaml's schedules, or only ``--cron`` (with a slug)."""
    from prefect.schedules import Cron

    return [Cron(cron, timezone="UTC", slug=CLI_CRON_SLUG)] if cron else schedules_of(dep, where)


def concurrency_of(dep: dict, where: str | os.PathLike = "prefect.yaml"):
    """prefect.yaml's ``concurrency_limit`` (an int or ``{limit, collision_strategy}``) as Prefect's config.

    A bare int means ENQUEUE, Prefect's own default for it: an overlapping run (the weekly forced
    run while the nightly one still trains) waits for the slot instead of being cancelled.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from pipeline.io import input_error

    raw = dep.get("concurrency_limit")
    if raw is None:
        return None
    field = f"deployments[{dep.get('name')}].concurrency_limit"
    spec = {"limit": raw} if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(spec, dict) or not isinstance(spec.get("limit"), int) or spec["limit"] < 1:
        raise input_error(where, field, "a positive integer or {limit: N, collision_strategy: ENQUEUE|CANCEL_NEW}", raw)
    strategy = str(spec.get("collision_strategy", "ENQUEUE")).upper()
    if strategy not in ConcurrencyLimitStrategy.__members__:
        raise input_error(where, f"{field}.collision_strategy", "ENQUEUE or CANCEL_NEW", spec.get("collision_strategy"))
    return ConcurrencyLimitConfig(limit=spec["limit"], collision_strategy=strategy)


def served_deployment(root: Path, dep: dict, cron: str | None = None):
    """The RunnerDeployment ``trimpi serve`` registers: schedules, parameters and concurrency of prefect.yaml."""
    from flows.reinternalize import reinternalize

    where = root / "prefect.yaml"
    params = {"workspace": str(root), **(dep.get("parameters") or {})}
    params["workspace"] = str(root / params["workspace"])
    return reinternalize.to_deployment(name=dep["name"], schedules=serve_schedules(dep, cron, where),
                                       parameters=params, description=dep.get("description"), tags=dep.get("tags"),
                                       concurrency_limit=concurrency_of(dep, where))


def drop_schedules_except(deployment_name: str, keep: set[str]) -> list[str]:
    """Delete the schedules of deployment ``flow/name`` whose slug is not in ``keep``; returns what went.

    The API updates schedules by slug but never removes one a request does not mention, so a
    ``--cron`` schedule would otherwise stay attached (and keep firing) next to nightly/weekly.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            d = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return []
        gone = []
        for s in d.schedules or []:
            if s.slug not in keep:
                client.delete_deployment_schedule(d.id, s.id)
                gone.append(s.slug or str(s.id))
    return gone


def prepare_serve(root: Path, dep: dict, cron: str | None = None):
    """(deployment to serve, schedules removed from the server): everything ``trimpi serve`` does
    before Prefect's runner registers the deployment and starts polling."""
    deployment = served_deployment(root, dep, cron)
    dropped = drop_schedules_except(f"{deployment.flow_name}/{deployment.name}",
                                    {s.slug for s in deployment.schedules})
    return deployment, dropped


def configure_serve(p) -> None:
    p.add_argument("--workspace", default=".")
    p.add_argument("--deployment", default=None, help="deployment name in prefect.yaml (default: the first)")
    p.add_argument("--cron", default=None,
                   help="serve with only this cron schedule (UTC) instead of prefect.yaml's; it is removed again on exit")


def run_serve(args) -> int:
    root = Path(args.workspace).resolve()
    prefect_env(root)
    _sigterm_as_interrupt()
    dep = load_deployment(root / "prefect.yaml", args.deployment)
    schedules_of(dep, root / "prefect.yaml")  # a bad prefect.yaml fails here, before any server starts
    concurrency_of(dep, root / "prefect.yaml")
    child = None
    if not use_running_server(root):
        log = Path(os.environ["PREFECT_HOME"]) / "server.log"
        print(f"trimpi serve: no Prefect server reachable; starting one on 127.0.0.1:{DEFAULT_UI[1]} (log: {log})",
              flush=True)
        child = start_server(*DEFAULT_UI, log_path=log)
        os.environ["PREFECT_API_URL"] = _local_api()
    full_name = None
    try:
        from prefect import serve

        deployment, dropped = prepare_serve(root, dep, args.cron)
        full_name = f"{deployment.flow_name}/{deployment.name}"
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        opts = deployment.concurrency_options
        strategy = getattr(getattr(opts, "collision_strategy", None), "value", getattr(opts, "collision_strategy", ""))
        print(f"trimpi serve: deployment {dep['name']!r} with {len(deployment.schedules)} schedule(s) "
              f"({', '.join(s.slug for s in deployment.schedules)}); concurrency limit "
              f"{deployment.concurrency_limit or 'none'}{f' ({strategy})' if strategy else ''}"
              + (f"; removed stale schedule(s) {', '.join(dropped)}" if dropped else "")
              + f"; UI at {ui} - Ctrl-C to stop", flush=True)
        serve(deployment)
    finally:
        if args.cron and full_name:
            try:  # the temporary schedule must not outlive this process
                drop_schedules_except(full_name, set())
            except Exception as e:  # noqa: BLE001 - a server already gone has nothing left to clean
                print(f"trimpi serve: could not remove the --cron schedule ({e})", file=sys.stderr)
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
    url = _local_api(_client_host(args.host), args.port)
    record = remember_ui(args.workspace, args.host, args.port)
    print(f"trimpi ui: Prefect server + UI at http://{args.host}:{args.port} (API /api; history in "
          f"{os.environ['PREFECT_HOME']}). `trimpi run` and `trimpi serve` in {Path(args.workspace).resolve()} "
          f"record their runs here (noted in {record}); from anywhere else: export PREFECT_API_URL={url}. "
          "Ctrl-C to stop.", flush=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    _sigterm_as_interrupt()
    try:
        proc = subprocess.Popen([prefect, "server", "start", "--host", args.host, "--port", str(args.port)],
                                env=_server_env(args.host, args.port))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 0
    finally:
        forget_ui(args.workspace)
