"""ClevrPolicy specs: semantics, validation errors, reachability, versions, rendering, CLI."""
from __future__ import annotations

import random
import re

import pytest
import yaml

from pipeline.cli import main
from pipeline.scenes import ATTRIBUTES, make_scene
from pipeline.io import InputError
from pipeline.policy import load_policy
from pipeline.policy.clevr import ClevrPolicy, sample_policy

SPEC = """kind: clevr
name: L2-Tesafo
depth: 2
tree:
- {id: '1', attribute: color, value: cyan, if_true: '2.1', if_false: '2.2'}
- {id: '2.1', attribute: shape, value: cube, if_true: Case 2, if_false: Case 0}
- {id: '2.2', attribute: size, value: small, if_true: Case 3, if_false: Case 1}
"""


def obj(shape="sphere", color="gray", size="large", material="rubber"):
    return {"shape": shape, "color": color, "size": size, "material": material}


def scene(*objs):
    return {"objects": list(objs)}


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_cumulative_existence_semantics(tmp_path):
    pol = load_policy(write(tmp_path, SPEC))
    # a cyan sphere and a red cube: "cyan?" yes, then "a cyan cube?" no (the cube is red)
    assert pol.evaluate(scene(obj("sphere", "cyan"), obj("cube", "red"))) == ("Case 0", [("1", True), ("2.1", False)])
    assert pol.evaluate(scene(obj("cube", "cyan"), obj("cube", "red")))[0] == "Case 2"
    # no cyan: "small?" is asked over all objects (the false edge keeps the empty context)
    assert pol.evaluate(scene(obj(size="small"), obj("cube", "red")))[0] == "Case 3"
    assert pol.evaluate(scene(obj(), obj("cube", "red"))) == ("Case 1", [("1", False), ("2.2", False)])


@pytest.mark.parametrize("depth,n_leaves", [(1, 2), (2, 4), (3, 8), (4, 16), (6, 40)])
def test_every_leaf_reachable_and_true_edge_rule(depth, n_leaves):
    for seed in range(3):
        pol = sample_policy(depth, random.Random(seed))
        assert len(pol.leaves) == n_leaves == len(set(pol.leaves))
        assert sorted(pol.leaves, key=lambda c: int(c.split()[1])) == [f"Case {i}" for i in range(n_leaves)]
        rng = random.Random(seed)
        for case in pol.leaves:  # a witness scene per leaf must evaluate to that leaf
            sc = make_scene(pol.witness_objects(case, rng.randint(3, 6), rng), rng)
            assert pol.evaluate(sc)[0] == case
        for cid, n in pol.nodes.items():  # no attribute type reused along the true path
            assert n.attribute not in {a for a, _ in pol.context[cid][0]}
        assert max(len(pol.context[c][0]) + len(pol.context[c][1]) for c in pol.leaves) == depth


def test_sampling_is_deterministic_and_named():
    a, b = sample_policy(4, random.Random(5)), sample_policy(4, random.Random(5))
    assert a.to_spec() == b.to_spec() and a.version == b.version
    assert re.fullmatch(r"L4-[A-Z][a-z]{5}", a.name)
    assert sample_policy(4, random.Random(6)).version != a.version


def test_version_is_content_hash(tmp_path):
    pol = load_policy(write(tmp_path, SPEC))
    spec = yaml.safe_load(SPEC)
    spec["tree"] = [spec["tree"][0], spec["tree"][2], spec["tree"][1]]  # reorder non-root nodes
    spec["tree"][1] = dict(reversed(list(spec["tree"][1].items())))  # and keys
    assert ClevrPolicy.from_spec(spec).version == pol.version
    spec["tree"][1]["value"] = "large"
    assert ClevrPolicy.from_spec(spec).version != pol.version


