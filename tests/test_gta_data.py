"""GTAPolicy data: bundled sample, GTA importer on a fixture, override set, validation catching bad labels."""
import json
import shutil
from pathlib import Path

import pytest

from pipeline.data.gta_policy import GenerateGtaConfig, build, load_gta
from pipeline.data.records import ImageStore, read_records, write_records
from pipeline.io import InputError, dump_yaml, load_yaml
from pipeline.policy import load_policy
from pipeline.policy.gta import GTAPolicy, load_gta_policy

FIXTURE = Path(__file__).parent / "fixtures" / "gta"
POLICIES = Path("policies/gta")


@pytest.fixture(scope="module")
def pol():
    return load_gta_policy(POLICIES)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, pol):
    out = tmp_path_factory.mktemp("gta") / "data"
    manifest = build(pol, GenerateGtaConfig(), out, seed=0)
    return out, manifest


def _answers(out, name):
    return {r.id: r for r in read_records(out / f"{name}.jsonl")}


def test_sample_covers_every_tool_and_rule_branch(sample, pol):
    out, m = sample
    recs = read_records(out / "train.jsonl") + read_records(out / "test.jsonl")
    assert 150 <= m["sizes"]["train"] <= 400 and m["sizes"]["test"] >= 30
    assert {pol.base_tool(json.loads(r.answer)["name"]) for r in recs} == set(pol.tools)
    assert m["uncovered_rules"] == []
    assert set(m["rule_coverage"]["train"]) == {lf.key for ls in pol.leaves.values() for lf in ls}
    # dialogs are split as a whole
    assert not {r.meta["dialog_id"] for r in recs if r.split == "train"} & {r.meta["dialog_id"] for r in recs if r.split == "test"}


def test_records_follow_the_contract(sample, pol):
    out, _ = sample
    store = ImageStore(out)
    for r in read_records(out / "test.jsonl"):
        call = json.loads(r.answer)
        assert r.answer == json.dumps(call) and set(call) == {"name", "arguments"}
        assert r.task == "gta" and r.policy == "GTAPolicy" and r.policy_version == pol.version
        assert set(r.context) == {"instruction", "profile", "history", "image_names"}
        assert len(r.context["image_names"]) == len(r.images) and len(r.context["history"]) == r.meta["step"]
        assert pol.resolve(r.context["profile"], r.meta["tool"], r.meta["instance"]) == call["name"]
        for h in r.context["history"]:  # earlier calls carry the version the same user must use
            assert pol.base_tool(h["name"]) is not None and isinstance(h["output"], str)
        assert store.open(r.images[0]).size[0] > 0
        if r.meta["tool"] == "OCR" and r.meta["instance"].get("image_has_math"):
            assert call["name"] == "MathOCR" and r.meta["rule"] == "OCR-4"
    store.close()


def test_cot_mirrors_train_and_ends_with_the_tool(sample):
    out, _ = sample
    train, cot = _answers(out, "train"), _answers(out, "cot")
    assert train.keys() == cot.keys()
    for k, r in cot.items():
        name = json.loads(r.answer)["name"]
        assert train[k].cot == "" and r.cot.endswith(f"I call {name}.")
        if r.meta["rule"]:
            assert f"Rule {r.meta['rule']} " in r.cot


def test_override_set_is_labelled_under_the_rewritten_policy(sample, pol):
    out, m = sample
    over = read_records(out / "override.jsonl")
    test = _answers(out, "test")
    p2 = load_policy(out / "override_policies" / "GTAPolicy.yaml")
    assert p2.name == pol.name and p2.version == m["override_policy_version"] != pol.version
    changed = 0
    for r in over:
        t = test[r.id.replace("/override/", "/test/")]
        assert r.meta["override_policy"] == "override_policies/GTAPolicy.yaml"
        assert json.loads(r.answer)["name"] == p2.resolve(r.context["profile"], r.meta["tool"], r.meta["instance"])
        assert r.meta["changed"] == (r.answer != t.answer)
        assert r.meta["changed"] == (r.meta["tool"] in ("OCR", "ImageDescription") and json.loads(r.answer)["name"] != "MathOCR")
        changed += r.meta["changed"]
    assert changed == m["override_changed"] > 0


