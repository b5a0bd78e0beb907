"""Model registry and promotion (``trimpi promote | registry …``).

Layout under the storage root (a local directory or ``s3://bucket/prefix``, via
:mod:`pipeline.storage`)::

    <model>/v3/model/...            weights (*.safetensors), config, processor/tokenizer files
    <model>/v3/metrics.json         the evaluation metrics the gate judged
    <model>/v3/gate.json            the gate verdict
    <model>/v3/card.json, card.md   model card: policies+versions, data version, params, git, metrics
    <model>/v3/intent.json          written FIRST, exclusively: the claim (content hash + claim id) on v3
    <model>/v3/COMPLETE.json        written LAST: manifest (file -> sha256, size); a version exists iff it has one
    <model>/aliases/production.json small pointer {"version": "v3", "previous": "v2", ...}
    <model>/log/<utc>-<event>-<v>.json  append-only promotion log: one new object per event, never rewritten

**Atomic alias move.** Promotion uploads everything, then writes ``COMPLETE.json``, then
replaces the pointer object (atomic per object on both backends). A crash anywhere before the
swap leaves production on the old version; readers resolve the alias and only ever follow it
to a version with a completion marker. A crashed upload is resumed by the next promotion of
the same weights (same content hash in ``intent.json``) instead of leaving a gap. The log
entry is written after the swap, so the pointer is the truth for "what is production" and
the log is the history: ``rollback`` walks it (v4 -> v3 -> v2, never back to a version that
was rolled back from, unless ``--to`` names it).

**Concurrent promoters** (two workspaces or machines; the workspace lock cannot see them).
A version number is taken by creating its ``intent.json`` *exclusively*: ``link()`` of a
complete temp file locally, ``PUT`` with ``If-None-Match: *`` on S3. The loser reads the
winner's intent: same content -> it joins that version (identical bytes), else it tries the
next number. Every weight object on S3 carries the content hash as metadata, and before
``COMPLETE.json`` is written the promoter re-reads ``intent.json`` and the metadata of every
object it uploaded: anything written by another content makes it start over with a new
number instead of completing a mixed version. An S3 endpoint that ignores ``If-None-Match``
(probed once) gets create-then-verify instead: intent written only if absent, read back after a
short settle delay, ownership re-checked before every file and again after upload. That narrows
the race to a writer stalled for longer than the delay between its own check and its PUT; use
an endpoint with conditional writes (AWS, SeaweedFS, MinIO) when promoters may run at once.

The gate that decides whether a model may be promoted lives beside evaluation
(``pipeline/evaluate/gate.py``); it reads the production model's metrics from here.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import flatten, get_dotted
from pipeline.io import TransientError, atomic_write_json, dump_yaml, file_hash, input_error, parse_json, read_json
from pipeline.storage import NotFound, Storage, open_storage

VERSION_RE = re.compile(r"^v(\d+)$")
CONTENT_META = "trimpi-content"  # S3 object metadata: the content hash of the version it was uploaded for
SETTLE_S = 1.0  # create-then-verify (no conditional writes): how long a racing PUT gets to land
MAX_CLAIMS = 20  # versions tried before giving up (each needs a concurrent winner to be lost)
_SECRETISH = re.compile(r"secret|password|passwd|token|access_key|credential", re.IGNORECASE)


@dataclass
class RegistryConfig:
    """``params.yaml: registry`` — where promoted models live."""

    root: str = "registry"
    """Storage root: a local directory (embedded default) or ``s3://bucket/prefix``."""
    model: str = "trimpi"
    """Registered model name (one directory under the root)."""
    endpoint_url: str = ""
    """S3 endpoint (e.g. ``http://127.0.0.1:8333``); empty = ``AWS_ENDPOINT_URL`` from the environment or AWS.
    Credentials are never configured here: only the standard AWS environment/config."""
    retries: int = 5
    """Attempts per storage operation for transient S3 errors (exponential back-off)."""
    backoff_s: float = 0.5
    """First back-off delay in seconds (doubles per attempt, capped at 30 s)."""


def _num(version: str | None) -> int:
    m = VERSION_RE.match(version or "")
    return int(m.group(1)) if m else -1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode()


