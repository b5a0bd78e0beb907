"""GTAPolicy spec: rule resolution matches the paper, the partition check rejects bad revisions."""
import argparse
import copy
import itertools
import json

import pytest

from pipeline.io import InputError, dump_yaml, load_yaml
from pipeline.policy import load_policy
from pipeline.policy.gta import GTAPolicy, configure_resolve, permute_versions, run_resolve

SPEC_PATH = "policies/gta/gtapolicy.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_yaml(SPEC_PATH)


@pytest.fixture(scope="module")
def pol():
    return load_policy(SPEC_PATH)


def paper(p, tool, math=False):
    """The rules exactly as transcribed in paper-notes.md section 3.1 (an independent oracle)."""
    a, c, g = p["account_type"], p["credits"], p["age"]
    if tool == "ImageDescription":
        return "ImageDescription_v5" if a == "A" else (
            ("ImageDescription_v4" if c > 500 else "ImageDescription_v3") if a in "BC"
            else ("ImageDescription_v2" if c > 500 else "ImageDescription_v1"))
    if tool == "OCR":
        if math:
            return "MathOCR"
        if c <= 250:
            return "OCR_v5"
        if c <= 750:
            return "OCR_v4" if a in "AB" else "OCR_v3"
        return "OCR_v2" if g < 21 else "OCR_v1"
    if tool == "GoogleSearch":
        return "GoogleSearch_v1" if g < 21 else ("GoogleSearch_v2" if c < 500 else "GoogleSearch_v3")
    if tool == "TextToImage":
        return "TextToImage_v1" if a in "ABC" else ("TextToImage_v2" if c > 500 else "TextToImage_v3")
    if tool == "RegionAttributeDescription":
        return "RegionAttributeDescription_v2" if a in "AB" else "RegionAttributeDescription_v1"
    if tool == "CountGivenObject":
        return f"CountGivenObject_v{1 + (c >= 250) + (c >= 500) + (c >= 750)}"
    if tool == "ImageStylization":
        return "ImageStylization_v1" if g < 21 else ("ImageStylization_v2" if g < 60 else "ImageStylization_v3")
    return tool


def test_catalogue_and_rule_counts(pol):
    assert len(pol.tools) == 14
    assert len(pol.rules) == 20 and len(pol.tips) == 4
    versions = {t.name: t.versions for t in pol.tools.values() if t.versions}
    assert versions == {"OCR": 5, "CountGivenObject": 4, "ImageDescription": 5, "GoogleSearch": 3,
                        "RegionAttributeDescription": 2, "TextToImage": 3, "ImageStylization": 3}


def test_resolution_matches_paper_on_a_grid(pol):
    credits = [0, 1, 249, 250, 251, 499, 500, 501, 749, 750, 751, 5000]
    ages = [0, 20, 21, 59, 60, 120]
    n = 0
    for a, c, g, math in itertools.product("ABCD", credits, ages, (False, True)):
        prof = {"account_type": a, "credits": c, "age": g}
        for tool in pol.tools:
            assert pol.resolve(prof, tool, {"image_has_math": math}) == paper(prof, tool, math), (prof, tool, math)
            n += 1
    assert n == 4 * len(credits) * len(ages) * 2 * 14


def test_match_names_the_rule_and_branch(pol):
    r = pol.match({"account_type": "B", "credits": 600, "age": 30}, "OCR")
    assert (r.name, r.rule, r.branch) == ("OCR_v4", "OCR-2", "then")
    r = pol.match({"account_type": "C", "credits": 600, "age": 30}, "OCR")
    assert (r.name, r.rule, r.branch) == ("OCR_v3", "OCR-2", "else")
    assert pol.match({"account_type": "C", "credits": 0, "age": 30}, "OCR", {"image_has_math": True}).rule == "OCR-4"
    assert pol.redirects() == {"MathOCR": ("OCR", {"image_has_math": True})}


def test_bad_profiles_are_input_errors(pol):
    with pytest.raises(InputError, match="profile.account_type"):
        pol.resolve({"account_type": "E", "credits": 1, "age": 3}, "ImageDescription")
    with pytest.raises(InputError, match="profile.credits"):
        pol.resolve({"account_type": "A", "age": 3}, "OCR")
    with pytest.raises(InputError, match="profile.credits"):
        pol.resolve({"account_type": "A", "credits": -5, "age": 3}, "OCR")
    with pytest.raises(InputError, match="base tools"):
        pol.resolve({"account_type": "A", "credits": 5, "age": 3}, "OCR_v1")


def _rule(spec, rid):
    return next(r for r in spec["rules"] if r["id"] == rid)


def test_overlapping_rules_are_rejected_with_their_names(spec):
    bad = copy.deepcopy(spec)
    _rule(bad, "OCR-1")["when"]["credits"] = {"le": 300}
    with pytest.raises(InputError, match=r"OCR-1 and OCR-2/(then|else) both match .*credits in \(250, 300\)"):
        GTAPolicy.from_spec(bad, "x.yaml")
    bad = copy.deepcopy(spec)
    _rule(bad, "ImageStylization-3")["when"]["age"] = {"ge": 59}
    with pytest.raises(InputError, match="ImageStylization-2 and ImageStylization-3 both match .*age = 59"):
        GTAPolicy.from_spec(bad, "x.yaml")


