"""``trimpi generate gta``: GTAPolicy single-turn tool-calling records.

Two sources give the same intermediate dialogs (user query, images, ground-truth tool calls
with their outputs): the bundled sample (``pipeline/data/gta_sample``, the default: real photos
from the scikit-image wheel, rendered documents, template dialogs) or a copy of the GTA
benchmark (``--source gta --gta-root DIR`` with ``dataset.json`` + the image folder). Every
tool call of every dialog becomes one instance: history = the calls before it (with their
versions resolved for the same user), target = that call with the version the policy resolves
for the dialog's synthesized profile. Splits are by dialog, so no test history leaks a train call.

Profiles come from a seeded, configurable distribution (account weights, credit/age ranges,
a share drawn right at rule boundaries). After sampling, a coverage pass re-draws the profiles
of a few train dialogs, by rejection inside the missing rule branch, until every branch of every
rule has a train target — the paper leaves the profile distribution unspecified, and a rule no
training example exercises could not be internalized.

Outputs (one atomic directory): train.jsonl (answer-only), cot.jsonl (the same records with a
template reverse-CoT), test.jsonl, override.jsonl (test dialogs relabelled under a revision with
permuted versions, saved in override_policies/), images/shard-*.zip, manifest.json.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.io import (atomic_dir, atomic_write_json, atomic_write_text, dump_yaml, input_error, load_yaml,
                         parse_json, read_json)

OVERRIDE_REF = "override_policies/GTAPolicy.yaml"


@dataclass
class GenerateGtaConfig:
    """``params.yaml: generate_gta`` — the GTAPolicy dataset."""

    source: str = "sample"
    """``sample`` (bundled real-image sample, no download) or ``gta`` (GTA benchmark copy at ``gta_root``)."""
    gta_root: str = ""
    """Directory with the GTA ``dataset.json`` and its image folder (``--gta-root`` overrides)."""
    train_dialogs: int = 110
    """Sample source: dialogs in the train split (each gives 1-2 instances; paper: 451 train instances)."""
    test_dialogs: int = 30
    """Sample source: dialogs in the test split (paper: 106 test instances)."""
    test_fraction: float = 0.2
    """GTA source: share of dialogs in the test split (the paper's 106/557 is about 0.19 of the calls)."""
    account_weights: dict = field(default_factory=lambda: {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0})
    """Relative frequency of each account type in synthesized profiles."""
    credits_range: list = field(default_factory=lambda: [0, 1000])
    """Uniform range of credits (inclusive integers)."""
    age_range: list = field(default_factory=lambda: [12, 80])
    """Uniform range of ages (inclusive integers)."""
    boundary_fraction: float = 0.3
    """Share of numeric profile values drawn at a rule boundary (b-1, b or b+1), where policies are easiest to get wrong."""
    cover_every_rule: bool = True
    """Re-draw profiles of some train dialogs until every rule branch has a train target."""
    override_tools: list = field(default_factory=lambda: ["OCR", "ImageDescription"])
    """Tools whose versions the override revision permutes (the paper permutes the OCR versions)."""
    image_max_side: int = 512
    """Sample photos are downscaled to this longest side (boxes are rescaled with them)."""
    instruction: str = ("You are a helpful assistant that solves the user's query by calling tools. Given the user "
                        "profile, the images, the query and the tool calls made so far with their outputs, output the "
                        "next tool call as one JSON object {\"name\": ..., \"arguments\": {...}}.")
    """The general instruction shown with every instance (policy-free)."""


# ---------------------------------------------------------------------- profiles


class ProfileSampler:
    def __init__(self, pol, cfg: GenerateGtaConfig, rng: random.Random):
        self.pol, self.cfg, self.rng = pol, cfg, rng
        self.cuts = {f: sorted({x for lfs in pol.leaves.values() for lf in lfs for g, c in lf.conds if g == f
                                for x in _bounds(c)}) for f in ("credits", "age")}
        w = cfg.account_weights
        bad = sorted(set(w) - set(pol.fields["account_type"].values))
        if bad or not w or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise input_error("params.yaml", "generate_gta.account_weights",
                              "non-negative weights over " + ", ".join(pol.fields["account_type"].values), w)

    def _num(self, f: str, lo: int, hi: int) -> int:
        if self.cuts[f] and self.rng.random() < self.cfg.boundary_fraction:
            v = int(round(self.rng.choice(self.cuts[f]))) + self.rng.choice((-1, 0, 1))
            return min(max(v, lo), hi)
        return self.rng.randint(lo, hi)

    def sample(self) -> dict:
        accts = sorted(self.cfg.account_weights)
        return {"account_type": self.rng.choices(accts, [self.cfg.account_weights[a] for a in accts])[0],
                "credits": self._num("credits", *self.cfg.credits_range), "age": self._num("age", *self.cfg.age_range)}

    def sample_in(self, leaf, tries: int = 20000) -> dict | None:
        """A profile whose profile fields satisfy ``leaf`` (rejection sampling)."""
        from pipeline.policy.gta import _cond_holds

        prof_conds = [(f, c) for f, c in leaf.conds if self.pol.fields[f].source == "profile"]
        for _ in range(tries):
            p = self.sample()
            if all(_cond_holds(c, p[f]) for f, c in prof_conds):
                return p
        return None


def _bounds(c) -> list:
    c = getattr(c, "cond", c)
    return list(c.values()) if isinstance(c, dict) else []


# ---------------------------------------------------------------------- records


def _instance_ok(leaf, instance: dict, pol) -> bool:
    from pipeline.policy.gta import _cond_holds

    return all(_cond_holds(c, instance.get(f, pol.fields[f].default)) for f, c in leaf.conds
               if pol.fields[f].source == "instance")


def make_cot(pol, profile: dict, step: dict, res, history: list[dict]) -> str:
    prof = ", ".join(f"{pol.fields[k].label} {v}" if k in pol.fields else f"{k} {v}" for k, v in profile.items())
    parts = [f"The user profile is: {prof}."]
    if history:
        parts.append("So far: " + "; ".join(f"{h['name']} returned \"{_short(h['output'])}\"" for h in history) + ".")
    else:
        parts.append("No tool has been called yet.")
    if step.get("why"):
        parts.append(step["why"])
    if res.rule:
        parts.append(f"Rule {res.rule} covers {step['tool']} when {pol.describe(res.leaf.conds)}, which holds here, "
                     f"so the version is {res.name}.")
    else:
        parts.append(f"{step['tool']} has a single version.")
    parts.append(f"I call {res.name}.")
    return " ".join(parts)


def _short(s: str, n: int = 80) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def dialog_records(pol, dialog: dict, profile: dict, split: str, refs: list[str], cfg, source: str) -> list:
    from pipeline.data.records import Record

    out, history = [], []
    for k, step in enumerate(dialog["steps"]):
        res = pol.match(profile, step["tool"], step["instance"])
        answer = json.dumps({"name": res.name, "arguments": step["arguments"]}, ensure_ascii=False)
        out.append(Record(
            id=f"gta/{split}/{dialog['id']}/{k}", task="gta", split=split, query=dialog["query"], answer=answer,
            images=list(refs), policy=pol.name, policy_version=pol.version,
            cot=make_cot(pol, profile, step, res, history),
            context={"instruction": cfg.instruction, "profile": dict(profile), "history": [dict(h) for h in history],
                     "image_names": [im["name"] for im in dialog["images"]]},
            meta={"tool": step["tool"], "rule": res.rule, "branch": res.branch, "dialog_id": dialog["id"], "step": k,
                  "instance": dict(step["instance"]), "source": source, "template": dialog.get("template", "")}))
        history.append({"name": res.name, "arguments": step["arguments"], "output": step["output"]})
    return out


def leaf_counts(pol, dialogs: list[dict], profiles: list[dict]) -> Counter:
    c = Counter()
    for d, p in zip(dialogs, profiles):
        for s in d["steps"]:
            r = pol.match(p, s["tool"], s["instance"])
            if r.leaf is not None:
                c[r.leaf.key] += 1
    return c


def cover_rules(pol, dialogs: list[dict], profiles: list[dict], sampler: ProfileSampler) -> list[str]:
    """Re-draw profiles of train dialogs so every rule branch has a target; returns branches still missing."""
    missing = []
    for tool, leaves in pol.leaves.items():
        for leaf in leaves:
            counts = leaf_counts(pol, dialogs, profiles)
            if counts[leaf.key]:
                continue
            done = False
            cands = [i for i, d in enumerate(dialogs)
                     if any(s["tool"] == tool and _instance_ok(leaf, s["instance"], pol) for s in d["steps"])]
            sampler.rng.shuffle(cands)
            for i in cands:  # only take a dialog whose current branches all have another example
                mine = Counter(pol.match(profiles[i], s["tool"], s["instance"]).leaf.key for s in dialogs[i]["steps"]
                               if pol.leaves[s["tool"]])
                if any(counts[k] <= n for k, n in mine.items()):
                    continue
                p = sampler.sample_in(leaf)
                if p is not None:
                    profiles[i] = p
                    done = True
                    break
            if not done:
                missing.append(leaf.key)
    return missing


# ---------------------------------------------------------------------- GTA importer


def _safe_path(root: Path, rel, where: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise input_error(root / "dataset.json", where, "a relative path inside the GTA root", rel)
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise input_error(root / "dataset.json", where, "a path that stays inside the GTA root", rel)
    if not p.is_file():
        raise input_error(root / "dataset.json", where, "an existing file", rel)
    return p


def _content(c) -> str:
    if isinstance(c, dict) and "content" in c:
        c = c["content"]
    return c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)


def load_gta(root: str | Path, pol) -> list[dict]:
    """GTA ``dataset.json`` -> dialogs (images opened lazily by path; every path checked to stay in root)."""
    root = Path(root)
    src = root / "dataset.json"
    data = read_json(src, finite=True)
    if not isinstance(data, dict) or not data:
        raise input_error(src, None, "a mapping of sample id -> {tools, files, dialogs, gt_answer}", type(data).__name__)
    redirects = pol.redirects()
    out = []
    for did, item in data.items():
        w = str(did)
        if not isinstance(item, dict) or not isinstance(item.get("dialogs"), list):
            raise input_error(src, f"{w}.dialogs", "a list of turns")
        images = []
        for j, f in enumerate(item.get("files") or []):
            if not isinstance(f, dict):
                raise input_error(src, f"{w}.files[{j}]", "a mapping {type, path}", f)
            if f.get("type", "image") != "image":
                continue
            images.append({"name": f.get("path"), "key": f"file:{f.get('path')}",
                           "path": _safe_path(root, f.get("path"), f"{w}.files[{j}].path")})
        turns, query, steps = item["dialogs"], None, []
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise input_error(src, f"{w}.dialogs[{j}]", "a mapping with a role", t)
            if t.get("role") == "user" and query is None:
                query = _content(t.get("content", ""))
            if t.get("role") == "assistant" and t.get("tool_calls"):
                for m, call in enumerate(t["tool_calls"]):
                    cw = f"{w}.dialogs[{j}].tool_calls[{m}].function"
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise input_error(src, cw, "{name, arguments}", call)
                    args = fn.get("arguments", {})
                    if isinstance(args, str):
                        args = parse_json(args, src, f"{cw}.arguments", finite=True, expected="a JSON object")
                    if not isinstance(args, dict):
                        raise input_error(src, f"{cw}.arguments", "a JSON object", args)
                    name, inst = fn["name"], {}
                    if name in redirects:
                        name, inst = redirects[name]
                    elif name not in pol.tools:
                        name = pol.base_tool(name) or name
                    if name not in pol.tools:
                        raise input_error(src, f"{cw}.name", "a tool of " + pol.name, fn["name"])
                    nxt = turns[j + 1] if j + 1 < len(turns) and isinstance(turns[j + 1], dict) else {}
                    output = _content(nxt.get("content", "")) if nxt.get("role") == "tool" else ""
                    why = t.get("thought") or f"The next step toward the answer is a call to {name}."
                    steps.append({"tool": name, "arguments": args, "output": output, "instance": dict(inst),
                                  "why": _content(why)})
        if query is None:
            raise input_error(src, f"{w}.dialogs", "a user turn with the query")
        if steps:
            out.append({"id": f"gta-{w}", "query": query, "images": images, "steps": steps})
    return out


# ---------------------------------------------------------------------- the stage


def check_config(cfg: GenerateGtaConfig, where: str = "params.yaml") -> None:
    for name in ("credits_range", "age_range"):
        v = getattr(cfg, name)
        if (len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in v) or v[0] > v[1]):
            raise input_error(where, f"generate_gta.{name}", "[low, high] integers with low <= high", v)
    for name in ("train_dialogs", "test_dialogs", "image_max_side"):
        if getattr(cfg, name) < (1 if name != "test_dialogs" else 0):
            raise input_error(where, f"generate_gta.{name}", "a positive integer", getattr(cfg, name))
    if not 0 <= cfg.test_fraction < 1 or not 0 <= cfg.boundary_fraction <= 1:
        raise input_error(where, "generate_gta.test_fraction/boundary_fraction", "fractions in [0, 1)",
                          [cfg.test_fraction, cfg.boundary_fraction])


