"""``trimpi policy diff``: what changed between two policy revisions, and how much data it moves.

A reviewer of a policy edit needs two answers a text diff of the YAML does not give:

* **what the edit means** — per policy, which conditions / rules changed, and which response
  cases (ClevrPolicy ``Case k``; GTAPolicy: the callable tool versions) were added, removed or
  are now reached under different circumstances;
* **how much of the data it moves** — on a dataset directory (``data/clevr``, ``data/gta``),
  every record's label is re-derived with *both* revisions, exactly as the generator derives
  it (ClevrPolicy: ``evaluate`` on the record's scene graph ``meta.scene``; GTAPolicy:
  ``resolve`` on ``context.profile`` + ``meta.tool`` + ``meta.instance``), and the flips are
  counted per split and per case (which cases gain or lose examples).

Decisions: policies are matched by ``name`` (a renamed policy is one removal plus one
addition). Case identity is its label: a ``Case 2`` whose path changed is reported as "now
reached when ..." rather than guessed to be some other case. Only ``train`` and ``test`` are
counted (``cot`` is a subset of ``train``; ``override`` follows a different tree on purpose).
Records a revision cannot label (no scene graph; a profile field the new rules need) are
counted as ``unlabelled``, never silently dropped. Nothing here imports torch or Prefect.
"""
from __future__ import annotations

import os
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io import InputError, input_error

SPLITS = ("train", "test")


@dataclass
class PolicyChange:
    """How one policy (matched by name) differs between the old and the new revision."""

    name: str
    kind: str
    status: str
    """``added`` | ``removed`` | ``changed`` | ``unchanged``."""
    old_version: str | None
    new_version: str | None
    changes: list[str] = field(default_factory=list)
    """One human-readable line per changed condition / rule / case / tool."""
    old: Any = field(default=None, repr=False)
    new: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "status", "old_version", "new_version", "changes")}


@dataclass
class LabelImpact:
    """Label flips of one policy on one dataset directory, per split."""

    dataset: str
    policy: str
    records: dict[str, int] = field(default_factory=dict)
    """Records of this policy per split."""
    flipped: dict[str, int] = field(default_factory=dict)
    """Records whose label differs between the revisions, per split."""
    unlabelled: dict[str, int] = field(default_factory=dict)
    """Records one revision could not label (no scene graph, missing profile field), per split."""
    gained: dict[str, Counter] = field(default_factory=dict)
    """split -> case -> flipped records that now get this case."""
    lost: dict[str, Counter] = field(default_factory=dict)
    """split -> case -> flipped records that had this case."""
    examples: list[str] = field(default_factory=list)
    """A few flipped record ids with their old and new label."""

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "policy": self.policy, "records": self.records, "flipped": self.flipped,
                "unlabelled": self.unlabelled, "gained": {s: dict(c) for s, c in self.gained.items()},
                "lost": {s: dict(c) for s, c in self.lost.items()}, "examples": self.examples}


# ----------------------------------------------------------------------------- loading both sides


def load_side(path: str | os.PathLike) -> dict[str, Any]:
    """A policy file, or every policy under a directory, by name."""
    from pipeline.policy import load_policies, load_policy

    p = Path(path)
    if p.is_dir():
        return load_policies(p)
    if p.is_file():
        pol = load_policy(p)
        return {pol.name: pol}
    raise input_error(p, None, "a policy YAML file or a directory of them")


def load_at_rev(rev: str, root: str | os.PathLike = "policies") -> dict[str, Any]:
    """Every policy under ``root`` as committed at git revision ``rev``, by name."""
    import yaml

    from pipeline.policy import policy_from_spec

    root = Path(root).resolve()

    def git(*args: str, cwd: Path) -> str:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise input_error("--rev", None, "git on PATH to read a revision", rev) from None
        if r.returncode != 0:
            raise input_error("--rev", None, f"a git revision of the checkout holding {root}",
                              f"{rev} ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'git failed'})")
        return r.stdout

    cwd = root if root.is_dir() else root.parent
    top = Path(git("rev-parse", "--show-toplevel", cwd=cwd).strip())
    rel = os.path.relpath(root, top)
    out: dict[str, Any] = {}
    for f in sorted(git("ls-tree", "-r", "--name-only", rev, "--", rel, cwd=top).splitlines()):
        if not f.endswith(".yaml"):
            continue
        where = f"{rev}:{f}"
        try:
            spec = yaml.safe_load(git("show", f"{rev}:{f}", cwd=top))
        except yaml.YAMLError as e:
            raise input_error(where, None, "valid YAML", str(e).splitlines()[0]) from None
        pol = policy_from_spec(spec, where)
        if pol.name in out:
            raise input_error(where, "name", "a name unique across the policies", pol.name)
        out[pol.name] = pol
    return out


