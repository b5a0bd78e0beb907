"""Generic QA (``trimpi generate generic``): labels re-derived from scene graphs, images match scenes."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from pipeline.data.generic_qa import QTYPES, GenerateGenericConfig, build
from pipeline.data.records import ImageStore, read_records
from pipeline.scenes import ATTRIBUTES, render_scene
from pipeline.io import InputError
from pipeline.model.prompts import format_ok, parse_answer, training_response

SMALL = dict(train={"exist": 40, "exist2": 60, "attribute": 20, "count": 20, "objects": 10, "text": 30},
             test_per_qtype=10)
NOUN = {"colour": "color", "shape": "shape", "size": "size", "material": "material"}
VALUES = {v: a for a, vals in ATTRIBUTES.items() for v in vals}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("generic") / "data"
    manifest = build(out, GenerateGenericConfig(**SMALL), seed=3, progress=False)
    return out, manifest


def parse_desc(phrase: str) -> dict:
    """'large red metal cube' / 'red objects' -> attribute dict, read back from the query words."""
    desc = {}
    for w in phrase.split():
        w = w.rstrip("s") if w.endswith("s") and w.rstrip("s") in VALUES else w
        if w in VALUES:
            desc[VALUES[w]] = w
    return desc


def rederive(query: str, scene: dict) -> str:
    """An independent answer key: parse the query text itself, then look at the scene graph."""
    objs = scene["objects"]
    match = lambda d: [o for o in objs if all(o[a] == v for a, v in d.items())]  # noqa: E731
    if m := re.fullmatch(r"Is there an? (.+)\?", query):
        return "yes" if match(parse_desc(m.group(1))) else "no"
    if m := re.fullmatch(r"What (\w+) is the (.+)\?", query):
        hits = match(parse_desc(m.group(2)))
        assert len(hits) == 1, f"ambiguous attribute question {query!r}"
        return hits[0][NOUN[m.group(1)]]
    if m := re.fullmatch(r"How many (.+) are there\?", query):
        return str(len(match(parse_desc(m.group(1)))))
    raise AssertionError(f"unexpected query {query!r}")


def rederive_text(query: str) -> str:
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", query):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", query):
        return str(max(int(m.group(1)), int(m.group(2))))
    if m := re.fullmatch(r"How many letters are in the word \"(\w+)\"\?", query):
        return str(len(m.group(1)))
    if m := re.fullmatch(r"What day comes after (\w+)\?", query):
        days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        return days[(days.index(m.group(1)) + 1) % 7]
    if m := re.fullmatch(r"What is the opposite of \"(\w+)\"\?", query):
        return None  # a lookup table: checked for consistency below instead
    raise AssertionError(f"unexpected text query {query!r}")


def test_every_label_is_rederived_from_the_scene_graph(dataset):
    out, _ = dataset
    n = 0
    for split in ("train", "test"):
        for r in read_records(out / f"{split}.jsonl"):
            assert r.meta["qtype"] in QTYPES
            if r.task == "text":
                gold = rederive_text(r.query)
                assert gold is None or gold == r.answer, r
                assert not r.images
            else:
                assert r.task == "generic" and len(r.images) == 1
                assert rederive(r.query, r.meta["scene"]) == r.answer, r
                n += 1
    assert n == sum(v for k, v in SMALL["train"].items() if k != "text") + 5 * 10


def test_images_are_the_renders_of_their_scene_graphs(dataset):
    out, _ = dataset
    store = ImageStore(out)
    for r in read_records(out / "test.jsonl")[::7]:
        if r.task != "generic":
            continue
        img = np.asarray(store.open(r.images[0]))
        again = np.asarray(render_scene(r.meta["scene"], object_scale=0.14))
        assert img.shape == (128, 128, 3)
        assert np.array_equal(img, again), r.id


def test_balanced_answers_hard_negatives_and_unambiguous_attributes(tmp_path):
    cfg = GenerateGenericConfig(train={"exist": 200, "exist2": 200, "attribute": 60, "count": 100}, test_per_qtype=0)
    build(tmp_path / "d", cfg, seed=0, progress=False)
    recs = read_records(tmp_path / "d" / "train.jsonl")
    by = lambda q: [r for r in recs if r.meta["qtype"] == q]  # noqa: E731
    for q in ("exist", "exist2"):
        yes = sum(r.answer == "yes" for r in by(q)) / len(by(q))
        assert 0.38 < yes < 0.62, (q, yes)
    # conjunction negatives where both attributes are present, on different objects
    hard = 0
    for r in by("exist2"):
        (a1, v1), (a2, v2) = r.meta["question"]["desc"].items()
        objs = r.meta["scene"]["objects"]
        if r.answer == "no" and any(o[a1] == v1 for o in objs) and any(o[a2] == v2 for o in objs):
            hard += 1
    assert hard >= 30
    counts = {r.answer for r in by("count")}
    assert {"0", "1", "2"} <= counts
    assert len({r.answer for r in by("attribute")}) > 4


def test_responses_use_the_pipeline_format(dataset):
    out, _ = dataset
    for r in read_records(out / "train.jsonl")[::5]:
        text = training_response(r)
        assert format_ok(text) and parse_answer(text) == r.answer
        if r.meta["qtype"] in ("exist", "exist2"):
            # the CoT asks the question and answers it the way ClevrPolicy's gold reasoning does
            assert r.cot.startswith(r.query + (" Yes, " if r.answer == "yes" else " No, there is no "))


def test_splits_are_disjoint_and_generation_is_deterministic(dataset, tmp_path):
    out, manifest = dataset
    store = ImageStore(out)
    digest = lambda r: hashlib.sha1(store.read_bytes(r.images[0])).hexdigest()  # noqa: E731
    train, test = read_records(out / "train.jsonl"), read_records(out / "test.jsonl")
    assert not {digest(r) for r in train if r.images} & {digest(r) for r in test if r.images}
    assert not {r.query for r in train if r.task == "text"} & {r.query for r in test if r.task == "text"}
    assert manifest["files"] == {"test.jsonl": 60, "train.jsonl": 180}
    build(tmp_path / "again", GenerateGenericConfig(**SMALL), seed=3, progress=False)
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (tmp_path / "again" / "images" / "shard-00000.zip").read_bytes() == \
        (out / "images" / "shard-00000.zip").read_bytes()
    build(tmp_path / "other", GenerateGenericConfig(**SMALL), seed=4, progress=False)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


@pytest.mark.parametrize("bad, field", [({"train": {"colours": 3}}, "train.colours"),
                                        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
                                        ({"test_per_qtype": -1}, "test_per_qtype")])
def test_bad_config_names_the_field(tmp_path, bad, field):
    with pytest.raises(InputError, match=re.escape(f"generate_generic.{field}")):
        build(tmp_path / "x", GenerateGenericConfig(**bad), seed=0, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_dataset(tmp_path):
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("base: {seed: 1}\ngenerate_generic:\n  train: {exist: 4, text: 2}\n  test_per_qtype: 1\n")
    assert main(["generate", "generic", "--params", str(params), "--out", str(tmp_path / "g")]) == 0
    assert len(read_records(tmp_path / "g" / "train.jsonl")) == 6
    assert main(["generate", "generic", "--params", str(params), "--out", str(tmp_path / "h"),
                 "--set", "image_size=7"]) == 2


def test_training_scenes_draw_their_object_scale_test_scenes_do_not(tmp_path):
    cfg = GenerateGenericConfig(train={"exist": 30, "objects": 30}, test_per_qtype=5, object_scale_max=0.25,
                                min_objects=1, max_objects=2)
    build(tmp_path / "d", cfg, seed=0, progress=False)
    store = ImageStore(tmp_path / "d")
    train = read_records(tmp_path / "d" / "train.jsonl")
    scales = [r.meta["scene"]["object_scale"] for r in train]
    assert all(0.14 <= s <= 0.25 for s in scales) and max(scales) - min(scales) > 0.05
    assert {r.meta["scene"]["object_scale"] for r in read_records(tmp_path / "d" / "test.jsonl")
            if r.task == "generic"} == {0.14}
    # the image is the render at the recorded scale, not at the default one
    r = max(train, key=lambda r: r.meta["scene"]["object_scale"])
    img = np.asarray(store.open(r.images[0]))
    assert np.array_equal(img, np.asarray(render_scene(r.meta["scene"], object_scale=r.meta["scene"]["object_scale"])))
    assert not np.array_equal(img, np.asarray(render_scene(r.meta["scene"], object_scale=0.14)))
    with pytest.raises(InputError, match="generate_generic.object_scale_max"):
        build(tmp_path / "x", GenerateGenericConfig(object_scale_max=0.1), seed=0, progress=False)
