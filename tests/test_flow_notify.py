"""Notifications and the policy diff of the reinternalize flow, against a local HTTP receiver.

Issue 15: a refused gate, a failed stage and a promotion must be announced (a Prefect
notification block — plain webhook URL or a saved block — configured in params.yaml), the
message naming the run, the stage and the failed gate checks, without credentials; and a run
triggered by a policy edit puts *what* changed and *how many labels it moved* into its summary.
One ephemeral Prefect API for the module; the stages are tiny python commands plus the real
``trimpi gate`` and ``trimpi promote``.
"""
from __future__ import annotations

import http.server
import json
import threading

import pytest

from pipeline.data.records import Record, write_records

SECRET = "s3cr3t-Value-That-Must-Not-Leak"
DVC_YAML = """stages:
  generate:
    cmd: python -c "import os; os.makedirs('data',exist_ok=True); open('data/d.txt','w').write('d')"
    deps: [policies]
    outs: [data]
  check:
    # prints a credential and fails when params say so: the announcement must not carry it
    cmd: >-
      python -c "import os,sys,yaml; p=yaml.safe_load(open('params.yaml'))['check'];
      print('connecting with AWS_SECRET_ACCESS_KEY=' + os.environ.get('AWS_SECRET_ACCESS_KEY','') + ' token=abcdef123456');
      os.makedirs('metrics',exist_ok=True); open('metrics/check.json','w').write('{}'); sys.exit(2 if p['fail'] else 0)"
    deps: [data]
    params: [check.fail]
    metrics: [metrics/check.json: {cache: false}]
  train:
    cmd: python -c "import os; os.makedirs('models/m',exist_ok=True); open('models/m/model.safetensors','wb').write(open('data/d.txt','rb').read())"
    deps: [data, metrics/check.json]
    outs: [models/m]
  evaluate:
    cmd: >-
      python -c "import os,json,yaml; s=yaml.safe_load(open('params.yaml'))['evaluate']['score'];
      os.makedirs('metrics',exist_ok=True); json.dump(dict(main=dict(score=s), test_sets=dict(t='h1')), open('metrics/eval.json','w'))"
    deps: [models/m]
    params: [evaluate.score]
    metrics: [metrics/eval.json: {cache: false}]
  verdict:
    cmd: trimpi gate --metrics metrics/eval.json --out metrics/gate.json
    always_changed: true
    deps: [metrics/eval.json]
    metrics: [metrics/gate.json: {cache: false}]
  register:
    cmd: trimpi promote --model models/m --metrics metrics/eval.json --gate metrics/gate.json --policies policies --out metrics/promote.json
    deps: [models/m, metrics/gate.json]
    outs: [metrics/promote.json: {cache: false}]
"""
PARAMS = """base: {{seed: 0}}
check: {{fail: {fail}}}
evaluate: {{score: {score}}}
gate: {{min_main_accuracy: 25.0, max_regression: 5.0, regression_metrics: [main.score]}}
registry: {{root: registry, model: tst}}
orchestrate: {{retries: 0, watch_params: [base.seed], diff_data: [scenes]}}
notify:
  webhooks: ["http://127.0.0.1:{port}/hook", "http://127.0.0.1:{dead}/nobody-listens"]
  blocks: {blocks}
"""


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        n = int(self.headers.get("Content-Length", 0))
        Receiver.got.append({"path": self.path, "json": json.loads(self.rfile.read(n) or b"null")})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def receiver():
    Receiver.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _scene_records(root):
    """Records with scene graphs, as data/clevr holds them: what the policy diff re-labels."""
    def rec(i, shape):
        return Record(id=f"L1-Tistu/train/{i}", task="clevr", split="train", query="q", answer="?",
                      policy="L1-Tistu", meta={"scene": {"objects": [
                          {"shape": shape, "color": "red", "size": "small", "material": "metal"}]}})

    (root / "scenes").mkdir()
    write_records(root / "scenes" / "train.jsonl", [rec(0, "cube"), rec(1, "sphere"), rec(2, "cylinder")])