# ----------------------------------------------------------------------------- structure


def diff_policies(old: dict[str, Any], new: dict[str, Any]) -> list[PolicyChange]:
    """One :class:`PolicyChange` per policy name on either side, sorted by name."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        kind = (b or a).kind
        if a is None:
            out.append(PolicyChange(name, kind, "added", None, b.version, _summary(b), None, b))
        elif b is None:
            out.append(PolicyChange(name, kind, "removed", a.version, None, [], a, None))
        elif a.version == b.version:
            out.append(PolicyChange(name, kind, "unchanged", a.version, b.version, [], a, b))
        elif a.kind != b.kind:
            out.append(PolicyChange(name, kind, "changed", a.version, b.version,
                                    [f"kind {a.kind} -> {b.kind}"], a, b))
        else:
            lines = _clevr_changes(a, b) if kind == "clevr" else _gta_changes(a, b)
            out.append(PolicyChange(name, kind, "changed", a.version, b.version,
                                    lines or ["normalized spec differs (no condition, case or rule changed)"], a, b))
    return out


def _summary(pol) -> list[str]:
    if pol.kind == "clevr":
        return [f"new decision tree: depth {pol.depth}, {len(pol.nodes)} conditions, {len(pol.leaves)} cases"]
    return [f"new tool policy: {len(pol.tools)} tools, {len(pol.rules)} rules, {len(pol.tips)} tips"]


def _node_text(pol, cid: str) -> str:
    from pipeline.scenes import describe

    n = pol.nodes[cid]
    return (f"is there {describe(pol.question(cid))}? yes -> {_ref(pol, n.if_true)}, "
            f"no -> {_ref(pol, n.if_false)}")


def _ref(pol, ref: str) -> str:
    return f"condition {ref}" if ref in pol.nodes else ref


def case_text(pol, case: str) -> str:
    """When a ClevrPolicy case is the response: its positive description and the excluded ones."""
    from pipeline.scenes import describe

    pos, negs = pol.context[case]
    parts = ([f"there is {describe(pos)}"] if pos else []) + [f"no {describe(n, False)}" for n in negs]
    return ", ".join(parts) or "any scene"


def _clevr_changes(a, b) -> list[str]:
    lines = []
    if a.depth != b.depth:
        lines.append(f"depth {a.depth} -> {b.depth}")
    for cid in sorted(set(a.nodes) | set(b.nodes), key=_id_key):
        if cid not in b.nodes:
            lines.append(f"condition {cid} removed (was: {_node_text(a, cid)})")
        elif cid not in a.nodes:
            lines.append(f"condition {cid} added: {_node_text(b, cid)}")
        elif _node_text(a, cid) != _node_text(b, cid):
            na, nb = a.nodes[cid], b.nodes[cid]
            own = (f"{na.attribute}={na.value} -> {nb.attribute}={nb.value}; "
                   if (na.attribute, na.value) != (nb.attribute, nb.value) else "")
            lines.append(f"condition {cid}: {own}now {_node_text(b, cid)} (was: {_node_text(a, cid)})")
    for case in sorted(set(a.leaves) | set(b.leaves), key=_case_key):
        if case not in b.context:
            lines.append(f"{case} removed (was when {case_text(a, case)})")
        elif case not in a.context:
            lines.append(f"{case} added: when {case_text(b, case)}")
        elif case_text(a, case) != case_text(b, case):
            lines.append(f"{case}: now when {case_text(b, case)} (was when {case_text(a, case)})")
    return lines


def _gta_changes(a, b) -> list[str]:
    lines = []
    if a.preamble != b.preamble:
        lines.append("preamble changed")
    fa, fb = a.spec.get("fields", {}), b.spec.get("fields", {})
    for f in sorted(set(fa) | set(fb)):
        if fa.get(f) != fb.get(f):
            lines.append(f"field {f} " + ("added" if f not in fa else "removed" if f not in fb else
                                         f"changed: {fa[f]} -> {fb[f]}"))
    for t in sorted(set(a.tools) | set(b.tools)):
        ta, tb = a.tools.get(t), b.tools.get(t)
        if ta is None or tb is None:
            lines.append(f"tool {t} " + ("added" if ta is None else "removed"))
            continue
        if ta.versions != tb.versions:
            lines.append(f"tool {t}: versions {ta.names[0]}..{ta.names[-1]} -> {tb.names[0]}..{tb.names[-1]}")
        if ta.description != tb.description:
            lines.append(f"tool {t}: description changed")
        if ta.arguments != tb.arguments:
            lines.append(f"tool {t}: arguments changed")
    ra, rb = {r["id"]: r for r in a.rules}, {r["id"]: r for r in b.rules}
    for rid in sorted(set(ra) | set(rb), key=lambda r: (len(r), r)):
        if rid not in rb:
            lines.append(f"rule {rid} removed (was: {a.rule_text(ra[rid]).removeprefix(f'{rid}: ')})")
        elif rid not in ra:
            lines.append(f"rule {rid} added: {b.rule_text(rb[rid]).removeprefix(f'{rid}: ')}")
        elif a.rule_text(ra[rid]) != b.rule_text(rb[rid]):
            now, was = (p.rule_text(r[rid]).removeprefix(f"{rid}: ") for p, r in ((b, rb), (a, ra)))
            lines.append(f"rule {rid}: now {now} (was: {was})")
    for t in a.tips:
        if t not in b.tips:
            lines.append(f"tip removed: {t}")
    for t in b.tips:
        if t not in a.tips:
            lines.append(f"tip added: {t}")
    return lines


def _id_key(cid: str) -> tuple[int, ...]:
    return tuple(int(p) for p in cid.split("."))


def _case_key(case: str):
    tail = case.split()[-1]
    return (0, int(tail)) if tail.isdigit() else (1, case)


# ----------------------------------------------------------------------------- labels on a dataset


def label_of(pol, record) -> str | None:
    """The label ``pol`` gives this record, derived as the generator does; None when it cannot."""
    if pol is None:
        return None
    try:
        if pol.kind == "clevr":
            scene = (record.meta or {}).get("scene")
            return pol.evaluate(scene)[0] if isinstance(scene, dict) and "objects" in scene else None
        tool = (record.meta or {}).get("tool")
        if tool not in pol.tools:
            return None
        return pol.resolve((record.context or {}).get("profile") or {}, tool, (record.meta or {}).get("instance"))
    except (InputError, KeyError, TypeError):
        return None


def label_impact(changes: list[PolicyChange], data_dirs: list[str | os.PathLike],
                 n_examples: int = 5) -> list[LabelImpact]:
    """Re-derive the labels of every changed policy's records under both revisions; count flips."""
    from pipeline.data.records import read_records

    changed = {c.name: c for c in changes if c.status != "unchanged"}
    out: list[LabelImpact] = []
    for d in data_dirs:
        d = Path(d)
        if not d.is_dir():
            raise input_error(d, None, "a dataset directory with train.jsonl / test.jsonl")
        by_policy: dict[str, LabelImpact] = {}
        for split in SPLITS:
            f = d / f"{split}.jsonl"
            if not f.exists():
                continue
            for r in read_records(f):
                c = changed.get(r.policy)
                if c is None:
                    continue
                imp = by_policy.setdefault(r.policy, LabelImpact(str(d), r.policy))
                imp.records[split] = imp.records.get(split, 0) + 1
                old, new = label_of(c.old, r), label_of(c.new, r)
                if (c.old is not None and old is None) or (c.new is not None and new is None):
                    imp.unlabelled[split] = imp.unlabelled.get(split, 0) + 1
                    continue
                if old != new:
                    imp.flipped[split] = imp.flipped.get(split, 0) + 1
                    if new is not None:
                        imp.gained.setdefault(split, Counter())[new] += 1
                    if old is not None:
                        imp.lost.setdefault(split, Counter())[old] += 1
                    if len(imp.examples) < n_examples:
                        imp.examples.append(f"{r.id}: {old or '(no policy)'} -> {new or '(no policy)'}")
        out += [by_policy[n] for n in sorted(by_policy)]
    return out


