"""One storage abstraction over a local directory and S3, for the model registry.

``open_storage("registry")`` and ``open_storage("s3://bucket/prefix")`` return objects with the
same small surface — ``put_bytes/get_bytes/put_file/get_file/list/children/exists/delete``,
``replace`` (atomic replace of a small object), ``create`` (write only if absent) and
``abort_uploads`` — so the registry has exactly one code path.
Keys are ``/``-separated and relative to the root; ``..`` and absolute keys are refused.

Decisions worth knowing:

* **Atomicity.** Local writes go to a temporary sibling and are renamed into place
  (``pipeline.io``), so a reader sees the old or the new bytes, never a prefix. S3 PUT (and a
  completed multipart upload) is atomic per object by the S3 contract, so ``replace`` is a
  plain PUT there. Nothing here is atomic *across* objects: the registry builds that from a
  completion marker and a pointer object written last.
* **Credentials** come only from boto3's standard chain (``AWS_ACCESS_KEY_ID``…, ``~/.aws``,
  instance roles). This module never reads, stores or prints them; errors name the URL and the
  endpoint, nothing else (a ``user:password@`` written into the endpoint URL is redacted). The endpoint comes from the caller (``registry.endpoint_url``) or
  boto3's own ``AWS_ENDPOINT_URL(_S3)`` environment variables.
* **Retries.** boto3's internal retries are switched off and replaced by one loop here, so the
  budget is explicit (``retries`` attempts, exponential back-off from ``backoff`` seconds) and
  the final error names the URL. Only transient failures (connection errors including a
  connection dropped mid-upload, timeouts, 5xx, throttling) are retried; AccessDenied,
  NoSuchBucket or missing credentials fail at once.
* **Unfinished multipart uploads.** boto3 aborts a failed multipart upload itself, which cannot
  work while the endpoint is unreachable. So before every retry of an upload, and when the
  registry resumes a version, unfinished uploads under that key/prefix are aborted
  (:meth:`Storage.abort_uploads`): none is left in the bucket once the endpoint is back.
* **Conditional create.** :meth:`Storage.create` writes an object only if its key is free:
  ``O_EXCL`` semantics locally (write a temp file, ``link`` it into place), ``If-None-Match: *``
  on S3 (AWS since 2024, SeaweedFS, MinIO, moto). Whether an endpoint honours it is probed once
  per storage object (:meth:`S3Storage.conditional_writes`); the registry falls back to
  create-then-verify where it does not.
* **Errors** are :class:`StorageError`: :class:`StorageRefused` (also an ``InputError``: exit 2,
  it will fail the same way again) or :class:`StorageUnavailable` (a ``TransientError``: the
  retry budget ran out; exit 75, the flow retries later). The CLI prints both without a traceback.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from pipeline.io import InputError, TransientError, _tmp_sibling, atomic_write_bytes

T = TypeVar("T")


class StorageError(Exception):
    """A storage operation failed; the message names the URL (and the endpoint, never credentials)."""


class StorageRefused(StorageError, InputError):
    """The request cannot succeed as made (missing bucket, access denied, no credentials, bad key)."""


class StorageUnavailable(StorageError, TransientError):
    """The endpoint kept failing transiently (connection, timeout, 5xx) for the whole retry budget."""


class NotFound(StorageRefused):
    """The key does not exist."""


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageRefused(f"storage key: expected a relative '/'-separated key without '..' or empty parts, got {key!r}")
    return key


class Storage:
    """Interface shared by both backends (see module docstring)."""

    url: str

    def put_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def get_bytes(self, key: str) -> bytes: raise NotImplementedError
    def put_file(self, key: str, path: str | os.PathLike, metadata: dict | None = None) -> None:
        raise NotImplementedError
    def get_file(self, key: str, path: str | os.PathLike) -> None: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def children(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def exists(self, key: str) -> bool: raise NotImplementedError
    def delete(self, key: str) -> None: raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if the key is free; True if the object now holds ``data``.

        A retried request whose first attempt did land (the reply was lost) finds its own bytes
        there and also returns True, which is why callers put a unique claim id in ``data``.
        """
        raise NotImplementedError

    def abort_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under ``prefix``; returns how many (none locally)."""
        return 0

    def conditional_writes(self) -> bool:
        """Whether :meth:`create` is a true exclusive create on this backend."""
        return True

    def replace(self, key: str, data: bytes) -> None:
        """Atomically replace a small object: concurrent readers see the old or the new bytes."""
        self.put_bytes(key, data)

    def where(self, key: str = "") -> str:
        """The URL of ``key`` under this root (for messages)."""
        return self.url.rstrip("/") + ("/" + key if key else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# ----------------------------------------------------------------------------- local directory


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)

    def replace(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)  # os.replace: atomic on POSIX

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.where(key)}: expected an existing object") from None

    def put_file(self, key: str, path: str | os.PathLike, metadata: dict | None = None) -> None:
        dst = self._path(key)  # metadata is an S3 notion; a local registry needs no claim tags
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"{self.where(key)}: expected an existing object")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            # temp files of interrupted writes start with "." and are never objects
            if p.is_file() and not p.name.startswith("."):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def children(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if not p.name.startswith("."))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def create(self, key: str, data: bytes) -> bool:
        dst = self._path(key)
        tmp = _tmp_sibling(dst)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                # link() fails if dst exists: an exclusive create that publishes whole bytes
                os.link(tmp, dst)
            except FileExistsError:
                return dst.read_bytes() == data
            return True
        finally:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- S3

TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "500", "502", "503", "504",
                   # a conditional write raced another one (AWS asks to retry); an upload id aborted
                   # under us by a cleanup (the retry starts a new upload)
                   "ConditionalRequestConflict", "409", "NoSuchUpload"}


class S3Storage(Storage):
    def __init__(self, url: str, endpoint_url: str | None = None, retries: int = 5, backoff: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageRefused(f"{url}: expected s3://bucket[/prefix]")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.retries = max(1, retries)
        self.backoff = backoff
        self._sleep = sleep
        self._client = None
        self._conditional: bool | None = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"},  # our loop retries
                         connect_timeout=5, read_timeout=60,
                         s3={"addressing_style": "path" if self.endpoint_url else "auto"})
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _describe(self) -> str:
        return self.url + (f" (endpoint {_shown(self.endpoint_url)})" if self.endpoint_url else "")

    def _call(self, what: str, key: str, fn: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        """Run ``fn`` with the retry budget; map failures to StorageRefused/StorageUnavailable naming the URL.

        ``before_retry`` runs (best effort) before every retry and after the last failed attempt.
        """
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                         HTTPClientError, IncompleteReadError, NoCredentialsError,
                                         PartialCredentialsError)

        where = self.where(key)
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            if attempt > 1 and before_retry is not None:
                self._best_effort(before_retry)
            try:
                return fn()
            except Exception as raw:  # noqa: BLE001 - classified below; anything unknown is re-raised
                e = _unwrap(raw)
                if isinstance(e, ClientError):
                    err = e.response.get("Error", {})
                    code = str(err.get("Code", ""))
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code in ("NoSuchKey", "404", "NotFound"):
                        raise NotFound(f"{where}: expected an existing object") from None
                    if code == "NoSuchBucket":
                        raise StorageRefused(f"{where}: {what} failed: bucket {self.bucket!r} does not exist "
                                           f"at {self._describe()}") from None
                    transient = code in TRANSIENT_CODES or status >= 500
                    if not transient:
                        raise StorageRefused(f"{where}: {what} failed: {code or status}: {err.get('Message', '')} "
                                           f"(endpoint {_shown(self.endpoint_url) or 'AWS default'})") from None
                    last = f"{code or status}"
                elif isinstance(e, (NoCredentialsError, PartialCredentialsError)):
                    raise StorageRefused(f"{where}: {what} failed: no usable AWS credentials (set AWS_ACCESS_KEY_ID/"
                                       f"AWS_SECRET_ACCESS_KEY or configure ~/.aws; they are never stored by trimpi)"
                                       ) from None
                elif isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, OSError)):
                    # HTTPClientError covers ConnectionClosedError: a connection dropped mid-upload
                    last = type(e).__name__
                elif isinstance(e, BotoCoreError):  # other client-side errors are not going to heal by waiting
                    raise StorageRefused(f"{where}: {what} failed: {type(e).__name__}: {e}") from None
                else:
                    raise
            if attempt < self.retries:
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        if before_retry is not None:
            self._best_effort(before_retry)
        raise StorageUnavailable(f"{where}: {what} failed after {self.retries} attempts "
                                 f"(last error: {last}) at {self._describe()}")

    @staticmethod
    def _best_effort(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - cleanup while the endpoint is down fails; it is retried later
            pass

    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call("put", key, lambda: self.client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def get_bytes(self, key: str) -> bytes:
        k = self._key(key)
        return self._call("get", key, lambda: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read())

    def put_file(self, key: str, path: str | os.PathLike, metadata: dict | None = None) -> None:
        k = self._key(key)
        extra = {"Metadata": dict(metadata)} if metadata else None
        # upload_file switches to multipart for large weights; completion is atomic per object.
        # A dropped connection leaves the multipart upload open: abort it before trying again.
        self._call("upload", key, lambda: self.client.upload_file(str(path), self.bucket, k, ExtraArgs=extra),
                   before_retry=lambda: self._abort(k, exact=True))

    def metadata(self, key: str) -> dict:
        """User metadata of an object (``put_file(..., metadata=...)``)."""
        k = self._key(key)
        return self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=k)).get("Metadata", {})

    def abort_uploads(self, prefix: str) -> int:
        return self._call("abort uploads", prefix, lambda: self._abort(self._key(prefix.rstrip("/")), exact=False))

    def _abort(self, k: str, exact: bool) -> int:
        n = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=k):
            for up in page.get("Uploads", []):
                if exact and up["Key"] != k:
                    continue
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        return n

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        """PUT with ``If-None-Match: *``: False when the key already exists (412)."""
        from botocore.exceptions import ClientError

        k = self._key(key)

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=k, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    return False
                raise

        return self._call("create", key, put)

    def create(self, key: str, data: bytes) -> bool:
        if not self.conditional_writes():
            raise StorageRefused(f"{self.where(key)}: create failed: {self._describe()} ignores If-None-Match "
                                 "(no conditional writes)")
        return self._put_if_absent(key, data) or self.get_bytes(key) == data

    def conditional_writes(self) -> bool:
        """Whether the endpoint refuses a second ``If-None-Match: *`` put of one key (probed once)."""
        if self._conditional is None:
            probe = f".trimpi-probe/{uuid.uuid4().hex}"
            self.put_bytes(probe, b"1")
            try:
                self._conditional = not self._put_if_absent(probe, b"2")
            finally:
                self._best_effort(lambda: self.delete(probe))
        return self._conditional

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        k = self._key(key)
        dst = Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")

        def fetch():
            try:
                self.client.download_file(self.bucket, k, str(tmp))
            except Exception as e:  # download_file reports a missing key as a bare 404 ClientError
                tmp.unlink(missing_ok=True)
                raise e
            os.replace(tmp, dst)

        self._call("download", key, fetch)

    def _paginate(self, prefix: str, delimiter: str | None):
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        kwargs = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = delimiter

        def run():
            pages = list(self.client.get_paginator("list_objects_v2").paginate(**kwargs))
            return full, pages

        return self._call("list", prefix, run)

    def list(self, prefix: str = "") -> list[str]:
        full, pages = self._paginate(prefix, None)
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(o["Key"][strip:] for p in pages for o in p.get("Contents", []))

    def children(self, prefix: str = "") -> list[str]:
        full, pages = self._paginate(prefix, "/")
        out = [o["Key"][len(full):] for p in pages for o in p.get("Contents", [])]
        out += [c["Prefix"][len(full):] for p in pages for c in p.get("CommonPrefixes", [])]
        return sorted(x for x in out if x)

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=k))
            return True
        except NotFound:
            return False

    def delete(self, key: str) -> None:
        k = self._key(key)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=k))


def _shown(endpoint: str | None) -> str | None:
    """The endpoint as messages show it: ``user:password@`` in the URL is redacted."""
    return re.sub(r"(://)[^/@\s]+@", r"\1<redacted>@", endpoint) if endpoint else endpoint


def _unwrap(e: BaseException) -> BaseException:
    """The error behind boto3's transfer-manager wrappers (``upload_file``/``download_file``).

    ``upload_file`` turns every ``ClientError`` (503 SlowDown, NoSuchBucket, AccessDenied) into
    ``S3UploadFailedError`` and ``download_file`` turns exhausted socket retries into
    ``RetriesExceededError``; classified as they come, a transient 503 during a weight upload
    would not be retried and a missing bucket would escape as a traceback.
    """
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(e, S3UploadFailedError) and e.__context__ is not None:
        return e.__context__  # raised inside `except ClientError`: the context is the real error
    if isinstance(e, RetriesExceededError) and e.last_exception is not None:
        return e.last_exception
    return e


def open_storage(url: str | os.PathLike, endpoint_url: str | None = None, retries: int = 5,
                 backoff: float = 0.5) -> Storage:
    """``s3://bucket/prefix`` -> :class:`S3Storage`; a path or ``file://`` URL -> :class:`LocalStorage`."""
    url = str(url)
    if url.startswith("s3://"):
        return S3Storage(url, endpoint_url=endpoint_url, retries=retries, backoff=backoff)
    if "://" in url and not url.startswith("file://"):
        raise StorageRefused(f"{url}: expected a local directory, file://path or s3://bucket/prefix")
    return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)
