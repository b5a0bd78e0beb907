"""Fault tolerance (issue 8, item 3): what the pipeline does when something breaks under it.

Each test breaks one thing for real — a SIGKILLed trainer, an S3 server that goes away in the
middle of a push, a tampered dataset, a hostile policy file, a full disk, a second run on the
same workspace — and checks the three promises: a clear error naming what failed, no half-
written output, and a re-run that finishes the job.

Already proven elsewhere (not repeated here): resume equivalence after an in-process
interrupt and stale-checkpoint refusal (test_train_stages), crash between upload and alias
swap and readers never seeing a half promotion (test_registry), the lock primitive itself
(test_lock), per-check ClevrPolicy corruption reports (test_validation_clevr), unsafe and
broken YAML in ``load_yaml`` and the ENOSPC mapping in the CLI (test_core).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
TRIMPI = [sys.executable, "-m", "pipeline.cli"]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what "outputs intact" is checked against)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def child_env(**extra) -> dict:
    """The environment for a ``trimpi`` child: one thread, offline, and no distributed settings
    leaked from an in-process trainer (a child reusing our MASTER_PORT would hang)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


# ----------------------------------------------------------------------------- 1. SIGKILL mid-training


TINY_PARAMS = """base: {seed: 0, model: tiny-xs, threads: 1}
model_init: {vocab_size: 1024, max_pixels: 12544}
generate_clevr: {train_per_policy: 6, cot_per_policy: 4, test_per_policy: 2, override_per_policy: 0,
                 override_count: 0, image_size: 64}
sft: {max_steps: 40, save_every: 2, batch_size: 2, epochs: 20, warmup_ratio: 0.0, lora: 'off'}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-xs init checkpoint and a small ClevrPolicy set (made in children: the parent stays light)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "params.yaml").write_text(TINY_PARAMS)
    for args in (["generate", "clevr", "--policies", str(REPO / "policies/clevr"), "--out", "data"],
                 ["model", "init", "--out", "init"]):
        r = subprocess.run([*TRIMPI, *args, "--params", "params.yaml"], cwd=root, env=child_env(),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    return root


def _sft(tiny: Path, out: Path, ckpt: Path) -> list[str]:
    return [*TRIMPI, "train", "sft", "--params", str(tiny / "params.yaml"), "--model", str(tiny / "init"),
            "--data", str(tiny / "data"), "--out", str(out), "--ckpt-dir", str(ckpt)]


@pytest.mark.slow
def test_sigkilled_training_resumes_from_its_checkpoint(tiny, tmp_path):
    """`trimpi train sft` SIGKILLed after its first checkpoint: no output dir, and the re-run resumes
    from that checkpoint and ends with exactly the weights of a run that was never interrupted."""
    env = child_env()
    ref = subprocess.run(_sft(tiny, tmp_path / "ref", tmp_path / "ck_ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    ck, out = tmp_path / "ck", tmp_path / "out"
    victim = subprocess.Popen(_sft(tiny, out, ck), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # "after the first checkpoint": DeepSpeed's 'latest' and the engine's fingerprint are both on
        # disk (a kill between those two writes is the next test)
        deadline = time.monotonic() + 300
        while (not ((ck / "latest").exists() and (ck / "fingerprint.json").exists())
               and victim.poll() is None and time.monotonic() < deadline):
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)  # no handler, no finally: the kernel just stops it
    finally:
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"
    assert not out.exists()                                        # nothing that looks like a finished model
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    killed_at = int((ck / "latest").read_text().strip().split("-")[1])
    assert 2 <= killed_at < 40

    again = subprocess.run(_sft(tiny, out, ck), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_step"] >= killed_at and m["steps"] == 40, again.stdout[-1500:]
    assert "resumed from" in again.stdout
    assert not ck.exists()                                         # checkpoints dropped once the output is whole

    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = (out / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 41)]   # one row per step, no gap/dup


@pytest.mark.slow
def test_kill_right_after_the_first_checkpoint_commit_still_resumes(tiny, tmp_path, monkeypatch):
    """Seen for real: the SIGKILL above, sent the moment 'latest' appeared, restarted from step 0.
    Reproduced deterministically by dying right after DeepSpeed's save_checkpoint returns."""
    from pipeline.config import load_section
    from pipeline.train.engine import setup_distributed
    from pipeline.train.sft import SFTConfig, train_sft

    setup_distributed()  # sets DS_ACCELERATOR before deepspeed is imported
    from deepspeed.runtime.engine import DeepSpeedEngine

    class Killed(BaseException):
        """Stands in for SIGKILL: nothing catches it, nothing after it runs."""

    real = DeepSpeedEngine.save_checkpoint

    def save_then_die(self, *a, **k):
        real(self, *a, **k)
        raise Killed

    cfg = load_section(SFTConfig, "sft", tiny / "params.yaml", ["max_steps=6"])
    args = (cfg, str(tiny / "init"), [str(tiny / "data")], str(tmp_path / "out"))
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_sft(*args, ckpt_dir=str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-0000002"   # a complete checkpoint
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", real)
    assert train_sft(*args, ckpt_dir=str(tmp_path / "ck"))["resumed_from_step"] == 2


# ----------------------------------------------------------------------------- 2. S3 down during a push


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server that can be stopped and restarted on the same port (state survives: it is
    moto's in-process backend), i.e. an S3 endpoint that goes away and comes back."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    m = Moto()
    m.start()
    yield m
    m.stop()


def _model(root: Path, name: str, weights: bytes) -> Path:
    d = root / name
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (d / "model.safetensors").write_bytes(weights)
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    return d


def test_s3_outage_during_push_is_retried_then_named_and_never_half_registers(tmp_path, moto, monkeypatch, capsys):
    import boto3

    from pipeline.registry import RegistryConfig, open_registry
    from pipeline.storage import S3Storage

    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="faults")
    url = f"s3://faults/{tmp_path.name}"
    params = tmp_path / "params.yaml"
    params.write_text(f"registry: {{root: '{url}', model: m, endpoint_url: '{moto.url}', retries: 3, backoff_s: 0.01}}\n")
    (tmp_path / "eval.json").write_text(json.dumps({"main": {"score": 50}}))
    (tmp_path / "gate.json").write_text(json.dumps({"passed": True, "checks": []}))

    def promote(name):
        return main(["promote", "--params", str(params), "--model", str(tmp_path / name), "--metrics",
                     str(tmp_path / "eval.json"), "--gate", str(tmp_path / "gate.json"), "--policies",
                     str(tmp_path / "none"), "--out", str(tmp_path / "promote.json")])

    # every real attempt of a storage operation, and an outage that starts after the first weight
    # file of a push (config.json) is uploaded
    attempts: list[tuple[str, str, bool]] = []
    outage = {"when": None, "heal_after": None}
    real_call, real_put_file = S3Storage._call, S3Storage.put_file

    def counted(self, what, key, fn, **kw):
        def attempt():
            try:
                r = fn()
            except Exception:
                attempts.append((what, key, False))
                failed = sum(1 for w, k, ok in attempts if k == key and not ok)
                if outage["heal_after"] is not None and failed >= outage["heal_after"]:
                    moto.start()        # the endpoint comes back within the retry budget
                    outage["heal_after"] = None
                raise
            attempts.append((what, key, True))
            return r
        return real_call(self, what, key, attempt, **kw)

    def put_file(self, key, path, **kw):
        real_put_file(self, key, path, **kw)
        if outage["when"] is not None and key.endswith(outage["when"]):
            outage["when"] = None
            moto.stop()

    monkeypatch.setattr(S3Storage, "_call", counted)
    monkeypatch.setattr(S3Storage, "put_file", put_file)

    _model(tmp_path, "a", b"A" * 64)
    assert promote("a") == 0

    # (1) a blip: down for one attempt, back before the budget is spent -> the push just succeeds
    _model(tmp_path, "b", b"B" * 64)
    outage.update(when="config.json", heal_after=1)
    attempts.clear()
    assert promote("b") == 0
    weights_b = [a for a in attempts if a[1] == "m/v2/model/model.safetensors" and a[0] == "upload"]
    assert [ok for *_, ok in weights_b] == [False, True]

    # (2) down for good: 3 attempts, then an error naming the object URL and the endpoint, exit 75
    # (EX_TEMPFAIL: the flow retries it; bad input would be 2)
    reg = open_registry(RegistryConfig(root=url, model="m", endpoint_url=moto.url))
    alias_before = reg.s.get_bytes("m/aliases/production.json")
    _model(tmp_path, "c", b"C" * 64)
    outage.update(when="config.json", heal_after=None)
    attempts.clear()
    capsys.readouterr()
    assert promote("c") == 75
    err = capsys.readouterr().err
    assert f"{url}/m/v3/model/model.safetensors: upload failed after 3 attempts" in err
    assert moto.url in err and "Traceback" not in err
    assert [ok for w, k, ok in attempts if k == "m/v3/model/model.safetensors" and w == "upload"] == [False] * 3
    assert json.loads((tmp_path / "promote.json").read_text())["version"] == "v2"   # DVC output untouched

    # nothing half-registered: production unchanged byte for byte, v3 invisible, no log entry
    moto.start()
    assert reg.s.get_bytes("m/aliases/production.json") == alias_before
    assert reg.versions() == ["v1", "v2"] and reg.versions(include_incomplete=True) == ["v1", "v2", "v3"]
    assert not reg.is_complete("v3") and reg.resolve("production") == "v2"
    assert [e["event"] for e in reg.log()] == ["promote", "promote"]
    capsys.readouterr()
    assert main(["registry", "list", "--params", str(params)]) == 0
    listed = capsys.readouterr().out
    assert "v2" in listed and "<- production" in listed and "v3" not in listed

    # (3) the re-run resumes the same content into v3 and only then moves production
    assert promote("c") == 0
    assert reg.resolve("production") == "v3" and reg.versions() == ["v1", "v2", "v3"]
    assert reg.manifest("v3")["files"]["model.safetensors"]["size"] == 64
    assert (reg.fetch("production", tmp_path / "fetched") / "model.safetensors").read_bytes() == b"C" * 64


@pytest.mark.slow
def test_real_s3_server_stopped_during_push(tmp_path, monkeypatch):
    """The same outage on SeaweedFS (a real server process, stopped after the first file of v2): the
    push fails naming the object after the retry budget; after a restart on the same data and port
    readers see production v1 and no v2, and the next promotion completes v2."""
    from pipeline.registry import RegistryConfig, open_registry
    from s3server import S3Server
    from pipeline.storage import S3Storage, StorageError

    passed = {"passed": True, "checks": []}
    server = S3Server(data_dir=tmp_path / "s3", buckets=["faults"]).start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        cfg = RegistryConfig(root="s3://faults/reg", model="m", retries=3, backoff_s=0.05)
        reg = open_registry(cfg)
        reg.promote(_model(tmp_path, "a", b"A" * 4096), {"main": {"score": 50}}, passed, {})
        real_put = S3Storage.put_file

        def stop_after_first_file(self, key, path, **kw):
            real_put(self, key, path, **kw)
            if key == "m/v2/model/config.json":
                server.stop()

        monkeypatch.setattr(S3Storage, "put_file", stop_after_first_file)
        with pytest.raises(StorageError, match=r"^s3://faults/reg/m/v2/model/model\.safetensors: upload failed "
                                               rf"after 3 attempts .*endpoint {server.endpoint}"):
            reg.promote(_model(tmp_path, "b", b"B" * 4096), {"main": {"score": 60}}, passed, {})
        monkeypatch.setattr(S3Storage, "put_file", real_put)

        server = S3Server(data_dir=tmp_path / "s3", buckets=["faults"], port=server.port).start()
        reader = open_registry(cfg)
        assert reader.resolve("production") == "v1" and reader.versions() == ["v1"]
        assert reader.versions(include_incomplete=True) == ["v1", "v2"]
        assert reader.promote(_model(tmp_path / "again", "b", b"B" * 4096), {"main": {"score": 60}}, passed,
                              {})["version"] == "v2"
        assert (reader.fetch("production", tmp_path / "f") / "model.safetensors").read_bytes() == b"B" * 4096
    finally:
        server.stop()


def test_throttled_weight_upload_is_retried_and_a_missing_bucket_is_named(tmp_path, moto):
    """boto3's upload_file wraps every ClientError in S3UploadFailedError: a 503 SlowDown on a weight
    upload must still be retried, and a missing bucket must be a StorageError, not a traceback."""
    import boto3
    from botocore.exceptions import ClientError

    from pipeline.storage import StorageError, open_storage

    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="throttled")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"w" * 100)
    store = open_storage("s3://throttled/p", endpoint_url=moto.url, retries=3, backoff=0.01)
    throttled = []

    def slow_down(**kw):
        if len(throttled) < 2:
            throttled.append(1)
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")

    store.client.meta.events.register("before-call.s3.PutObject", slow_down)
    store.put_file("m/w.safetensors", weights)
    assert len(throttled) == 2 and store.get_bytes("m/w.safetensors") == b"w" * 100
    missing = open_storage("s3://no-such-bucket-here/p", endpoint_url=moto.url, retries=3, backoff=0.01)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/p/w: upload failed: bucket "
                                           r"'no-such-bucket-here' does not exist"):
        missing.put_file("w", weights)


