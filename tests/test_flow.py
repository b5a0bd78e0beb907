"""The reinternalize flow end to end on a tiny fake pipeline, in ephemeral Prefect mode.

One Prefect process for the whole module (a fresh home costs ~30 s of migrations), so each
test combines several assertions. Stages are small python commands; the last two are the real
``trimpi promote`` into a local registry, so the skip path reads a real production card.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from pipeline.io import read_json


# `attempts/` is not a DVC output: it counts how often each command really ran.
COUNT = "import os,sys; os.makedirs('attempts',exist_ok=True); open(f'attempts/{sys.argv[1]}','a').write('x'); "
DVC_YAML = f"""stages:
  generate:
    cmd: python -c "{COUNT}import os; os.makedirs('data',exist_ok=True); open('data/d.txt','w').write('d')" generate
    deps: [policies]
    params: [base.seed]
    outs: [data]
  validate:
    cmd: python -c "{COUNT}import os,sys,yaml; ok=yaml.safe_load(open('params.yaml'))['validate']['ok']; os.makedirs('metrics',exist_ok=True); open('metrics/validate.json','w').write('{{}}'); sys.exit(0 if ok else 1)" validate
    deps: [data]
    params: [validate.ok]
    metrics:
      - metrics/validate.json: {{cache: false}}
  train:
    # fails once with EX_TEMPFAIL (75, "try again"), then succeeds: a transient failure
    cmd: python -c "{COUNT}import os,sys,json; n=len(open('attempts/train').read()); sys.exit(75) if n==1 else None; os.makedirs('models/m',exist_ok=True); open('models/m/model.safetensors','wb').write(b'w'); json.dump(dict(loss=0.5),open('models/m/metrics.json','w'))" train
    deps: [data, metrics/validate.json]   # as in the real graph: train only on validated data
    outs: [models/m]
  evaluate:
    cmd: python -c "{COUNT}import os,json; os.makedirs('metrics',exist_ok=True); json.dump(dict(main=dict(score=88.0)),open('metrics/eval.json','w')); json.dump(dict(passed=True,checks=[]),open('metrics/gate.json','w'))" evaluate
    deps: [models/m]
    metrics:
      - metrics/eval.json: {{cache: false}}
      - metrics/gate.json: {{cache: false}}
  promote:
    cmd: trimpi promote --model models/m --metrics metrics/eval.json --gate metrics/gate.json --policies policies --out metrics/promote.json
    deps: [models/m, metrics/gate.json]
    outs: [metrics/promote.json: {{cache: false}}]
"""
PARAMS = """base: {seed: 0}
validate: {ok: true}
registry: {root: registry, model: tst}
orchestrate: {retries: 2, retry_delay_s: 0.2, watch_params: [base.seed]}
"""


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        arts = client.read_artifacts()
    return {r.name: r for r in runs}, {a.key for a in arts}


def _bench_pipeline():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _attempts(root, stage):
    p = root / "attempts" / stage
    return len(p.read_text()) if p.exists() else 0


def test_run_retries_transient_then_skips_unchanged_then_fails_validation_without_retry(dvc_repo, prefect_home):
    from flows.reinternalize import reinternalize

    root = dvc_repo(DVC_YAML, PARAMS)

    # 1. first run: everything runs, the transient train failure is retried, the model is promoted
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [s["stage"] for s in result["stages"]] == ["generate", "validate", "train", "evaluate", "promote"]
    assert all(s["status"] == "ran" for s in result["stages"])
    tasks, artifacts = _task_runs(state.state_details.flow_run_id)
    stage_tasks = {n: t for n, t in tasks.items() if n in {"generate", "validate", "train", "evaluate", "promote"}}
    assert len(stage_tasks) == 5 and all(t.state.is_completed() for t in stage_tasks.values())
    assert stage_tasks["train"].run_count == 2 and _attempts(root, "train") == 2
    assert stage_tasks["generate"].run_count == 1
    assert {"stage-evaluate", "stage-train", "reinternalize-summary"} <= artifacts
    assert any(n.startswith("dvc-push") and t.state.is_completed() for n, t in tasks.items())
    assert any((root.parent / "ws-remote").rglob("*")), "dvc push left the local remote empty"
    summary = (root / "reports" / "reinternalize.md").read_text()
    assert "Production is now **v1**" in summary and "| main.score | 88 |" in summary
    # the run's record, next to the summary, is what scripts read (bench_pipeline's per-stage times)
    assert read_json(root / "reports" / "reinternalize.json") == json.loads(json.dumps(result))
    assert [s["stage"] for s in _bench_pipeline().flow_stages(root)] == [s["stage"] for s in result["stages"]]

    # 2. nothing changed: skipped quickly, no stage command runs
    t0 = time.monotonic()
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_completed() and state.result()["status"] == "skipped"
    assert "policies unchanged since production v1" in state.result()["reason"]
    assert time.monotonic() - t0 < 30
    assert _attempts(root, "generate") == 1

    # 3. a validation failure (exit 1) fails the run: no retry, the stages that need it not run
    (root / "params.yaml").write_text(PARAMS.replace("ok: true", "ok: false"))
    state = reinternalize(workspace=str(root), force=True, return_state=True)
    assert state.is_failed()
    assert _attempts(root, "validate") == 2  # once in run 1, once here: never retried
    tasks, _ = _task_runs(state.state_details.flow_run_id)
    assert tasks["validate"].state.is_failed() and tasks["validate"].run_count == 1
    assert "train" not in tasks  # nothing that depends on the failed stage ran
    summary = (root / "reports" / "reinternalize.md").read_text()
    assert "# reinternalize: failed" in summary and "| validate | FAILED (not retried) |" in summary
    record = read_json(root / "reports" / "reinternalize.json")
    assert record["status"] == "failed" and {"stage": "validate", "status": "FAILED (not retried)"} in record["stages"]
    assert "| train | not run (needs failed stage validate) |" in summary and "Production stays **v1**" in summary