def test_generation_is_deterministic(sample, pol, tmp_path):
    out, _ = sample
    build(pol, GenerateGtaConfig(), tmp_path / "again", seed=0)
    for f in ("train.jsonl", "cot.jsonl", "test.jsonl", "override.jsonl", "images/shard-00000.zip"):
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes()


def test_changing_one_rule_changes_exactly_its_targets(sample, tmp_path):
    out, _ = sample
    spec = load_yaml(POLICIES / "gtapolicy.yaml")
    rule = next(r for r in spec["rules"] if r["id"] == "ImageStylization-2")
    rule["use"] = "ImageStylization_v3"
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "gtapolicy.yaml").write_text(dump_yaml(spec))
    pol2 = load_gta_policy(tmp_path / "pol")
    build(pol2, GenerateGtaConfig(), tmp_path / "new", seed=0)
    for split in ("train", "test"):
        old, new = _answers(out, split), _answers(tmp_path / "new", split)
        assert old.keys() == new.keys()
        n = 0
        for k in old:
            a, b = old[k].to_dict(), new[k].to_dict()
            affected = a["meta"]["rule"] == "ImageStylization-2"
            assert (a["answer"] != b["answer"]) == affected, k
            if affected:
                n += 1
                assert json.loads(b["answer"])["name"] == "ImageStylization_v3"
            for f in ("policy_version", "answer", "cot"):
                a.pop(f), b.pop(f)
            assert a == b
        assert n > 0 or split == "test"


# ---------------------------------------------------------------------- GTA importer