class Registry:
    """One registered model on one storage root. All methods are backend-agnostic."""

    def __init__(self, storage: Storage, model: str):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model or ""):
            raise input_error("params.yaml", "registry.model", "a name of letters, digits, '_', '.', '-'", model)
        self.s = storage
        self.model = model

    def _k(self, *parts: str) -> str:
        return "/".join((self.model,) + parts)

    # -- reading
    def _version_dirs(self) -> list[str]:
        names = [c.rstrip("/") for c in self.s.children(self.model) if c.endswith("/")]
        return sorted((n for n in names if VERSION_RE.match(n)), key=lambda n: int(n[1:]))

    def is_complete(self, version: str) -> bool:
        return self.s.exists(self._k(version, "COMPLETE.json"))

    def versions(self, include_incomplete: bool = False) -> list[str]:
        return [v for v in self._version_dirs() if include_incomplete or self.is_complete(v)]

    def _read_json(self, *parts: str) -> Any:
        key = self._k(*parts)
        return parse_json(self.s.get_bytes(key), self.s.where(key))

    def alias(self, name: str = "production") -> dict | None:
        try:
            ptr = self._read_json("aliases", f"{name}.json")
        except NotFound:
            return None
        if not self.is_complete(ptr["version"]):  # never true unless someone edited the store by hand
            raise input_error(self.s.where(self._k("aliases", f"{name}.json")), "version",
                              "a version with a completion marker", ptr["version"])
        return ptr

    def resolve(self, ref: str = "production") -> str:
        """``"production"`` | ``"v3"`` | ``"3"`` -> a complete version name."""
        if ref == "production":
            ptr = self.alias()
            if ptr is None:
                raise input_error(self.s.where(self.model), "production", "a promoted model (none yet)")
            return ptr["version"]
        v = ref if ref.startswith("v") else f"v{ref}"
        if not VERSION_RE.match(v) or not self.is_complete(v):
            raise input_error(self.s.where(self.model), "version", "one of " + (", ".join(self.versions()) or "(none)"), ref)
        return v

    def metrics(self, ref: str = "production") -> dict:
        return self._read_json(self.resolve(ref), "metrics.json")

    def card(self, ref: str = "production") -> dict:
        return self._read_json(self.resolve(ref), "card.json")

    def manifest(self, ref: str = "production") -> dict:
        return self._read_json(self.resolve(ref), "COMPLETE.json")

    def log(self) -> list[dict]:
        return [parse_json(self.s.get_bytes(k), self.s.where(k)) for k in self.s.list(self._k("log"))]

    def fetch(self, ref: str, dest: str | os.PathLike) -> Path:
        """Download a version's model files into ``dest`` (atomically) and verify every sha256."""
        from pipeline.io import atomic_dir

        v = self.resolve(ref)
        files = self.manifest(v)["files"]
        with atomic_dir(dest) as tmp:
            for rel, info in files.items():
                self.s.get_file(self._k(v, "model", rel), tmp / rel)
                if file_hash(tmp / rel, None) != info["sha256"]:
                    raise input_error(self.s.where(self._k(v, "model", rel)), "sha256", info["sha256"], "a different hash")
        return Path(dest)

    # -- writing
    def _append_log(self, event: dict) -> None:
        event = {"at": now(), "model": self.model, **event}
        name = f"{event['at'].replace(':', '')}-{event['event']}-{event.get('version', '')}-{uuid.uuid4().hex[:6]}.json"
        self.s.put_bytes(self._k("log", name), _json_bytes(event))

    def _swap(self, version: str, reason: str) -> dict:
        """The one atomic step: replace the small pointer object."""
        old = self.alias()
        ptr = {"version": version, "previous": old["version"] if old else None, "at": now(), "reason": reason}
        self.s.replace(self._k("aliases", "production.json"), _json_bytes(ptr))
        return ptr

    def _claim(self, version: str, intent: dict) -> bool:
        """Take ``version`` by creating its intent.json; False if someone else holds it."""
        key, data = self._k(version, "intent.json"), _json_bytes(intent)
        if self.s.conditional_writes():
            return self.s.create(key, data)
        # create-then-verify (see the module docstring): no endpoint support for If-None-Match
        if self.s.exists(key):
            return False
        self.s.put_bytes(key, data)
        time.sleep(SETTLE_S)
        return self.s.get_bytes(key) == data

    def _intent(self, version: str) -> dict | None:
        try:
            intent = self._read_json(version, "intent.json")
        except NotFound:
            return None
        return intent if isinstance(intent, dict) else None

    def _pick_version(self, content: str) -> tuple[str, bool]:
        """(version, already_complete): a version holding the same content, else a newly claimed number."""
        dirs = self._version_dirs()
        for v in dirs:
            intent = self._intent(v)
            if intent is not None and intent.get("content") == content:
                return v, self.is_complete(v)  # resume a crashed upload, or the same weights again
        n = max((int(v[1:]) for v in dirs), default=0) + 1
        for _ in range(MAX_CLAIMS):
            v = f"v{n}"
            if self._claim(v, {"content": content, "claim": uuid.uuid4().hex, "at": now()}):
                return v, False
            theirs = self._intent(v)
            if theirs is not None and theirs.get("content") == content:  # a concurrent promotion of these weights
                return v, self.is_complete(v)
            n += 1
        raise TransientError(f"{self.s.where(self.model)}: v{n - MAX_CLAIMS}..v{n - 1} were all taken by other "
                             "promoters while this one tried them; promote again")

    def _owned(self, version: str, content: str) -> bool:
        intent = self._intent(version)
        return intent is not None and intent.get("content") == content

    def _conflicts(self, version: str, content: str, files: list[str]) -> list[str]:
        """After the upload, before COMPLETE: what in ``version`` is not ours any more."""
        if not self._owned(version, content):
            return ["intent.json"]
        meta = getattr(self.s, "metadata", None)
        if meta is None:  # local: the exclusive create already excludes other writers
            return []
        return [rel for rel in files if meta(self._k(version, "model", rel)).get(CONTENT_META) != content]

    def register(self, model_dir: str | os.PathLike, metrics: dict, gate: dict, card: dict) -> tuple[str, bool]:
        """Upload a model version (idempotent by content, safe against concurrent promoters).

        Returns (version, newly_uploaded).
        """
        model_dir = Path(model_dir)
        files = model_files(model_dir)
        manifest = {rel: {"sha256": file_hash(model_dir / rel, None), "size": (model_dir / rel).stat().st_size}
                    for rel in files}
        content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        from tqdm import tqdm

        for _ in range(MAX_CLAIMS):
            version, done = self._pick_version(content)
            if done:
                return version, False
            # a crashed earlier upload of this version may have left multipart uploads open
            self.s.abort_uploads(self._k(version) + "/")
            careful = not self.s.conditional_writes()
            lost = False
            for rel in tqdm(files, desc=f"upload {version}", unit="file", disable=None):
                if careful and not self._owned(version, content):
                    lost = True
                    break
                self.s.put_file(self._k(version, "model", rel), model_dir / rel, metadata={CONTENT_META: content})
            if lost or self._conflicts(version, content, files):
                continue  # another promoter owns this number (or wrote into it): start over
            vcard = {**card, "version": version, "model": self.model, "content": content}
            self.s.put_bytes(self._k(version, "metrics.json"), _json_bytes(metrics))
            self.s.put_bytes(self._k(version, "gate.json"), _json_bytes(gate))
            self.s.put_bytes(self._k(version, "card.json"), _json_bytes(vcard))
            self.s.put_bytes(self._k(version, "card.md"), render_card(vcard, metrics, gate).encode())
            self.s.put_bytes(self._k(version, "COMPLETE.json"),
                             _json_bytes({"content": content, "files": manifest, "at": now()}))
            return version, True
        raise TransientError(f"{self.s.where(self.model)}: other promoters overwrote this upload {MAX_CLAIMS} times "
                             "(an endpoint without conditional writes?); promote again")

    def promote(self, model_dir, metrics: dict, gate: dict, card: dict) -> dict:
        if not gate.get("passed"):
            raise GateFailed("the gate verdict is 'failed'; refusing to promote (see gate.json)")
        version, uploaded = self.register(model_dir, metrics, gate, card)
        current = self.alias()
        if current and current["version"] == version:
            return {"version": version, "uploaded": uploaded, "production": version, "changed": False}
        ptr = self._swap(version, "promote")
        self._append_log({"event": "promote", "version": version, "previous": ptr["previous"],
                          "git": card.get("git", {}).get("revision")})
        return {"version": version, "uploaded": uploaded, "production": version, "changed": True,
                "previous": ptr["previous"]}

    def rollback_target(self) -> str:
        """The version a plain ``rollback`` goes to, from the promotion log.

        The most recent version that was production before the current one and has not been
        rolled back from since it last became production: after v1..v4, rollback goes to v3,
        and again to v2 (the pointer's ``previous`` alone would bounce back to v4).
        """
        current = self.alias()
        if current is None:
            raise input_error(self.s.where(self.model), "production", "a promoted model to roll back from (none yet)")
        became: dict[str, int] = {}
        retired: set[str] = set()
        for i, e in enumerate(self.log()):  # object names start with the UTC time: chronological
            prev, to = e.get("previous"), e.get("version")
            # leaving a version by a rollback marks it bad, unless `--to` moved forward on purpose
            if e.get("event") == "rollback" and prev and (e.get("mode") != "to" or _num(prev) > _num(to)):
                retired.add(prev)
            if e.get("version"):
                became[e["version"]] = i
                retired.discard(e["version"])
        for v in sorted(became, key=became.get, reverse=True):
            if v != current["version"] and v not in retired and self.is_complete(v):
                return v
        history = ", ".join(sorted(became, key=became.get)) or "none"
        raise input_error(self.s.where(self.model), "production",
                          f"an earlier production version that was not rolled back from (production history: "
                          f"{history}; current {current['version']}); pass --to VERSION")

    def rollback(self, to: str | None = None) -> dict:
        current = self.alias()
        if current is None:
            raise input_error(self.s.where(self.model), "production", "a promoted model to roll back from (none yet)")
        target = self.resolve(to) if to is not None else self.rollback_target()
        if target == current["version"]:
            return {"version": target, "changed": False}
        ptr = self._swap(target, "rollback")
        self._append_log({"event": "rollback", "version": target, "previous": ptr["previous"],
                          "mode": "to" if to is not None else "previous"})
        return {"version": target, "changed": True, "previous": ptr["previous"]}


