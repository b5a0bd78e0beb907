r"""``trimpi generate generic``: policy-free perception QA on our own scenes, plus text-only QA.

This is the data of ``trimpi train base`` (the tiny presets learn to see before any policy) and,
through ``test.jsonl``, the probe set of the forgetting suite. Output directory (atomic)::

    data/generic/train.jsonl  test.jsonl  images/shard-*.zip  manifest.json

Question types (``meta.qtype`` on every record; the forgetting suite groups by it):

* ``exist``  — one attribute: "Is there a brown object?", "Is there a cube?" (every attribute type);
* ``exist2`` — two-attribute conjunction: "Is there a red cube?", "Is there a large metal object?";
  half of the "no" scenes are *hard negatives* that hold each attribute on a different object, so
  answering needs binding, not two separate existence checks (ClevrPolicy's depth-2 nodes ask
  exactly such conjunctions);
* ``attribute`` — "What colour is the cube?", asked only when the description names exactly one
  object in the scene;
* ``count``  — "How many red objects are there?" (0 included);
* ``objects`` — "How many objects are there?", the CoT lists every object left to right with all
  four attributes: a caption, the densest perception signal per image (see PERCEPTION.md);
* ``text``   — text-only instructions (small arithmetic, comparisons, word facts), ``task="text"``,
  no image, so the base has some language ability for later stages to forget.

Answers are never sampled: scenes are *steered* towards a target answer (a witness object, or a
pool of objects that avoid the description), and the label is then computed from the scene graph
by :func:`answer_for` — the tests re-derive every label independently. Responses use the
pipeline's one format (``<think>CoT</think>\boxed{answer}``); the CoT repeats the question and,
for "yes", cites a witness with all four attributes, in the words ClevrPolicy's gold reasoning
uses ("Is there a cyan cube? Yes, a small cyan metal cube is in the image."), so the base learns
the very sentences CoT SFT will later chain.

Departures from the obvious: one question per image (no sharing of images between questions),
because the probe set must score each question type on images it has not seen; and the scene
knobs (``image_size``, ``object_scale``, objects per scene) are this section's own, so perception
can be made learnable here without touching ``generate_clevr`` (see benchmarks/PERCEPTION.md). One
such knob departs from a fixed scene distribution: with ``object_scale_max`` each *training* scene is
placed and drawn at its own object scale (recorded as ``scene["object_scale"]``), because a random
tiny VLM only learns to name what it sees when some objects are large; test scenes stay at
``object_scale``, so the probe set measures the small objects.
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.data.records import ImageStore, Record, write_records
from pipeline.scenes import (ATTR_NOUN, ATTRIBUTES, all_combos, check_scene_settings, describe, holds, make_scene, plural,
                             render_scene)
from pipeline.io import atomic_dir, atomic_write_json, input_error

QTYPES = ("exist", "exist2", "attribute", "count", "objects", "text")
IMAGE_QTYPES = QTYPES[:-1]
COMBOS = all_combos()


@dataclass
class GenerateGenericConfig:
    """``params.yaml: generate_generic`` — sizes and scene settings of the generic QA set."""

    train: dict[str, int] = field(default_factory=lambda: {"exist": 4000, "exist2": 4000, "attribute": 2000,
                                                           "count": 1000, "objects": 6000, "text": 1000})
    """Training records per question type (each image question has its own image); object lists teach
    attributes fastest (PERCEPTION.md §6)."""
    test_per_qtype: int = 25
    """Held-out records per question type (test.jsonl = the forgetting probe set and the held-out images of
    train base's vision phase)."""
    image_size: int = 128
    """Image side in pixels (Qwen2.5-VL: one merged token per 28x28 px)."""
    object_scale: float = 0.14
    """Large-object radius as a fraction of the image side (small objects: 0.62 of it)."""
    object_scale_max: float = 0.0
    """Training scenes draw their object scale uniformly in [object_scale, object_scale_max] (0 = all at
    object_scale); test scenes always use object_scale. Larger objects bootstrap perception (PERCEPTION.md)."""
    min_objects: int = 1
    """Fewest objects per scene (1-2-object scenes feed the first curriculum phase of ``train base``)."""
    max_objects: int = 6
    """Most objects per scene."""
    hard_negative_share: float = 0.5
    """Share of ``exist2`` "no" scenes that hold both attributes on different objects."""
    shard_size: int = 2000
    """Images per zip shard."""


# ----------------------------------------------------------------------------- words


def _full(obj: dict) -> dict[str, str]:
    return {a: obj[a] for a in ATTRIBUTES}


def _left_to_right(objs: list[dict]) -> list[dict]:
    return sorted(objs, key=lambda o: (o["pixel_coords"][0], o["pixel_coords"][1]))


# ----------------------------------------------------------------------------- questions


def question_text(q: dict) -> str:
    """The query the model sees for a question spec ``{"qtype", "desc", "target"?}``."""
    if q["qtype"] in ("exist", "exist2"):
        return f"Is there {describe(q['desc'])}?"
    if q["qtype"] == "attribute":
        return f"What {ATTR_NOUN[q['target']]} is the {describe(q['desc'], article=False)}?"
    if q["qtype"] in ("count", "objects"):
        return f"How many {plural(q['desc'])} are there?"
    raise ValueError(q["qtype"])


def answer_for(q: dict, scene: dict) -> tuple[str, str]:
    """(answer, CoT) of an image question, computed from the scene graph alone.

    Raises ValueError for an ``attribute`` question whose description does not name exactly one
    object (such a question is never asked).
    """
    objs = _left_to_right(scene["objects"])
    match = [o for o in objs if holds(o, q["desc"])]
    ask = question_text(q)
    if q["qtype"] in ("exist", "exist2"):
        if match:
            return "yes", f"{ask} Yes, {describe(_full(match[0]))} is in the image."
        return "no", f"{ask} No, there is no {describe(q['desc'], article=False)}."
    if q["qtype"] == "attribute":
        if len(match) != 1:
            raise ValueError(f"{ask} is ambiguous: {len(match)} objects match")
        o = match[0]
        return o[q["target"]], f"There is one {describe(q['desc'], article=False)}: {describe(_full(o))}."
    if q["qtype"] in ("count", "objects"):
        if not match:
            return "0", f"There is no {describe(q['desc'], article=False)}. The count is 0."
        listed = ", ".join(describe(_full(o)) for o in match)
        return str(len(match)), f"From left to right: {listed}. The count is {len(match)}."
    raise ValueError(q["qtype"])


def _random_desc(rng: random.Random, n_attrs: int, exclude: str | None = None) -> dict[str, str]:
    attrs = [a for a in ATTRIBUTES if a != exclude]
    return {a: rng.choice(ATTRIBUTES[a]) for a in rng.sample(attrs, n_attrs)}


def _others(rng: random.Random, n: int, avoid: dict[str, str] | None) -> list[dict]:
    pool = [o for o in COMBOS if not (avoid and holds(o, avoid))]
    return [dict(rng.choice(pool)) for _ in range(n)]


def sample_question(qtype: str, rng: random.Random, n_objects: int, hard_share: float = 0.5
                    ) -> tuple[dict, list[dict]]:
    """A question spec and the objects (attribute dicts) of a scene steered towards a balanced answer.

    ``exist``/``exist2``: yes/no with probability 1/2 each; ``count``: a target count uniform in
    0..min(4, n_objects); ``attribute``: exactly one object matches the description.
    """
    if qtype in ("exist", "exist2"):
        desc = _random_desc(rng, 1 if qtype == "exist" else 2)
        if rng.random() < 0.5:  # yes: one witness, the rest random
            witness = dict(rng.choice([o for o in COMBOS if holds(o, desc)]))
            objs = [witness] + [dict(rng.choice(COMBOS)) for _ in range(n_objects - 1)]
        else:
            objs = _others(rng, n_objects, desc)
            if qtype == "exist2" and n_objects >= 2 and rng.random() < hard_share:
                # hard negative: each attribute present, never on the same object
                (a1, v1), (a2, v2) = desc.items()
                objs[0] = dict(rng.choice([o for o in COMBOS if o[a1] == v1 and o[a2] != v2]))
                objs[1] = dict(rng.choice([o for o in COMBOS if o[a2] == v2 and o[a1] != v1]))
        rng.shuffle(objs)
        return {"qtype": qtype, "desc": desc}, objs
    if qtype == "attribute":
        target = rng.choice(list(ATTRIBUTES))
        desc = _random_desc(rng, rng.choice((1, 2)), exclude=target)
        objs = [dict(rng.choice([o for o in COMBOS if holds(o, desc)]))] + _others(rng, n_objects - 1, desc)
        rng.shuffle(objs)
        return {"qtype": qtype, "desc": desc, "target": target}, objs
    if qtype == "count":
        desc = _random_desc(rng, rng.choice((1, 1, 2)))
        k = rng.randint(0, min(4, n_objects))
        objs = [dict(rng.choice([o for o in COMBOS if holds(o, desc)])) for _ in range(k)]
        objs += _others(rng, n_objects - k, desc)
        rng.shuffle(objs)
        return {"qtype": qtype, "desc": desc}, objs
    if qtype == "objects":
        return {"qtype": qtype, "desc": {}}, [dict(rng.choice(COMBOS)) for _ in range(n_objects)]
    raise ValueError(qtype)


# ----------------------------------------------------------------------------- text-only

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OPPOSITES = {"left": "right", "right": "left", "up": "down", "down": "up", "big": "small", "small": "big",
             "large": "small", "hot": "cold", "cold": "hot", "yes": "no", "no": "yes", "true": "false",
             "false": "true", "front": "behind", "first": "last", "last": "first", "open": "closed",
             "more": "less", "less": "more", "top": "bottom", "bottom": "top", "day": "night", "night": "day"}
WORDS = ["cube", "sphere", "cylinder", "policy", "image", "object", "answer", "metal", "rubber", "purple",
         "yellow", "green", "red", "blue", "scene", "count", "tool", "case", "brown", "gray", "cyan", "shape"]


def text_question(rng: random.Random) -> tuple[str, str, str, str]:
    """(kind, query, cot, answer) of one text-only instruction; the answer is computed, not stored."""
    kind = rng.choice(("add", "larger", "weekday", "opposite", "letters"))
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return kind, f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", str(a + b)
    if kind == "larger":
        a, b = rng.sample(range(100), 2)
        return kind, f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.", str(max(a, b))
    if kind == "weekday":
        d = rng.randrange(7)
        nxt = WEEKDAYS[(d + 1) % 7]
        return kind, f"What day comes after {WEEKDAYS[d]}?", f"The day after {WEEKDAYS[d]} is {nxt}.", nxt
    if kind == "opposite":
        w = rng.choice(sorted(OPPOSITES))
        return kind, f"What is the opposite of \"{w}\"?", f"The opposite of {w} is {OPPOSITES[w]}.", OPPOSITES[w]
    w = rng.choice(WORDS)
    return kind, f"How many letters are in the word \"{w}\"?", f"{'-'.join(w)} has {len(w)} letters.", str(len(w))


# ----------------------------------------------------------------------------- build


def check_config(cfg: GenerateGenericConfig, params) -> None:
    sec = "generate_generic"
    unknown = sorted(set(cfg.train) - set(QTYPES))
    if unknown:
        raise input_error(params, f"{sec}.train.{unknown[0]}", "one of " + ", ".join(QTYPES), unknown[0])
    for k, v in {**{f"train.{q}": n for q, n in cfg.train.items()}, "test_per_qtype": cfg.test_per_qtype}.items():
        if not isinstance(v, int) or v < 0:
            raise input_error(params, f"{sec}.{k}", "a non-negative integer", v)
    check_scene_settings(params, sec, cfg, min_image=28)
    if cfg.object_scale_max and not cfg.object_scale <= cfg.object_scale_max <= 0.4:
        raise input_error(params, f"{sec}.object_scale_max", "0 (off) or a scale in [object_scale, 0.4]",
                          cfg.object_scale_max)
    if not 0.0 <= cfg.hard_negative_share <= 1.0:
        raise input_error(params, f"{sec}.hard_negative_share", "a share in [0, 1]", cfg.hard_negative_share)


def image_example(qtype: str, rng: random.Random, cfg: GenerateGenericConfig, index: int = 0, split: str = "train"
                  ) -> tuple[dict, dict, str, str, str]:
    """(question spec, scene graph, query, cot, answer) of one image question; no image rendered yet.

    The scene records the object scale it was placed at (``scene["object_scale"]``): render it with that.
    """
    from pipeline.io import InputError

    for _attempt in range(20):
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        q, objs = sample_question(qtype, rng, n, cfg.hard_negative_share)
        scale = cfg.object_scale
        if split == "train" and cfg.object_scale_max > scale:
            scale = round(rng.uniform(cfg.object_scale, cfg.object_scale_max), 4)
        try:  # many large objects occasionally do not fit: draw another scene (and scale)
            scene = make_scene(objs, rng, cfg.image_size, scale, index, split)
            scene["object_scale"] = scale
            break
        except InputError:
            continue
    else:
        raise input_error("params.yaml", "generate_generic.object_scale",
                          f"objects that fit: {cfg.max_objects} objects at scale {cfg.object_scale} rarely fit "
                          f"in {cfg.image_size} px", cfg.object_scale)
    answer, cot = answer_for(q, scene)
    return q, scene, question_text(q), cot, answer


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def build(out: str | Path, cfg: GenerateGenericConfig, seed: int, params="params.yaml", progress: bool = True) -> dict:
    """Write the dataset directory; returns the manifest."""
    from tqdm import tqdm

    check_config(cfg, params)
    plan = {"train": dict(cfg.train), "test": {q: cfg.test_per_qtype for q in QTYPES}}
    total = sum(n for split in plan.values() for q, n in split.items() if q != "text")
    manifest: dict = {"task": "generic", "seed": seed, "config": asdict(cfg), "files": {}, "answers": {}}
    seen_images: set[str] = set()
    seen_text: set[str] = set()
    with atomic_dir(out) as tmp, tqdm(total=total, desc="generate generic", unit="img", disable=not progress) as bar:
        store = ImageStore(tmp, shard_size=cfg.shard_size)
        # test first: the probe set claims its images/queries, train re-draws any collision with it
        for split in ("test", "train"):
            recs: list[Record] = []
            for qtype in QTYPES:
                rng = random.Random(f"{seed}/generic/{split}/{qtype}")
                for i in range(plan[split].get(qtype, 0)):
                    rid = f"{qtype}/{split}/{i:06d}"
                    if qtype == "text":
                        while True:
                            kind, query, cot, ans = text_question(rng)
                            if split == "test" or query not in seen_text:
                                break
                        if split == "test":
                            seen_text.add(query)
                        recs.append(Record(id=rid, task="text", split=split, query=query, answer=ans, cot=cot,
                                           meta={"qtype": "text", "kind": kind}))
                        continue
                    while True:
                        q, scene, query, cot, ans = image_example(qtype, rng, cfg, i, split)
                        data = _png(render_scene(scene, object_scale=scene["object_scale"]))
                        h = hashlib.sha1(data).hexdigest()
                        if h not in seen_images:
                            break
                    seen_images.add(h)
                    ref = store.add_bytes(data, f"{split}-{qtype}-{i:06d}.png")
                    recs.append(Record(id=rid, task="generic", split=split, query=query, answer=ans, cot=cot,
                                       images=[ref], meta={"qtype": qtype, "question": q, "scene": scene}))
                    bar.update(1)
            manifest["files"][f"{split}.jsonl"] = write_records(tmp / f"{split}.jsonl", recs)
            manifest["answers"][split] = _answer_distribution(recs)
        store.close()
        manifest["images"] = len(seen_images)
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def _answer_distribution(recs: list[Record]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in recs:
        d = out.setdefault(r.meta["qtype"], {})
        d[r.answer] = d.get(r.answer, 0) + 1
    return {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:12]) for q, d in out.items()}


# ----------------------------------------------------------------------------- CLI


def configure_generate(parser) -> None:
    parser.add_argument("--out", default="data/generic", help="dataset directory to (re)create")


def run_generate(args) -> int:
    import time

    from pipeline.config import load_base, load_section

    cfg = load_section(GenerateGenericConfig, "generate_generic", args.params, args.overrides)
    seed = load_base(args.params).seed
    t = time.perf_counter()
    m = build(args.out, cfg, seed, params=args.params)
    for f, n in m["files"].items():
        print(f"{n} records in {f}")
    for q, d in m["answers"]["test"].items():
        top = max(d.values()) / max(1, sum(d.values()))
        print(f"  test {q:<9} majority answer share {top:.0%}")
    print(f"wrote {args.out} ({m['images']} images) in {time.perf_counter() - t:.1f} s")
    return 0
