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
locally); (c) when the policies changed, the policy diff against production's (what changed,
how many labels of ``orchestrate.diff_data`` flip: ``pipeline/policy/diff.py``); (d) the
stages; (e) ``dvc push``; (f) a markdown summary (policy diff, gate verdict, metrics vs the
production model as it was before the run, registry entry), written to ``orchestrate.summary``
and as a Prefect artifact, and the run's record (status, reason, every stage's status and
seconds) as JSON next to it (``runner.record_path``) for scripts and the console; (g)
notifications of a refused gate / failed stage / promotion (``params.yaml: notify``,
``flows/notify.py``). A failed stage stops the stages that depend on
it, but push, the summary and the notifications still happen, then the run fails.

The whole run holds the workspace lock; a run Prefect started while another holds it waits
(``orchestrate.deployment_lock_wait_s``) instead of failing.

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
from flows.notify import EVENTS, NotifyConfig, build_events, deliver
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
    from pipeline.config import flatten

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


def summary_markdown(root: Path, status: str, chk: ChangeCheck, stages: list[dict], notes: list[str],
                     policy_diff_md: str = "", promoted: dict | None = None, gate_stage: str | None = None) -> str:
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
    if policy_diff_md:
        md += [policy_diff_md.rstrip(), ""]
    if stages:
        md += ["## Stages", ""] + runner.stage_table(stages, total=False) + [""]
    gate = load(GATE)
    if gate is not None and status != "skipped":
        verdict = "PASSED" if gate.get("passed") else "FAILED"
        if any(s["stage"] == gate_stage and str(s.get("status", "")).startswith("not run") for s in stages):
            verdict = f"not run this time (the verdict on file, from an earlier run: {verdict})"
        md += [f"## Gate: {verdict}", "",
               "| check | value | threshold | status |", "|---|---|---|---|"]
        md += [f"| {c.get('name')} | {_fmt(c.get('value'))} | {c.get('op', '')} {c.get('threshold')} | "
               f"{c.get('status')} |" for c in gate.get("checks", [])] + [""]
    ev = load(EVAL)
    if ev is not None and status != "skipped":
        from pipeline.config import flatten

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
    md += ["## Registry", ""]
    if promoted:
        md.append(f"Production is now **{promoted.get('version')}** "
                  f"({'newly promoted' if promoted.get('changed') else 'unchanged'}): {promoted.get('url')}")
    elif prod:
        md.append(f"Production stays **{prod['version']}**: {prod.get('url')}")
    else:
        md.append("No model in production yet.")
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- the flow




@flow(name="reinternalize", log_prints=True)
def reinternalize(workspace: str = ".", params: str = "params.yaml", force: bool = False,
                  stages: list[str] | None = None, remote: str | None = None,
                  pull: bool | None = None, push: bool | None = None, overrides: list[str] | None = None) -> dict:
    """Re-internalize the policies when they changed: check, pull, run the DVC stages, push, report.

    ``stages`` restricts the run to those stages (in graph order); ``remote``/``pull``/``push``
    override the ``orchestrate`` params section for this run, as do ``overrides`` (``key=value``).
    """
    log = get_run_logger()
    root = Path(workspace).resolve()
    params_file = str(root / params)
    cfg = load_section(OrchestrateConfig, "orchestrate", params_file, overrides)
    ncfg = notify_config(params_file)
    run = {"workspace": str(root), **_run_info()}
    try:
        # `trimpi run` already holds the lock (re-entrant: no wait here, it applied lock_wait_s itself);
        # a run Prefect started waits its turn, and checks the policies only once it has the lock, so
        # a run queued behind one that promoted the same policies ends as "skipped".
        with WorkspaceLock(root, timeout=cfg.deployment_lock_wait_s, command=f"reinternalize flow run {run['name']}",
                           on_wait=log.warning):
            return _reinternalize(root, params_file, cfg, ncfg, run, force, stages, remote, pull, push)
    except _Announced as e:
        raise e.error from None
    except Exception as e:
        # failed outside any stage (lock wait ran out, bad dvc.yaml, registry unreadable): still announced
        deliver(build_events(run=run, status="failed", reason="(the run failed before its stages finished)",
                             stages=[], failures={"flow": e}, gate_stage=None, gate=None, promoted=None,
                             production_before=None, diff_lines=[], notes=[]), ncfg, log.warning, log.info)
        raise


