"""File I/O every stage shares: clear input errors, bounded YAML/JSON, atomic writes.

Rules that live here so no stage re-invents them:

* Bad input raises :class:`InputError`, whose message names the file, the field and what
  was expected. The CLI prints it without a traceback and exits 2.
* A failure that may heal by itself (a dropped connection, an S3 5xx after the retry budget,
  a busy workspace) raises :class:`TransientError`; the CLI exits 75 (``EX_TEMPFAIL``) and the
  flow retries it. Nothing decides "transient" by reading output text.
* Every YAML and JSON document the project reads goes through :func:`parse_yaml` /
  :func:`parse_json`: cost bounded (size, alias expansion, nesting), optional refusal of
  non-finite numbers, errors shaped like the rest.
* Outputs are written to a temporary sibling and renamed into place, so a crashed or
  interrupted stage never leaves a file or directory that DVC would take as complete,
  and the previous output stays intact until the new one is whole. Temporary files and
  directories get the permissions the umask gives ordinary files (``mkstemp``'s 0600 would
  otherwise survive the rename and lock out other users and serving containers).
* OS-level write and read failures (full disk, read-only, not a directory, permission)
  become one line in :func:`os_error_line`, the only place that wording lives.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import reprlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

EX_TEMPFAIL = 75
"""Exit code of a transient failure (BSD sysexits ``EX_TEMPFAIL``: "try again later")."""
EX_SOFTWARE = 70
"""Exit code of an unexpected exception (sysexits ``EX_SOFTWARE``): a bug, not a failed check. Exit 1 is
kept for "a check failed" (validation, gate), so the flow can tell the two apart."""

MAX_DOCUMENT_CHARS = 16 << 20
"""Largest YAML document read (policies and params are kilobytes; more is not ours)."""
MAX_YAML_NODES = 200_000
"""Most YAML nodes after expanding aliases: a 529-byte anchor bomb expands to 43 million."""


class InputError(Exception):
    """Bad user input (policy spec, dataset, checkpoint, params, remote).

    Build it with :func:`input_error` so every message has the same shape:
    ``<file>: <field>: expected <what>, got <what>``.
    """


class TransientError(Exception):
    """A failure worth retrying later (network, storage 5xx after retries, busy workspace).

    The CLI prints the message and exits :data:`EX_TEMPFAIL`; the flow retries that code.
    """


# reprlib bounds the work, not just the output: a value shared a million times through YAML
# aliases (or a huge list) is never walked in full just to print 200 characters of it.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 160, 160
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 8


def preview(value: Any, limit: int = 200) -> str:
    """A short repr of any value at a bounded cost (for messages)."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def input_error(path: str | os.PathLike | None, field: str | None, expected: str, got: Any = None) -> InputError:
    where = str(path) if path is not None else "<input>"
    msg = f"{where}: " + (f"{field}: " if field else "") + f"expected {expected}"
    if got is not None:
        msg += f", got {preview(got)}"
    return InputError(msg)


# ----------------------------------------------------------------------------- bounded YAML / JSON


def _yaml_size(root, where) -> None:
    """Refuse a node graph whose expansion (aliases followed) exceeds MAX_YAML_NODES.

    Aliases make the composed graph a DAG: sizes are memoized per node, so this costs one
    visit per distinct node however large the expansion. Recursive anchors never end.
    """
    from yaml.nodes import MappingNode, SequenceNode

    def kids(n):
        if isinstance(n, SequenceNode):
            return n.value
        if isinstance(n, MappingNode):
            return [x for kv in n.value for x in kv]
        return []

    size: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        k = id(node)
        if done:
            active.discard(k)
            size[k] = 1 + sum(size[id(c)] for c in kids(node))
            if size[k] > MAX_YAML_NODES:
                break
            continue
        if k in size:
            continue
        if k in active:
            raise input_error(where, f"line {node.start_mark.line + 1}", "a YAML document without recursive aliases")
        active.add(k)
        stack.append((node, True))
        stack.extend((c, False) for c in kids(node) if id(c) not in size)
    total = size.get(id(root), MAX_YAML_NODES + 1)
    if total > MAX_YAML_NODES:
        raise input_error(where, "document", f"at most {MAX_YAML_NODES:,} values once anchors/aliases are expanded",
                          "more (an alias bomb?)")


def parse_yaml(text: str, where: str | os.PathLike | None = None) -> Any:
    """Parse YAML text with the safe loader (custom tags refused), at a bounded cost."""
    import yaml

    if len(text) > MAX_DOCUMENT_CHARS:
        raise input_error(where, None, f"a YAML document of at most {MAX_DOCUMENT_CHARS >> 20} MiB",
                          f"{len(text):,} characters")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise input_error(where, loc, "valid YAML (safe subset, no custom tags)", problem) from None
    except RecursionError:
        raise input_error(where, "document", "YAML nested less deeply") from None
    finally:
        loader.dispose()


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"non-finite number {text}")
    return v


