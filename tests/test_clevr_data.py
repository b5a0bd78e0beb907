"""ClevrPolicy dataset builder: labels re-derived, CoT/answer consistency, disjoint splits, balance."""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.clevr_policy import QUERY, GenerateClevrConfig, build
from pipeline.data.records import ImageStore, read_records
from pipeline.scenes import render_scene
from pipeline.io import InputError, dump_yaml, read_json
from pipeline.policy import load_policies, load_policy
from pipeline.policy.clevr import sample_policy

FIXTURE = Path(__file__).parent / "fixtures" / "clevr" / "CLEVR_v1.0"
SMALL = dict(train_per_policy=16, cot_per_policy=8, test_per_policy=8, override_per_policy=8, override_count=1)


def make_policies(root: Path, depths=(2, 3)) -> Path:
    d = root / "policies" / "clevr"
    d.mkdir(parents=True)
    for i, depth in enumerate(depths):
        pol = sample_policy(depth, random.Random(100 + i))
        (d / f"{pol.name}.yaml").write_text(dump_yaml(pol.to_spec()))
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevr")
    pols = make_policies(root)
    out = root / "data"
    manifest = build(pols, out, GenerateClevrConfig(**SMALL), seed=0, progress=False)
    return pols, out, manifest


def load(out: Path, split: str):
    return read_records(out / f"{split}.jsonl")


def test_every_label_is_rederived(dataset):
    pols, out, _ = dataset
    policies = load_policies(pols)
    for split in ("train", "cot", "test"):
        recs = load(out, split)
        assert recs
        for r in recs:
            pol = policies[r.policy]
            case, path = pol.evaluate(r.meta["scene"])
            assert r.answer == case and r.meta["gold_path"] == [[c, b] for c, b in path]
            assert r.policy_version == pol.version and r.task == "clevr" and r.meta["depth"] == pol.depth
            assert r.query == QUERY.format(name=pol.name)


def test_override_labels_follow_the_new_tree(dataset):
    pols, out, manifest = dataset
    over = load(out, "override")
    assert len(over) == SMALL["override_per_policy"]
    name = over[0].policy
    new = load_policy(out / over[0].meta["override_policy"])
    old = load_policies(pols)[name]
    assert new.name == name and new.version != old.version
    assert manifest["override_policies"][name]["version"] == new.version
    differ = 0
    for r in over:
        assert r.split == "override" and r.policy_version == new.version
        assert r.answer == new.evaluate(r.meta["scene"])[0]
        differ += r.answer != old.evaluate(r.meta["scene"])[0]
    assert differ > 0  # the override set actually tests following the new tree


def test_images_match_scenes_and_splits_are_disjoint(dataset):
    _, out, manifest = dataset
    store = ImageStore(out)
    owners: dict[str, set] = {}
    for split in ("train", "test", "override"):
        for r in load(out, split):
            raw = store.read_bytes(r.images[0])
            owners.setdefault(hashlib.sha256(raw).hexdigest(), set()).add(split)
            img = store.open(r.images[0])
            assert img.size == (128, 128)
            # the stored pixels are exactly the render of the recorded scene graph
            assert np.array_equal(np.asarray(img), np.asarray(render_scene(r.meta["scene"], 128, 0.14)))
    assert all(len(s) == 1 for s in owners.values())
    assert manifest["images"] == len(owners)
    assert len(list((out / "images").glob("shard-*.zip"))) >= 1


def test_cot_subset_answer_only_train_and_cot_consistency(dataset):
    _, out, _ = dataset
    train = {r.id: r for r in load(out, "train")}
    assert all(r.cot == "" for r in train.values())
    cot = load(out, "cot")
    assert len(cot) == 2 * SMALL["cot_per_policy"]
    for r in cot + load(out, "test") + load(out, "override"):
        assert r.cot.endswith(f"The answer is {r.answer}.")
        for cid, _ in r.meta["gold_path"]:
            assert f"Condition {cid} asks" in r.cot
    for r in cot:
        t = train[r.id]
        assert (t.answer, t.images, t.meta["scene"]) == (r.answer, r.images, r.meta["scene"])


def test_labels_are_balanced_and_manifest_counts(dataset):
    pols, out, manifest = dataset
    policies = load_policies(pols)
    for split, n in (("train", SMALL["train_per_policy"]), ("test", SMALL["test_per_policy"])):
        for name, pol in policies.items():
            c = Counter(r.answer for r in load(out, split) if r.policy == name)
            assert sum(c.values()) == n
            assert set(c) == set(pol.leaves) and max(c.values()) - min(c.values()) <= 1
            assert manifest["policies"][name]["labels"][split] == dict(sorted(c.items(), key=lambda kv: int(kv[0][5:])))
    for f, n in manifest["files"].items():
        assert len(read_records(out / f)) == n


