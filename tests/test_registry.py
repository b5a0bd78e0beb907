"""Registry: versions, atomic production alias under crashes, rollback, CLI, local + S3 (moto) backends."""
import json
import types

import pytest

from pipeline.io import InputError
from pipeline.registry import Registry, RegistryConfig, open_registry, run_promote
from pipeline.storage import LocalStorage, open_storage

PASSED = {"passed": True, "checks": []}


def _metrics(score):
    return {"main": {"score": score}, "test_sets": {"clevr/test.jsonl": "abc"}}


def _model(tmp_path, name, weights: bytes):
    d = tmp_path / name
    (d / "tokenizer").mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    (d / ".cache").write_text("hidden files are not registered")
    return d


@pytest.fixture(params=["local", "s3"])
def reg(request, tmp_path, monkeypatch):
    if request.param == "local":
        return Registry(open_storage(tmp_path / "registry"), "m")
    endpoint = request.getfixturevalue("moto_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="reg")
    return Registry(open_storage(f"s3://reg/{tmp_path.name}", endpoint_url=endpoint, retries=2, backoff=0.01), "m")


def test_promote_versions_idempotence_fetch_and_rollback(reg, tmp_path):
    assert reg.alias() is None and reg.versions() == []
    a = _model(tmp_path, "a", b"weights-a")
    r1 = reg.promote(a, _metrics(50), PASSED, {"policies": [{"name": "P", "version": "h1", "path": "p.yaml"}]})
    assert r1 == {"version": "v1", "uploaded": True, "production": "v1", "changed": True, "previous": None}
    assert reg.resolve("production") == "v1"
    assert sorted(reg.manifest("v1")["files"]) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    # same weights again: nothing uploaded, nothing moved
    assert reg.promote(a, _metrics(50), PASSED, {})["uploaded"] is False
    assert reg.versions() == ["v1"]
    r2 = reg.promote(_model(tmp_path, "b", b"weights-b"), _metrics(60), PASSED, {})
    assert (r2["version"], r2["previous"]) == ("v2", "v1")
    assert reg.metrics()["main"]["score"] == 60 and reg.card("v1")["policies"][0]["version"] == "h1"
    out = reg.fetch("v1", tmp_path / "fetched")
    assert (out / "model.safetensors").read_bytes() == b"weights-a"
    # rollback: default = the previous production, or an explicit version; bad versions refused
    assert reg.rollback()["version"] == "v1" and reg.resolve("production") == "v1"
    assert reg.rollback(to="v2")["version"] == "v2"
    with pytest.raises(InputError, match="v1, v2"):
        reg.rollback(to="v9")
    events = [(e["event"], e["version"], e["previous"]) for e in reg.log()]
    assert events == [("promote", "v1", None), ("promote", "v2", "v1"), ("rollback", "v1", "v2"), ("rollback", "v2", "v1")]


def test_crash_between_upload_and_swap_keeps_old_production(reg, tmp_path, monkeypatch):
    reg.promote(_model(tmp_path, "a", b"A"), _metrics(50), PASSED, {})
    new = _model(tmp_path, "b", b"B")

    def crash(self, version, reason):
        raise KeyboardInterrupt("killed between upload and swap")

    monkeypatch.setattr(Registry, "_swap", crash)
    with pytest.raises(KeyboardInterrupt):
        reg.promote(new, _metrics(70), PASSED, {})
    assert reg.resolve("production") == "v1"
    assert reg.is_complete("v2")  # fully uploaded, just never made production
    assert [e["event"] for e in reg.log()] == ["promote"]
    monkeypatch.undo()
    res = reg.promote(new, _metrics(70), PASSED, {})  # re-run: reuses the upload, then swaps
    assert (res["version"], res["uploaded"], res["changed"]) == ("v2", False, True)


def test_crash_during_upload_is_invisible_and_resumed(tmp_path):
    store = LocalStorage(tmp_path / "registry")
    reg = Registry(store, "m")
    reg.promote(_model(tmp_path, "a", b"A"), _metrics(50), PASSED, {})
    real_put = LocalStorage.put_file
    calls = {"n": 0}

    def flaky(self, key, path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("network went away mid-upload")
        real_put(self, key, path, **kw)

    store.put_file = types.MethodType(flaky, store)
    with pytest.raises(ConnectionError):
        reg.promote(_model(tmp_path, "b", b"B"), _metrics(70), PASSED, {})
    assert reg.versions() == ["v1"] and reg.versions(include_incomplete=True) == ["v1", "v2"]
    assert reg.resolve("production") == "v1"
    with pytest.raises(InputError):
        reg.resolve("v2")  # an incomplete version cannot be addressed
    del store.put_file
    assert reg.promote(_model(tmp_path, "b", b"B"), _metrics(70), PASSED, {})["version"] == "v2"


def test_reader_never_sees_half_promoted_model(tmp_path):
    """After every single storage write of a promotion, a fresh reader resolves a complete version."""
    root = tmp_path / "registry"
    writer_store = LocalStorage(root)
    reg = Registry(writer_store, "m")
    reg.promote(_model(tmp_path, "a", b"A" * 100), _metrics(50), PASSED, {})
    seen = []

    def observe():
        reader = Registry(LocalStorage(root), "m")
        v = reader.resolve("production")
        fetched = reader.fetch(v, tmp_path / f"read{len(seen)}")
        seen.append((v, (fetched / "model.safetensors").read_bytes()[:1]))

    for name in ("put_bytes", "put_file", "replace"):
        real = getattr(LocalStorage, name)

        def wrapped(self, *a, _real=real, **kw):
            _real(self, *a, **kw)
            observe()

        setattr(writer_store, name, types.MethodType(wrapped, writer_store))
    reg.promote(_model(tmp_path, "b", b"B" * 100), _metrics(60), PASSED, {})
    assert seen[0] == ("v1", b"A") and seen[-1] == ("v2", b"B")
    assert set(seen) == {("v1", b"A"), ("v2", b"B")}
    # the swap is one write: once production is v2 it stays v2
    first_new = [v for v, _ in seen].index("v2")
    assert all(v == "v2" for v, _ in seen[first_new:])


def test_model_dir_without_safetensors_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"x")
    reg = Registry(LocalStorage(tmp_path / "r"), "m")
    with pytest.raises(InputError, match="safetensors"):
        reg.promote(d, {}, PASSED, {})


def _args(tmp_path, **kw):
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  root: {tmp_path / 'registry'}\n  model: m\n")
    return types.SimpleNamespace(params=str(params), overrides=[], policies=str(tmp_path / "nopolicies"), data=[], **kw)


def test_promote_cli_refuses_failed_gate_and_writes_card(tmp_path, capsys):
    model = _model(tmp_path, "a", b"A")
    metrics, gate = tmp_path / "eval.json", tmp_path / "gate.json"
    metrics.write_text(json.dumps(_metrics(50)))
    gate.write_text(json.dumps({"passed": False, "checks": []}))
    args = _args(tmp_path, model=str(model), metrics=str(metrics), gate=str(gate), out=str(tmp_path / "promote.json"))
    assert run_promote(args) == 1
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "registry").exists() and not (tmp_path / "promote.json").exists()
    gate.write_text(json.dumps({"passed": True, "checks": [{"name": "main accuracy", "value": 50, "op": ">=",
                                                             "threshold": 30, "status": "pass"}]}))
    assert run_promote(args) == 0
    res = json.loads((tmp_path / "promote.json").read_text())
    assert res["version"] == "v1" and res["url"].endswith("m/v1")
    reg = open_registry(RegistryConfig(root=str(tmp_path / "registry"), model="m"))
    card = reg.card()
    assert card["git"]["revision"] and "registry" in card["params"]
    md = reg.s.get_bytes("m/v1/card.md").decode()
    assert "| main.score | 50 |" in md and "| main accuracy | 50 | >= 30 | pass |" in md