# ----------------------------------------------------------------------------- rendering


def _pct(k: int, n: int) -> str:
    return f"{k} of {n} ({100.0 * k / n:.1f} %)" if n else "0 of 0"


def _case_moves(imp: LabelImpact) -> list[tuple[str, dict[str, int]]]:
    """(case, {"train+": g, "train-": l, ...}) for every case that gained or lost examples."""
    cases: set[str] = set()
    for s in SPLITS:
        cases |= set(imp.gained.get(s, {})) | set(imp.lost.get(s, {}))
    rows = []
    for case in sorted(cases, key=_case_key):
        rows.append((case, {f"{s}{sign}": (imp.gained if sign == "+" else imp.lost).get(s, Counter())[case]
                            for s in SPLITS for sign in "+-"}))
    return rows


def render_text(changes: list[PolicyChange], impacts: list[LabelImpact] | None = None,
                old_label: str = "old", new_label: str = "new") -> str:
    lines = [f"policies: {old_label} -> {new_label}"]
    for c in changes:
        ver = {"added": f"new {c.new_version}", "removed": f"was {c.old_version}",
               "unchanged": c.new_version}.get(c.status, f"{c.old_version} -> {c.new_version}")
        lines.append(f"{c.name} ({c.kind}): {c.status} ({ver})")
        lines += [f"  {x}" for x in c.changes]
    if impacts is not None:
        lines.append("")
        if not impacts:
            lines.append("labels: no record of a changed policy in the given data")
        for imp in impacts:
            split_txt = "; ".join(f"{s}: {_pct(imp.flipped.get(s, 0), imp.records[s])} flip"
                                  for s in SPLITS if s in imp.records)
            un = sum(imp.unlabelled.values())
            lines.append(f"labels of {imp.policy} on {imp.dataset}: {split_txt}"
                         + (f" ({un} records could not be labelled)" if un else ""))
            for case, m in _case_moves(imp):
                lines.append("  " + case + ": " + ", ".join(
                    f"{s} {m[s + '+'] - m[s + '-']:+d} (+{m[s + '+']}/-{m[s + '-']})" for s in SPLITS
                    if s in imp.records))
            lines += [f"  e.g. {e}" for e in imp.examples[:3]]
    return "\n".join(lines) + "\n"


