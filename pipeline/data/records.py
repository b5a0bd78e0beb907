"""The one record schema every stage reads and writes, and the sharded image store.

A dataset directory (what ``trimpi generate clevr|gta|generic`` writes) looks like::

    data/clevr/
      images/shard-00000.zip ...      # PNG/JPEG files, stored (not compressed) in zip shards
      train.jsonl                     # answer-only records (direct SFT, RL)
      cot.jsonl                       # the subset with gold reasoning (VM-CPT, CoT SFT)
      test.jsonl override.jsonl       # evaluation (override: + override_policies/<name>.yaml)
      manifest.json                   # sizes, label distribution, policy versions, params used

Each JSONL row is a :class:`Record`. Images are referenced as ``"<shard>.zip/<member>"``
relative to the dataset directory, so a dataset is a handful of files, not hundreds of
thousands, and the reference survives a move of the whole directory.

Every stage opens a dataset the same way, :func:`open_dataset` (the directory, its image store,
its manifest and the policy rendering it was made for), and reads a split with
:meth:`Dataset.records` (training: the file must exist) or :func:`split_records` (evaluation: an
absent split is empty, an optional cap spreads over policies).
"""
from __future__ import annotations

import dataclasses
import io
import os
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.io import input_error, read_jsonl, write_jsonl

TASKS = ("clevr", "gta", "generic", "text")
SPLITS = ("train", "test", "override", "probe")


@dataclass
class Record:
    """One training/evaluation example. The same shape for ClevrPolicy, GTAPolicy and generic QA."""

    id: str
    """Unique within the dataset, e.g. ``"L2-Surinu/train/000017"``."""
    task: str
    """``clevr`` | ``gta`` | ``generic`` (policy-free perception QA) | ``text`` (text-only QA)."""
    split: str
    """``train`` | ``test`` | ``override`` | ``probe``."""
    query: str
    """The user query exactly as the model sees it."""
    answer: str
    """Gold answer: the text that goes inside ``\\boxed{...}`` (``"Case 3"``, a JSON tool call, ``"yes"``)."""
    images: list[str] = field(default_factory=list)
    """Input image references (``"shard-00000.zip/000017.png"``) relative to the dataset dir."""
    policy: str = ""
    """Name of the policy the query refers to (``"L2-Surinu"``, ``"GTAPolicy"``); empty for generic QA."""
    policy_version: str = ""
    """Content hash of that policy spec when the record was made (labels are only valid for it)."""
    cot: str = ""
    """Gold reasoning (the text inside ``<think>...</think>``); empty when the record has none."""
    context: dict[str, Any] = field(default_factory=dict)
    """Task-specific inputs shown to the model besides the query: GTA ``profile``, ``history``, ``instruction``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance and gold structure, never shown to the model: ``scene``, ``gold_path``, ``depth``, ``qtype``..."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: str | os.PathLike = "<records>", line: int | None = None) -> "Record":
        where = f"line {line}" if line is not None else "record"
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("id", "task", "split", "query", "answer") if k not in d]
        if missing:
            raise input_error(path, f"{where}.{missing[0]}", "a value (required record field)")
        unknown = sorted(set(d) - names)
        if unknown:
            raise input_error(path, f"{where}.{unknown[0]}", "only the Record fields " + ", ".join(sorted(names)))
        for k in ("id", "task", "split", "query", "answer", "policy", "policy_version", "cot"):
            if k in d and not isinstance(d[k], str):
                raise input_error(path, f"{where}.{k}", "a string", d[k])
        if not isinstance(d.get("images", []), list):
            raise input_error(path, f"{where}.images", "a list of image references", d.get("images"))
        return cls(**d)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    return write_jsonl(path, (r.to_dict() for r in records))


def read_records(path: str | os.PathLike) -> list[Record]:
    return [Record.from_dict(d, path, i + 1) for i, d in enumerate(read_jsonl(path))]


def _member(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed timestamp: the same images give byte-identical shards, so DVC
    sees no change (and re-runs nothing downstream) when a regenerated dataset is the same."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


class ImageStore:
    """Read and write images of one dataset directory, packed into zip shards.

    Writing: ``ref = store.add(pil_image, "000017.png")`` appends to the current shard
    (a new shard every ``shard_size`` images); call :meth:`close` when done. Shards are
    written under temporary names and renamed on close, so an interrupted writer leaves
    no shard that looks complete. Reading: ``store.open(ref)`` returns a PIL image.
    """

    def __init__(self, root: str | os.PathLike, subdir: str = "images", shard_size: int = 2000):
        self.root = Path(root)
        self.subdir = subdir
        self.shard_size = shard_size
        self._writer: zipfile.ZipFile | None = None
        self._writer_tmp: Path | None = None
        self._writer_name = ""
        self._count = 0
        self._shard = 0
        self._readers: dict[str, zipfile.ZipFile] = {}
        self._lock = threading.Lock()

    # -- writing
    def add(self, image, name: str, fmt: str | None = None) -> str:
        if self._writer is None or self._count >= self.shard_size:
            self._rotate()
        buf = io.BytesIO()
        fmt = fmt or ("JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG")
        image.save(buf, format=fmt)
        self._writer.writestr(_member(name), buf.getvalue())
        self._count += 1
        return f"{self.subdir}/{self._writer_name}/{name}"

    def add_bytes(self, data: bytes, name: str) -> str:
        if self._writer is None or self._count >= self.shard_size:
            self._rotate()
        self._writer.writestr(_member(name), data)
        self._count += 1
        return f"{self.subdir}/{self._writer_name}/{name}"

    def _rotate(self) -> None:
        self._finish_shard()
        d = self.root / self.subdir
        d.mkdir(parents=True, exist_ok=True)
        while (d / f"shard-{self._shard:05d}.zip").exists():
            self._shard += 1
        self._writer_name = f"shard-{self._shard:05d}.zip"
        self._writer_tmp = d / f".{self._writer_name}.tmp"
        self._writer = zipfile.ZipFile(self._writer_tmp, "w", compression=zipfile.ZIP_STORED)
        self._count = 0
        self._shard += 1

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self._writer_tmp, self.root / self.subdir / self._writer_name)
            self._writer = None

    def close(self) -> None:
        self._finish_shard()
        for z in self._readers.values():
            z.close()
        self._readers.clear()

    # -- reading
    def read_bytes(self, ref: str) -> bytes:
        parts = ref.split("/")
        if (len(parts) < 3 or not parts[-2].endswith(".zip") or ".." in parts or ref.startswith("/")
                or "\\" in ref):
            raise input_error(self.root, "images", "a reference '<subdir>/<shard>.zip/<member>' inside the dataset", ref)
        shard = "/".join(parts[:-1])
        member = parts[-1]
        with self._lock:
            z = self._readers.get(shard)
            if z is None:
                p = self.root / shard
                if not p.resolve().is_relative_to(self.root.resolve()):  # e.g. a symlinked shard
                    raise input_error(self.root, "images", "a shard inside the dataset directory", ref)
                if not p.exists():
                    raise input_error(p, "images", "an existing image shard", ref)
                try:
                    z = self._readers[shard] = zipfile.ZipFile(p)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
                    raise input_error(p, "images", "an intact zip shard (regenerate the dataset)",
                                      f"{type(e).__name__}: {e}") from None
            try:
                return z.read(member)
            except KeyError:
                raise input_error(self.root / shard, member, "an image in this shard", ref) from None
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
                # a flipped byte fails the member's CRC-32; a cut shard fails its headers
                raise input_error(self.root / shard, member, "an intact image (regenerate the dataset)",
                                  f"{type(e).__name__}: {e}") from None

    def open(self, ref: str):
        from PIL import Image

        data = self.read_bytes(ref)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            raise input_error(self.root, ref, "a decodable image", f"{type(e).__name__}: {e}") from None
        return img.convert("RGB")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- a dataset directory


@dataclass
class Dataset:
    """One dataset directory (``data/clevr``): where its records and images are, and how its policies render."""

    root: Path
    store: ImageStore
    manifest: dict
    multimodal: bool
    """Render policies with their images (ClevrPolicy-M): the manifest's choice unless the caller forced one."""

    @property
    def name(self) -> str:
        return self.root.name

    def records(self, file: str) -> list[Record]:
        """Every record of ``file`` (e.g. ``cot.jsonl``); a missing file is an InputError."""
        return read_records(self.root / file)