# ----------------------------------------------------------------------------- 3. corrupted datasets


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One small, clean dataset per task (generated through the CLI, like `dvc repro` does)."""
    root = tmp_path_factory.mktemp("faultdata")
    assert main(["generate", "clevr", "--policies", str(REPO / "policies/clevr"), "--out", str(root / "clevr"),
                 "--params", str(REPO / "params.yaml"), "--set", "train_per_policy=8", "--set", "cot_per_policy=4",
                 "--set", "test_per_policy=4", "--set", "override_per_policy=4", "--set", "override_count=1",
                 "--set", "image_size=48"]) == 0
    assert main(["generate", "gta", "--policies", str(REPO / "policies/gta"), "--out", str(root / "gta"),
                 "--params", str(REPO / "params.yaml"), "--set", "train_dialogs=50", "--set", "test_dialogs=4"]) == 0
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _break_image(data: Path, ref: str) -> None:
    """Cut one image inside its zip shard to 60 bytes (the shard itself stays a valid zip)."""
    _, shard, member = ref.split("/")
    zpath = data / "images" / shard
    with zipfile.ZipFile(zpath) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(zpath, "w") as z:
        for info, blob in items:
            z.writestr(info, blob[:60] if info.filename == member else blob)


def _retarget(task: str, answer: str) -> str:
    if task == "clevr":
        return "Case 1" if answer != "Case 1" else "Case 0"
    call = json.loads(answer)
    n = int(call["name"][-1]) if call["name"][-1].isdigit() else 0
    base = call["name"].rsplit("_v", 1)[0]
    call["name"] = f"{base}_v{n % 5 + 1}"  # another version of the same tool
    return json.dumps(call)


@pytest.mark.parametrize("task", ["clevr", "gta"])
def test_validate_cli_fails_on_corruption_and_names_every_bad_row(task, datasets, tmp_path, capsys):
    data = tmp_path / task
    shutil.copytree(datasets / task, data)
    policies = str(REPO / "policies" / task)
    report = tmp_path / "metrics" / f"validate_{task}.json"
    args = ["validate", "--task", task, "--data", str(data), "--policies", policies, "--report", str(report),
            "--params", str(REPO / "params.yaml")]
    assert main(args) == 0, capsys.readouterr().out                   # clean data passes first

    test = _lines(data / "test.jsonl")
    # label tampering: a record whose answer no longer follows the policy
    tampered = test[1]
    tampered["answer"] = _retarget(task, tampered["answer"])
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    # corrupted image bytes, in an image no other record uses
    uses: dict[str, list[str]] = {}
    for name in ("train", "test", "override"):
        for r in _lines(data / f"{name}.jsonl"):
            for ref in r["images"]:
                uses.setdefault(ref, []).append(r["id"])
    victim = next(r for r in test if r["images"] and tampered["images"] != r["images"])
    broken = victim["images"][0]
    _break_image(data, broken)
    # truncated JSONL: the writer died mid-line
    train = data / "train.jsonl"
    n_train = len(train.read_text().splitlines())
    train.write_bytes(train.read_bytes()[:-40])

    capsys.readouterr()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("validation FAILED")
    rep = json.loads(report.read_text())
    assert rep["success"] is False and rep["task"] == task
    failed = {c["name"]: c for c in rep["checks"] if not c["success"]}
    rows = [json.dumps(r) for c in failed.values() for r in c["failing_rows"]]

    def named(check_fragment: str, needle: str) -> bool:
        return any(check_fragment in name and needle in json.dumps(c["failing_rows"]) for name, c in failed.items())

    assert named("train.jsonl: every line is a valid record", f'"line": {n_train}'), sorted(failed)
    assert named("record counts match manifest.json", '"train.jsonl"'), sorted(failed)
    assert any(named("image", json.dumps(rid)) for rid in uses[broken]), sorted(failed)
    label_check = "labels and gold paths re-derived" if task == "clevr" else "test.jsonl: target tool re-resolved"
    assert named(label_check, json.dumps(tampered["id"])), sorted(failed)
    assert rows and tampered["id"] in out and any(rid in out for rid in uses[broken])   # printed report too


# ----------------------------------------------------------------------------- 4. hostile / broken policy YAML

UNSAFE = "kind: clevr\nname: !!python/object/apply:os.system ['touch {sentinel}']\ndepth: 1\ntree: []\n"
BROKEN = "kind: clevr\nname: L1-Broken\ndepth: 1\ntree:\n- {id: '1', attribute: shape, value: cube,\n"


@pytest.mark.parametrize("kind", ["unsafe tag", "malformed"])
@pytest.mark.parametrize("command", ["policy render", "generate clevr", "generate gta", "validate"])
def test_hostile_or_broken_policy_yaml_is_exit_2_naming_the_file(kind, command, tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    pdir = tmp_path / "policies"
    pdir.mkdir()
    bad = pdir / "evil.yaml"
    bad.write_text(UNSAFE.format(sentinel=sentinel) if kind == "unsafe tag" else BROKEN)
    out = tmp_path / "out"
    argv = {"policy render": ["policy", "render", str(bad)],
            "generate clevr": ["generate", "clevr", "--policies", str(pdir), "--out", str(out)],
            "generate gta": ["generate", "gta", "--policies", str(pdir), "--out", str(out)],
            "validate": ["validate", "--task", "gta", "--data", str(out), "--policies", str(pdir)]}[command]
    assert main([*argv, "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: line ") and "Traceback" not in err
    assert ("no custom tags" in err) if kind == "unsafe tag" else ("expected valid YAML" in err)
    assert not sentinel.exists() and not out.exists()


def test_unsafe_params_yaml_is_refused_before_anything_runs(tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    params = tmp_path / "params.yaml"
    params.write_text(f"generate_clevr:\n  train_per_policy: !!python/object/apply:os.system ['touch {sentinel}']\n")
    assert main(["generate", "clevr", "--params", str(params), "--policies", str(REPO / "policies/clevr"),
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {params}: line 2")
    assert not sentinel.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 5. disk full mid-stage


def _enospc(name: str):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", name)
    return full


@pytest.mark.parametrize("task, where", [("clevr", "image shard"), ("clevr", "records"), ("gta", "image shard")])
def test_disk_full_during_generate_keeps_previous_dataset(task, where, tmp_path, monkeypatch, capsys):
    """Root ignores chmod, so a full disk is simulated at the real writers: the zip shard writer after a
    few images, or the JSONL writer after all images are in; either way the stage is mid-write."""
    out = tmp_path / "data"
    base = ["generate", task, "--policies", str(REPO / "policies" / task), "--out", str(out),
            "--params", str(REPO / "params.yaml")]
    def sized(n: int) -> list[str]:
        sets = ([f"train_per_policy={n}", "cot_per_policy=2", "test_per_policy=2", "override_per_policy=2",
                 "image_size=32"] if task == "clevr" else [f"train_dialogs={n}", "test_dialogs=2", "cover_every_rule=false"])
        return [x for s in sets for x in ("--set", s)]

    assert main(base + sized(4)) == 0
    before = snapshot(out)
    assert any(k.startswith("images/shard-") for k in before)

    if where == "image shard":
        calls = {"n": 0}
        real = zipfile.ZipFile.writestr

        def writestr(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > 3:
                _enospc(self.filename)()
            return real(self, *a, **k)

        monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    else:
        monkeypatch.setattr("pipeline.data.clevr_policy.write_records", _enospc("train.jsonl"))
    capsys.readouterr()
    assert main(base + sized(6)) == 2                                    # a different dataset, cut short
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous outputs are intact" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]        # no temp dir left beside it


# ----------------------------------------------------------------------------- 6. two runs, one workspace

HOLDER = """
import sys, time
from pipeline.lock import WorkspaceLock
with WorkspaceLock(sys.argv[1], command="trimpi run (first)"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def held_workspace(tmp_path):
    """A workspace whose lock is held by another process for the duration of the test."""
    ws = tmp_path / "ws"
    (ws / "policies" / "clevr").mkdir(parents=True)
    shutil.copy(REPO / "policies/clevr" / sorted(os.listdir(REPO / "policies/clevr"))[0], ws / "policies/clevr")
    (ws / "params.yaml").write_text("orchestrate: {lock_wait_s: 0, pull: false, push: false}\n")
    (ws / "dvc.yaml").write_text("stages:\n  touch:\n    cmd: python -c \"open('ran','w').write('x')\"\n    outs: [ran]\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws), "120"], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    assert holder.stdout.readline().strip() == "held"
    try:
        yield ws, holder
    finally:
        holder.kill()
        holder.wait()


def test_second_trimpi_run_refuses_without_touching_the_workspace(held_workspace, tmp_path):
    ws, holder = held_workspace
    before = snapshot(ws, skip=(".trimpi/",))
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL="http://127.0.0.1:9/api")
    t0 = time.monotonic()
    r = subprocess.run([*TRIMPI, "run", "--workspace", str(ws)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 75, r.stderr                                   # EX_TEMPFAIL: try again later
    assert f"in use by pid {holder.pid}" in r.stderr and "trimpi run (first)" in r.stderr
    r2 = subprocess.run([*TRIMPI, "run", "--workspace", str(ws), "--wait", "1.5"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 75 and "after waiting 1.5 s" in r2.stderr
    assert time.monotonic() - t0 < 60
    assert snapshot(ws, skip=(".trimpi/",)) == before and not (ws / "ran").exists()
    assert holder.poll() is None                                          # the first run was not disturbed


@pytest.mark.slow
def test_flow_started_beside_a_running_one_fails_before_any_stage(held_workspace, prefect_home):
    """A served deployment has no outer `trimpi run`: the flow itself must take the lock.

    With ``deployment_lock_wait_s: 0`` it refuses at once; the default queues instead
    (tests/test_flow_overlap.py)."""
    from flows.reinternalize import reinternalize
    from pipeline.lock import LockBusy

    ws, holder = held_workspace
    (ws / "params.yaml").write_text("orchestrate: {lock_wait_s: 0, deployment_lock_wait_s: 0, pull: false, push: false}\n")
    before = snapshot(ws, skip=(".trimpi/",))
    state = reinternalize(workspace=str(ws), force=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(LockBusy, match=f"pid {holder.pid}"):
        state.result()
    assert snapshot(ws, skip=(".trimpi/",)) == before and not (ws / "ran").exists()
