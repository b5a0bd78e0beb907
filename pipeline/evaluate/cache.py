"""Response cache of the forgetting suite: each (model, probe set, decoding) is generated once.

Every evaluation of a run (``evaluate`` and each ``evaluate_variant@…``) probes the same baseline
on the same probe set; its "before" figures were recomputed five times per run (75 batches each,
issue 17). Greedy responses are a pure function of the checkpoint, the probe records and images,
the prompt/decoding code and the decoding settings, so they are cached under a key hashing
exactly those:

* the checkpoint's CONTENT: every file of the model directory except the run artifacts stages
  write beside the weights (``metrics.json``, ``model_card.json``, ``train_log.csv``), so a copy
  or a re-save of the same weights hits and any change to weights, config, tokenizer or
  processor misses;
* the probe set: the JSONL file's hash and the bytes of every image file (zip shard) it refers to;
* the decoding: ``max_new_tokens``, ``batch_size`` (rows decoded together), the prompt/decoding
  code (``pipeline/model/*.py``), torch/transformers versions, device, dtype and thread count
  (floating-point sums may differ across them).

Only greedy decoding is cached: a sampled response depends on the random state left by the suites
that ran before it. The "after" pass goes through the same cache, so evaluating the baseline
itself (``evaluate_variant@init``/``@base``) generates nothing for this suite, and re-running an
evaluation of an unchanged model re-uses its responses.

Where: ``.trimpi/cache/forgetting/<key>.json`` (``trimpi evaluate --cache-dir``; ``""`` turns
the cache off). Not a DVC output, on purpose: DVC deletes a stage's outputs before re-running it
and would throw the baseline's responses away exactly when another stage needs them, and an
output of the stage that builds the base would tie the base-building stage to the probe set and
to evaluation settings it does not otherwise depend on (and the baseline is not always that
stage's checkpoint). A content-keyed entry cannot go stale: anything that could change a
response changes the key. Entries are small JSON files (a few hundred KB per probe set); delete
the folder at any time to reclaim them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# files a training stage writes next to the weights; they never change what the model generates
RUN_ARTIFACTS = {"metrics.json", "model_card.json", "train_log.csv"}
_memo: dict = {}


def _sha(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _memo[memo_key] = h.hexdigest()
    return _memo[memo_key]


def model_hash(model_dir: str | os.PathLike) -> str:
    """Content hash of a checkpoint directory (weights, config, tokenizer, processor; not run artifacts)."""
    root = Path(model_dir)
    parts = {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in RUN_ARTIFACTS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def images_hash(root: Path, recs) -> str:
    """Hash of the image files (zip shards or plain files under ``root``) the records refer to."""
    files = set()
    for r in recs:
        for ref in r.images:
            files.add(ref.split(".zip/")[0] + ".zip" if ".zip/" in ref else ref)
    parts = {f: (_sha(root / f) if (root / f).is_file() else "missing") for f in sorted(files)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def code_hash() -> str:
    """The prompt building and decoding code (``pipeline/model/*.py``)."""
    here = Path(__file__).resolve().parents[1] / "model"
    return hashlib.sha256(json.dumps({p.name: _sha(p) for p in sorted(here.glob("*.py"))}).encode()).hexdigest()


def cache_key(model_dir, cfg, src, recs) -> str | None:
    """Key of the responses of the checkpoint ``model_dir`` to ``recs`` (a probe source) under ``cfg``
    (:class:`EvalConfig`), or None when they must not be cached (sampling). Computed without loading the
    model: device and dtype are the ones ``pipeline.model.load`` picks."""
    if cfg.do_sample:
        return None
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    parts = {
        "model": model_hash(model_dir),
        "records": src.hash,
        "ids": [r.id for r in recs],
        "images": images_hash(Path(src.root), recs),
        "multimodal": bool(getattr(src, "multimodal", False)),
        "decoding": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "code": code_hash(),
        "versions": [torch.__version__, transformers.__version__],
        "device": ["cuda" if cuda else "cpu", "bfloat16" if cuda else "float32", torch.get_num_threads()],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached_responses(cache_dir: str | os.PathLike | None, model_dir, cfg, src, recs,
                     compute) -> tuple[list[str], bool]:
    """(responses, hit): from ``<cache_dir>/forgetting/<key>.json`` when present, else ``compute()`` then stored."""
    key = cache_key(model_dir, cfg, src, recs) if cache_dir else None
    if key is None:
        return compute(), False
    path = Path(cache_dir) / "forgetting" / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("ids") == [r.id for r in recs] and len(data.get("responses", [])) == len(recs):
                return list(data["responses"]), True
        except (OSError, ValueError):
            pass  # a damaged entry is recomputed and rewritten
    texts = compute()
    from pipeline.io import atomic_write_json

    atomic_write_json(path, {"model_dir": str(model_dir), "ids": [r.id for r in recs], "responses": texts})
    return texts, False
