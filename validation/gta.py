"""Validation of a GTAPolicy dataset: a great-expectations suite over the flattened records plus
the checks GE cannot express.

Python checks, each over every split file:

* the target is what the policy requires: the tool version is re-resolved from the record's
  profile (and instance attributes) with the policy spec on disk — ``policies/`` for train/cot/
  test, the dataset's own ``override_policies/`` for override — and the rule id must match;
  a record made under an older policy version fails here;
* the arguments fit the tool's schema (required present, no unknown names, JSON types, bbox
  format) and image arguments name one of the record's images or an image a previous call
  returned;
* every image reference exists and decodes, and there is one image name per image;
* the history is well formed: one entry per previous step, each a callable tool name of the
  policy with an argument object and a string output;
* cot.jsonl mirrors train.jsonl and every rationale ends with the chosen tool; train and test
  share no dialog; every rule branch has at least one train target;
* every line is a valid record and each file holds as many records as ``manifest.json`` says.

Broken data does not raise: a truncated line, a tampered label, an undecodable image or an
unreadable override spec is a failed check with example rows (file + line or record id), so
``trimpi validate`` exits 1 with one report of everything that is wrong.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.io import InputError, parse_json, read_json
from validation.expectations import CheckResult, python_check, read_lenient, run_expectations

FILES = ("train", "cot", "test", "override")


def _load(data_dir: Path) -> tuple[dict[str, list], dict[str, list[dict]]]:
    """(records per split file, failing rows per file for lines that are not a valid record)."""
    files: dict[str, list] = {}
    bad: dict[str, list[dict]] = {}
    for f in FILES:
        path = data_dir / f"{f}.jsonl"
        if not path.exists():
            continue
        good, bad[f] = read_lenient(path)
        files[f] = [r for _, _, r in good]
    return files, bad


def _manifest_counts(data_dir: Path, files: dict[str, list]) -> list[dict]:
    """Failing rows where a file holds another number of records than manifest.json says."""
    try:
        sizes = read_json(data_dir / "manifest.json")["sizes"]
    except (OSError, InputError, KeyError, TypeError) as e:
        return [{"file": "manifest.json", "error": f"unreadable: {type(e).__name__}: {str(e)[:120]}"}]
    return [{"file": f"{f}.jsonl", "manifest": sizes.get(f), "records": len(recs)}
            for f, recs in files.items() if sizes.get(f) != len(recs)]


def _call(rec) -> dict | None:
    try:
        obj = parse_json(rec.answer, rec.id, "answer", finite=True)
    except InputError:
        return None
    ok = isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)
    return obj if ok and set(obj) == {"name", "arguments"} else None


def _row(r, why: str, **extra) -> dict:
    return {"id": r.id, "why": why, **extra}


def schema_errors(pol, name: str, args: dict, image_names: set[str]) -> list[str]:
    """What is wrong with ``args`` for the callable ``name`` (empty when they fit)."""
    from pipeline.evaluate.gta_scoring import parse_bbox

    if pol.base_tool(name) is None:
        return [f"unknown tool {name!r}"]
    schema = {a["name"]: a for a in pol.tool_schema(name)}
    errs = [f"missing required argument {k!r}" for k, a in schema.items() if a.get("required") and k not in args]
    types = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}
    for k, v in args.items():
        a = schema.get(k)
        if a is None:
            errs.append(f"unknown argument {k!r}")
            continue
        if not isinstance(v, types[a["type"]]) or (a["type"] in ("integer", "number") and isinstance(v, bool)):
            errs.append(f"{k} should be {a['type']}, got {type(v).__name__}")
        elif a.get("format") == "bbox" and parse_bbox(v) is None:
            errs.append(f"{k} is not a box (x1, y1, x2, y2): {v!r}")
        elif k == "image" and v not in image_names:
            errs.append(f"image {v!r} is neither an input image nor a previous output")
    return errs


def validate(data_dir, policies_dir) -> list[CheckResult]:
    import pandas as pd

    from pipeline.data.records import ImageStore
    from pipeline.io import InputError, input_error
    from pipeline.policy import StaleRecord, load_policy, resolve_policy
    from pipeline.policy.gta import load_gta_policy

    data_dir = Path(data_dir)
    pol = load_gta_policy(policies_dir)
    files, unparsable = _load(data_dir)
    if not files:
        raise input_error(data_dir, None, "a GTAPolicy dataset (train.jsonl, test.jsonl, ...)")
    overrides: dict[str, object] = {}

    def policy_for(r):
        ref = r.meta.get("override_policy")
        if r.split != "override" or not ref:
            return pol
        if ref not in overrides:
            p = (data_dir / ref).resolve()
            try:
                overrides[ref] = load_policy(p) if p.is_relative_to(data_dir.resolve()) and p.exists() else None
            except InputError:  # a broken (or unsafe-tagged) spec in the dataset is bad data: report it
                overrides[ref] = None
        return overrides[ref]

    results: list[CheckResult] = [
        python_check(f"{f}.jsonl: every line is a valid record", rows, "truncated or malformed JSONL / wrong fields")
        for f, rows in unparsable.items()]
    results.append(python_check("record counts match manifest.json", _manifest_counts(data_dir, files),
                                "records lost or added after generation"))
    rows = []
    for fname, recs in files.items():
        for r in recs:
            call, prof = _call(r), r.context.get("profile") or {}
            rows.append({"uid": f"{fname}:{r.id}", "id": r.id, "file": fname, "task": r.task, "policy": r.policy,
                         "split": r.split, "answer_ok": call is not None, "account_type": prof.get("account_type"),
                         "credits": prof.get("credits"), "age": prof.get("age"), "step": r.meta.get("step"),
                         "history_len": len(r.context.get("history") or []), "query_len": len(r.query.strip()),
                         "instruction_len": len(str(r.context.get("instruction", "")).strip())})
    df = pd.DataFrame(rows)
    acct = list(pol.fields["account_type"].values)
    results += run_expectations("gta records", df, [
        {"type": "expect_table_row_count_to_be_between", "min_value": 1},
        {"type": "expect_column_values_to_be_unique", "column": "uid"},
        {"type": "expect_column_values_to_be_in_set", "column": "task", "value_set": ["gta"]},
        {"type": "expect_column_values_to_be_in_set", "column": "policy", "value_set": [pol.name]},
        {"type": "expect_column_values_to_be_in_set", "column": "answer_ok", "value_set": [True],
         "name": "gta records: answer is one JSON tool call {name, arguments}"},
        {"type": "expect_column_values_to_be_in_set", "column": "account_type", "value_set": acct},
        {"type": "expect_column_values_to_be_between", "column": "credits", "min_value": pol.fields["credits"].min,
         "max_value": pol.fields["credits"].max},
        {"type": "expect_column_values_to_be_between", "column": "age", "min_value": pol.fields["age"].min,
         "max_value": pol.fields["age"].max},
        {"type": "expect_column_pair_values_to_be_equal", "column_A": "step", "column_B": "history_len",
         "name": "gta records: history holds exactly the previous steps"},
        {"type": "expect_column_values_to_be_between", "column": "query_len", "min_value": 1},
        {"type": "expect_column_values_to_be_between", "column": "instruction_len", "min_value": 1},
    ])

    store = ImageStore(data_dir)
    decoded: dict[str, str | None] = {}
    for fname, recs in files.items():
        wrong, bad_args, bad_imgs, bad_hist, stale = [], [], [], [], []
        for r in recs:
            call, p = _call(r), policy_for(r)
            ctx = r.context or {}
            names = list(ctx.get("image_names") or [])
            if p is None:
                wrong.append(_row(r, "override policy missing, unreadable or outside the dataset", ref=r.meta.get("override_policy")))
                continue
            try:  # p is the policy file (or the override spec) this record is checked against; GE checks the name
                resolve_policy(r, {r.policy: p}, f"{fname}.jsonl", require_version=True)
            except StaleRecord:
                stale.append(_row(r, "labels made under another policy version", record=r.policy_version, policy=p.version))
            if call is not None:
                try:
                    res = p.match(ctx.get("profile") or {}, r.meta.get("tool", ""), r.meta.get("instance") or {})
                    if res.name != call["name"] or res.rule != r.meta.get("rule", ""):
                        wrong.append(_row(r, "target differs from the re-resolved tool", answer=call["name"],
                                          expected=res.name, rule=res.rule, profile=ctx.get("profile")))
                except Exception as e:  # noqa: BLE001 - an unresolvable record is a failing row
                    wrong.append(_row(r, f"cannot resolve: {e}"))
            hist = ctx.get("history")
            outputs = set()
            if not isinstance(hist, list) or len(hist) != r.meta.get("step"):
                bad_hist.append(_row(r, "history length differs from meta.step"))
                hist = hist if isinstance(hist, list) else []
            for i, h in enumerate(hist):
                ok = (isinstance(h, dict) and set(h) == {"name", "arguments", "output"} and isinstance(h["name"], str)
                      and pol.base_tool(h["name"]) is not None and isinstance(h["arguments"], dict)
                      and isinstance(h["output"], str))
                if not ok:
                    bad_hist.append(_row(r, f"history[{i}] is not {{name: a tool of the policy, arguments: {{}}, output: str}}",
                                         entry=h))
                    break
                outputs.add(h["output"].strip())
            if call is not None:
                errs = schema_errors(p, call["name"], call["arguments"], set(names) | outputs)
                if errs:
                    bad_args.append(_row(r, "; ".join(errs), answer=call))
            if len(names) != len(r.images):
                bad_imgs.append(_row(r, f"{len(names)} image names for {len(r.images)} images"))
            for ref in r.images:
                if ref not in decoded:
                    try:
                        store.open(ref)
                        decoded[ref] = None
                    except Exception as e:  # noqa: BLE001 - report, do not stop
                        decoded[ref] = str(e)
                if decoded[ref]:
                    bad_imgs.append(_row(r, decoded[ref], ref=ref))
        n = len(recs)
        results += [
            python_check(f"{fname}.jsonl: target tool re-resolved from the profile by the policy", wrong, f"of {n}"),
            python_check(f"{fname}.jsonl: labels made under the current policy version", stale, f"of {n}"),
            python_check(f"{fname}.jsonl: arguments match the tool's schema", bad_args, f"of {n}"),
            python_check(f"{fname}.jsonl: images exist, decode, one name each", bad_imgs, f"of {n}"),
            python_check(f"{fname}.jsonl: history well formed", bad_hist, f"of {n}"),
        ]
    store.close()

    train, cot, test = files.get("train", []), files.get("cot", []), files.get("test", [])
    if cot:
        by_id = {r.id: r for r in train}
        bad = [_row(r, "not in train.jsonl or different answer") for r in cot
               if r.id not in by_id or by_id[r.id].answer != r.answer]
        for r in cot:
            call = _call(r)
            if call and not r.cot.rstrip(". ").endswith(call["name"]):
                bad.append(_row(r, "rationale does not end with the chosen tool", cot_end=r.cot[-60:]))
        results.append(python_check("cot.jsonl: train records with a rationale ending in the chosen tool", bad))
    shared = sorted({r.meta.get("dialog_id") for r in train} & {r.meta.get("dialog_id") for r in test})
    results.append(python_check("splits: no dialog in both train and test", [{"dialog_id": d} for d in shared]))
    covered = Counter(r.meta.get("rule", "") + (f"/{r.meta['branch']}" if r.meta.get("branch") else "") for r in train)
    missing = [{"rule": lf.key} for leaves in pol.leaves.values() for lf in leaves if not covered[lf.key]]
    results.append(python_check("train.jsonl: every rule branch has a target", missing))
    return results