def test_gta_importer_on_fixture(pol, tmp_path):
    cfg = GenerateGtaConfig(source="gta", test_fraction=0.25)
    m = build(pol, cfg, tmp_path / "d", seed=0, gta_root=str(FIXTURE))
    recs = read_records(tmp_path / "d" / "train.jsonl") + read_records(tmp_path / "d" / "test.jsonl")
    assert len(recs) == 10 and m["sizes"]["dialogs_test"] == 1 and m["sizes"]["images"] == 5
    by = {(r.meta["dialog_id"], r.meta["step"]): r for r in recs}
    calc = by[("gta-0", 1)]
    assert json.loads(calc.answer) == {"name": "Calculator", "arguments": {"expression": "2.50+1.25"}}
    h = calc.context["history"]
    assert len(h) == 1 and h[0]["output"] == "Milk 2.50; Bread 1.25"
    assert h[0]["name"] == pol.resolve(calc.context["profile"], "OCR")  # history versioned for the same user
    math = by[("gta-1", 0)]
    assert json.loads(math.answer)["name"] == "MathOCR" and math.meta["tool"] == "OCR"
    assert math.meta["instance"] == {"image_has_math": True} and math.meta["rule"] == "OCR-4"
    search = by[("gta-2", 2)]  # arguments given as a JSON string in dataset.json
    assert json.loads(search.answer)["arguments"] == {"query": "desert canyon winter temperature", "k": 1}
    assert search.context["image_names"] == ["image/image_3.jpg", "image/image_4.jpg"] and len(search.images) == 2
    assert json.loads(search.answer)["name"] == pol.resolve(search.context["profile"], "GoogleSearch")
    assert [x["output"] for x in by[("gta-3", 2)].context["history"]] == ["(10, 12, 40, 30), score 0.8", "green"]
    splits = {}
    for r in recs:
        splits.setdefault(r.meta["dialog_id"], set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    store = ImageStore(tmp_path / "d")
    assert store.open(search.images[1]).getpixel((1, 1))[0] > 150  # image_4 is the red one
    store.close()


def _fixture_copy(tmp_path, mutate):
    root = tmp_path / "gta"
    shutil.copytree(FIXTURE, root)
    data = json.loads((root / "dataset.json").read_text())
    mutate(data)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("path", ["../outside.jpg", "/etc/hostname", "image/../../outside.jpg"])
def test_importer_rejects_paths_escaping_the_root(pol, tmp_path, path):
    (tmp_path / "outside.jpg").write_bytes((FIXTURE / "image" / "image_1.jpg").read_bytes())
    root = _fixture_copy(tmp_path, lambda d: d["0"]["files"][0].update(path=path))
    with pytest.raises(InputError, match=r"0\.files\[0\]\.path"):
        load_gta(root, pol)


def test_importer_rejects_symlinks_out_of_the_root(pol, tmp_path):
    (tmp_path / "outside.jpg").write_bytes((FIXTURE / "image" / "image_1.jpg").read_bytes())
    root = _fixture_copy(tmp_path, lambda d: d["0"]["files"][0].update(path="image/link.jpg"))
    (root / "image" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(InputError, match="stays inside the GTA root"):
        load_gta(root, pol)


def test_importer_names_bad_fields(pol, tmp_path):
    root = _fixture_copy(tmp_path, lambda d: d["2"]["dialogs"][1]["tool_calls"][0]["function"].update(name="Teleport"))
    with pytest.raises(InputError, match=r"2\.dialogs\[1\]\.tool_calls\[0\]\.function\.name"):
        load_gta(root, pol)
    root = _fixture_copy(tmp_path / "b", lambda d: d["1"]["dialogs"][1]["tool_calls"][0]["function"].update(arguments="{x"))
    with pytest.raises(InputError, match=r"1\.dialogs\[1\]\.tool_calls\[0\]\.function\.arguments"):
        load_gta(root, pol)


def test_cli_end_to_end(tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["generate", "gta", "--policies", str(POLICIES), "--out", str(tmp_path / "d"), "--params", "params.yaml",
               "--set", "train_dialogs=20", "--set", "test_dialogs=5", "--set", "cover_every_rule=false"])
    assert rc == 0 and "train" in capsys.readouterr().out
    assert main(["generate", "gta", "--out", str(tmp_path / "e"), "--set", "age_range=[9]"]) == 2


# ---------------------------------------------------------------------- validation


def test_validation_passes_then_catches_a_contradicting_version(sample, tmp_path):
    from validation.gta import validate

    out, _ = sample
    res = validate(out, POLICIES)
    assert all(r.success for r in res), [r for r in res if not r.success]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    recs = read_records(bad / "test.jsonl")
    victim = next(r for r in recs if r.meta["tool"] == "ImageDescription")
    call = json.loads(victim.answer)
    n = int(call["name"][-1])
    call["name"] = f"ImageDescription_v{n % 5 + 1}"  # a version the profile does not allow
    victim.answer = json.dumps(call)
    other = next(r for r in recs if r.meta["tool"] == "RegionAttributeDescription")
    other_call = json.loads(other.answer)
    other_call["arguments"]["bbox"] = "(5, 5, 1)"
    other.answer = json.dumps(other_call)
    write_records(bad / "test.jsonl", recs)
    failed = {r.name: r for r in validate(bad, POLICIES) if not r.success}
    assert set(failed) == {"test.jsonl: target tool re-resolved from the profile by the policy",
                           "test.jsonl: arguments match the tool's schema"}
    rows = failed["test.jsonl: target tool re-resolved from the profile by the policy"].failing_rows
    assert [r["id"] for r in rows] == [victim.id] and rows[0]["answer"] == call["name"]
    assert [r["id"] for r in failed["test.jsonl: arguments match the tool's schema"].failing_rows] == [other.id]


def test_validation_flags_labels_of_an_older_policy(sample, tmp_path):
    from validation.gta import validate

    out, _ = sample
    spec = load_yaml(POLICIES / "gtapolicy.yaml")
    next(r for r in spec["rules"] if r["id"] == "RegionAttributeDescription-2")["use"] = "RegionAttributeDescription_v2"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "g.yaml").write_text(dump_yaml(spec))
    failed = {r.name for r in validate(out, tmp_path / "p") if not r.success}
    assert "train.jsonl: labels made under the current policy version" in failed
    assert "train.jsonl: target tool re-resolved from the profile by the policy" in failed
    assert GTAPolicy.from_spec(spec).version != load_gta_policy(POLICIES).version
