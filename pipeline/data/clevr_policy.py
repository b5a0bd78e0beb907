"""``trimpi generate clevr``: the ClevrPolicy datasets, one record schema for every stage.

For each policy under ``--policies`` it writes, into ``--out`` (atomically, as one directory):

* ``train.jsonl`` — answer-only training records (Direct SFT and RL); ``cot`` is empty on
  purpose so no stage can train on reasoning by accident;
* ``cot.jsonl``   — the CoT subset of train (same ids and images, ``cot`` filled): VM-CPT uses
  it with the policy in context, CoT SFT without;
* ``test.jsonl``  — held-out images (``cot`` filled as the gold reference for branching analysis);
* ``override.jsonl`` + ``override_policies/<name>.yaml`` — a NEW random tree published under an
  existing policy's name, labels under the new tree (``meta.override_policy`` names its spec);
* ``images/shard-*.zip`` and ``manifest.json`` (counts, label distribution, versions, config).

Labels are never sampled: each answer is ``policy.evaluate(scene)``. Balancing only steers
which scenes are drawn: with ``balance`` the synthetic source asks the policy for objects
that reach a chosen leaf (:meth:`ClevrPolicy.witness_objects`, exact, no rejection loop),
cycling through the leaves so every case gets the same count (+-1); the CLEVR source
buckets the real scenes by leaf and draws round-robin. Train, test and override images are
disjoint (synthetic: content hash of the encoded image, a collision re-draws the scene; CLEVR:
test and override both come from the val split, so an image taken by one is closed to the other).

Every stream is seeded from ``base.seed`` + policy name + split, so adding a policy never
changes another policy's data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data.records import Record, ImageStore, write_records
from pipeline.io import InputError, atomic_dir, atomic_write_json, atomic_write_text, dump_yaml, input_error

QUERY = "According to Policy: {name}, what should be the response for the given image?"
SPLITS = ("train", "test", "override")


@dataclass
class GenerateClevrConfig:
    """``params.yaml: generate_clevr`` — sizes and scene settings of the ClevrPolicy datasets."""

    train_per_policy: int = 1500
    """Answer-only training images per policy (paper: 2000 -> 20K for 10 policies). Rendering is cheap
    (~1,700 PNG scenes/s); the training steps, not the data, bound the embedded run."""
    cot_per_policy: int = 1500
    """Of those, how many also go to cot.jsonl with gold reasoning (paper: ~250 -> 2.5K)."""
    test_per_policy: int = 100
    """Held-out test images per policy (paper: 200 -> 2K for 10 policies)."""
    override_per_policy: int = 50
    """Override-suite images per overridden policy (labels under the new tree)."""
    override_count: int = 2
    """How many policies (first by name) get a new tree published under their name; 0 = no override set."""
    image_size: int = 128
    """Synthetic image side in pixels (128 px = 25 merged 28x28 tokens in Qwen2.5-VL)."""
    object_scale: float = 0.14
    """Radius of a large object as a fraction of the image side (small objects are 0.62 of that)."""
    min_objects: int = 3
    """Fewest objects per synthetic scene (CLEVR: 3)."""
    max_objects: int = 6
    """Most objects per synthetic scene (CLEVR: 10; more need a smaller object_scale to fit)."""
    multimodal: bool = False
    """Policy variant the in-context stages render (False = ClevrPolicy-T, True = -M with icons); recorded in the manifest."""
    balance: bool = True
    """Draw scenes so every case of a policy gets the same count; False = the natural distribution of random scenes."""
    source: Literal["synthetic", "clevr"] = "synthetic"
    """``synthetic``: sample and render scenes; ``clevr``: use real CLEVR v1.0 scenes and images from clevr_root."""
    clevr_root: str = ""
    """The ``CLEVR_v1.0`` directory (source: clevr)."""
    clevr_train_split: str = "train"
    """CLEVR split whose images become train/cot records."""
    clevr_test_split: str = "val"
    """CLEVR split whose images become test/override records (CLEVR's test split has no scene graphs)."""
    clevr_limit: int = 0
    """Read at most this many scenes per CLEVR split (0 = all)."""
    shard_size: int = 2000
    """Images per zip shard."""


def check_config(cfg: GenerateClevrConfig, params) -> None:
    from pipeline.scenes import check_scene_settings

    sec = "generate_clevr"
    for f in ("train_per_policy", "cot_per_policy", "test_per_policy", "override_per_policy", "override_count"):
        if getattr(cfg, f) < 0:
            raise input_error(params, f"{sec}.{f}", "a non-negative integer", getattr(cfg, f))
    if cfg.cot_per_policy > cfg.train_per_policy:
        raise input_error(params, f"{sec}.cot_per_policy", f"at most train_per_policy ({cfg.train_per_policy})",
                          cfg.cot_per_policy)
    check_scene_settings(params, sec, cfg)
    if cfg.source == "clevr" and not cfg.clevr_root:
        raise input_error(params, f"{sec}.clevr_root", "the CLEVR_v1.0 directory when source is clevr")


def _leaf_cycle(leaves: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` target cases, each leaf equally often (+-1), in random order."""
    out = []
    while len(out) < n:
        block = list(leaves)
        rng.shuffle(block)
        out += block
    out = out[:n]
    rng.shuffle(out)
    return out


class _Builder:
    """Holds the image store, the seen-image hashes and a running image counter."""

    def __init__(self, out: Path, cfg: GenerateClevrConfig, seed: int, bar):
        self.cfg, self.seed, self.bar = cfg, seed, bar
        self.store = ImageStore(out, shard_size=cfg.shard_size)
        self.seen: dict[str, str] = {}  # image content hash -> split that owns it
        self.n_images = 0
        self.clevr_pools: dict[str, list[dict]] = {}
        self.clevr_refs: dict[str, str] = {}
        self.clevr_owner: dict[str, str] = {}  # CLEVR image path -> the one split that may use it

    def _add(self, data: bytes) -> str:
        self.n_images += 1
        return self.store.add_bytes(data, f"{self.n_images:07d}.png")

    def synthetic(self, policy, split: str, n: int) -> list[tuple[dict, str]]:
        """(scene, image ref) pairs: scenes steered to leaves when balancing, rendered and stored."""
        import io

        from pipeline.scenes import make_scene, render_scene, sample_scene

        cfg = self.cfg
        rng = random.Random(f"generate-clevr/{self.seed}/{policy.name}/{policy.version}/{split}")
        targets = _leaf_cycle(policy.leaves, n, rng) if cfg.balance else [None] * n
        out = []
        for i, case in enumerate(targets):
            misfit = None
            for _attempt in range(100):
                k = rng.randint(cfg.min_objects, cfg.max_objects)
                try:
                    if case is None:
                        scene = sample_scene(rng, k, k, cfg.image_size, cfg.object_scale, i, split)
                    else:
                        scene = make_scene(policy.witness_objects(case, k, rng), rng, cfg.image_size,
                                           cfg.object_scale, i, split)
                except InputError as e:
                    # k large objects (a case that asks for "large" things, say) occasionally do not
                    # fit at this scale: draw another scene. Settings where none ever fits still
                    # end in this error, naming object_scale, after the last attempt.
                    misfit = e
                    continue
                misfit = None
                buf = io.BytesIO()
                render_scene(scene, cfg.image_size, cfg.object_scale).save(buf, format="PNG")
                data = buf.getvalue()
                h = hashlib.sha256(data).hexdigest()
                if h not in self.seen:  # an identical image in any split is drawn again
                    break
            else:
                if misfit is not None:
                    raise misfit
                raise RuntimeError(f"{policy.name}/{split}: could not draw a new image in 100 tries")
            self.seen[h] = split
            out.append((scene, self._add(data)))
            self.bar.update(1)
        return out

    def clevr(self, policy, split: str, n: int) -> list[tuple[dict, str]]:
        """(scene, image ref) pairs from real CLEVR, round-robin over the policy's leaves."""
        from pipeline.scenes import import_clevr, read_clevr_image

        cfg = self.cfg
        csplit = cfg.clevr_train_split if split == "train" else cfg.clevr_test_split
        if csplit not in self.clevr_pools:
            self.clevr_pools[csplit] = import_clevr(cfg.clevr_root, csplit, cfg.clevr_limit or None)
        pool = self.clevr_pools[csplit]
        rng = random.Random(f"generate-clevr/{self.seed}/{policy.name}/{policy.version}/{split}")
        order = list(range(len(pool)))
        rng.shuffle(order)
        # test and override both draw from CLEVR's val pool: an image another split already took
        # is not available here (within a split, policies share images on purpose)
        order = [j for j in order if self.clevr_owner.get(pool[j]["image_path"], split) == split]
        buckets: dict[str, list[int]] = {c: [] for c in policy.leaves}
        for j in order:
            buckets[policy.evaluate(pool[j])[0]].append(j)
        picks: list[int] = []
        if cfg.balance:
            while len(picks) < n and any(buckets.values()):
                for c in _leaf_cycle(policy.leaves, len(policy.leaves), rng):
                    if buckets[c] and len(picks) < n:
                        picks.append(buckets[c].pop())
        else:
            picks = order[:n]
        if len(picks) < n:
            raise input_error(Path(cfg.clevr_root) / "scenes", csplit,
                              f"at least {n} scenes for {policy.name}/{split}", len(picks))
        out = []
        for j in picks:
            sc = pool[j]
            ref = self.clevr_refs.get(sc["image_path"])
            if ref is None:
                data = read_clevr_image(sc)
                self.seen[hashlib.sha256(data).hexdigest()] = split
                self.clevr_owner[sc["image_path"]] = split
                ref = self.clevr_refs[sc["image_path"]] = self._add(data)
            scene = {k: v for k, v in sc.items() if k != "image_path"}
            out.append((scene, ref))
            self.bar.update(1)
        return out


def _balanced_subset(recs: list[Record], n: int) -> list[Record]:
    """The first ``n`` records taken round-robin over answers (kept in their original order)."""
    by: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        by.setdefault(r.answer, []).append(i)
    queues = [list(reversed(v)) for _, v in sorted(by.items())]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return [recs[i] for i in sorted(picked)]


def _records(policy, split: str, pairs, with_cot: bool, extra_meta: dict | None = None) -> list[Record]:
    recs = []
    for i, (scene, ref) in enumerate(pairs):
        case, path = policy.evaluate(scene)
        recs.append(Record(
            id=f"{policy.name}/{split}/{i:06d}", task="clevr", split=split,
            query=QUERY.format(name=policy.name), answer=case, images=[ref],
            policy=policy.name, policy_version=policy.version,
            cot=policy.reasoning(scene) if with_cot else "",
            meta={"scene": scene, "gold_path": [[c, b] for c, b in path], "depth": policy.depth,
                  **(extra_meta or {})}))
    return recs


def _distribution(recs: list[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in recs:
        out[r.answer] = out.get(r.answer, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split()[-1])))


def build(policies_dir: str | Path, out: str | Path, cfg: GenerateClevrConfig, seed: int,
          params: str = "params.yaml", progress: bool = True) -> dict:
    """Build the whole dataset directory; returns the manifest."""
    from tqdm import tqdm

    from pipeline.policy import load_policies
    from pipeline.policy.clevr import sample_policy

    check_config(cfg, params)
    policies = [p for _, p in sorted(load_policies(policies_dir).items()) if p.kind == "clevr"]
    if not policies:
        raise input_error(policies_dir, None, "at least one ClevrPolicy spec (kind: clevr)")
    over_names = [p.name for p in policies[: cfg.override_count]] if cfg.override_per_policy else []
    total = len(policies) * (cfg.train_per_policy + cfg.test_per_policy) + len(over_names) * cfg.override_per_policy
    out = Path(out)
    split_recs: dict[str, list[Record]] = {"train": [], "cot": [], "test": [], "override": []}
    manifest: dict = {"task": "clevr", "seed": seed, "source": cfg.source, "multimodal": cfg.multimodal,
                      "policies": {}, "override_policies": {}, "config": dataclasses.asdict(cfg)}
    with atomic_dir(out) as tmp, tqdm(total=total, desc="generate clevr", unit="img", disable=not progress) as bar:
        b = _Builder(tmp, cfg, seed, bar)
        draw = b.clevr if cfg.source == "clevr" else b.synthetic
        for pol in policies:
            train = _records(pol, "train", draw(pol, "train", cfg.train_per_policy), with_cot=False)
            cot = [dataclasses.replace(r, cot=pol.reasoning(r.meta["scene"]))
                   for r in _balanced_subset(train, cfg.cot_per_policy)]
            test = _records(pol, "test", draw(pol, "test", cfg.test_per_policy), with_cot=True)
            split_recs["train"] += train
            split_recs["cot"] += cot
            split_recs["test"] += test
            entry = {"version": pol.version, "depth": pol.depth, "path": str(pol.path), "leaves": pol.leaves,
                     "labels": {"train": _distribution(train), "cot": _distribution(cot), "test": _distribution(test)}}
            if pol.name in over_names:
                # a different tree under the same name: the model must follow the in-context policy
                orng = random.Random(f"override-policy/{seed}/{pol.name}/{pol.version}")
                new = sample_policy(pol.depth, orng, name=pol.name)
                while new.version == pol.version:
                    new = sample_policy(pol.depth, orng, name=pol.name)
                rel = f"override_policies/{pol.name}.yaml"
                atomic_write_text(tmp / rel, f"# Override tree published as {pol.name} (replaces version "
                                             f"{pol.version}); labels of override.jsonl follow it.\n"
                                  + dump_yaml(new.to_spec()))
                over = _records(new, "override", draw(new, "override", cfg.override_per_policy), with_cot=True,
                                extra_meta={"override_policy": rel, "original_version": pol.version})
                split_recs["override"] += over
                entry["labels"]["override"] = _distribution(over)
                manifest["override_policies"][pol.name] = {"version": new.version, "path": rel,
                                                           "leaves": new.leaves, "original_version": pol.version}
            manifest["policies"][pol.name] = entry
        b.store.close()
        manifest["files"] = {}
        for split, recs in split_recs.items():
            manifest["files"][f"{split}.jsonl"] = write_records(tmp / f"{split}.jsonl", recs)
        manifest["images"] = b.n_images
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def summary(manifest: dict) -> str:
    """Human-readable label distribution per policy and split (the stage prints it)."""
    lines = [f"{n} records in {f}" for f, n in manifest["files"].items()]
    for name, p in manifest["policies"].items():
        lines.append(f"{name} (version {p['version']}, depth {p['depth']}, {len(p['leaves'])} cases):")
        for split, dist in p["labels"].items():
            n = sum(dist.values()) or 1
            top = max(dist.values(), default=0) / n
            lines.append(f"  {split:<8} " + " ".join(f"{c.split()[-1]}:{k}" for c, k in dist.items())
                         + f"   (largest case {top:.0%})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def configure_generate(parser) -> None:
    parser.add_argument("--policies", default="policies/clevr", help="directory of ClevrPolicy specs")
    parser.add_argument("--out", default="data/clevr", help="dataset directory to (re)create")


def run_generate(args) -> int:
    import time

    from pipeline.config import load_base, load_section

    cfg = load_section(GenerateClevrConfig, "generate_clevr", args.params, args.overrides)
    seed = load_base(args.params).seed
    t = time.perf_counter()
    manifest = build(args.policies, args.out, cfg, seed, params=args.params)
    print(summary(manifest))
    print(f"wrote {args.out} ({manifest['images']} images) in {time.perf_counter() - t:.1f} s")
    return 0
