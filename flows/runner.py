"""Running DVC from the flow: stage order, one subprocess per stage, and what a failure means.

The flow never re-implements the pipeline: ``dvc.yaml`` is the graph, and each stage runs as
``dvc repro --single-item <stage>`` in the order computed here, so DVC keeps skipping whatever
did not change and writes ``dvc.lock`` exactly as a plain ``dvc repro`` would. Nothing here
imports Prefect; the flow module wraps these functions in tasks.

Decisions worth knowing:

* **Order**: DVC's own index builds the graph (``foreach``/``matrix``/``vars`` resolved);
  stages are then ordered topologically, ties broken by declaration order in ``dvc.yaml``,
  so the run reads in the same order as the file.
* **Subprocess, streamed**: output is read as it comes and handed to a callback line by
  line (tqdm's ``\\r`` updates are throttled), so a multi-hour training stage shows progress
  and the flow process stays responsive (its heartbeats keep it from being marked crashed).
  The child runs in its own process group, led by ``flows/stagewatch.py``, which kills the
  group when this process goes away by any means (SIGKILL included); the per-stage timeout,
  Ctrl-C, SIGTERM to ``trimpi run`` (:func:`terminate_all`) and a flow cancellation kill it too.
  While it runs, ``.trimpi/stage.json`` names the group, so a later run refuses to start beside
  an orphan (:mod:`pipeline.lock`).
* **A failed stage leaves the workspace as it was.** ``dvc repro`` deletes a stage's outputs
  before running it; when the stage then fails (or is killed, or times out),
  :func:`preserved_outputs` puts the previous ones back: cached outputs with ``dvc checkout``
  from the cache (what ``dvc.lock`` records), uncached ones (metrics, plots, predictions) from
  hard links taken just before the run. A backup left by a runner that was SIGKILLed is
  restored before that stage runs next.
* **Failure kinds** (what the flow retries): DVC exits 255 for any failed stage and prints
  ``exited with N``; the stage's own code N decides, never its output text. N = 1 (a check
  failed: validation, gate), 2 (bad input) or 70 (an unexpected exception: a bug) is
  **deterministic**, never retried. N = 75
  (``EX_TEMPFAIL``: ``trimpi`` exits so on a :class:`pipeline.io.TransientError`, e.g. storage
  unreachable after its retry budget), death by a signal or any other code is **transient** and
  retried with back-off. Only when DVC failed on its own (``dvc pull``/``push``, no stage ran) is
  its output read, because DVC exits 1 for a dead remote and for a bad config alike. A timeout is
  not retried: a stage that ran out of time will run out again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.io import EX_TEMPFAIL, atomic_write_json, input_error, read_json

DETERMINISTIC_CODES = (1, 2, 70)  # a check failed, bad input, a crash (pipeline.io.EX_SOFTWARE)
# DVC's own failures (pull/push, its repo lock) that a later attempt can get past. Read only
# when no stage ran: a stage says what it means with its exit code.
DVC_TRANSIENT = re.compile(
    r"EndpointConnectionError|Could not connect to the endpoint|Connection refused|ConnectTimeout|"
    r"ReadTimeout|Connection reset by peer|SlowDown|ServiceUnavailable|RequestTimeout|Unable to acquire lock")


@dataclass
class OrchestrateConfig:
    """``params.yaml: orchestrate`` — how the reinternalize flow runs the DVC stages."""

    retries: int = 2
    """Retries of a stage (and of ``dvc pull``/``push``) after a transient failure; deterministic ones never retry."""
    retry_delay_s: float = 30.0
    """First back-off delay; it doubles on each retry (30 s, 60 s, ...)."""
    stage_timeout_s: float = 6 * 3600.0
    """Wall-clock limit of one stage; the stage's whole process group is killed when it is reached."""
    stage_timeouts: dict = field(default_factory=dict)
    """Per-stage limits overriding ``stage_timeout_s``, e.g. ``{rl: 86400}``."""
    remote: str = ""
    """DVC remote to pull from / push to; empty = the default remote in ``.dvc/config`` (none = skip)."""
    pull: bool = True
    """Run ``dvc pull`` before the stages (restores outputs another machine already built)."""
    push: bool = True
    """Run ``dvc push`` after the stages (ships data and models to the remote)."""
    watch_params: list = field(default_factory=lambda: ["base.seed", "generate_clevr", "generate_gta",
                                                        "generate_generic"])
    """params.yaml sections (or ``section.key``) that, with ``policies/``, decide "did the policies change"."""
    lock_wait_s: float = 0.0
    """How long a second ``trimpi run`` in the same workspace waits for the first; 0 = refuse at once."""
    deployment_lock_wait_s: float = 86400.0
    """How long a run started by Prefect (a schedule, a worker, ``prefect deployment run``) waits for
    the workspace lock while another run holds it, before failing. Overlapping scheduled runs queue
    behind each other instead of failing; the later one re-checks the policies once it has the lock."""
    diff_data: list = field(default_factory=lambda: ["data/clevr", "data/gta"])
    """Dataset dirs on which the summary counts label flips when the policies changed (missing ones are skipped)."""
    summary: str = "reports/reinternalize.md"
    """Where the run's final markdown summary is written (also a Prefect artifact)."""


