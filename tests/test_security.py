"""Security hygiene (issue 8, item 4): credentials never written, model output never executed,
importers never read outside the dataset they import.

* Credentials: a promotion to S3 runs with distinctive AWS keys in the environment; afterwards
  every file written, every object in the bucket and all captured output are searched for them
  (the slow test does the same through the Prefect flow, including its artifacts and logs).
* Model output: hostile responses (tool calls whose arguments are Python, ``__import__``,
  attribute chains, YAML tags) go through the evaluation scorer and the RL reward with
  ``eval``/``exec``/``os.system``/``subprocess`` booby-trapped; they must score 0, not run.
* Paths: CLEVR scene files, GTA ``dataset.json``, user benchmarks, override specs and image
  references must not resolve outside their root (absolute paths, ``..``, symlinks out).

Already proven elsewhere (not repeated): GTA importer absolute/``..``/symlink refusal
(test_gta_data), CLEVR importer ``..``/absolute refusal (test_scenes), ``safe_eval`` on hostile
and huge expressions (test_gta_scoring), card scrubbing and secrets absent from the card and
storage errors (test_registry, test_storage), DVC config free of keys (test_s3).
"""
from __future__ import annotations

import base64
import builtins
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

# imported before any trap is set: defining dataclasses runs exec legitimately (at import time)
import pipeline.evaluate.gta_scoring  # noqa: F401
import pipeline.evaluate.suites  # noqa: F401
import pipeline.model.prompts  # noqa: F401
import pipeline.train.rl  # noqa: F401
from pipeline.cli import main
from pipeline.io import InputError

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "AKIATRIMPITESTQ7Z3XW"
SECRET_KEY = "tRiMpI/s3cr3t+NeverWrite9vWq2LxBz0Kp"
SESSION_TOKEN = "FwoGZXIvYXdzTRIMPISESSIONtoken0123456789"


def _forms(value: str) -> set[str]:
    """The ways a leaked value could appear: raw, URL-quoted, base64, JSON-escaped."""
    return {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
            base64.b64encode(value.encode()).decode(), json.dumps(value)[1:-1]}


NEEDLES = {f: name for name, v in (("access key", ACCESS_KEY), ("secret key", SECRET_KEY),
                                   ("session token", SESSION_TOKEN)) for f in _forms(v)}


def leaks(blob: bytes | str, where: str) -> list[str]:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    return [f"{NEEDLES[n]} in {where}" for n in NEEDLES if n in text]


def scan_tree(root: Path) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            found += leaks(p.read_bytes(), str(p))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 endpoint, with distinctive credentials in the environment only."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])]
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _workspace(root: Path, endpoint: str, bucket: str) -> Path:
    """policies, a dataset manifest, a model dir, metrics: what `trimpi gate` + `promote` read."""
    shutil.copytree(REPO / "policies" / "clevr", root / "policies" / "clevr")
    (root / "data").mkdir()
    (root / "data" / "manifest.json").write_text('{"images": 0}')
    model = root / "models" / "rl"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 32)
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (model / "metrics.json").write_text('{"steps": 3}')
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text(json.dumps({"main": {"score": 80.0}}))
    (root / "params.yaml").write_text(
        "base: {seed: 0}\n"
        f"registry: {{root: 's3://{bucket}/reg', model: tst, endpoint_url: '{endpoint}', retries: 2, backoff_s: 0.01}}\n"
        "gate: {min_main_accuracy: 10.0}\n")
    return root


# ----------------------------------------------------------------------------- credentials


def test_promote_to_s3_writes_no_credentials_anywhere(tmp_path, s3, capsys, caplog, monkeypatch):
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="sec")
    ws = _workspace(tmp_path / "ws", s3, "sec")
    monkeypatch.chdir(ws)
    p = ["--params", "params.yaml"]
    assert main(["gate", *p]) == 0
    assert main(["promote", *p, "--model", "models/rl", "--data", "data", "--policies", "policies"]) == 0
    assert main(["registry", "list", *p]) == 0
    assert main(["registry", "show", *p]) == 0
    # an error path too: an unreachable endpoint must be named without the keys that were tried
    assert main(["registry", "list", *p, "--set", f"endpoint_url=http://127.0.0.1:{_free_port()}"]) == 75
    out = capsys.readouterr()

    objects = bucket_objects(s3, "sec")
    assert {"reg/tst/v1/card.json", "reg/tst/v1/card.md", "reg/tst/v1/COMPLETE.json",
            "reg/tst/aliases/production.json"} <= set(objects)
    assert "production" in out.out and "failed after 2 attempts" in out.err   # the commands really ran
    found = scan_tree(tmp_path) + leaks(out.out, "stdout") + leaks(out.err, "stderr") + leaks(caplog.text, "logs")
    for key, blob in objects.items():
        found += leaks(blob, f"s3://sec/{key}")
    assert found == []


