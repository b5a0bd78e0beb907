"""The ``reinternalize`` Prefect flow: policy-change check, pull, every DVC stage, push, report.

Prefect wraps DVC, it does not duplicate it: ``dvc.yaml`` declares the stages and this flow
runs each as its own task (``dvc repro --single-item <stage>`` in dependency order; see
``flows/runner.py``), so retries, logs, timings and a metrics artifact exist per stage, while
DVC still skips whatever did not change. Whatever ``dvc.yaml`` declares is what runs: the flow
knows no stage by name except for reading ``metrics/gate.json``, ``metrics/eval.json`` and
``metrics/promote.json`` into the final report.

Steps: (a) policy-change check against the production model's registry card — unchanged means
the run completes at once as "skipped: policies unchanged" (``force`` overrides); (b) ``dvc
pull`` from the remote when one is configured (unreachable after retries: warn and build
locally); (c) the stages; (d) ``dvc push``; (e) a markdown summary (gate verdict, metrics vs
the production model as it was before the run, registry entry), written to
``orchestrate.summary`` and as a Prefect artifact. A failed stage stops the stages that depend on it,
but push and the summary still happen (what was built is kept), then the run fails.

Unlike library modules this one imports Prefect at the top: a deployment entrypoint needs the
flow object at module level. The CLI imports it only inside ``trimpi run``/``serve``, after it
has set Prefect's environment (home, analytics off, startup timeout).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import runner
from flows.change import ChangeCheck, check
from flows.runner import OrchestrateConfig, StageFailed
from pipeline.config import load_section, read_params
from pipeline.lock import WorkspaceLock

GATE, EVAL, PROMOTE = "metrics/gate.json", "metrics/eval.json", "metrics/promote.json"


def _key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _retry_transient(task_, task_run, state) -> bool:
    """Retry only failures the runner classified as transient (see runner.classify)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - the state's exception itself
        exc = e
    return isinstance(exc, StageFailed) and exc.transient


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _metrics_table(metrics: dict, limit: int = 40) -> list[str]:
    from pipeline.evaluate.metrics import flatten

    rows = [(k, v) for k, v in flatten(metrics).items() if isinstance(v, (int, float, str, bool)) or v is None]
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows[:limit]]
    return lines + ([f"| ... | {len(rows) - limit} more |"] if len(rows) > limit else [])


# ----------------------------------------------------------------------------- tasks


@task(name="policy-change-check")
def policy_change_check(root: str, params_file: str, watch: list[str]) -> ChangeCheck:
    result = check(root, read_params(params_file) if Path(params_file).exists() else {}, params_file, watch)
    get_run_logger().info(("changed: " if result.changed else "unchanged: ") + result.reason)
    return result


@task(name="dvc-pull", retry_condition_fn=_retry_transient)
def dvc_pull(root: str, remote: str) -> None:
    # --allow-missing: a fresh remote, or outputs never pushed, are normal, not errors
    runner.dvc(["pull", "--allow-missing", "-r", remote], root, get_run_logger().info)


@task(name="dvc-push", retry_condition_fn=_retry_transient)
def dvc_push(root: str, remote: str) -> None:
    runner.dvc(["push", "-r", remote], root, get_run_logger().info)


@task(name="stage", retry_condition_fn=_retry_transient)
def run_stage(root: str, stage: str, timeout: float) -> dict:
    # the logger is bound here: the output is read on another thread, outside the run context
    res = runner.repro_stage(root, stage, get_run_logger().info, timeout=timeout)
    metrics = runner.stage_metrics(root, stage)
    md = [f"# Stage `{stage}`: {res.status} in {res.seconds:.1f} s", ""]
    for path, m in metrics.items():
        md += [f"## `{path}`", ""] + (_metrics_table(m) if isinstance(m, dict) else [f"`{m}`"]) + [""]
    if not metrics:
        md.append("(this stage declares no metrics)")
    create_markdown_artifact(key=f"stage-{_key(stage)}", markdown="\n".join(md),
                             description=f"DVC stage {stage}: {res.status}")
    return {"stage": stage, "status": res.status, "seconds": round(res.seconds, 1)}


# ----------------------------------------------------------------------------- the report


def summary_markdown(root: Path, status: str, chk: ChangeCheck, stages: list[dict], notes: list[str]) -> str:
    from pipeline.io import read_json

    def load(rel):
        p = root / rel
        try:
            return read_json(p) if p.exists() else None
        except Exception:  # noqa: BLE001 - a broken file is reported, not fatal to the report
            return None

    prod = chk.production
    md = [f"# reinternalize: {status}", "", f"Policy-change check: {chk.reason}.", ""]
    md += [f"* {n}" for n in notes] + ([""] if notes else [])
    if stages:
        md += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
        md += [f"| {s['stage']} | {s['status']} | {_fmt(s.get('seconds'))} |" for s in stages] + [""]
    gate = load(GATE)
    if gate is not None and status != "skipped":
        md += [f"## Gate: {'PASSED' if gate.get('passed') else 'FAILED'}", "",
               "| check | value | threshold | status |", "|---|---|---|---|"]
        md += [f"| {c.get('name')} | {_fmt(c.get('value'))} | {c.get('op', '')} {c.get('threshold')} | "
               f"{c.get('status')} |" for c in gate.get("checks", [])] + [""]
    ev = load(EVAL)
    if ev is not None and status != "skipped":
        from pipeline.evaluate.metrics import flatten

        mine = flatten(ev)
        theirs = flatten(prod["metrics"]) if prod else {}
        label = f"production {prod['version']}" if prod else "production (none)"
        md += ["## Metrics vs production (before this run)", "", f"| metric | this run | {label} | delta |",
               "|---|---|---|---|"]
        for k, v in list(mine.items())[:60]:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            b = theirs.get(k)
            delta = _fmt(v - b) if isinstance(b, (int, float)) and not isinstance(b, bool) else "-"
            md.append(f"| {k} | {_fmt(v)} | {_fmt(b)} | {delta} |")
        md.append("")
    promoted = load(PROMOTE) if status != "skipped" else None
    md += ["## Registry", ""]
    if promoted and any(s["stage"] == "promote" and s["status"] == "ran" for s in stages):
        md.append(f"Production is now **{promoted.get('version')}** "
                  f"({'newly promoted' if promoted.get('changed') else 'unchanged'}): {promoted.get('url')}")
    elif prod:
        md.append(f"Production stays **{prod['version']}**: {prod.get('url')}")
    else:
        md.append("No model in production yet.")
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- the flow