def test_card_scrubs_credentials():
    from pipeline.registry import scrub

    out = scrub({"registry": {"endpoint_url": "http://user:pw@host:9000", "aws_secret_access_key": "x"}, "k": [1]})
    assert out == {"registry": {"endpoint_url": "http://<redacted>@host:9000", "aws_secret_access_key": "<redacted>"},
                   "k": [1]}


def test_cli_promote_list_rollback_against_s3(tmp_path, moto_endpoint, monkeypatch, capsys):
    from pipeline.registry import run_list, run_rollback

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="cli")
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  root: s3://cli/{tmp_path.name}\n  model: m\n  endpoint_url: {moto_endpoint}\n")
    metrics, gate = tmp_path / "eval.json", tmp_path / "gate.json"
    metrics.write_text(json.dumps(_metrics(50)))
    gate.write_text(json.dumps(PASSED))
    for name in ("a", "b"):
        args = types.SimpleNamespace(params=str(params), overrides=[], policies="policies", data=[],
                                     model=str(_model(tmp_path, name, name.encode())), metrics=str(metrics),
                                     gate=str(gate), out=str(tmp_path / "promote.json"))
        assert run_promote(args) == 0
    assert json.loads((tmp_path / "promote.json").read_text())["url"] == f"s3://cli/{tmp_path.name}/m/v2"
    base = types.SimpleNamespace(params=str(params), overrides=[])
    assert run_rollback(types.SimpleNamespace(**vars(base), to=None)) == 0
    assert run_list(types.SimpleNamespace(**vars(base), all=False)) == 0
    out = capsys.readouterr().out
    assert "* v1" in out and "<- production" in out and "  v2" in out
    card = boto3.client("s3", endpoint_url=moto_endpoint).get_object(Bucket="cli", Key=f"{tmp_path.name}/m/v1/card.json")
    assert "s3cr3t" not in card["Body"].read().decode()  # credentials never reach the card


@pytest.mark.slow
def test_registry_on_real_seaweedfs(tmp_path, s3_server, monkeypatch):
    """Against a real S3-compatible server (SeaweedFS `weed mini` on 127.0.0.1, from tests/conftest.py);
    the endpoint and keys come from the environment only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    reg = open_registry(RegistryConfig(root=f"s3://trimpi-test/{tmp_path.name}", model="m", retries=3, backoff_s=0.1))
    assert reg.alias() is None
    reg.promote(_model(tmp_path, "a", b"A" * 4096), _metrics(50), PASSED, {})
    store = reg.s
    real_replace = type(store).replace

    def crash(self, key, data):
        raise KeyboardInterrupt("killed before the swap")

    store.replace = types.MethodType(crash, store)
    with pytest.raises(KeyboardInterrupt):
        reg.promote(_model(tmp_path, "b", b"B" * 4096), _metrics(60), PASSED, {})
    assert reg.resolve("production") == "v1" and reg.is_complete("v2")
    store.replace = types.MethodType(real_replace, store)
    assert reg.promote(_model(tmp_path, "b", b"B" * 4096), _metrics(60), PASSED, {})["uploaded"] is False
    assert reg.versions() == ["v1", "v2"] and reg.resolve("production") == "v2"
    assert reg.rollback()["version"] == "v1"
    assert (reg.fetch("production", tmp_path / "f") / "model.safetensors").read_bytes() == b"A" * 4096
    assert [e["event"] for e in reg.log()] == ["promote", "promote", "rollback"]