BAD = {
    "unknown attribute": ("attribute: color, value: cyan, if_true: '2.1'", "attribute: texture, value: cyan, if_true: '2.1'",
                          r"condition 1\)\.attribute: expected one of shape, color"),
    "unknown value": ("value: cube", "value: pyramid", r"condition 2\.1\)\.value: expected a shape"),
    "missing child key": (", if_false: Case 1}", "}", r"condition 2\.2\)\.if_false: expected a child"),
    "missing child node": ("if_false: '2.2'", "if_false: '2.9'", r"condition 1\)\.if_false: expected an existing condition id"),
    "cycle": ("if_true: Case 3", "if_true: '1'", r"condition 2\.2\)\.if_true: expected a tree: this edge leads back"),
    "reused node": ("if_false: Case 1}", "if_false: '2.1'}", r"condition 2\.2\)\.if_false: expected a tree: condition 2\.1 is already"),
    "duplicate id": ("id: '2.2'", "id: '2.1'", r"condition 2\.1\)\.id: expected a unique condition id"),
    "duplicate case": ("if_true: Case 3", "if_true: Case 2", r"condition 2\.2\)\.if_true: expected a case label used by one leaf"),
    "depth mismatch": ("depth: 2", "depth: 3", r"depth: expected the actual depth of the tree \(2"),
    "bad name": ("name: L2-Tesafo", "name: 'L2 Tesafo!'", r"name: expected a policy name"),
    "true-edge rule": ("attribute: shape, value: cube", "attribute: color, value: red",
                       r"condition 2\.1\)\.attribute: expected an attribute type not already fixed"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_specs_name_file_and_node(tmp_path, kind):
    old, new, pattern = BAD[kind]
    assert old in SPEC
    p = write(tmp_path, SPEC.replace(old, new, 1), "bad.yaml")
    with pytest.raises(InputError) as e:
        load_policy(p)
    assert str(p) in str(e.value)
    assert re.search(pattern, str(e.value)), str(e.value)


def test_impossible_branch_and_orphan_rejected(tmp_path):
    # under "no small object" every object is large, so "is there a large object?" can never be "no"
    spec = SPEC.replace("if_false: Case 1}", "if_false: '3.1'}") + \
        "- {id: '3.1', attribute: size, value: large, if_true: Case 1, if_false: Case 4}\n"
    with pytest.raises(InputError, match=r"condition 3\.1\).*the 'no' branch can never be taken"):
        ClevrPolicy.from_spec(yaml.safe_load(spec.replace("depth: 2", "depth: 3")), "x.yaml")
    orphan = SPEC + "- {id: '3.1', attribute: shape, value: cube, if_true: Case 5, if_false: Case 6}\n"
    with pytest.raises(InputError, match=r"condition 3\.1\): expected a condition reachable from the root"):
        ClevrPolicy.from_spec(yaml.safe_load(orphan), "x.yaml")


def test_render_text_and_multimodal(tmp_path):
    pol = sample_policy(3, random.Random(1), name="L3-Surinu")
    r = pol.render()
    assert r.images == [] and r.text.startswith("Policy: L3-Surinu")
    sections = re.findall(r"^# Condition ([0-9.]+)$", r.text, flags=re.M)
    assert sorted(sections) == sorted(pol.nodes) and sections[0] == "1"
    for case in pol.leaves:
        assert r.text.count(f"the response is {case}.") == 1
    for cid, n in pol.nodes.items():  # every "go to" names an existing section
        for child in (n.if_true, n.if_false):
            if child in pol.nodes:
                assert f"go to Condition {child}." in r.text
    m = pol.render(multimodal=True)
    assert len(m.images) == (len(pol.nodes) + 1) // 2
    assert m.text.count("<image>") == len(m.images)
    assert all(isinstance(a, str) != isinstance(b, str) for a, b in zip(m.parts, m.parts[1:]))  # parts alternate
    assert m.version == r.version == pol.version
    assert pol.render().text == r.text  # deterministic: the same renderer for every stage


def test_reasoning_walks_gold_path():
    pol = sample_policy(4, random.Random(2))
    rng = random.Random(0)
    for case in pol.leaves:
        sc = make_scene(pol.witness_objects(case, 4, rng), rng)
        cot = pol.reasoning(sc)
        _, path = pol.evaluate(sc)
        assert cot.endswith(f"The answer is {case}.")
        cited = re.findall(r"Condition ([0-9.]+) asks", cot)
        assert cited == [c for c, _ in path]


def test_cli_new_list_render(tmp_path, capsys):
    out = tmp_path / "policies" / "clevr"
    assert main(["policy", "new", "clevr", "--depth", "2", "--count", "3", "--seed", "4", "--out", str(out)]) == 0
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 3
    pols = [load_policy(f) for f in files]
    assert len({p.name for p in pols}) == 3 and all(p.depth == 2 and len(p.leaves) == 4 for p in pols)
    # same seed elsewhere -> the same policies; next to the first ones -> same trees, new names
    again = tmp_path / "other" / "clevr"
    main(["policy", "new", "clevr", "--depth", "2", "--count", "3", "--seed", "4", "--out", str(again)])
    assert sorted(load_policy(f).version for f in again.glob("*.yaml")) == sorted(p.version for p in pols)
    main(["policy", "new", "clevr", "--depth", "2", "--count", "3", "--seed", "4", "--out", str(out)])
    both = [load_policy(f) for f in out.glob("*.yaml")]
    assert len({p.name for p in both}) == 6
    assert sorted(str(p.to_spec()["tree"]) for p in both) == sorted(2 * [str(p.to_spec()["tree"]) for p in pols])
    capsys.readouterr()
    assert main(["policy", "list", "--policies", str(tmp_path / "policies")]) == 0
    listing = capsys.readouterr().out
    assert all(p.name in listing and p.version in listing for p in pols)
    assert main(["policy", "render", pols[0].name, "--policies", str(tmp_path / "policies")]) == 0
    assert capsys.readouterr().out.strip() == pols[0].render().text.strip()
    (out / "broken.yaml").write_text(SPEC.replace("value: cube", "value: pyramid"))
    assert main(["policy", "list", "--policies", str(tmp_path / "policies")]) == 2
    assert "broken.yaml" in capsys.readouterr().out


def test_attribute_ontology_is_clevr():
    assert sum(1 for _ in ATTRIBUTES["color"]) == 8
    assert len(ATTRIBUTES["shape"]) * len(ATTRIBUTES["color"]) * len(ATTRIBUTES["size"]) * len(ATTRIBUTES["material"]) == 96