def build(pol, cfg: GenerateGtaConfig, out: str | Path, seed: int, gta_root: str = "") -> dict:
    from tqdm import tqdm

    from pipeline.data.records import ImageStore, write_records
    from pipeline.policy.gta import GTAPolicy, permute_versions

    check_config(cfg)
    rng = random.Random(f"gta-{seed}")
    sampler = ProfileSampler(pol, cfg, rng)
    if cfg.source == "sample":
        from pipeline.data.gta_sample import SampleDialogs

        gen = SampleDialogs(rng, cfg.image_max_side)
        train = [gen.next(f"s{i:04d}") for i in range(cfg.train_dialogs)]
        test = [gen.next(f"t{i:04d}") for i in range(cfg.test_dialogs)]
    elif cfg.source == "gta":
        root = gta_root or cfg.gta_root
        if not root:
            raise input_error("params.yaml", "generate_gta.gta_root", "the GTA dataset directory (or --gta-root)")
        dialogs = load_gta(root, pol)
        rng.shuffle(dialogs)
        n_test = round(len(dialogs) * cfg.test_fraction) if len(dialogs) > 1 else 0
        test, train = dialogs[:n_test], dialogs[n_test:]
    else:
        raise input_error("params.yaml", "generate_gta.source", "sample or gta", cfg.source)

    train_p = [sampler.sample() for _ in train]
    test_p = [sampler.sample() for _ in test]
    missing = cover_rules(pol, train, train_p, sampler) if cfg.cover_every_rule else []

    raw = load_yaml(pol.path) if pol.path else pol.spec
    over_spec = permute_versions(raw, cfg.override_tools, seed)
    over = GTAPolicy.from_spec(over_spec, OVERRIDE_REF)

    with atomic_dir(out) as tmp:
        store, refs_by_key = ImageStore(tmp), {}

        def refs(d):
            for im in d["images"]:
                if im["key"] not in refs_by_key:
                    n = len(refs_by_key)
                    if "path" in im:
                        data = im["path"].read_bytes()
                        _check_image(data, im["path"])
                        refs_by_key[im["key"]] = store.add_bytes(data, f"{n:06d}{im['path'].suffix.lower()}")
                    else:
                        ext = ".jpg" if im["name"].endswith(".jpg") else ".png"
                        refs_by_key[im["key"]] = store.add(im["image"], f"{n:06d}{ext}")
            return [refs_by_key[im["key"]] for im in d["images"]]

        splits = {"train": [], "test": [], "override": []}
        for d, p in tqdm(list(zip(train, train_p)), desc="gta train", leave=False):
            splits["train"] += dialog_records(pol, d, p, "train", refs(d), cfg, cfg.source)
        for d, p in tqdm(list(zip(test, test_p)), desc="gta test", leave=False):
            r = refs(d)
            orig = dialog_records(pol, d, p, "test", r, cfg, cfg.source)
            splits["test"] += orig
            for o, t in zip(dialog_records(over, d, p, "override", r, cfg, cfg.source), orig):
                o.meta.update(override_policy=OVERRIDE_REF, original_answer=t.answer, changed=o.answer != t.answer)
                splits["override"].append(o)
        store.close()
        cot = list(splits["train"])
        write_records(tmp / "cot.jsonl", cot)
        for r in splits["train"]:
            r.cot = ""
        for name in ("train", "test", "override"):
            write_records(tmp / f"{name}.jsonl", splits[name])
        (tmp / "override_policies").mkdir()
        atomic_write_text(tmp / OVERRIDE_REF, dump_yaml(over_spec))
        manifest = {
            "task": "gta", "source": cfg.source, "seed": seed, "policy": pol.name, "policy_version": pol.version,
            "override_policy_version": over.version, "override_tools": cfg.override_tools,
            "sizes": {"train": len(splits["train"]), "cot": len(cot), "test": len(splits["test"]),
                      "override": len(splits["override"]), "dialogs_train": len(train), "dialogs_test": len(test),
                      "images": len(refs_by_key)},
            "override_changed": sum(r.meta["changed"] for r in splits["override"]),
            "tools": dict(Counter(json.loads(r.answer)["name"] for r in splits["train"] + splits["test"])),
            "rule_coverage": {"train": dict(sorted(Counter(_key(r) for r in splits["train"] if r.meta["rule"]).items())),
                              "test": dict(sorted(Counter(_key(r) for r in splits["test"] if r.meta["rule"]).items()))},
            "uncovered_rules": missing, "params": asdict(cfg),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def _key(r) -> str:
    return r.meta["rule"] + (f"/{r.meta['branch']}" if r.meta.get("branch") else "")


def _check_image(data: bytes, path: Path) -> None:
    import io

    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad input
        raise input_error(path, None, "a decodable image", f"{type(e).__name__}: {e}") from None


def configure_generate(parser) -> None:
    parser.add_argument("--policies", default="policies/gta", help="GTA policy directory or file (default: policies/gta)")
    parser.add_argument("--out", default="data/gta", help="dataset directory to write (default: data/gta)")
    parser.add_argument("--source", choices=("sample", "gta"), help="override generate_gta.source")
    parser.add_argument("--gta-root", default="", help="GTA benchmark directory (dataset.json + images) for --source gta")


def run_generate(args) -> int:
    from pipeline.config import load_base, load_section
    from pipeline.policy.gta import load_gta_policy

    cfg = load_section(GenerateGtaConfig, "generate_gta", args.params, args.overrides)
    if args.source:
        cfg.source = args.source
    if args.gta_root and not args.source:
        cfg.source = "gta"
    base = load_base(args.params)
    pol = load_gta_policy(args.policies)
    m = build(pol, cfg, args.out, base.seed, args.gta_root)
    s = m["sizes"]
    print(f"gta: {s['train']} train / {s['test']} test / {s['override']} override records "
          f"({s['dialogs_train']}+{s['dialogs_test']} dialogs, {s['images']} images) -> {args.out}")
    if m["uncovered_rules"]:
        print("warning: no train target for rule branches " + ", ".join(m["uncovered_rules"]))
    return 0