def render_markdown(changes: list[PolicyChange], impacts: list[LabelImpact] | None = None,
                    old_label: str = "old", new_label: str = "new", heading: str = "##") -> str:
    """The diff as a markdown section (the flow puts it into its summary artifact)."""
    md = [f"{heading} Policy changes ({old_label} -> {new_label})", "",
          "| policy | kind | status | version |", "|---|---|---|---|"]
    for c in changes:
        ver = {"added": f"`{c.new_version}` (new)", "removed": f"`{c.old_version}` (removed)",
               "unchanged": f"`{c.new_version}`"}.get(c.status, f"`{c.old_version}` -> `{c.new_version}`")
        md.append(f"| {c.name} | {c.kind} | {c.status} | {ver} |")
    md.append("")
    for c in changes:
        if c.changes:
            md += [f"**{c.name}**", ""] + [f"* {_md(x)}" for x in c.changes] + [""]
    if impacts is not None:
        md += [f"{heading}# Labels moved (re-derived from each record with both revisions)", ""]
        if not impacts:
            md += ["No record of a changed policy in the data that was checked.", ""]
        else:
            md += ["| policy | data | split | records | labels flipped | unlabelled |", "|---|---|---|---|---|---|"]
            for imp in impacts:
                for s in SPLITS:
                    if s in imp.records:
                        md.append(f"| {imp.policy} | `{imp.dataset}` | {s} | {imp.records[s]} | "
                                  f"{_pct(imp.flipped.get(s, 0), imp.records[s])} | {imp.unlabelled.get(s, 0)} |")
            md.append("")
            md += ["| policy | case | " + " | ".join(f"{s} gained | {s} lost" for s in SPLITS) + " |",
                   "|---|---|" + "---|---|" * len(SPLITS)]
            for imp in impacts:
                for case, m in _case_moves(imp):
                    md.append(f"| {imp.policy} | {case} | "
                              + " | ".join(f"{m[s + '+']} | {m[s + '-']}" for s in SPLITS) + " |")
            md.append("")
    return "\n".join(md) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


# ----------------------------------------------------------------------------- CLI


def configure_diff(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="OLD NEW",
                        help="two policy files or directories (without --rev)")
    parser.add_argument("--rev", default=None,
                        help="compare the policies committed at this git revision with the working tree")
    parser.add_argument("--policies", default="policies", help="policies root for --rev (default: policies)")
    parser.add_argument("--data", action="append", default=[], metavar="DIR",
                        help="dataset dir (e.g. data/clevr): count label flips and which cases gain/lose examples "
                             "(repeatable)")
    parser.add_argument("--json", action="store_true", help="print the diff as JSON")


def run_diff(args) -> int:
    import json

    if args.rev:
        if args.paths:
            raise input_error("trimpi policy diff", "OLD NEW", "no paths with --rev (it compares --policies at "
                              "REV with the working tree)", args.paths)
        old, new = load_at_rev(args.rev, args.policies), load_side(args.policies)
        labels = (f"{args.policies} at {args.rev}", f"{args.policies} (working tree)")
    else:
        if len(args.paths) != 2:
            raise input_error("trimpi policy diff", "OLD NEW", "two policy files or directories, or --rev REV",
                              args.paths)
        old, new = load_side(args.paths[0]), load_side(args.paths[1])
        labels = tuple(args.paths)
    changes = diff_policies(old, new)
    impacts = label_impact(changes, args.data) if args.data else None
    if args.json:
        print(json.dumps({"old": labels[0], "new": labels[1], "policies": [c.to_dict() for c in changes],
                          "labels": [i.to_dict() for i in impacts] if impacts is not None else None}, indent=2))
    else:
        print(render_text(changes, impacts, *labels), end="")
    return 0