def test_deterministic_from_seed(dataset, tmp_path):
    pols, out, _ = dataset
    again = tmp_path / "again"
    build(pols, again, GenerateClevrConfig(**SMALL), seed=0, progress=False)
    for f in ("train.jsonl", "cot.jsonl", "test.jsonl", "override.jsonl", "manifest.json"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f
    other = tmp_path / "other"
    build(pols, other, GenerateClevrConfig(**SMALL), seed=1, progress=False)
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_unbalanced_mode_uses_random_scenes(tmp_path):
    pols = make_policies(tmp_path, depths=(2,))
    cfg = GenerateClevrConfig(**{**SMALL, "balance": False, "override_count": 0})
    m = build(pols, tmp_path / "d", cfg, seed=0, progress=False)
    assert m["files"]["override.jsonl"] == 0
    recs = read_records(tmp_path / "d" / "train.jsonl")
    pol = next(iter(load_policies(pols).values()))
    assert all(r.answer == pol.evaluate(r.meta["scene"])[0] for r in recs)
    assert all(3 <= len(r.meta["scene"]["objects"]) <= 6 for r in recs)


def test_a_scene_that_does_not_fit_is_drawn_again(tmp_path):
    """At object_scale 0.2 six objects often do not fit in 128 px while three always do: the
    generator draws another scene instead of failing the whole dataset. Settings where no scene
    ever fits still fail, naming object_scale, and write nothing."""
    pols = make_policies(tmp_path, depths=(2, 3))
    cfg = GenerateClevrConfig(**{**SMALL, "object_scale": 0.2, "min_objects": 3, "max_objects": 6})
    build(pols, tmp_path / "d", cfg, seed=0, progress=False)
    policies = load_policies(pols)
    for split in ("train", "test"):
        for r in read_records(tmp_path / "d" / f"{split}.jsonl"):
            assert 3 <= len(r.meta["scene"]["objects"]) <= 6
            assert r.answer == policies[r.policy].evaluate(r.meta["scene"])[0]
    with pytest.raises(InputError, match="generate_clevr.object_scale"):
        build(pols, tmp_path / "e", GenerateClevrConfig(**{**SMALL, "object_scale": 0.4, "min_objects": 6,
                                                              "max_objects": 6}), seed=0, progress=False)
    assert not (tmp_path / "e").exists()


def test_clevr_source_from_fixture(tmp_path):
    pols = make_policies(tmp_path, depths=(1,))
    cfg = GenerateClevrConfig(train_per_policy=6, cot_per_policy=2, test_per_policy=4, override_per_policy=4,
                              override_count=1, source="clevr", clevr_root=str(FIXTURE))
    out = tmp_path / "d"
    build(pols, out, cfg, seed=0, progress=False)
    pol = next(iter(load_policies(pols).values()))
    store = ImageStore(out)
    fixture_bytes = {p.read_bytes() for p in (FIXTURE / "images").rglob("*.png")}
    for split in ("train", "test"):
        recs = read_records(out / f"{split}.jsonl")
        assert len(recs) == {"train": 6, "test": 4}[split]
        for r in recs:
            assert r.answer == pol.evaluate(r.meta["scene"])[0]
            assert r.meta["scene"]["split"] == {"train": "train", "test": "val"}[split]
            assert store.read_bytes(r.images[0]) in fixture_bytes
            assert "image_path" not in r.meta["scene"]  # no absolute local paths leak into records
    # asking for more scenes than the fixture has is a clear error
    with pytest.raises(InputError, match="at least 50 scenes"):
        build(pols, tmp_path / "e", GenerateClevrConfig(**{**cfg.__dict__, "train_per_policy": 50,
                                                             "cot_per_policy": 0}), seed=0, progress=False)


def test_bad_config_and_cli(tmp_path):
    pols = make_policies(tmp_path, depths=(2,))
    with pytest.raises(InputError, match=r"generate_clevr\.cot_per_policy: expected at most train_per_policy"):
        build(pols, tmp_path / "x", GenerateClevrConfig(train_per_policy=2, cot_per_policy=3), seed=0, progress=False)
    assert not (tmp_path / "x").exists()  # nothing half-written
    params = tmp_path / "params.yaml"
    params.write_text("base: {seed: 3}\ngenerate_clevr: {train_per_policy: 4, cot_per_policy: 2, test_per_policy: 4, "
                      "override_per_policy: 0}\n")
    out = tmp_path / "cli"
    assert main(["generate", "clevr", "--params", str(params), "--set", "test_per_policy=8",
                 "--policies", str(pols), "--out", str(out)]) == 0
    m = read_json(out / "manifest.json")
    assert m["seed"] == 3 and m["files"] == {"train.jsonl": 4, "cot.jsonl": 2, "test.jsonl": 8, "override.jsonl": 0}
    assert main(["generate", "clevr", "--params", str(params), "--set", "max_objects=11",
                 "--policies", str(pols), "--out", str(out)]) == 2