def record_path(summary: str | Path) -> Path:
    """The run's machine-readable record next to its markdown summary (``reports/reinternalize.json``):
    status, reason and every stage's status and seconds. Scripts (``trimpi run``'s console table,
    ``benchmarks/bench_pipeline.py``) read this, never the markdown."""
    return Path(summary).with_suffix(".json")


def stage_table(stages: list[dict], total: bool = True) -> list[str]:
    """A run's per-stage markdown table (status and wall time of every stage), optionally with a total
    line: the summary's "Stages" section and ``trimpi run``'s console table are this one table."""
    if not stages:
        return []
    secs = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 - 12000.0 s, not 1.2e+04
    table = ["| stage | status | seconds |", "|---|---|---|"]
    table += [f"| {s['stage']} | {s['status']} | {secs(s.get('seconds'))} |" for s in stages]
    return table + ([f"| total | | {sum(s.get('seconds') or 0.0 for s in stages):.0f} |"] if total else [])


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "unchanged"
    seconds: float
    log_tail: list[str] = dataclasses.field(default_factory=list)


CHECK_FAILED = "a check failed"


class StageFailed(RuntimeError):
    """A stage (or dvc command) failed; ``transient`` says whether retrying may help."""

    def __init__(self, what: str, code: int | None, transient: bool, tail: list[str], reason: str = ""):
        self.what, self.code, self.transient, self.tail = what, code, transient, tail
        self.check_failed = reason.startswith(CHECK_FAILED)
        """The stage ran to the end and reported a failed check (validation, gate): its report is the news."""
        kind = "transient" if transient else "deterministic"
        last = "\n".join(tail[-15:])
        super().__init__(f"{what} failed ({kind}: {reason or f'exit {code}'})\n{last}")


class StageTimeout(StageFailed):
    def __init__(self, what: str, seconds: float, tail: list[str]):
        super().__init__(what, None, False, tail, f"timed out after {seconds:g} s")


# ----------------------------------------------------------------------------- the graph


def stage_graph(root: str | os.PathLike = ".") -> tuple[list[str], dict[str, set[str]]]:
    """(stages in declaration order, direct dependencies of each stage) of the repo at ``root``."""
    from dvc.repo import Repo

    root = Path(root)
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return [], {}
    from pipeline.io import load_yaml

    raw = load_yaml(dvc_yaml) or {}
    if not isinstance(raw, dict) or not raw.get("stages"):  # `stages:` with nothing under it yet: DVC would refuse the file
        return [], {}
    with Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        names = [_address(repo, s) for s in stages]
        needs = {n: set() for n in names}
        for a, b in repo.index.graph.edges:  # edge a -> b: a depends on b
            a, b = _address(repo, a), _address(repo, b)
            if a in needs and b in needs:
                needs[a].add(b)
    return names, needs


def stage_order(root: str | os.PathLike = ".", only: list[str] | None = None) -> list[str]:
    """Pipeline stages of the repo at ``root`` in dependency order (declaration order on ties).

    ``only`` restricts to those stages (and keeps the computed order); unknown names are an error.
    A ``dvc.yaml`` with no stages yet gives an empty list.
    """
    names, graph = stage_graph(root)
    pos = {n: i for i, n in enumerate(names)}
    needs = {n: set(d) for n, d in graph.items()}
    order: list[str] = []
    ready = sorted((s for s, n in needs.items() if not n), key=pos.get)
    while ready:
        s = ready.pop(0)
        order.append(s)
        for t, n in needs.items():
            if s in n:
                n.discard(s)
                if not n:
                    ready.append(t)
        ready.sort(key=pos.get)
    if only:
        unknown = [s for s in only if s not in pos]
        if unknown:
            raise input_error(Path(root) / "dvc.yaml", "stages",
                              "names of stages declared there: " + ", ".join(order), unknown[0])
        order = [s for s in order if s in only]
    return order