def parse_json(text: str | bytes, where: str | os.PathLike | None = None, field: str | None = None,
               finite: bool = False, expected: str = "valid JSON") -> Any:
    """Parse JSON; errors name ``where``/``field``. ``finite`` refuses NaN, Infinity and overflowing
    numbers such as 1e400 (user inputs: a NaN profile field would crash integer checks far away).

    JSON has no aliases, so its cost is linear in the text; only nesting is bounded (Python's
    recursion limit, turned into the usual error).
    """
    try:
        if finite:
            return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise input_error(where, field or f"line {e.lineno}", expected, f"{e.msg} at column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise input_error(where, field, "UTF-8 text", f"undecodable byte at {e.start}") from None
    except ValueError as e:  # a refused constant or overflowing float
        raise input_error(where, field, "finite numbers only", str(e)) from None
    except RecursionError:
        raise input_error(where, field, "JSON nested less deeply") from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Read and parse a YAML file (see :func:`parse_yaml`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise input_error(p, None, "an existing YAML file") from None
    except UnicodeDecodeError as e:
        raise input_error(p, None, "UTF-8 text", f"undecodable byte at {e.start}") from None
    return parse_yaml(text, p)


def dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)


def stable_hash(obj: Any, n: int = 12) -> str:
    """Content hash of a JSON-able object, independent of key order. Used as a version."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_hash(path: str | os.PathLike, n: int | None = 12) -> str:
    """sha256 of a file's bytes, read in chunks: the first ``n`` hex digits (a version), or all of
    them with ``n=None`` (the registry's manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# ----------------------------------------------------------------------------- OS errors

# errno -> an explanation added to the system's own wording where that wording is cryptic;
# the only table of its kind (the CLI prints what os_error_line makes of it).
_OS_ERRORS = {
    errno.ENOSPC: "", errno.EDQUOT: "", errno.EFBIG: "", errno.EROFS: "", errno.EIO: "",
    errno.EACCES: "", errno.EPERM: "", errno.ENAMETOOLONG: "",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EEXIST: "a file is in the way where a directory is needed",
    errno.EISDIR: "a directory is in the way where a file is needed",
}


def os_error_line(e: OSError) -> str | None:
    """The one-line message for an OS-level read/write failure, or None for errors we do not own.

    Every writer goes through the temp-then-rename helpers below, so a failed write leaves the
    previous outputs intact, which the message says. A permission error on a file that exists
    but cannot be read is reported as a failed read (the old wording said "write" for both).
    """
    if e.errno not in _OS_ERRORS:
        return None
    name = os.fsdecode(e.filename) if e.filename else "output"
    what = (e.strerror or os.strerror(e.errno)) + (f" ({_OS_ERRORS[e.errno]})" if _OS_ERRORS[e.errno] else "")
    reading = False
    if e.errno in (errno.EACCES, errno.EPERM) and e.filename:
        with contextlib.suppress(OSError):
            reading = Path(name).exists() and not os.access(name, os.R_OK)
    if reading:
        return f"cannot read {name}: {what}"
    return f"cannot write {name}: {what} (nothing was half-written; previous outputs are intact)"


@contextlib.contextmanager
def disk_writes(path: str | os.PathLike) -> Iterator[None]:
    """Turn a serializer's write failure into the OSError it really is.

    torch.save reports a failed write as ``RuntimeError: ... unexpected pos``, safetensors as
    ``SafetensorError: ... No space left on device``: neither is an OSError, so without this a
    full disk during a checkpoint or model save ends in a traceback instead of one line.
    """
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it is a write failure
        text = str(e)
        if "No space left" in text or "StorageFull" in text or "os error 28" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        if "File too large" in text or "FileTooLarge" in text or "os error 27" in text:
            raise OSError(errno.EFBIG, "File too large", str(path)) from e
        if "unexpected pos" in text or "file write failed" in text:
            # torch's stream writer does not keep errno; "unexpected pos" is a short write
            raise OSError(errno.EIO, "write failed (disk full?)", str(path)) from e
        raise


_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it,
    which is briefly process-wide, hence the lock and the /proc path first."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- atomic writes


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would have given the final file
    finally:
        os.close(fd)
    return Path(name)


def _as_final(e: OSError, tmp: Path, final: Path) -> OSError:
    """The same error, naming the output a person asked for instead of its temporary sibling."""
    name = os.fsdecode(e.filename) if e.filename else ""
    if name and name.startswith(str(tmp)):
        e.filename = str(final) + name[len(str(tmp)):]
    return e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _as_final(e, tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n")


def _respect_umask(root: Path) -> None:
    """Give a finished output tree the modes plain ``open``/``mkdir`` would have given it.

    mkdtemp makes the directory 0700, and writers inside it (transformers' shard writer among
    them) use mkstemp-style 0600 files: renamed into place, those would lock every other user
    and a serving container with another uid out of ``models/*``.
    """
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                mode = os.stat(p).st_mode & 0o777
                os.chmod(p, (mode | (0o666 & ~mask)) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    The old directory is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _respect_umask(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_final(e, tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- JSON lines


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Atomically write rows as JSON lines; returns the row count."""
    n = 0
    lines = []
    for r in rows:
        lines.append(json.dumps(r, ensure_ascii=False, sort_keys=False))
        n += 1
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return n


def read_jsonl(path: str | os.PathLike, finite: bool = True) -> list[dict]:
    """Read JSON lines; a truncated, malformed, non-UTF-8 or non-finite line is an InputError naming it.

    Lines are decoded one by one so a bad byte is reported with its line like any other damage.
    """
    p = Path(path)
    if not p.exists():
        raise input_error(p, None, "an existing JSONL file")
    rows = []
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise input_error(p, f"line {i}", "UTF-8 text", f"undecodable byte at column {e.start + 1}") from None
            if not line.strip():
                continue
            obj = parse_json(line, p, f"line {i}", finite=finite, expected="one JSON object per line")
            if not isinstance(obj, dict):
                raise input_error(p, f"line {i}", "a JSON object", type(obj).__name__)
            rows.append(obj)
    return rows


def read_json(path: str | os.PathLike, finite: bool = False) -> Any:
    """Read a JSON file (see :func:`parse_json`); a missing or undecodable file is an InputError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise input_error(p, None, "an existing JSON file") from None
    except IsADirectoryError:
        raise input_error(p, None, "a JSON file, not a directory") from None
    return parse_json(data, p, finite=finite)
