"""Storage: the same behaviour on a local directory and on S3 (moto), retries, clear errors."""

import pytest

from conftest import free_port

from pipeline.storage import LocalStorage, NotFound, S3Storage, StorageError, open_storage


@pytest.fixture
def s3_env(monkeypatch, moto_endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="bkt")
    return moto_endpoint


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_env")
    return open_storage(f"s3://bkt/pre/{tmp_path.name}", endpoint_url=endpoint, retries=2, backoff=0.01)


def test_same_surface_on_both_backends(store, tmp_path):
    assert store.list() == [] and not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/c/d.bin", b"\x00\x01")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"w" * 1000)
    store.put_file("m/w.safetensors", f)
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a/zzz")
    assert store.list() == ["a/b.txt", "a/c/d.bin", "m/w.safetensors"]
    assert store.list("a") == ["a/b.txt", "a/c/d.bin"]
    assert store.children("a") == ["b.txt", "c/"]
    assert store.children() == ["a/", "m/"]
    store.get_file("m/w.safetensors", tmp_path / "out" / "w")
    assert (tmp_path / "out" / "w").read_bytes() == b"w" * 1000
    store.replace("a/b.txt", b"v2")
    assert store.get_bytes("a/b.txt") == b"v2"
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing key is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(NotFound, match="a/b.txt"):
        store.get_bytes("a/b.txt")
    with pytest.raises(NotFound):
        store.get_file("nope", tmp_path / "x")
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(StorageError, match="storage key"):
            store.put_bytes(bad, b"")


def test_local_replace_leaves_no_temp_and_hides_partial_writes(tmp_path):
    s = LocalStorage(tmp_path)
    s.put_bytes("p.json", b"old")
    (tmp_path / ".p.json.tmp-crashed").write_bytes(b"half")  # what a crashed writer leaves
    s.replace("p.json", b"new")
    assert s.list() == ["p.json"] and s.get_bytes("p.json") == b"new"


def test_transient_errors_are_retried_then_named(monkeypatch):
    from botocore.exceptions import ClientError, EndpointConnectionError

    s = S3Storage("s3://bkt/x", endpoint_url="http://127.0.0.1:9", retries=4, backoff=0.01, sleep=lambda d: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return "ok"

    assert s._call("put", "k", flaky) == "ok" and len(calls) == 3

    def down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(StorageError, match=r"s3://bkt/x/k: put failed after 4 attempts .*endpoint http://127.0.0.1:9"):
        s._call("put", "k", down)

    denied = []

    def forbidden():
        denied.append(1)
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")

    with pytest.raises(StorageError, match="AccessDenied"):
        s._call("put", "k", forbidden)
    assert len(denied) == 1  # permanent errors are not retried


def test_unreachable_endpoint_fails_within_budget(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s = open_storage("s3://bkt/p", endpoint_url=f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    with pytest.raises(StorageError, match=r"s3://bkt/p/a: get failed after 2 attempts"):
        s.get_bytes("a")


def test_missing_bucket_and_bad_url(s3_env):
    s = open_storage("s3://no-such-bucket/p", endpoint_url=s3_env, retries=1)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        s.put_bytes("a", b"x")
    with pytest.raises(StorageError, match="expected a local directory"):
        open_storage("gs://bucket/x")


def test_credentials_never_appear_in_errors(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    s = open_storage("s3://no-such-bucket/p", endpoint_url=s3_env, retries=1)
    with pytest.raises(StorageError) as e:
        s.get_bytes("a")
    assert "sekrit" not in str(e.value) and "sekrit" not in repr(s)