def downstream(graph: dict[str, set[str]], failed: str) -> set[str]:
    """Every stage that depends, directly or not, on ``failed`` (it cannot run after that failure)."""
    out: set[str] = set()
    frontier = {failed}
    while frontier:
        nxt = {s for s, deps in graph.items() if deps & frontier and s not in out}
        out |= nxt
        frontier = nxt
    return out


def _address(repo, stage) -> str:
    """``name`` for stages of the root ``dvc.yaml``, ``sub/dvc.yaml:name`` otherwise.

    DVC's own ``addressing`` is relative to the current directory, which is not the workspace
    when the flow runs from elsewhere (a served deployment, tests).
    """
    rel = os.path.relpath(stage.dvcfile.path, repo.root_dir)
    name = getattr(stage, "name", None)
    if not name:
        return rel
    return name if rel == "dvc.yaml" else f"{rel}:{name}"


def stage_files(root: str | os.PathLike, stage: str) -> dict[str, list[str]]:
    """The files a stage declares as ``metrics`` and ``plots``, and its other ``outs``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if _address(repo, s) == stage:
                return {"metrics": [o.def_path for o in s.outs if o.metric],
                        "plots": [o.def_path for o in s.outs if o.plot],
                        "outs": [o.def_path for o in s.outs if not (o.metric or o.plot)]}
    return {"metrics": [], "plots": [], "outs": []}


def declared_by(root: str | os.PathLike) -> dict[str, str]:
    """Every path a stage declares as out/metric/plot -> that stage (one DVC index read for all stages).

    The flow finds "the gate" and "the promotion" by the files they declare (``metrics/gate.json``,
    ``metrics/promote.json``), never by stage name.
    """
    from dvc.repo import Repo

    if not (Path(root) / "dvc.yaml").exists():
        return {}
    with Repo(str(root)) as repo:
        return {o.def_path: _address(repo, s) for s in repo.index.stages for o in s.outs}


def stage_metrics(root: str | os.PathLike, stage: str) -> dict[str, dict]:
    """Metrics a stage produced: its declared metrics files plus ``<out dir>/metrics.json``.

    Training stages keep ``metrics.json`` inside their checkpoint directory, which DVC cannot
    also declare as a metric, so those are picked up by convention.
    """
    root = Path(root)
    files = stage_files(root, stage)
    paths = [*files["metrics"], *(f"{o}/metrics.json" for o in files["outs"])]
    out = {}
    for p in paths:
        if (root / p).is_file() and p.endswith(".json"):
            try:
                out[p] = read_json(root / p)
            except Exception as e:  # noqa: BLE001 - a broken metrics file must not hide the stage result
                out[p] = {"error": str(e)}
    return out


def default_remote(root: str | os.PathLike = ".", name: str = "") -> str | None:
    """The remote to use: ``name`` if given (must exist), else the default remote, else None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remotes = dict(repo.config.get("remote", {}))
        chosen = name or repo.config.get("core", {}).get("remote")
    if name and name not in remotes:
        raise input_error(Path(root) / ".dvc/config", "remote", "one of the configured remotes " + ", ".join(remotes),
                          name)
    return chosen or None


# ----------------------------------------------------------------------------- subprocesses


def classify(code: int, tail: list[str]) -> tuple[bool, str]:
    """(transient?, reason) for a failed ``dvc`` command from its exit code and last lines."""
    text = "\n".join(tail)
    stage_rc = [int(m) for m in re.findall(r"exited with (-?\d+)", text)]
    if not stage_rc:  # DVC failed on its own: its exit code does not say why
        if DVC_TRANSIENT.search(text):
            return True, f"dvc: network/lock error, exit {code}"
        if code == 255:  # dvc itself refused (bad dvc.yaml, missing dependency)
            return False, "dvc refused the stage"
    rc = stage_rc[-1] if stage_rc else code
    if rc == EX_TEMPFAIL:
        return True, "transient failure (retry later), exit 75"
    if rc in DETERMINISTIC_CODES:
        return False, {1: CHECK_FAILED, 2: "bad input", 70: "crashed"}[rc] + f", exit {rc}"
    return True, f"exit {rc}" + (" (killed by a signal)" if rc < 0 or rc > 128 else "")


