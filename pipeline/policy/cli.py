"""``trimpi policy new|render|list|resolve``: create, show and list policy specs.

``new`` only samples ClevrPolicy trees (GTAPolicy is written by hand). Names are unique
across the whole ``policies/`` tree, so a new policy never shadows an existing one.
``resolve`` belongs to GTAPolicy and is delegated to :mod:`pipeline.policy.gta`.
"""
from __future__ import annotations

import random
from pathlib import Path

from pipeline.io import InputError, atomic_write_text, dump_yaml, input_error, load_yaml
from pipeline.policy import load_policy, policy_files


def _names_under(root: Path) -> set[str]:
    """Names already used by any policy file under ``root`` (read without validating)."""
    names = set()
    for p in policy_files(root):
        try:
            spec = load_yaml(p)
        except InputError:
            continue
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            names.add(spec["name"])
    return names


# ----------------------------------------------------------------------------- new


def configure_new(parser) -> None:
    parser.add_argument("kind", choices=["clevr"], help="policy kind to sample (only clevr trees are sampled)")
    parser.add_argument("--depth", type=int, required=True, help="decision nodes on the longest path (paper: 2, 4, 6)")
    parser.add_argument("--count", type=int, default=1, help="how many policies to sample")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: base.seed)")
    parser.add_argument("--out", default=None, help="output directory (default: policies/<kind>)")


def run_new(args) -> int:
    from pipeline.config import load_base
    from pipeline.policy.clevr import ClevrPolicy, sample_name, sample_policy

    from pipeline.policy.clevr import DEPTH_WHY, MAX_DEPTH

    if args.depth < 1 or args.count < 1:
        raise input_error("--depth/--count", None, "positive integers", (args.depth, args.count))
    if args.depth > MAX_DEPTH:
        raise input_error("--depth", None, DEPTH_WHY, args.depth)
    seed = load_base(args.params).seed if args.seed is None else args.seed
    out = Path(args.out or f"policies/{args.kind}")
    taken = _names_under(out.parent) | _names_under(out)
    # one stream per (seed, depth); a name that is already taken is replaced from a second
    # stream, so the trees never depend on which names exist already
    rng = random.Random(f"clevr-policy/{seed}/{args.depth}")
    name_rng = random.Random(f"clevr-policy-name/{seed}/{args.depth}")
    for i in range(args.count):
        pol = sample_policy(args.depth, rng)
        if pol.name in taken:
            pol = ClevrPolicy.from_spec({**pol.to_spec(), "name": sample_name(args.depth, name_rng, taken)})
        taken.add(pol.name)
        path = out / f"{pol.name}.yaml"
        header = (f"# ClevrPolicy sampled by `trimpi policy new clevr --depth {args.depth} --seed {seed}` (#{i}).\n"
                  "# Semantics: pipeline/policy/clevr.py. Edit freely; `trimpi policy list` re-validates.\n")
        atomic_write_text(path, header + dump_yaml(pol.to_spec()))
        print(f"{pol.name}\t{len(pol.leaves)} cases\tversion {pol.version}\t{path}")
    return 0


# ----------------------------------------------------------------------------- render


def find_policy(name_or_path: str, root: str = "policies"):
    """A policy by file path, or by name under ``root``."""
    p = Path(name_or_path)
    if p.is_file():
        return load_policy(p)
    for f in policy_files(root):
        try:
            spec = load_yaml(f)
        except InputError:
            continue
        if isinstance(spec, dict) and spec.get("name") == name_or_path:
            return load_policy(f)
    raise input_error(root, None, f"a policy file or a policy named {name_or_path!r} under {root}/")


def configure_render(parser) -> None:
    parser.add_argument("policy", metavar="NAME_OR_PATH", help="policy name (searched under --policies) or YAML path")
    parser.add_argument("--policies", default="policies", help="policies root (default: policies)")
    parser.add_argument("--multimodal", action="store_true", help="the -M rendering: some values shown as images")
    parser.add_argument("--save-images", metavar="DIR", default=None,
                        help="write the policy images as DIR/<name>-<k>.png (multimodal)")


def run_render(args) -> int:
    pol = find_policy(args.policy, args.policies)
    r = pol.render(multimodal=args.multimodal)
    print(r.text)
    if args.save_images and r.images:
        d = Path(args.save_images)
        d.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(r.images):
            img.save(d / f"{pol.name}-{k}.png")
        print(f"\n[{len(r.images)} policy images written to {d}/]")
    elif r.images:
        print(f"\n[{len(r.images)} policy images shown as <image>; --save-images DIR writes them]")
    return 0


# ----------------------------------------------------------------------------- list


def configure_list(parser) -> None:
    parser.add_argument("--policies", default="policies", help="policies root (default: policies)")


def run_list(args) -> int:
    rows, bad = [], 0
    seen: dict[str, Path] = {}
    for f in policy_files(args.policies):
        try:
            pol = load_policy(f)
            if pol.name in seen:  # the same refusal as load_policies (generate, train), so list agrees
                raise input_error(f, "name", f"a name unique across policies/ (also used by {seen[pol.name]})",
                                  pol.name)
            seen[pol.name] = f
            rows.append((pol.name, pol.kind, pol.version, str(f)))
        except InputError as e:
            bad += 1
            rows.append(("INVALID", "-", "-", str(e)))
    if not rows:
        print(f"no policies under {args.policies}/")
    w = max([len(r[0]) for r in rows] + [4])
    print(f"{'name':<{w}}  {'kind':<5}  {'version':<12}  path")
    for name, kind, version, path in rows:
        print(f"{name:<{w}}  {kind:<5}  {version:<12}  {path}")
    return 2 if bad else 0


# ----------------------------------------------------------------------------- resolve (GTAPolicy)


def configure_resolve(parser) -> None:
    from pipeline.policy import gta

    gta.configure_resolve(parser)


def run_resolve(args) -> int:
    from pipeline.policy import gta

    return gta.run_resolve(args)