def test_credentials_written_into_the_endpoint_url_are_not_echoed(tmp_path, monkeypatch, capsys):
    """Keys belong in the AWS environment, but a user who pastes them into the endpoint URL must not
    see them again in an error message (or a CI log)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = f"http://{ACCESS_KEY}:{urllib.parse.quote(SECRET_KEY, safe='')}@127.0.0.1:{_free_port()}"
    params = tmp_path / "params.yaml"
    params.write_text(f"registry: {{root: 's3://b/p', model: m, endpoint_url: '{endpoint}', retries: 1}}\n")
    assert main(["registry", "list", "--params", str(params)]) == 75   # unreachable: transient
    err = capsys.readouterr().err
    assert "get failed after 1 attempts" in err and "http://<redacted>@127.0.0.1" in err
    assert leaks(err, "stderr") == []


@pytest.mark.slow
def test_reinternalize_flow_with_s3_registry_leaks_no_credentials(dvc_repo, prefect_home, s3, capsys):
    """The whole orchestration path: DVC stage logs streamed into Prefect, per-stage metric
    artifacts, the summary artifact, the Prefect database itself, the DVC remote, the registry."""
    import boto3

    from flows.reinternalize import reinternalize

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="flowsec")
    make = ("import os,json; os.makedirs('models/m',exist_ok=True); os.makedirs('metrics',exist_ok=True); "
            "open('models/m/model.safetensors','wb').write(b'w'); "
            "json.dump(dict(main=dict(score=90.0)),open('metrics/eval.json','w')); "
            "json.dump(dict(passed=True,checks=[]),open('metrics/gate.json','w')); print('trained')")
    dvc_yaml = f"""stages:
  train:
    cmd: python -c "{make}"
    deps: [policies]
    params: [base.seed]
    outs: [models/m]
    metrics:
      - metrics/eval.json: {{cache: false}}
      - metrics/gate.json: {{cache: false}}
  promote:
    cmd: trimpi promote --model models/m --metrics metrics/eval.json --gate metrics/gate.json --policies policies --out metrics/promote.json
    deps: [models/m, metrics/gate.json]
    outs: [metrics/promote.json: {{cache: false}}]