STAGEWATCH = Path(__file__).with_name("stagewatch.py")
_live: dict[int, subprocess.Popen] = {}  # pgid -> running stage group (terminate_all)
_live_guard = threading.Lock()


def terminate_all() -> None:
    """Kill every stage process group this process started (SIGTERM/SIGINT handler of ``trimpi run``)."""
    with _live_guard:
        procs = list(_live.values())
    for proc in procs:
        stop_group(proc)


def run_streamed(cmd: list[str], cwd: str | os.PathLike, on_line: Callable[[str], None],
                 timeout: float | None = None, env: dict | None = None,
                 progress_every: float = 10.0, workspace: str | os.PathLike | None = None) -> tuple[int, list[str]]:
    """Run ``cmd``, feeding each output line to ``on_line``; returns (exit code, last 200 lines).

    ``cmd`` runs under ``flows/stagewatch.py`` in a new process group that dies with this process.
    With ``workspace``, the group is recorded in its ``.trimpi/stage.json`` while it runs.
    Raises :class:`StageTimeout` (after killing the process group) when ``timeout`` passes.
    """
    from pipeline.lock import clear_stage, record_stage

    # stdin is the watchdog's lifeline: only this process holds the write end (never written)
    proc = subprocess.Popen([sys.executable, str(STAGEWATCH), *cmd], cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.PIPE, start_new_session=True)
    with _live_guard:
        _live[proc.pid] = proc
    tail: deque[str] = deque(maxlen=200)

    def pump():
        buf = b""
        last_progress = 0.0
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"(\r\n|\n|\r)", buf)
            buf = parts.pop()  # incomplete remainder
            for text, sep in zip(parts[0::2], parts[1::2]):
                line = text.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                if sep == b"\r":  # a progress-bar redraw: keep the latest, log one every few seconds
                    now = time.monotonic()
                    if now - last_progress < progress_every:
                        continue
                    last_progress = now
                tail.append(line)
                on_line(line)
        if buf.strip():
            line = buf.decode("utf-8", "replace").rstrip()
            tail.append(line)
            on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if workspace is not None:
            record_stage(workspace, proc.pid, " ".join(cmd))
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        reader.join(5)
        raise StageTimeout(" ".join(cmd), timeout or 0, list(tail)) from None
    except BaseException:  # KeyboardInterrupt, flow cancellation: never leave a training job behind
        stop_group(proc)
        raise
    finally:
        with _live_guard:
            _live.pop(proc.pid, None)
        if workspace is not None:
            clear_stage(workspace, proc.pid)
        proc.stdin.close()
    reader.join(30)
    return code, list(tail)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the process group ``proc`` leads (started with ``start_new_session``): SIGTERM, ``grace``
    seconds to exit, then SIGKILL. The one way this package stops what it started: stage groups
    here, the Prefect servers and workers of ``trimpi ui | serve``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env() -> dict:
    """Environment for stage subprocesses: this venv first on PATH, offline, one thread, unbuffered."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc(args: list[str], root: str | os.PathLike, on_line: Callable[[str], None],
        timeout: float | None = None) -> list[str]:
    """Run ``dvc <args>`` (this interpreter's DVC); raise :class:`StageFailed` on failure."""
    cmd = [sys.executable, "-m", "dvc", *args]
    code, tail = run_streamed(cmd, root, on_line, timeout=timeout, env=child_env(), workspace=root)
    if code != 0:
        transient, reason = classify(code, tail)
        raise StageFailed("dvc " + " ".join(args), code, transient, tail, reason)
    return tail


def repro_stage(root: str | os.PathLike, stage: str, on_line: Callable[[str], None],
                timeout: float | None = None) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC skips it when nothing it depends on changed.

    A failure (or a kill) puts the stage's previous outputs back (:func:`preserved_outputs`).
    """
    t0 = time.monotonic()
    with preserved_outputs(root, stage, on_line):
        tail = dvc(["repro", "--single-item", stage], root, on_line, timeout)
    unchanged = any("didn't change, skipping" in line for line in tail)
    return StageResult(stage, "unchanged" if unchanged else "ran", time.monotonic() - t0, tail[-20:])


# ----------------------------------------------------------------------------- outputs of a failed stage

BACKUP_DIR = ".trimpi/restore"


_outs_cache: dict[tuple, dict[str, list[tuple[str, bool]]]] = {}


def stage_outputs(root: str | os.PathLike, stage: str) -> list[tuple[str, bool]]:
    """(path, cached in DVC's cache) for every output of ``stage`` (metrics and plots included).

    Read once per version of ``dvc.yaml`` (opening DVC's index costs about a second per stage).
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    st = (root / "dvc.yaml").stat() if (root / "dvc.yaml").exists() else None
    key = (str(root), st and st.st_mtime_ns, st and st.st_size)
    if key not in _outs_cache:
        with Repo(str(root)) as repo:
            _outs_cache[key] = {_address(repo, s): [(o.def_path, bool(o.use_cache)) for o in s.outs]
                                for s in repo.index.stages}
    return _outs_cache[key].get(stage, [])


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (file or tree) at ``dst``; copy where linking is refused. Stages write
    through temp-then-rename, so a new output never changes the inode a link points at."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _backup_dir(root: Path, stage: str) -> Path:
    return root / BACKUP_DIR / re.sub(r"[^A-Za-z0-9_.@-]+", "_", stage)


def _locked(root: Path, stage: str) -> bool:
    """Whether ``dvc.lock`` records a run of ``stage`` (else there is nothing to check out)."""
    from pipeline.io import InputError, load_yaml

    lock = root / "dvc.lock"
    try:
        data = load_yaml(lock) if lock.exists() else None
    except InputError:
        return True  # let DVC say what is wrong with it
    return isinstance(data, dict) and stage in (data.get("stages") or {})


def restore_outputs(root: str | os.PathLike, stage: str, on_line: Callable[[str], None],
                    keep_reports: bool = False) -> None:
    """Put ``stage``'s outputs back as they were before it ran (see the module docstring).

    ``keep_reports``: leave the uncached outputs (metrics, reports) as the failed run wrote them."""
    root = Path(root)
    backup = _backup_dir(root, stage)
    if not (backup / "outs.json").exists():
        # written last: without it the backup was cut short, so DVC never ran and nothing changed
        shutil.rmtree(backup, ignore_errors=True)
        return
    saved = json.loads((backup / "outs.json").read_text())
    outs = stage_outputs(root, stage)
    for path, cached in outs:
        if cached or keep_reports:
            continue
        target = root / path
        _remove(target)
        if saved.get(path):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(backup / "files" / path, target)
    if any(cached for _, cached in outs) and _locked(root, stage):
        # the cached outputs dvc.lock records (a failed stage never rewrites dvc.lock)
        cmd = [sys.executable, "-m", "dvc", "checkout", "--force", stage]
        r = subprocess.run(cmd, cwd=str(root), env=child_env(), capture_output=True, text=True)
        if r.returncode != 0:
            last = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1]
            on_line(f"restore {stage}: dvc checkout failed (exit {r.returncode}); outputs not in the cache stay "
                    f"missing: {last}")
    shutil.rmtree(backup, ignore_errors=True)
    on_line(f"restored the previous outputs of {stage}")


@contextlib.contextmanager
def preserved_outputs(root: str | os.PathLike, stage: str, on_line: Callable[[str], None]):
    """Back up ``stage``'s uncached outputs, run the body, restore everything if it fails."""
    root = Path(root)
    backup = _backup_dir(root, stage)
    if backup.exists():  # left by a runner that died mid-stage: undo that first
        restore_outputs(root, stage, on_line)
    saved = {}
    for path, cached in stage_outputs(root, stage):
        if not cached and (root / path).exists():
            _link_tree(root / path, backup / "files" / path)
            saved[path] = True
    backup.mkdir(parents=True, exist_ok=True)
    atomic_write_json(backup / "outs.json", saved)  # last: marks the backup complete
    try:
        yield
    except BaseException as e:
        # A refused gate or a failed validation exits 1 after writing its verdict: putting the
        # previous (passing) gate.json back would hide why the run stopped. Killed, crashed or
        # timed-out stages get everything back.
        restore_outputs(root, stage, on_line, keep_reports=isinstance(e, StageFailed) and e.check_failed)
        raise
    shutil.rmtree(backup, ignore_errors=True)