def _run_name() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.name or flow_run.id or "")


@flow(name="reinternalize", log_prints=True)
def reinternalize(workspace: str = ".", params: str = "params.yaml", force: bool = False,
                  stages: list[str] | None = None, remote: str | None = None,
                  pull: bool | None = None, push: bool | None = None, overrides: list[str] | None = None) -> dict:
    """Re-internalize the policies when they changed: check, pull, run the DVC stages, push, report.

    ``stages`` restricts the run to those stages (in graph order); ``remote``/``pull``/``push``
    override the ``orchestrate`` params section for this run, as do ``overrides`` (``key=value``).
    """
    from pipeline.io import atomic_write_text

    log = get_run_logger()
    root = Path(workspace).resolve()
    params_file = str(root / params)
    cfg = load_section(OrchestrateConfig, "orchestrate", params_file, overrides)
    summary_path = root / cfg.summary
    # `trimpi run` already holds the lock (re-entrant: no wait here, it applied lock_wait_s itself);
    # a run Prefect started waits its turn, and checks the policies only once it has the lock, so
    # a run queued behind one that promoted the same policies ends as "skipped".
    with WorkspaceLock(root, timeout=cfg.deployment_lock_wait_s, command=f"reinternalize flow run {_run_name()}",
                       on_wait=log.warning):
        chk = policy_change_check(str(root), params_file, cfg.watch_params)
        if not chk.changed and not force:
            md = summary_markdown(root, "skipped", chk, [], ["Nothing to do: the production model already "
                                                             "reflects these policies (use force to run anyway)."])
            atomic_write_text(summary_path, md)
            create_markdown_artifact(key="reinternalize-summary", markdown=md, description="skipped")
            log.info(f"skipped: {chk.reason}")
            return {"status": "skipped", "reason": chk.reason, "summary": str(summary_path), "stages": []}

        notes: list[str] = [] if chk.changed else ["Run forced although nothing changed."]
        retry = dict(retries=cfg.retries,
                     retry_delay_seconds=[cfg.retry_delay_s * 2 ** i for i in range(cfg.retries)] or 0)
        remote_name = runner.default_remote(root, remote if remote is not None else cfg.remote)
        if remote_name and (cfg.pull if pull is None else pull):
            try:
                dvc_pull.with_options(**retry)(str(root), remote_name)
            except StageFailed as e:
                notes.append(f"`dvc pull -r {remote_name}` failed ({e.code}); built locally instead")
                log.warning(f"dvc pull failed, continuing with the local cache: {e}")
        elif not remote_name:
            notes.append("No DVC remote configured: nothing pulled or pushed.")

        order = runner.stage_order(root, stages)
        log.info(f"{len(order)} stage(s): {' -> '.join(order) or '(dvc.yaml declares none yet)'}")
        done: list[dict] = []
        failure: Exception | None = None
        # A failed stage blocks only what depends on it: a refused gate stops promote, not the
        # ablations, the report or the perception base that do not need the gate.
        _, graph = runner.stage_graph(root)
        blocked: dict[str, str] = {}
        for name in order:
            if name in blocked:
                done.append({"stage": name, "status": f"not run (needs failed stage {blocked[name]})"})
                continue
            timeout = float(cfg.stage_timeouts.get(name, cfg.stage_timeout_s))
            try:
                done.append(run_stage.with_options(name=f"stage {name}", task_run_name=name, **retry)(
                    str(root), name, timeout))
            except StageFailed as e:
                failure = failure or e
                done.append({"stage": name, "status": "FAILED" + ("" if e.transient else " (not retried)")})
                for s in runner.downstream(graph, name):
                    blocked.setdefault(s, name)

        if remote_name and (cfg.push if push is None else push):
            try:
                dvc_push.with_options(**retry)(str(root), remote_name)
                notes.append(f"Pushed data and models to DVC remote `{remote_name}`.")
            except StageFailed as e:
                failure = failure or e
                notes.append(f"`dvc push -r {remote_name}` FAILED: the remote does not have this run's outputs")

        status = "failed" if failure else "completed"
        md = summary_markdown(root, status, chk, done, notes)
        atomic_write_text(summary_path, md)
        create_markdown_artifact(key="reinternalize-summary", markdown=md, description=status)
        result = {"status": status, "reason": chk.reason, "summary": str(summary_path), "stages": done,
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if failure is not None:
            raise failure
        return result
