"""Forgetting-suite inputs: the policy-free probe set and user benchmarks in one documented format.

The probe set is ``<probes>/test.jsonl`` (``trimpi generate generic``): records of task ``generic``
(perception questions about unseen scenes, grouped by ``meta.qtype``) and ``text`` (text-only
questions, reported as one group ``text``). Any number of user benchmarks can be added with
``evaluate.benchmarks``: JSON lines, image paths relative to the JSONL file (they may not escape
its folder), ``choices`` optional::

    {"id": "q1", "question": "Which colour ...?", "answer": "B", "images": ["img/q1.png"], "choices": ["red", "blue"]}

With ``choices`` the question is followed by lettered options and the answer may be given as a
letter or as the option text (MMMU-Pro / MMLU-Pro exports map directly onto this).

Responses without ``\\boxed{}`` are scored on their last non-empty line: an untrained baseline
rarely follows the boxed format, and the before/after comparison must measure knowledge, not format.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.records import Record, open_dataset, split_records
from pipeline.evaluate import metrics as M
from pipeline.io import file_hash, input_error, read_jsonl


def dataset_key(path: Path) -> str:
    """How a scored file is named in ``metrics.test_sets`` (stable across checkouts)."""
    return f"{path.parent.name}/{path.name}"


class FileImages:
    """Image store over plain files next to a user benchmark (paths may not escape its folder)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def open(self, ref: str):
        from PIL import Image

        p = (self.root / ref).resolve()
        if not p.is_relative_to(self.root) or not p.is_file():
            raise input_error(self.root, "images", "an existing image path inside the benchmark folder", ref)
        with Image.open(p) as im:
            return im.convert("RGB")


@dataclass
class ProbeSource:
    """What :meth:`Runner.respond` needs from a dataset, for probe sets and user benchmarks."""

    root: Path
    store: Any
    hash: str
    multimodal: bool = False
    name: str = ""


def load_benchmark(path: str | os.PathLike) -> list[Record]:
    """A user benchmark JSONL (format in the module docstring) -> Records of task ``generic``."""
    p = Path(path)
    recs = []
    for i, row in enumerate(read_jsonl(p), 1):
        for k in ("id", "question", "answer"):
            if not isinstance(row.get(k), (str, int, float)) or row.get(k) == "":
                raise input_error(p, f"line {i}.{k}", "a non-empty string")
        images, choices = row.get("images", []), row.get("choices")
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise input_error(p, f"line {i}.images", "a list of image paths", images)
        if choices is not None and (not isinstance(choices, list) or not 2 <= len(choices) <= 26):
            raise input_error(p, f"line {i}.choices", "a list of 2-26 options", choices)
        query = str(row["question"])
        if choices:
            query += "\nOptions:\n" + "\n".join(f"{M.CHOICE_LETTERS[j]}. {c}" for j, c in enumerate(choices))
            query += "\nAnswer with the option's letter."
        recs.append(Record(id=str(row["id"]), task="generic", split="probe", query=query, answer=str(row["answer"]),
                           images=images, meta={"qtype": p.stem, "choices": choices}))
    return recs


def probe_sets(probes_dir: Path | None, cfg) -> list[tuple[str, ProbeSource, list[Record]]]:
    sets = []
    if probes_dir is not None and (probes_dir / "test.jsonl").exists():
        f = probes_dir / "test.jsonl"
        ds = open_dataset(probes_dir, multimodal=False)
        recs = [r for r in split_records(ds, "test") if r.task in ("generic", "text")]
        for r in recs:
            r.meta.setdefault("qtype", r.task)
            if r.task == "text":  # the text-only set is reported as one group
                r.meta["qtype"] = "text"
        if recs:
            sets.append((dataset_key(f), ProbeSource(probes_dir, ds.store, file_hash(f), name=probes_dir.name),
                         recs[:cfg.max_examples] if cfg.max_examples else recs))
    for b in cfg.benchmarks:
        p = Path(b)
        recs = load_benchmark(p)
        sets.append((f"benchmark/{p.name}", ProbeSource(p.parent, FileImages(p.parent), file_hash(p), name=p.stem),
                     recs[:cfg.max_examples] if cfg.max_examples else recs))
    return sets


def probe_rows(recs: list[Record], texts: list[str], when: str, set_name: str) -> list[dict]:
    from pipeline.model.prompts import parse_answer

    rows = []
    for r, t in zip(recs, texts):
        pred = parse_answer(t)
        if pred is None:
            lines = [ln.strip() for ln in (t or "").strip().splitlines() if ln.strip()]
            pred = lines[-1] if lines else None
        rows.append({"id": r.id, "set": set_name, "when": when, "qtype": r.meta.get("qtype", r.task), "response": t,
                     "pred": pred, "gold": r.answer, "correct": M.choice_match(pred, r.answer, r.meta.get("choices"))})
    return rows