"""
    params = (f"base: {{seed: 0}}\nregistry: {{root: 's3://flowsec/reg', model: tst, endpoint_url: '{s3}'}}\n"
              "orchestrate: {retries: 0, watch_params: [base.seed]}\n")
    root = dvc_repo(dvc_yaml, params)
    state = reinternalize(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert [s["status"] for s in state.result()["stages"]] == ["ran", "ran"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = [a for a in client.read_artifacts() if a.flow_run_id == run_id]
        run = client.read_flow_run(run_id)
    log_text = "\n".join(lg.message for lg in logs)
    assert "trained" in log_text                                        # stage output did reach the logs
    assert {a.key for a in artifacts} >= {"stage-train", "stage-promote", "reinternalize-summary"}
    found = leaks(log_text, "flow logs") + leaks(json.dumps(run.parameters), "flow parameters")
    for a in artifacts:
        found += leaks(str(a.data), f"artifact {a.key}")
    found += scan_tree(root.parent) + scan_tree(Path(prefect_home))     # workspace, DVC remote, Prefect DB
    out = capsys.readouterr()
    found += leaks(out.out + out.err, "captured output")
    for key, blob in bucket_objects(s3, "flowsec").items():
        found += leaks(blob, f"s3://flowsec/{key}")
    assert found == []


@pytest.mark.slow
def test_dev_s3_server_keeps_the_keys_out_of_its_data_and_log(tmp_path, monkeypatch):
    from pipeline.registry import Registry
    from s3server import S3Server
    from pipeline.storage import open_storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with S3Server(data_dir=tmp_path / "s3", buckets=["sec"]) as server:
        ws = _workspace(tmp_path / "ws", server.endpoint, "sec")
        reg = Registry(open_storage("s3://sec/reg", endpoint_url=server.endpoint), "tst")
        reg.promote(ws / "models" / "rl", {"main": {"score": 80.0}}, {"passed": True, "checks": []}, {})
        assert reg.resolve("production") == "v1"
    assert (tmp_path / "s3" / "weed.log").exists()
    assert scan_tree(tmp_path) == []


@pytest.mark.slow
def test_make_s3_banner_does_not_echo_the_users_keys(tmp_path):
    import signal

    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "infra" / "s3server.py"), "--dir", str(tmp_path / "s3"), "--port",
                             str(_free_port()), "--bucket", "banner"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    banner = []
    try:
        for line in proc.stdout:
            banner.append(line)
            if "Ctrl-C to stop" in line:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    text = "".join(banner) + (rest or "")
    assert "S3 server (SeaweedFS) at http://127.0.0.1" in text      # the banner was printed
    assert leaks(text, "make s3 banner") == []


# ----------------------------------------------------------------------------- model output is data


# boxed answers a model could emit; SENTINEL is replaced by a path the payload would create if run
HOSTILE = [
    '{"name": "Calculator", "arguments": {"expression": "__import__(\'os\').system(\'touch SENTINEL\')"}}',
    '{"name": "Calculator", "arguments": {"expression": "().__class__.__base__.__subclasses__()"}}',
    '{"name": "Calculator", "arguments": {"expression": "(lambda: open(\'SENTINEL\', \'w\'))()"}}',
    '{"name": "__import__(\'os\').system(\'touch SENTINEL\')", "arguments": {}}',
    '{"name": "Calculator", "arguments": "{\'expression\': __import__(\'os\').system(\'touch SENTINEL\')}"}',
    '{"name": "Calculator", "arguments": {"expression": "!!python/object/apply:os.system [\'touch SENTINEL\']"}}',
    "{'name': 'Calculator', 'arguments': {'expression': __import__('os').system('touch SENTINEL')}}",
    "__import__('os').system('touch SENTINEL')",
    "{" * 5000,
    '{"name": "Calculator", "arguments": ' * 2000,
]

@pytest.fixture
def trapped(monkeypatch, tmp_path):
    """Booby-trap every way Python could run text: any call fails the test. Returns the sentinel path
    a payload would create if it ever ran (checked too, in case something runs it another way)."""
    calls = []

    def trap(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called on model output")
        return f

    real_compile = builtins.compile

    def compile_ast_only(src, filename, mode, flags=0, *a, **k):
        import ast

        if not flags & ast.PyCF_ONLY_AST:  # ast.parse (the safe evaluator's parser) only builds a tree
            return trap("compile")()
        return real_compile(src, filename, mode, flags, *a, **k)

    monkeypatch.setattr(builtins, "eval", trap("eval"))
    monkeypatch.setattr(builtins, "exec", trap("exec"))
    monkeypatch.setattr(builtins, "compile", compile_ast_only)
    monkeypatch.setattr(os, "system", trap("os.system"))
    monkeypatch.setattr(os, "popen", trap("os.popen"))
    monkeypatch.setattr(subprocess, "Popen", trap("subprocess.Popen"))
    sentinel = tmp_path / "PWNED"
    yield sentinel
    assert calls == [] and not sentinel.exists()


def _responses(sentinel: Path) -> list[str]:
    return [f"<think>call it</think>\n\\boxed{{{h.replace('SENTINEL', str(sentinel))}}}" for h in HOSTILE]


def test_gta_scorer_and_rl_reward_never_execute_model_output(trapped):
    from pipeline.data.records import Record
    from pipeline.evaluate.suites import score_rows
    from pipeline.train.rl import task_reward

    gold = json.dumps({"name": "Calculator", "arguments": {"expression": "2+3"}})
    rec = Record(id="g", task="gta", split="test", query="q", answer=gold, policy="GTAPolicy")
    hostile = _responses(trapped)
    good = "<think>add</think>\n\\boxed{" + json.dumps({"name": "Calculator", "arguments": {"expression": "3 + 2"}}) + "}"
    rows = score_rows([rec] * (len(hostile) + 1), hostile + [good], {}, "policy-free")
    assert [r["arg_score"] for r in rows[:len(hostile)]] == [0.0] * len(hostile)
    assert rows[-1]["correct"] is True                                     # equal by value, computed safely
    rewards = [task_reward(rec, t)[0] for t in hostile + [good]]
    assert max(rewards[:-1]) <= 0.5 and rewards[-1] == 1.0                # a right tool name alone is half


def test_clevr_exact_match_never_executes_model_output(trapped):
    from pipeline.data.records import Record
    from pipeline.evaluate.suites import score_rows
    from pipeline.train.rl import task_reward

    rec = Record(id="c", task="clevr", split="test", query="q", answer="Case 2", policy="L2-X")
    texts = _responses(trapped) + ["<think>x</think>\\boxed{Case 2}"]
    rows = score_rows([rec] * len(texts), texts, {}, "policy-free")
    assert [r["correct"] for r in rows] == [False] * (len(texts) - 1) + [True]
    assert [task_reward(rec, t)[0] for t in texts] == [0.0] * (len(texts) - 1) + [1.0]


def test_no_code_path_evaluates_text_or_loads_unsafe_formats():
    """Static guard: the library never calls eval/exec, unsafe YAML loaders, pickle or a shell."""
    import re

    banned = re.compile(r"(?<![\w.])(eval|exec)\(|yaml\.(load|unsafe_load|full_load)\(|Loader=yaml\.(Unsafe|Full)?Loader"
                        r"|\bpickle\.loads?\(|shell=True|os\.system\(")
    hits = []
    for d in ("pipeline", "flows", "validation"):
        for p in (REPO / d).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if banned.search(line.split("#")[0]):
                    hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == []


# ----------------------------------------------------------------------------- paths stay inside the root


def _outside_png(tmp_path: Path) -> Path:
    from PIL import Image

    p = tmp_path / "outside" / "secret.png"
    p.parent.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(p)
    return p


def test_clevr_importer_refuses_a_symlink_out_of_the_root(tmp_path):
    from pipeline.scenes import import_clevr

    root = tmp_path / "CLEVR_v1.0"
    shutil.copytree(REPO / "tests" / "fixtures" / "clevr" / "CLEVR_v1.0", root)
    scenes = json.loads((root / "scenes" / "CLEVR_val_scenes.json").read_text())
    name = scenes["scenes"][0]["image_filename"]
    img = root / "images" / "val" / name
    img.unlink()
    img.symlink_to(_outside_png(tmp_path))                 # the name is innocent, the file is not
    with pytest.raises(InputError, match=r"scenes\[0\]\.image_filename: expected an image path inside the dataset root"):
        import_clevr(root, "val")


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_user_benchmark_images_stay_in_their_folder(tmp_path, how):
    from pipeline.evaluate.probes import FileImages

    secret = _outside_png(tmp_path)
    bench = tmp_path / "bench"
    (bench / "img").mkdir(parents=True)
    ref = {"absolute": str(secret), "dotdot": "img/../../outside/secret.png", "symlink": "img/link.png"}[how]
    if how == "symlink":
        (bench / "img" / "link.png").symlink_to(secret)
    with pytest.raises(InputError, match="inside the benchmark folder"):
        FileImages(bench).open(ref)
    Path(bench / "img" / "ok.png").write_bytes(secret.read_bytes())
    assert FileImages(bench).open("img/ok.png").size == (4, 4)   # the legitimate form still works


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_override_suite_refuses_specs_outside_the_dataset(tmp_path, how):
    from pipeline.evaluate import suites as S
    from pipeline.data.records import open_dataset
    from pipeline.policy import RenderCache, load_policies

    d = tmp_path / "clevr"
    assert main(["generate", "clevr", "--params", str(REPO / "params.yaml"), "--policies", str(REPO / "policies/clevr"),
                 "--out", str(d), "--set", "train_per_policy=2", "--set", "cot_per_policy=1", "--set", "test_per_policy=2",
                 "--set", "override_per_policy=2", "--set", "override_count=1", "--set", "image_size=32"]) == 0
    rows = [json.loads(x) for x in (d / "override.jsonl").read_text().splitlines()]
    spec = d / rows[0]["meta"]["override_policy"]
    outside = tmp_path / "elsewhere" / spec.name
    outside.parent.mkdir()
    shutil.copy(spec, outside)                        # a valid spec, just not the dataset's own
    if how == "symlink":
        spec.unlink()
        spec.symlink_to(outside)
        ref = rows[0]["meta"]["override_policy"]
    else:
        ref = str(outside) if how == "absolute" else f"../elsewhere/{spec.name}"
    rows[0]["meta"]["override_policy"] = ref
    (d / "override.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Never(S.Runner):
        def __init__(self):
            self.model_dir, self.cfg, self.policies, self.render = "none", S.EvalConfig(), load_policies(REPO / "policies"), RenderCache()
            self.budgets = {}

        def respond(self, ds, recs, policies, desc):
            raise AssertionError("nothing may reach the model")

    ev = S.Evaluation(Never(), [open_dataset(d)], S.EvalConfig(), tmp_path / "preds")
    with pytest.raises(InputError, match=rf"override.jsonl: {rows[0]['id']}\.meta\.override_policy: expected a spec "
                                         "path inside the dataset"):
        ev.override()


@pytest.mark.parametrize("how", ["absolute", "symlinked shard"])
def test_image_refs_stay_inside_the_dataset(tmp_path, how):
    import zipfile

    from pipeline.data.records import ImageStore

    evil = tmp_path / "outside" / "evil.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("secret.png", _outside_png(tmp_path).read_bytes())
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    if how == "absolute":
        ref = f"{evil}/secret.png"
    else:
        (ds / "images" / "shard-00000.zip").symlink_to(evil)
        ref = "images/shard-00000.zip/secret.png"
    store = ImageStore(ds)
    with pytest.raises(InputError, match="inside the dataset"):
        store.read_bytes(ref)