class GateFailed(Exception):
    """Promotion refused because the gate failed."""


def model_files(model_dir: Path) -> list[str]:
    """Files of a checkpoint dir to register: all but hidden files and resume checkpoints; needs safetensors."""
    if not model_dir.is_dir():
        raise input_error(model_dir, None, "a checkpoint directory")
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file() and not any(part.startswith((".", "checkpoint")) for part in p.relative_to(model_dir).parts))
    if not any(f.endswith(".safetensors") for f in files):
        raise input_error(model_dir, "weights", "*.safetensors weights (save_pretrained with safe serialization)", files[:5])
    return files


def open_registry(cfg: RegistryConfig) -> Registry:
    return Registry(open_storage(cfg.root, endpoint_url=cfg.endpoint_url or None, retries=cfg.retries,
                                 backoff=cfg.backoff_s), cfg.model)


# ----------------------------------------------------------------------------- model card


def _git() -> dict:
    def run(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except Exception:  # noqa: BLE001 - not a git checkout / no git: the card says so
            return None

    rev = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev or "unknown", "dirty": bool(dirty) if dirty is not None else None}


def scrub(obj: Any) -> Any:
    """Drop anything that looks like a credential before it goes into a card (defence in depth)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRETISH.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"(://)[^/@\s]+@", r"\1<redacted>@", obj)  # user:pass@ in URLs
    return obj


def build_card(params_path: str, policies_dir: str | None, data_dirs: list[str], model_dir: str) -> dict:
    from pipeline.config import read_params

    policies = []
    if policies_dir and Path(policies_dir).exists():
        from pipeline.policy import load_policies

        # the normalized spec too, so a later run can say what changed since this model
        # (`trimpi policy diff`, the flow's summary) without the git history of the checkout
        policies = [{"name": n, "version": p.version, "path": str(p.path), "spec": p.spec}
                    for n, p in sorted(load_policies(policies_dir).items())]
    data = {}
    for d in data_dirs:
        man = Path(d) / "manifest.json"
        data[d] = file_hash(man) if man.exists() else None
    params = read_params(params_path) if Path(params_path).exists() else {}
    train_metrics = Path(model_dir) / "metrics.json"
    return scrub({"created_at": now(), "policies": policies, "data": data, "params": params, "git": _git(),
                  "source_dir": str(model_dir),
                  "training": read_json(train_metrics) if train_metrics.exists() else None})


def render_card(card: dict, metrics: dict, gate: dict) -> str:
    lines = [f"# {card.get('model')} {card.get('version')}", "",
             f"Registered {card.get('created_at')} from `{card.get('source_dir')}` at git "
             f"`{card.get('git', {}).get('revision')}`" + (" (dirty tree)" if card.get("git", {}).get("dirty") else ""),
             f"Content hash `{card.get('content')}`. Gate: **{'passed' if gate.get('passed') else 'failed'}**.", "",
             "## Policies", "", "| policy | version | file |", "|---|---|---|"]
    lines += [f"| {p['name']} | `{p['version']}` | {p['path']} |" for p in card.get("policies", [])] or ["| (none recorded) | | |"]
    lines += ["", "## Data", ""] + [f"* `{d}`: manifest `{h}`" for d, h in card.get("data", {}).items()]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in flatten(metrics).items() if not isinstance(v, (list, dict))]
    lines += ["", "## Gate", "", "| check | value | threshold | status |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']} | {c['op']} {c['threshold']} | {c['status']} |" for c in gate.get("checks", [])]
    lines += ["", "## Params", "", "```yaml", dump_yaml(card.get("params", {})).rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- promote + registry CLI


def configure_promote(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir to register (e.g. models/rl)")
    p.add_argument("--metrics", default="metrics/eval.json")
    p.add_argument("--gate", default="metrics/gate.json")
    p.add_argument("--policies", default="policies", help="policies recorded (with versions) in the card")
    p.add_argument("--data", action="append", default=[], help="dataset dirs whose manifest hash goes in the card")
    p.add_argument("--out", default="metrics/promote.json", help="summary of what was promoted (DVC output)")


def run_promote(args) -> int:
    from pipeline.config import load_section

    cfg = load_section(RegistryConfig, "registry", args.params, args.overrides)
    gate = read_json(args.gate)
    if not gate.get("passed"):
        print(f"promote: refused: the gate failed ({args.gate}); production is unchanged", file=sys.stderr)
        return 1
    metrics = read_json(args.metrics)
    reg = open_registry(cfg)
    card = build_card(args.params, args.policies, args.data, args.model)
    res = reg.promote(args.model, metrics, gate, card)
    res["url"] = reg.s.where(reg._k(res["version"]))
    atomic_write_json(args.out, res)
    what = "registered and promoted" if res["uploaded"] else "already registered; promoted"
    print(f"promote: {what} {res['version']} -> production"
          + (" (unchanged)" if not res["changed"] else f" (was {res.get('previous') or 'none'})") + f"\n  {res['url']}")
    return 0


def configure_list(p) -> None:
    p.add_argument("--all", action="store_true", help="also show incomplete (crashed) uploads")


def run_list(args) -> int:
    from pipeline.config import load_section

    reg = open_registry(load_section(RegistryConfig, "registry", args.params, args.overrides))
    ptr = reg.alias()
    prod = ptr["version"] if ptr else None
    versions = reg.versions(include_incomplete=args.all)
    if not versions:
        print(f"no versions of {reg.model!r} in {reg.s.url}")
    for v in versions:
        if not reg.is_complete(v):
            print(f"  {v:<6} (incomplete upload)")
            continue
        m = reg._read_json(v, "metrics.json")
        created = reg._read_json(v, "COMPLETE.json").get("at", "")
        mark = "*" if v == prod else " "
        print(f"{mark} {v:<6} {created}  main={get_dotted(m, 'main.score')}  override={get_dotted(m, 'override.score')}"
              + ("  <- production" if v == prod else ""))
    return 0


def configure_show(p) -> None:
    p.add_argument("version", nargs="?", default="production", help="vN or 'production' (default)")


def run_show(args) -> int:
    from pipeline.config import load_section

    reg = open_registry(load_section(RegistryConfig, "registry", args.params, args.overrides))
    v = reg.resolve(args.version)
    print(reg.s.get_bytes(reg._k(v, "card.md")).decode())
    return 0


def configure_rollback(p) -> None:
    p.add_argument("--to", default=None, help="version to point production at (default: the previous production)")


def run_rollback(args) -> int:
    from pipeline.config import load_section

    reg = open_registry(load_section(RegistryConfig, "registry", args.params, args.overrides))
    res = reg.rollback(args.to)
    print(f"rollback: production -> {res['version']}" + ("" if res["changed"] else " (unchanged)"))
    return 0
