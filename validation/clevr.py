"""Validation of a ClevrPolicy dataset directory (``trimpi validate --task clevr``).

Two layers, one report:

* a great-expectations suite per JSONL file: schema, non-null fields, task/split values,
  unique ids, answers in the policy's case set (per policy, via row conditions), query
  format, one image per record, character and word length bounds, answer-only train;
* Python checks GE cannot express: every label and gold path re-derived from the scene
  graph and the CURRENT policy (a version mismatch is reported as stale data), override
  labels re-derived from the override spec saved in the dataset, images exist and decode,
  train/test/override images disjoint by content hash, cot.jsonl a subset of train.jsonl,
  the CoT ends by stating the gold case and cites only conditions on the gold path, no
  case dominating a policy's split, counts equal to the manifest.

Nothing here raises on bad data: a truncated JSONL line, a missing file or an unreadable
policy becomes a failed check with example rows, so the report always says everything
that is wrong at once.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import InputError, input_error, read_json
from validation.expectations import CheckResult, python_check, read_lenient, run_expectations

FILES = {"train.jsonl": "train", "cot.jsonl": "train", "test.jsonl": "test", "override.jsonl": "override"}
QUERY_RE = r"^According to Policy: [A-Za-z0-9][A-Za-z0-9_.-]*, what should be the response for the given image\?$"
RECORD_FIELDS = ["id", "task", "split", "query", "answer", "images", "policy", "policy_version", "cot", "context", "meta"]
DERIVED = ["file", "line", "n_images", "query_chars", "cot_chars", "cot_words"]


@dataclass
class ValidateConfig:
    """``params.yaml: validate`` — thresholds of ``trimpi validate --task clevr``."""

    max_label_share: float = 0.5
    """Fail when one case holds more than this share of a policy's records in a split."""
    min_cot_words: int = 5
    """Shortest acceptable CoT (words), for records that carry one."""
    max_cot_words: int = 1500
    """Longest acceptable CoT (words): a depth-6 walk is ~150 words; far more means a broken generator."""
    max_query_chars: int = 300
    """Longest acceptable query (characters)."""
    example_rows: int = 5
    """Failing example rows kept per check in the report."""


def _frame(parsed: dict[str, list[tuple[int, dict]]]):
    """One DataFrame over all files: scalar Record fields + ``file``, ``line`` and derived lengths."""
    import pandas as pd

    recs = []
    for fname, rows in parsed.items():
        for line, d in rows:
            r = {k: d.get(k) for k in d}
            for k in ("images", "context", "meta"):
                if k in r:
                    r[k] = json.dumps(r[k], sort_keys=True)
            cot = d.get("cot") or ""
            r.update(file=fname, line=line, n_images=len(d.get("images") or []),
                     query_chars=len(d.get("query") or ""), cot_chars=len(cot), cot_words=len(cot.split()))
            recs.append(r)
    cols = RECORD_FIELDS + DERIVED
    return pd.DataFrame(recs, columns=cols + sorted({k for r in recs for k in r} - set(cols)))


def _suite(files: list[str], leaves: dict[str, dict[str, list[str]]], cfg: ValidateConfig) -> list[dict]:
    """The GE expectations over all files; ``leaves[file][policy]`` = that policy's case labels."""
    def where(cond: str) -> dict:
        return {"row_condition": cond, "condition_parser": "pandas"}

    exp: list[dict] = [
        {"type": "expect_table_columns_to_match_set", "name": "records: schema (Record fields)",
         "column_set": RECORD_FIELDS + DERIVED, "exact_match": True},
        {"type": "expect_compound_columns_to_be_unique", "column_list": ["file", "id"],
         "name": "records: id unique within its file"},
        {"type": "expect_column_values_to_be_in_set", "column": "task", "value_set": ["clevr"]},
        {"type": "expect_column_values_to_match_regex", "column": "answer", "regex": r"^Case [0-9]+$"},
        {"type": "expect_column_values_to_match_regex", "column": "query", "regex": QUERY_RE},
        {"type": "expect_column_values_to_be_between", "column": "n_images", "min_value": 1, "max_value": 1,
         "name": "records: exactly one image"},
        {"type": "expect_column_values_to_be_between", "column": "query_chars", "min_value": 20,
         "max_value": cfg.max_query_chars, "name": "records: query length in bounds"},
    ]
    for col in ("id", "task", "split", "query", "answer", "policy", "policy_version", "meta"):
        exp.append({"type": "expect_column_values_to_not_be_null", "column": col})
    for fname in files:
        is_file = f'file=="{fname}"'
        exp.append({"type": "expect_column_values_to_be_in_set", "column": "split", "value_set": [FILES[fname]],
                    "name": f"{fname}: split is {FILES[fname]!r}", **where(is_file)})
        exp.append({"type": "expect_column_values_to_be_in_set", "column": "policy",
                    "value_set": sorted(leaves.get(fname, {})), "name": f"{fname}: policy is known", **where(is_file)})
        if fname == "train.jsonl":  # answer-only by contract: Direct SFT / RL must never see a CoT
            exp.append({"type": "expect_column_values_to_be_between", "column": "cot_chars", "min_value": 0,
                        "max_value": 0, "name": f"{fname}: answer-only (empty cot)", **where(is_file)})
        else:
            exp.append({"type": "expect_column_values_to_be_between", "column": "cot_words",
                        "min_value": cfg.min_cot_words, "max_value": cfg.max_cot_words,
                        "name": f"{fname}: CoT length in bounds", **where(is_file)})
        for name, cases in sorted(leaves.get(fname, {}).items()):
            exp.append({"type": "expect_column_values_to_be_in_set", "column": "answer", "value_set": cases,
                        "name": f"{fname}: answer is one of {name}'s cases",
                        **where(f'{is_file} and policy=="{name}"')})
    return exp