def test_uncovered_profiles_are_rejected_with_the_rule_names(spec):
    bad = copy.deepcopy(spec)
    _rule(bad, "OCR-3")["when"]["credits"] = {"gt": 800}
    with pytest.raises(InputError, match=r"rules covering every profile.*none of OCR-1, OCR-2, OCR-3, OCR-4 .*credits in \(750, 800\)"):
        GTAPolicy.from_spec(bad, "x.yaml")
    bad = copy.deepcopy(spec)
    bad["rules"] = [r for r in bad["rules"] if r["id"] != "RegionAttributeDescription-2"]
    with pytest.raises(InputError, match="none of RegionAttributeDescription-1 matches .*account_type = C"):
        GTAPolicy.from_spec(bad, "x.yaml")
    bad = copy.deepcopy(spec)  # a boundary point left out: credits == 250 exactly
    _rule(bad, "CountGivenObject-2")["when"]["credits"] = {"gt": 250, "lt": 500}
    with pytest.raises(InputError, match="credits = 250"):
        GTAPolicy.from_spec(bad, "x.yaml")


def test_integer_axes_have_no_gap_between_adjacent_integers(spec):
    ok = copy.deepcopy(spec)
    _rule(ok, "GoogleSearch-1")["when"]["age"] = {"le": 20}
    pol = GTAPolicy.from_spec(ok, "x.yaml")  # age <= 20 / age >= 21 covers every integer age
    assert pol.resolve({"account_type": "A", "credits": 0, "age": 20}, "GoogleSearch") == "GoogleSearch_v1"
    ok["fields"]["age"]["type"] = "number"  # ... but not every real age
    with pytest.raises(InputError, match=r"age in \(20, 21\)"):
        GTAPolicy.from_spec(ok, "x.yaml")


@pytest.mark.parametrize("mutate, where", [
    (lambda s: _rule(s, "OCR-1")["when"].update(colour=["red"]), r"rules\[3\] \(OCR-1\).when.colour"),
    (lambda s: _rule(s, "ImageDescription-1").update(use="ImageDescription_v9"), r"ImageDescription-1\).use"),
    (lambda s: _rule(s, "ImageDescription-1")["when"].update(account_type=["Z"]), "when.account_type"),
    (lambda s: s["rules"].append(dict(_rule(s, "OCR-1"))), "unique rule ids"),
    (lambda s: s["tools"][1].update(versions=1), r"tools\[1\].versions"),
])
def test_malformed_specs_name_the_field(spec, mutate, where):
    bad = copy.deepcopy(spec)
    mutate(bad)
    with pytest.raises(InputError, match=where):
        GTAPolicy.from_spec(bad, "x.yaml")


def test_render_is_the_full_policy_and_version_tracks_content(spec, pol, tmp_path):
    text = pol.render().text
    for t in pol.tools.values():
        assert f"## {t.name}" in text and ", ".join(t.names) in text
    for r in pol.rules:
        assert f"{r['id']}: for {r['tool']}," in text
    assert "use OCR_v4 if account type is A or B, otherwise OCR_v3" in text
    assert "if 250 < credits <= 750 and the image contains no math" in text
    assert all(t in text for t in pol.tips)
    assert '{"name": "bbox", "type": "string"' in text
    # a re-formatted file is the same version; a changed rule is a new one
    (tmp_path / "a.yaml").write_text(dump_yaml(json.loads(json.dumps(spec))))
    assert load_policy(tmp_path / "a.yaml").version == pol.version
    changed = copy.deepcopy(spec)
    _rule(changed, "ImageDescription-1")["use"] = "ImageDescription_v4"
    assert GTAPolicy.from_spec(changed).version != pol.version


def test_permute_versions_rewrites_every_ocr_rule_only(spec, pol):
    new = GTAPolicy.from_spec(permute_versions(spec, ["OCR"], seed=3))
    prof_grid = [{"account_type": a, "credits": c, "age": g} for a in "ABCD" for c in (0, 300, 800) for g in (18, 40)]
    for p in prof_grid:
        assert new.resolve(p, "OCR") != pol.resolve(p, "OCR")
        assert new.resolve(p, "OCR", {"image_has_math": True}) == "MathOCR"
        assert new.resolve(p, "ImageDescription") == pol.resolve(p, "ImageDescription")
    assert new.version != pol.version


def test_resolve_cli(capsys):
    parser = argparse.ArgumentParser()
    configure_resolve(parser)
    args = parser.parse_args(["--profile", '{"account_type":"B","credits":600,"age":30}', "--tool", "OCR"])
    assert run_resolve(args) == 0 and capsys.readouterr().out.strip() == "OCR_v4"
    args = parser.parse_args(["--profile", '{"account_type":"B","credits":600,"age":30}', "--tool", "OCR",
                              "--instance", '{"image_has_math": true}', "--json"])
    run_resolve(args)
    assert json.loads(capsys.readouterr().out) == {"name": "MathOCR", "rule": "OCR-4", "branch": ""}
    with pytest.raises(InputError, match="--profile"):
        run_resolve(parser.parse_args(["--profile", "{oops", "--tool", "OCR"]))