class _Announced(Exception):
    """Wraps a failure whose events were already delivered, so the outer handler does not announce it twice."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def notify_config(params_file: str) -> NotifyConfig:
    from pipeline.io import input_error

    ncfg = load_section(NotifyConfig, "notify", params_file)
    unknown = [e for e in ncfg.events if e not in EVENTS]
    if unknown:
        raise input_error(params_file, "notify.events", "events among " + ", ".join(EVENTS), unknown[0])
    for i, url in enumerate(ncfg.webhooks):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise input_error(params_file, f"notify.webhooks[{i}]", "an http(s) URL", url)
    for i, slug in enumerate(ncfg.blocks):
        if not isinstance(slug, str) or slug.count("/") != 1:
            raise input_error(params_file, f"notify.blocks[{i}]", "a saved block as <block-type-slug>/<name>, "
                              "e.g. slack-webhook/trimpi-alerts", slug)
    return ncfg


def _run_info() -> dict:
    from prefect.runtime import deployment, flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    # an ephemeral run has no UI to link to (its temporary server is gone when the message is read)
    url = flow_run.ui_url if PREFECT_API_URL.value() and PREFECT_UI_URL.value() else None
    return {"name": str(flow_run.name or ""), "id": str(flow_run.id or ""), "deployment": deployment.name,
            "url": url}


@task(name="policy-diff")
def policy_diff(root: str, production: dict, data_dirs: list[str]) -> dict:
    """What changed since the production model's policies, and how many labels that moves (pipeline/policy/diff.py)."""
    import os

    from flows.change import production_policies
    from pipeline.policy import load_policies
    from pipeline.policy.diff import diff_policies, label_impact, render_markdown

    base = Path(root)
    old, missing = production_policies(production, base)
    new = {n: p for n, p in load_policies(base / "policies").items() if n not in missing}
    changes = diff_policies(old, new)
    dirs = [str(base / d) for d in data_dirs if (base / d).is_dir()]
    impacts = label_impact(changes, dirs) if dirs else None
    for imp in impacts or []:
        imp.dataset = os.path.relpath(imp.dataset, base)
    md = render_markdown(changes, impacts, f"production {production['version']}", "this run")
    if missing:
        md += (f"\nProduction {production['version']}'s card does not record the text of {', '.join(missing)} "
               "(and git at its revision has no matching file): not compared.\n")
    if impacts is None:
        md += f"\nNo dataset found at {', '.join(data_dirs) or '(orchestrate.diff_data is empty)'}: label flips not counted.\n"
    short = [f"{c.name} {c.status}" + (f" ({len(c.changes)} change{'s' * (len(c.changes) != 1)})" if c.changes else "")
             for c in changes if c.status != "unchanged"]
    short += [f"{i.policy} labels flipped on {i.dataset}: " + ", ".join(
        f"{s} {i.flipped.get(s, 0)}/{n}" for s, n in i.records.items()) for i in impacts or []]
    get_run_logger().info("policy diff: " + ("; ".join(short) or "no policy differs"))
    return {"markdown": md, "short": short}


def _reinternalize(root: Path, params_file: str, cfg: OrchestrateConfig, ncfg: NotifyConfig, run: dict, force: bool,
                   stages, remote, pull, push) -> dict:
    from pipeline.io import atomic_write_json, atomic_write_text, read_json

    log = get_run_logger()
    summary_path = root / cfg.summary
    chk = policy_change_check(str(root), params_file, cfg.watch_params)
    prod_before = chk.production["version"] if chk.production else None
    if not chk.changed and not force:
        md = summary_markdown(root, "skipped", chk, [], ["Nothing to do: the production model already "
                                                         "reflects these policies (use force to run anyway)."])
        atomic_write_text(summary_path, md)
        create_markdown_artifact(key="reinternalize-summary", markdown=md, description="skipped")
        result = {"status": "skipped", "reason": chk.reason, "summary": str(summary_path), "stages": [],
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(runner.record_path(summary_path), result)
        log.info(f"skipped: {chk.reason}")
        deliver(build_events(run=run, status="skipped", reason=chk.reason, stages=[], failures={}, gate_stage=None,
                             gate=None, promoted=None, production_before=prod_before, diff_lines=[], notes=[]),
                ncfg, log.warning, log.info)
        return result

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

    # What the policy edit means and how much data it moves, computed on the data as it is
    # before generate re-labels it: the reviewer sees it next to the gate verdict.
    diff = {"markdown": "", "short": []}
    if chk.policies_changed and chk.production:
        try:
            diff = policy_diff(str(root), chk.production, list(cfg.diff_data))
        except Exception as e:  # noqa: BLE001 - the diff informs; it must not stop a retraining
            notes.append(f"Policy diff not available: {type(e).__name__}: {e}")

    order = runner.stage_order(root, stages)
    log.info(f"{len(order)} stage(s): {' -> '.join(order) or '(dvc.yaml declares none yet)'}")
    done: list[dict] = []
    failures: dict[str, Exception] = {}
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
            failures[name] = e
            done.append({"stage": name, "status": "FAILED" + ("" if e.transient else " (not retried)")})
            for s in runner.downstream(graph, name):
                blocked.setdefault(s, name)

    if remote_name and (cfg.push if push is None else push):
        try:
            dvc_push.with_options(**retry)(str(root), remote_name)
            notes.append(f"Pushed data and models to DVC remote `{remote_name}`.")
        except StageFailed as e:
            failures["dvc-push"] = e
            notes.append(f"`dvc push -r {remote_name}` FAILED: the remote does not have this run's outputs")

    status = "failed" if failures else "completed"
    owners = runner.declared_by(root) if order else {}
    promote_stage = owners.get(PROMOTE)
    promoted = None
    if promote_stage and any(s["stage"] == promote_stage and s["status"] == "ran" for s in done) \
            and (root / PROMOTE).exists():
        promoted = {**read_json(root / PROMOTE), "stage": promote_stage}
    md = summary_markdown(root, status, chk, done, notes, diff["markdown"], promoted, owners.get(GATE))
    atomic_write_text(summary_path, md)
    create_markdown_artifact(key="reinternalize-summary", markdown=md, description=status)
    gate = None
    if (root / GATE).exists():
        try:
            gate = read_json(root / GATE)
        except Exception:  # noqa: BLE001 - a broken verdict file is reported as a failed stage anyway
            gate = None
    deliver(build_events(run=run, status=status, reason=chk.reason, stages=done, failures=failures,
                         gate_stage=owners.get(GATE), gate=gate, promoted=promoted, production_before=prod_before,
                         diff_lines=diff["short"], notes=notes), ncfg, log.warning, log.info)
    result = {"status": status, "reason": chk.reason, "summary": str(summary_path), "stages": done,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(runner.record_path(summary_path), result)
    if failures:
        raise _Announced(next(iter(failures.values())))
    return result
