"""`trimpi policy diff`: changed conditions/cases/rules, and label flips re-derived from the data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.records import Record, write_records
from pipeline.policy import load_policies
from pipeline.policy.diff import diff_policies, label_impact, render_markdown

REPO = Path(__file__).resolve().parents[1]
L1 = """kind: clevr
name: L1-Tistu
depth: 1
tree:
- {id: '1', attribute: shape, value: cube, if_true: Case 0, if_false: Case 1}
"""
L2 = """kind: clevr
name: L1-Tistu
depth: 2
tree:
- {id: '1', attribute: shape, value: sphere, if_true: '2.1', if_false: Case 1}
- {id: '2.1', attribute: color, value: red, if_true: Case 0, if_false: Case 2}
"""


def _obj(shape, color="gray"):
    return {"shape": shape, "color": color, "size": "small", "material": "rubber"}


def _clevr(i, split, *objs):
    return Record(id=f"L1-Tistu/{split}/{i}", task="clevr", split=split, query="q", answer="?",
                  policy="L1-Tistu", meta={"scene": {"objects": list(objs)}})


def _tree(tmp_path, name, files: dict[str, str]) -> Path:
    root = tmp_path / name
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_clevr_diff_names_conditions_and_cases_and_counts_flips_from_the_scene_graphs(tmp_path):
    old = _tree(tmp_path, "old", {"clevr/L1-Tistu.yaml": L1})
    new = _tree(tmp_path, "new", {"clevr/L1-Tistu.yaml": L2})
    changes = diff_policies(load_policies(old), load_policies(new))
    (c,) = changes
    assert c.status == "changed" and c.old_version != c.new_version
    text = "\n".join(c.changes)
    assert "depth 1 -> 2" in text
    assert "condition 1: shape=cube -> shape=sphere" in text
    assert "condition 2.1 added: is there a red sphere? yes -> Case 0, no -> Case 2" in text
    assert "Case 0: now when there is a red sphere (was when there is a cube)" in text
    assert "Case 2 added: when there is a sphere, no red sphere" in text

    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.jsonl", [
        _clevr(0, "train", _obj("cube")),                       # Case 0 -> Case 1
        _clevr(1, "train", _obj("sphere", "red")),              # Case 1 -> Case 0
        _clevr(2, "train", _obj("sphere")),                     # Case 1 -> Case 2
        _clevr(3, "train", _obj("cylinder")),                   # Case 1 -> Case 1
        Record(id="x", task="clevr", split="train", query="q", answer="?", policy="L1-Tistu"),  # no scene
        Record(id="other", task="clevr", split="train", query="q", answer="?", policy="L2-Other",
               meta={"scene": {"objects": [_obj("cube")]}}),   # not a changed policy: ignored
    ])
    write_records(data / "test.jsonl", [_clevr(0, "test", _obj("cylinder"), _obj("cube"))])  # Case 0 -> Case 1
    (imp,) = label_impact(changes, [data])
    assert imp.records == {"train": 5, "test": 1} and imp.unlabelled == {"train": 1}
    assert imp.flipped == {"train": 3, "test": 1}
    assert dict(imp.gained["train"]) == {"Case 1": 1, "Case 0": 1, "Case 2": 1}
    assert dict(imp.lost["train"]) == {"Case 0": 1, "Case 1": 2}
    assert dict(imp.gained["test"]) == {"Case 1": 1} and dict(imp.lost["test"]) == {"Case 0": 1}
    md = render_markdown(changes, [imp])
    assert "| L1-Tistu | clevr | changed |" in md and "3 of 5 (60.0 %)" in md
    assert "| L1-Tistu | Case 2 | 1 | 0 | 0 | 0 |" in md


def test_gta_diff_names_the_rule_and_flips_labels_from_the_profiles(tmp_path):
    src = (REPO / "policies" / "gta" / "gtapolicy.yaml").read_text()
    edited = src.replace("when: {credits: {gt: 500}}, then: ImageDescription_v4",
                            "when: {credits: {gt: 400}}, then: ImageDescription_v4", 1)
    assert edited != src
    old = _tree(tmp_path, "old", {"gta/gtapolicy.yaml": src})
    new = _tree(tmp_path, "new", {"gta/gtapolicy.yaml": edited, "clevr/L1-Tistu.yaml": L1})
    changes = {c.name: c for c in diff_policies(load_policies(old), load_policies(new))}
    assert changes["L1-Tistu"].status == "added"
    gta = changes["GTAPolicy"]
    assert gta.status == "changed"
    assert gta.changes == ["rule ImageDescription-2: now for ImageDescription, if account type is B or C, use "
                           "ImageDescription_v4 if credits > 400, otherwise ImageDescription_v3. (was: for "
                           "ImageDescription, if account type is B or C, use ImageDescription_v4 if credits > 500, "
                           "otherwise ImageDescription_v3.)"]

    def rec(i, credits, tool="ImageDescription"):
        return Record(id=f"gta/test/{i}", task="gta", split="test", query="q", answer="{}", policy="GTAPolicy",
                      context={"profile": {"account_type": "B", "credits": credits, "age": 30}},
                      meta={"tool": tool, "instance": {}})

    data = tmp_path / "gta"
    data.mkdir()
    write_records(data / "test.jsonl", [rec(0, 450), rec(1, 600), rec(2, 100), rec(3, 450, "OCR")])
    (imp,) = label_impact(list(changes.values()), [data])
    assert imp.records == {"test": 4} and imp.flipped == {"test": 1}
    assert dict(imp.gained["test"]) == {"ImageDescription_v4": 1}
    assert dict(imp.lost["test"]) == {"ImageDescription_v3": 1}


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


def test_cli_diffs_a_git_revision_against_the_working_tree_and_reports_bad_input_in_one_line(
        tmp_path, capsys, monkeypatch):
    ws = _tree(tmp_path, "ws", {"policies/clevr/L1-Tistu.yaml": L1})
    shutil.copy(REPO / "policies" / "clevr" / "L2-Fedaru.yaml", ws / "policies" / "clevr")
    _git(ws, "init", "-q")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "policies")
    (ws / "policies" / "clevr" / "L1-Tistu.yaml").write_text(L1.replace("value: cube", "value: sphere"))
    data = ws / "data"
    data.mkdir()
    write_records(data / "train.jsonl", [_clevr(0, "train", _obj("cube")), _clevr(1, "train", _obj("cylinder"))])
    monkeypatch.chdir(ws)

    assert main(["policy", "diff", "--rev", "HEAD", "--data", "data"]) == 0
    out = capsys.readouterr().out
    assert "policies: policies at HEAD -> policies (working tree)" in out
    assert "L1-Tistu (clevr): changed" in out and "L2-Fedaru (clevr): unchanged" in out
    assert "condition 1: shape=cube -> shape=sphere" in out
    assert "labels of L1-Tistu on data: train: 1 of 2 (50.0 %) flip" in out
    assert "Case 0: train -1 (+0/-1)" in out and "Case 1: train +1 (+1/-0)" in out

    assert main(["policy", "diff", "policies", "policies", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert {p["status"] for p in js["policies"]} == {"unchanged"} and js["labels"] is None

    for argv, msg in [(["policy", "diff", "policies"], "OLD NEW: expected two policy files or directories"),
                      (["policy", "diff", "--rev", "no-such-rev"], "--rev: expected a git revision"),
                      (["policy", "diff", "policies", "nowhere"], "nowhere: expected a policy YAML file or a dir")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