def open_dataset(path: str | os.PathLike, multimodal: bool | None = None) -> Dataset:
    """Open a dataset directory; ``multimodal`` None = the policy rendering its manifest records."""
    from pipeline.io import read_json

    root = Path(path)
    if not root.is_dir():
        raise input_error(root, "--data", "an existing dataset directory (trimpi generate ...)")
    manifest = read_json(root / "manifest.json") if (root / "manifest.json").exists() else {}
    if not isinstance(manifest, dict):
        raise input_error(root / "manifest.json", None, "a JSON object", type(manifest).__name__)
    if multimodal is None:
        # clevr records the choice at the top level and in its config; older manifests only in the config
        conf = manifest.get("config")
        multimodal = bool(manifest.get("multimodal", conf.get("multimodal", False) if isinstance(conf, dict) else False))
    return Dataset(root, ImageStore(root), manifest, multimodal)


def split_records(ds: Dataset, split: str, limit: int = 0) -> list[Record]:
    """Records of ``<split>.jsonl`` (none when the dataset has no such split), at most ``limit`` (0 = all)."""
    path = ds.root / f"{split}.jsonl"
    if not path.exists():
        return []
    recs = read_records(path)
    if not limit or len(recs) <= limit:
        return recs
    # round-robin over policies: the files are grouped by policy, and the first `limit` records
    # would score one policy only
    by_policy: dict[str, list[Record]] = {}
    for r in recs:
        by_policy.setdefault(r.policy, []).append(r)
    queues = list(by_policy.values())
    picked = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)][:limit]
    order = {id(r): i for i, r in enumerate(recs)}
    return sorted(picked, key=lambda r: order[id(r)])