def _run_name(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def test_promotion_refused_gate_and_failed_stage_are_announced_and_the_summary_shows_the_policy_diff(
        dvc_repo, prefect_home, receiver, monkeypatch):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from conftest import free_port
    from flows.reinternalize import reinternalize

    port, dead = receiver, free_port()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    root = dvc_repo(DVC_YAML, PARAMS.format(fail="false", score=50.0, port=port, dead=dead, blocks="[]"), remote=None)
    _scene_records(root)

    def by_event(kind):
        return [g["json"] for g in Receiver.got if g["path"] == "/hook" and g["json"].get("event") == kind]

    # 1. first run: promoted v1 (and a receiver that is down does not fail the run)
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    (msg,) = by_event("promoted")
    name = _run_name(state)
    assert msg["run"] == name and msg["stage"] == "register" and msg["production"] == "v1"
    assert f"Run {name} of reinternalize" in msg["text"] and "Production is now v1 (was none)" in msg["text"]
    assert "main accuracy (main.score): 50.0, needs >= 25.0" in msg["text"]

    # 2. a policy edit whose model scores worse: the gate refuses, the message lists the failed checks
    pol = root / "policies" / "clevr" / "L1-Tistu.yaml"
    pol.write_text(pol.read_text().replace("value: cube", "value: sphere"))
    (root / "params.yaml").write_text(PARAMS.format(fail="false", score=10.0, port=port, dead=dead, blocks="[]"))
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_failed()
    (msg,) = by_event("gate_refused")
    name = _run_name(state)
    assert msg["run"] == name and msg["stage"] == "verdict" and msg["production"] == "v1"
    assert {c["metric"] for c in msg["failed_checks"]} == {"main.score"} and len(msg["failed_checks"]) == 2
    text = msg["text"]
    assert f"Run {name} of reinternalize" in text and "Stage `verdict` refused the candidate model" in text
    assert "main accuracy (main.score): 10.0, needs >= 25.0" in text
    assert "no regression vs production v1: main.score: 40.0, needs <= 5.0" in text
    assert "production stays v1" in text and "L1-Tistu changed" in text
    assert "L1-Tistu labels flipped on scenes: train 2/3" in text
    assert not by_event("stage_failed")  # a refusal is announced as such, once
    summary = (root / "reports" / "reinternalize.md").read_text()
    assert "## Policy changes (production v1 -> this run)" in summary
    assert "condition 1: shape=cube -> shape=sphere" in summary
    assert "| L1-Tistu | `scenes` | train | 3 | 2 of 3 (66.7 %) | 0 |" in summary
    assert summary.index("## Policy changes") < summary.index("## Gate: FAILED")

    # 3. a failing stage, announced to the webhook and to a saved Prefect block (its URL lives in Prefect)
    CustomWebhookNotificationBlock(name="alerts", url=f"http://127.0.0.1:{port}/from-block",
                                   json_data={"text": "{{subject}}\n{{body}}"}).save("trimpi-alerts", overwrite=True)
    (root / "params.yaml").write_text(PARAMS.format(fail="true", score=50.0, port=port, dead=dead,
                                                    blocks='["custom-webhook/trimpi-alerts"]'))
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_failed()
    (msg,) = by_event("stage_failed")
    assert msg["run"] == _run_name(state) and msg["stage"] == "check"
    assert "Stage `check` FAILED (not retried)" in msg["text"]
    assert "Not run (need the failed stage): train, evaluate, verdict, register" in msg["text"]
    (via_block,) = [g["json"] for g in Receiver.got if g["path"] == "/from-block"]
    assert "Stage `check` FAILED" in via_block["text"]
    everything = json.dumps(Receiver.got)
    assert SECRET not in everything and "abcdef123456" not in everything
    assert "connecting with AWS_SECRET_ACCESS_KEY=*** token=***" in msg["text"]
    assert "exited with 2" in msg["text"] and "python -c" not in msg["text"]  # output lines, not the command
    # the verdict on file is from run 2: the summary must not present it as this run's
    assert "## Gate: not run this time (the verdict on file, from an earlier run: FAILED)" in \
        (root / "reports" / "reinternalize.md").read_text()


def test_notify_config_errors_name_the_field(tmp_path):
    from flows.notify import redact
    from flows.reinternalize import notify_config
    from pipeline.io import InputError

    p = tmp_path / "params.yaml"
    for text, msg in [("notify: {events: [gate_failed]}", "notify.events: expected events among gate_refused"),
                      ("notify: {webhooks: [hooks.internal/x]}", "notify.webhooks[0]: expected an http(s) URL"),
                      ("notify: {blocks: [trimpi-alerts]}", "notify.blocks[0]: expected a saved block as "
                                                             "<block-type-slug>/<name>")]:
        p.write_text(text + "\n")
        with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            notify_config(str(p))
    p.write_text("base: {seed: 0}\n")
    assert notify_config(str(p)).events == ["gate_refused", "stage_failed", "promoted"]  # no section: defaults
    assert redact("s3://user:pa55word@host/x password: hunter22 ok") == "s3://***@host/x password: *** ok"
