"""File I/O every stage shares: clear input errors, safe YAML, atomic writes.

Two rules live here so no stage re-invents them:

* Bad input raises :class:`InputError`, whose message names the file, the field and what
  was expected. The CLI prints it without a traceback and exits 2.
* Outputs are written to a temporary sibling and renamed into place, so a crashed or
  interrupted stage never leaves a file or directory that DVC would take as complete,
  and the previous output stays intact until the new one is whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class InputError(Exception):
    """Bad user input (policy spec, dataset, checkpoint, params, remote).

    Build it with :func:`input_error` so every message has the same shape:
    ``<file>: <field>: expected <what>, got <what>``.
    """


def input_error(path: str | os.PathLike | None, field: str | None, expected: str, got: Any = None) -> InputError:
    where = str(path) if path is not None else "<input>"
    msg = f"{where}: " + (f"{field}: " if field else "") + f"expected {expected}"
    if got is not None:
        shown = repr(got)
        msg += f", got {shown if len(shown) < 200 else shown[:200] + '...'}"
    return InputError(msg)


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse YAML with the safe loader only (tags such as !!python/object are refused)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise input_error(p, None, "an existing YAML file") from None
    except UnicodeDecodeError as e:
        raise input_error(p, None, "UTF-8 text", f"undecodable byte at {e.start}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise input_error(p, loc, "valid YAML (safe subset, no custom tags)", problem) from None


def dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)


def stable_hash(obj: Any, n: int = 12) -> str:
    """Content hash of a JSON-able object, independent of key order. Used as a version."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_hash(path: str | os.PathLike, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# ----------------------------------------------------------------------------- atomic writes


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n")


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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines; a truncated or malformed line is an InputError naming the line."""
    p = Path(path)
    if not p.exists():
        raise input_error(p, None, "an existing JSONL file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise input_error(p, f"line {i}", "one JSON object per line", f"{e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise input_error(p, f"line {i}", "a JSON object", type(obj).__name__)
            rows.append(obj)
    return rows


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise input_error(p, None, "an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise input_error(p, f"line {e.lineno}", "valid JSON", e.msg) from None
