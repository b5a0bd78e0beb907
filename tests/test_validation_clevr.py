"""Validation of ClevrPolicy data: a clean dataset passes; each kind of corruption fails with a clear report."""
from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data.clevr_policy import GenerateClevrConfig, build
from pipeline.io import dump_yaml
from pipeline.policy.clevr import sample_policy
from validation.clevr import validate
from validation.expectations import CheckResult, format_report, python_check, run_expectations, write_report

SMALL = dict(train_per_policy=12, cot_per_policy=6, test_per_policy=8, override_per_policy=8, override_count=1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("vclevr")
    pols = root / "policies" / "clevr"
    pols.mkdir(parents=True)
    for i, depth in enumerate((2, 3)):
        pol = sample_policy(depth, random.Random(200 + i))
        (pols / f"{pol.name}.yaml").write_text(dump_yaml(pol.to_spec()))
    build(pols, root / "data", GenerateClevrConfig(**SMALL), seed=0, progress=False)
    return root


@pytest.fixture
def ws(clean, tmp_path):
    """A private copy of the clean dataset + policies to corrupt."""
    shutil.copytree(clean / "data", tmp_path / "data")
    shutil.copytree(clean / "policies", tmp_path / "policies")
    return tmp_path


def failed(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results if not r.success}


def edit_jsonl(path: Path, line: int, fn) -> dict:
    lines = path.read_text().splitlines()
    d = json.loads(lines[line])
    fn(d)
    lines[line] = json.dumps(d)
    path.write_text("\n".join(lines) + "\n")
    return d


def test_clean_dataset_passes(clean):
    results = validate(clean / "data", clean / "policies" / "clevr")
    assert len(results) > 40
    assert failed(results) == {}, format_report(results)
    assert any(r.source == "great_expectations" for r in results) and any(r.source == "python" for r in results)


def test_tampered_label_fails(ws):
    d = edit_jsonl(ws / "data" / "test.jsonl", 3, lambda d: d.update(answer="Case 0" if d["answer"] != "Case 0" else "Case 1"))
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    rows = bad["labels and gold paths re-derived from scene + policy"].failing_rows
    assert [r["id"] for r in rows] == [d["id"]] and rows[0]["answer"] == d["answer"] != rows[0]["rederived"]
    assert "CoT ends with the gold case and cites only gold-path conditions" in bad


def test_label_outside_case_set_fails_ge(ws):
    d = edit_jsonl(ws / "data" / "train.jsonl", 0, lambda d: d.update(answer="Case 99"))
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    ge = bad[f"train.jsonl: answer is one of {d['policy']}'s cases"]
    assert ge.source == "great_expectations" and ge.failing_rows[0]["id"] == d["id"]


def test_broken_image_bytes_fail(ws):
    d = json.loads((ws / "data" / "test.jsonl").read_text().splitlines()[0])
    shard, member = d["images"][0].split("/")[1:]
    zpath = ws / "data" / "images" / shard
    with zipfile.ZipFile(zpath) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(zpath, "w") as z:
        for info, data in items:
            z.writestr(info, data[:60] if info.filename == member else data)
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    rows = bad["images exist and decode"].failing_rows
    assert rows[0]["id"] == d["id"] and "decodable image" in rows[0]["error"]


def test_truncated_jsonl_fails(ws):
    p = ws / "data" / "train.jsonl"
    p.write_bytes(p.read_bytes()[:-500])
    results = validate(ws / "data", ws / "policies" / "clevr")
    bad = failed(results)
    assert bad["train.jsonl: every line is a valid record"].failing_rows[0]["line"] == 2 * SMALL["train_per_policy"]
    assert bad["record counts match manifest.json"].failing_rows == [
        {"file": "train.jsonl", "manifest": 24, "records": 23}]
    text = format_report(results)
    assert text.startswith("validation FAILED") and "FAIL [python] train.jsonl: every line is a valid record" in text


def test_stale_policy_is_reported(ws):
    pfile = sorted((ws / "policies" / "clevr").glob("*.yaml"))[0]
    import yaml

    # swap two case labels: same tree shape, a new version, and different labels
    s = yaml.safe_load(pfile.read_text())
    leaves = [(n, e) for n in s["tree"] for e in ("if_true", "if_false") if str(n[e]).startswith("Case")]
    (a, ea), (b, eb) = leaves[0], leaves[1]
    a[ea], b[eb] = b[eb], a[ea]
    pfile.write_text(dump_yaml(s))
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    stale = bad["policy_version matches the current policy"]
    assert "STALE" in stale.details and "trimpi generate clevr" in stale.details
    assert "labels and gold paths re-derived from scene + policy" in bad


def test_leaked_image_breaks_disjointness(ws):
    train0 = json.loads((ws / "data" / "train.jsonl").read_text().splitlines()[0])
    edit_jsonl(ws / "data" / "test.jsonl", 0, lambda d: d.update(images=train0["images"]))
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    row = bad["train, test and override images pairwise disjoint (content hash)"].failing_rows[0]
    assert row["train"] == train0["id"]


def test_override_and_cot_tampering(ws):
    edit_jsonl(ws / "data" / "override.jsonl", 1, lambda d: d["meta"].update(override_policy="../../etc/passwd"))
    edit_jsonl(ws / "data" / "cot.jsonl", 0, lambda d: d.update(cot=d["cot"] + " Actually Case 7."))
    edit_jsonl(ws / "data" / "cot.jsonl", 1, lambda d: d.update(id="nobody/train/1"))
    bad = failed(validate(ws / "data", ws / "policies" / "clevr"))
    assert "inside" in bad["every record's policy is known"].failing_rows[0]["error"]
    assert bad["CoT ends with the gold case and cites only gold-path conditions"].failing_rows[0]["line"] == 1
    assert bad["cot.jsonl is a subset of train.jsonl (same answers and images)"].failing_rows[0]["id"] == "nobody/train/1"


def test_cli_exit_code_and_report(ws, clean, capsys):
    report = ws / "metrics" / "validate_clevr.json"
    args = ["validate", "--task", "clevr", "--data", str(clean / "data"), "--policies", str(clean / "policies" / "clevr"),
            "--report", str(report)]
    assert main(args) == 0
    assert json.loads(report.read_text())["success"] is True
    edit_jsonl(ws / "data" / "test.jsonl", 0, lambda d: d.update(answer="Case 42"))
    args[4] = str(ws / "data")
    assert main(args) == 1
    rep = json.loads(report.read_text())
    assert rep["success"] is False and rep["n_failed"] >= 1 and rep["task"] == "clevr"
    assert "FAIL" in capsys.readouterr().out


def test_expectations_runner_api(tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "answer": ["Case 1", "oops", "Case 2"], "policy": ["P", "P", "Q"]})
    res = run_expectations("toy", df, [
        {"type": "expect_column_values_to_match_regex", "column": "answer", "regex": r"^Case \d+$"},
        {"type": "expect_column_values_to_be_in_set", "column": "answer", "value_set": ["Case 2"],
         "row_condition": 'policy=="Q"', "condition_parser": "pandas", "name": "Q answers"},
        {"type": "expect_column_values_to_not_be_null", "column": "missing"},
    ])
    assert [r.success for r in res] == [False, True, False]
    assert res[0].failing_rows == [{"answer": "oops", "id": "b"}] and res[1].name == "Q answers"
    assert "could not run" in res[2].details
    ok = python_check("x", [])
    bad = python_check("y", [{"id": i} for i in range(9)], "why", max_rows=2)
    assert ok.success and not bad.success and len(bad.failing_rows) == 2 and bad.details.startswith("9 failing rows")
    assert write_report(tmp_path / "r.json", [ok]) is True
    assert write_report(tmp_path / "r.json", [ok, bad]) is False
    assert json.loads((tmp_path / "r.json").read_text())["n_failed"] == 1