def _meta(d: dict) -> dict:
    m = d.get("meta")
    return m if isinstance(m, dict) else {}


def _override_policy(data: Path, rel, cache: dict):
    """The override spec a record points to (must live inside the dataset dir)."""
    from pipeline.policy import load_policy

    if rel not in cache:
        p = (data / str(rel)).resolve()
        if not isinstance(rel, str) or not p.is_relative_to(data.resolve()):
            cache[rel] = InputError(f"{rel}: expected a path inside {data}")
        else:
            try:
                cache[rel] = load_policy(p)
            except InputError as e:
                cache[rel] = e
    return cache[rel]


def validate(data_dir, policies_dir, config: ValidateConfig | None = None) -> list[CheckResult]:
    """All checks of one ClevrPolicy dataset against the policies under ``policies_dir``."""
    from pipeline.data.records import ImageStore
    from pipeline.policy import StaleRecord, load_policies, resolve_policy

    cfg = config or ValidateConfig()
    n_ex = cfg.example_rows
    data = Path(data_dir)
    results: list[CheckResult] = []
    chk = lambda name, rows, details="": results.append(python_check(name, rows, details, n_ex))  # noqa: E731

    # ---- manifest, files, parsing
    manifest = {}
    try:
        manifest = read_json(data / "manifest.json")
        if not isinstance(manifest, dict):
            raise input_error(data / "manifest.json", None, "a JSON object", type(manifest).__name__)
        chk("manifest.json readable", [])
    except (OSError, InputError) as e:
        chk("manifest.json readable", [{"file": "manifest.json", "error": str(e)[:200]}])
    expected = manifest.get("files", {})
    parsed: dict[str, list[tuple[int, dict]]] = {}
    records: dict[str, list] = {}  # the same lines as Records, in the same order
    for fname in FILES:
        p = data / fname
        if not p.exists():
            if fname != "override.jsonl" or expected.get(fname):
                chk(f"{fname}: present", [{"file": fname, "error": "missing"}])
            continue
        good, bad = read_lenient(p)
        parsed[fname] = [(line, d) for line, d, _ in good]
        records[fname] = [rec for _, _, rec in good]
        chk(f"{fname}: every line is a valid record", bad, "truncated or malformed JSONL / wrong fields")
    count_rows = [{"file": f, "manifest": n, "records": len(parsed.get(f, []))}
                  for f, n in expected.items() if len(parsed.get(f, [])) != n]
    chk("record counts match manifest.json", count_rows, "records lost or added after generation")

    # ---- policies (current ones and the override specs stored in the dataset)
    try:
        policies = {n: p for n, p in load_policies(policies_dir).items() if p.kind == "clevr"}
        chk(f"policies load ({policies_dir})", [])
    except InputError as e:
        policies = {}
        chk(f"policies load ({policies_dir})", [{"error": str(e)}], "cannot re-derive labels")
    over_cache: dict = {}

    def policy_of(fname: str, d: dict):
        if fname == "override.jsonl":
            return _override_policy(data, _meta(d).get("override_policy"), over_cache)
        return policies.get(d.get("policy"))

    # ---- great-expectations suite (one over all files: GE's cost is per expectation)
    leaves: dict[str, dict[str, list[str]]] = {}
    for fname, rows in parsed.items():
        if fname == "override.jsonl":
            for _, d in rows:
                pol = policy_of(fname, d)
                if pol is not None and not isinstance(pol, Exception):
                    leaves.setdefault(fname, {})[pol.name] = pol.leaves
        else:
            leaves[fname] = {n: p.leaves for n, p in policies.items()}
    if any(parsed.values()):
        results += run_expectations("records", _frame(parsed), _suite(sorted(parsed), leaves, cfg), max_rows=n_ex,
                                    id_columns=["file", "line", "id"])

    # ---- labels re-derived, versions, CoT
    wrong, stale, cot_bad, unknown = [], [], [], []
    for fname, rows in parsed.items():
        for (line, d), rec in zip(rows, records[fname]):
            rid = {"file": fname, "line": line, "id": d.get("id")}
            pol = policy_of(fname, d)
            if isinstance(pol, Exception):
                unknown.append({**rid, "policy": d.get("policy"), "error": str(pol)})
                continue
            try:  # the override spec is published under the record's policy name
                pol = resolve_policy(rec, {rec.policy: pol} if fname == "override.jsonl" else policies, fname,
                                     require_version=True)
            except StaleRecord as e:
                pol = e.policy  # stale, but the labels are still re-derived with the current policy
                stale.append({**rid, "record_version": d.get("policy_version"), "policy_version": pol.version})
            except InputError as e:
                unknown.append({**rid, "policy": d.get("policy"), "error": str(e)})
                continue
            scene = _meta(d).get("scene")
            try:
                case, path = pol.evaluate(scene)
            except (TypeError, KeyError, AttributeError):
                wrong.append({**rid, "answer": d.get("answer"), "rederived": None, "error": "no usable meta.scene"})
                continue
            gold = [[c, b] for c, b in path]
            if case != d.get("answer") or gold != _meta(d).get("gold_path"):
                wrong.append({**rid, "answer": d.get("answer"), "rederived": case,
                              "gold_path": _meta(d).get("gold_path"), "rederived_path": gold})
            cot = d.get("cot") or ""
            if cot:
                m = re.search(r"(Case [0-9]+)\.?\s*$", cot)
                cited = set(re.findall(r"Condition ([0-9]+(?:\.[0-9]+)*)", cot))
                if not m or m.group(1) != d.get("answer") or not cited <= {c for c, _ in path}:
                    cot_bad.append({**rid, "answer": d.get("answer"), "cot_end": cot[-60:],
                                    "off_path_conditions": sorted(cited - {c for c, _ in path})})
    chk("every record's policy is known", unknown)
    chk("labels and gold paths re-derived from scene + policy", wrong)
    chk("policy_version matches the current policy", stale,
        "the data is STALE: the policy changed since generation; re-run `trimpi generate clevr`")
    chk("CoT ends with the gold case and cites only gold-path conditions", cot_bad)

    # ---- images decode; split disjointness by content hash
    store = ImageStore(data)
    hashes: dict[str, str] = {}
    owners: dict[str, dict[str, str]] = {}  # content hash -> split -> example id
    bad_img = []
    for fname, rows in parsed.items():
        split = FILES[fname]
        for line, d in rows:
            for ref in d.get("images") or []:
                if ref not in hashes:
                    try:
                        raw = store.read_bytes(ref)
                        hashes[ref] = hashlib.sha256(raw).hexdigest()
                        store.open(ref)
                    except InputError as e:
                        hashes[ref] = ""
                        bad_img.append({"file": fname, "line": line, "id": d.get("id"), "image": ref,
                                        "error": str(e)[:200]})
                if hashes[ref]:
                    owners.setdefault(hashes[ref], {}).setdefault(split, d.get("id"))
    store.close()
    chk("images exist and decode", bad_img)
    overlap = [{"image_sha256": h[:16], **ids} for h, ids in owners.items() if len(ids) > 1]
    chk("train, test and override images pairwise disjoint (content hash)", overlap)

    # ---- cot.jsonl is a subset of train.jsonl
    train = {d.get("id"): d for _, d in parsed.get("train.jsonl", [])}
    sub = [{"id": d.get("id"), "line": line, "error": "not in train.jsonl" if d.get("id") not in train
            else "answer/images differ from train.jsonl"}
           for line, d in parsed.get("cot.jsonl", [])
           if d.get("id") not in train or (train[d["id"]].get("answer"), train[d["id"]].get("images"))
           != (d.get("answer"), d.get("images"))]
    chk("cot.jsonl is a subset of train.jsonl (same answers and images)", sub)

    # ---- balance
    dom = []
    for fname, rows in parsed.items():
        counts: dict[str, dict[str, int]] = {}
        for _, d in rows:
            c = counts.setdefault(str(d.get("policy")), {})
            c[str(d.get("answer"))] = c.get(str(d.get("answer")), 0) + 1
        for pol, c in counts.items():
            n = sum(c.values())
            top = max(c, key=c.get)
            if n >= 8 and c[top] / n > cfg.max_label_share:
                dom.append({"file": fname, "policy": pol, "case": top, "share": round(c[top] / n, 3), "records": n})
    chk(f"no case holds more than {cfg.max_label_share:.0%} of a policy's records", dom)
    return results
