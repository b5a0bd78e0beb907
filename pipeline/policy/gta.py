"""GTAPolicy: a tool catalogue with versions, and rules that pick a version from the user profile.

The spec (``policies/gta/*.yaml``, ``kind: gta``) is pure data:

* ``fields`` — what a rule may condition on: profile fields (``account_type``, ``credits``,
  ``age``) and instance fields (``image_has_math``: the paper's "if the image contains math,
  call MathOCR instead of OCR_*" is a rule over an attribute of the input, not code);
* ``tools`` — name, number of versions (none = unversioned), description, argument schema;
* ``rules`` — ``{id, tool, when: {field: condition}, use: NAME | {when, then, else}}``;
* ``tips`` — free-text additional tips.

Where it departs from the obvious: a rule set is checked *exactly* when loaded. Each numeric
axis is cut at every boundary any rule of the tool mentions, giving finitely many cells
(boundary points and the open intervals between them); every cell of every tool must be matched
by exactly one rule leaf, so an overlap or a gap is reported with the rule ids and a witness
profile instead of surfacing as a silently wrong label later. The version is the content hash
of the normalized spec; :meth:`GTAPolicy.render` is the one in-context text.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io import input_error, parse_json, stable_hash

OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
FIELD_TYPES = ("category", "integer", "number", "boolean")
_VERSIONED = re.compile(r"^(?P<base>.+)_v(?P<n>\d+)$")


@dataclass(frozen=True)
class Field:
    name: str
    source: str  # "profile" | "instance"
    type: str
    values: tuple = ()
    min: float | None = None
    max: float | None = None
    default: Any = None
    label: str = ""
    label_false: str = ""


@dataclass(frozen=True)
class Not:
    """The negated condition of an ``else`` branch."""

    cond: Any


@dataclass(frozen=True)
class Leaf:
    """One outcome of one rule: ``rule`` id, ``branch`` ("" | "then" | "else"), conditions, target."""

    rule: str
    branch: str
    tool: str
    conds: tuple  # ((field, cond), ...) with cond: tuple of values | dict of ops | bool | Not
    target: str

    @property
    def key(self) -> str:
        return self.rule + (f"/{self.branch}" if self.branch else "")


@dataclass(frozen=True)
class Resolution:
    name: str
    rule: str = ""
    branch: str = ""
    leaf: Leaf | None = None


@dataclass
class Tool:
    name: str
    versions: int
    description: str
    arguments: list[dict] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f"{self.name}_v{i}" for i in range(1, self.versions + 1)] if self.versions else [self.name]


class GTAPolicy:
    kind = "gta"

    def __init__(self, name, preamble, fields, tools, rules, tips, spec, path):
        self.name, self.preamble, self.fields, self.tools = name, preamble, fields, tools
        self.rules, self.tips, self.spec, self.path = rules, tips, spec, Path(path) if path else None
        self.version = stable_hash(spec)
        self.leaves: dict[str, list[Leaf]] = {t: [] for t in tools}
        for r in rules:
            for lf in r["leaves"]:
                self.leaves[r["tool"]].append(lf)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_spec(cls, spec: dict, path: str | os.PathLike | None = None) -> "GTAPolicy":
        P = path or "<spec>"
        if spec.get("kind") != "gta":
            raise input_error(P, "kind", "'gta'", spec.get("kind"))
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise input_error(P, "name", "a non-empty policy name", name)
        unknown = sorted(set(spec) - {"kind", "name", "preamble", "fields", "tools", "rules", "tips"})
        if unknown:
            raise input_error(P, unknown[0], "only kind, name, preamble, fields, tools, rules, tips", unknown[0])
        fields = _parse_fields(spec.get("fields"), P)
        tools = _parse_tools(spec.get("tools"), P)
        callable_names = {n for t in tools.values() for n in t.names}
        rules = [_parse_rule(r, i, fields, tools, callable_names, P) for i, r in enumerate(spec.get("rules") or [])]
        ids = [r["id"] for r in rules]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise input_error(P, "rules", "unique rule ids", dup[0])
        tips = spec.get("tips") or []
        if not isinstance(tips, list) or not all(isinstance(t, str) for t in tips):
            raise input_error(P, "tips", "a list of strings", tips)
        preamble = spec.get("preamble", "")
        if not isinstance(preamble, str):
            raise input_error(P, "preamble", "a string", preamble)
        normalized = {
            "kind": "gta", "name": name, "preamble": preamble.strip(),
            "fields": {f.name: {k: v for k, v in vars(f).items() if k != "name" and v not in (None, "", ())}
                       for f in fields.values()},
            "tools": [vars(t) for t in tools.values()],
            "rules": [{k: r[k] for k in ("id", "tool", "when", "use")} for r in rules],
            "tips": tips,
        }
        normalized = json.loads(json.dumps(normalized))  # tuples -> lists: one canonical form
        pol = cls(name, preamble.strip(), fields, tools, rules, tips, normalized, path)
        pol._check_partition(P)
        return pol

    def _check_partition(self, P) -> None:
        for tname, tool in self.tools.items():
            leaves = self.leaves[tname]
            if not leaves:
                if tool.versions:
                    raise input_error(P, f"rules (tool {tname})", f"rules choosing among {', '.join(tool.names)}",
                                      "no rule for this versioned tool")
                continue
            used = sorted({f for lf in leaves for f, _ in lf.conds})
            axes = [_cells(self.fields[f], [c for lf in leaves for g, c in lf.conds if g == f]) for f in used]
            for combo in itertools.product(*axes):
                point = {f: rep for f, (rep, _) in zip(used, combo)}
                hits = [lf for lf in leaves if _leaf_matches(lf, point)]
                where = "{" + ", ".join(f"{f} {desc}" for f, (_, desc) in zip(used, combo)) + "}"
                if len(hits) > 1:
                    names = " and ".join(sorted({h.key for h in hits}))
                    raise input_error(P, f"rules (tool {tname})", "rules that do not overlap",
                                      f"{names} both match {where}")
                if not hits:
                    names = ", ".join(r["id"] for r in self.rules if r["tool"] == tname)
                    raise input_error(P, f"rules (tool {tname})", "rules covering every profile",
                                      f"none of {names} matches {where}")

    # ------------------------------------------------------------------ queries
    def base_tool(self, name: str) -> str | None:
        """``OCR_v3`` -> ``OCR``; ``MathOCR`` -> ``MathOCR``; unknown -> None."""
        if name in self.tools and not self.tools[name].versions:
            return name
        m = _VERSIONED.match(name or "")
        if m and m["base"] in self.tools and name in self.tools[m["base"]].names:
            return m["base"]
        return None

    def tool_schema(self, name: str) -> list[dict]:
        """The argument schema of a callable name (versioned or not); [] for an unknown name."""
        base = self.base_tool(name)
        return list(self.tools[base].arguments) if base else []

    def redirects(self) -> dict[str, tuple[str, dict]]:
        """Callable names reached only through another tool's rule, with the instance attributes
        that rule needs: ``{"MathOCR": ("OCR", {"image_has_math": True})}`` (used by importers)."""
        out = {}
        for tname, leaves in self.leaves.items():
            for lf in leaves:
                if self.base_tool(lf.target) != tname:
                    inst = {f: c for f, c in lf.conds if self.fields[f].source == "instance" and isinstance(c, bool)}
                    out[lf.target] = (tname, inst)
        return out

    def match(self, profile: dict, tool: str, instance: dict | None = None) -> Resolution:
        if tool not in self.tools:
            raise input_error(self.path, "tool", "one of the base tools " + ", ".join(self.tools), tool)
        leaves = self.leaves[tool]
        if not leaves:
            return Resolution(tool)
        if not isinstance(profile, dict):
            raise input_error(self.path, "profile", "a mapping of profile fields", profile)
        point = {}
        for f in sorted({f for lf in leaves for f, _ in lf.conds}):
            fd = self.fields[f]
            src = profile if fd.source == "profile" else (instance or {})
            val = src.get(f, fd.default)
            if val is None:
                raise input_error(self.path, f"{fd.source}.{f}", f"a value ({tool} rules depend on it)")
            point[f] = _check_value(fd, val, f"{fd.source}.{f}", self.path)
        hits = [lf for lf in leaves if _leaf_matches(lf, point)]
        if len(hits) != 1:  # impossible for a loaded spec unless the value is outside the field domain
            raise input_error(self.path, tool, "exactly one matching rule", f"{len(hits)} for {point}")
        lf = hits[0]
        return Resolution(lf.target, lf.rule, lf.branch, lf)

    def resolve(self, profile: dict, tool: str, instance: dict | None = None) -> str:
        """The callable name the policy requires, e.g. ``resolve({"account_type": "B", ...}, "OCR") -> "OCR_v4"``."""
        return self.match(profile, tool, instance).name

    # ------------------------------------------------------------------ rendering
    def describe(self, conds) -> str:
        return " and ".join(_describe(self.fields[f], c) for f, c in conds)

    def rule_text(self, rule: dict) -> str:
        use = rule["use"]
        if isinstance(use, str):
            then = f"use {use}"
        else:
            then = (f"use {use['then']} if {self.describe(_items(use['when']))}, "
                    f"otherwise {use['else']}")
        return f"{rule['id']}: for {rule['tool']}, if {self.describe(_items(rule['when']))}, {then}."

    def render(self, multimodal: bool = False):
        """The exact in-context policy text (GTAPolicy has no policy images)."""
        from pipeline.policy import RenderedPolicy

        lines = [f"Policy: {self.name}", self.preamble, "", "# Tools",
                 'Call a tool with one JSON object: {"name": <tool name>, "arguments": {<argument>: <value>}}.']
        for t in self.tools.values():
            args = [{k: a[k] for k in ("name", "type", "description", "required", "default") if k in a}
                    for a in t.arguments]
            lines += ["", f"## {t.name}", "Names: " + ", ".join(t.names), "Description: " + t.description,
                      "Arguments: " + json.dumps(args, ensure_ascii=False)]
        lines += ["", "# Tool-calling rules",
                  "Choose the tool version from the user profile with exactly one rule below."]
        lines += [f"{i}. {self.rule_text(r)}" for i, r in enumerate(self.rules, 1)]
        lines += ["", "# Additional tips"] + [f"{i}. {t}" for i, t in enumerate(self.tips, 1)]
        return RenderedPolicy(self.name, self.version, ["\n".join(lines) + "\n"])


# ---------------------------------------------------------------------- parsing helpers


def _parse_fields(raw, P) -> dict[str, Field]:
    if not isinstance(raw, dict) or not raw:
        raise input_error(P, "fields", "a mapping of field name -> {source, type, ...}", raw)
    out = {}
    for name, d in raw.items():
        where = f"fields.{name}"
        if not isinstance(d, dict):
            raise input_error(P, where, "a mapping", d)
        if d.get("source") not in ("profile", "instance"):
            raise input_error(P, f"{where}.source", "'profile' or 'instance'", d.get("source"))
        if d.get("type") not in FIELD_TYPES:
            raise input_error(P, f"{where}.type", "one of " + ", ".join(FIELD_TYPES), d.get("type"))
        extra = sorted(set(d) - {"source", "type", "values", "min", "max", "default", "label", "label_false"})
        if extra:
            raise input_error(P, f"{where}.{extra[0]}", "only source, type, values, min, max, default, label, label_false")
        values = tuple(d.get("values") or ())
        if d["type"] == "category" and (not values or not all(isinstance(v, str) for v in values)):
            raise input_error(P, f"{where}.values", "a non-empty list of strings", d.get("values"))
        for k in ("min", "max"):
            if d.get(k) is not None and not _finite(d[k]):
                raise input_error(P, f"{where}.{k}", "a finite number", d[k])
        out[name] = Field(name, d["source"], d["type"], values, d.get("min"), d.get("max"), d.get("default"),
                          d.get("label", name), d.get("label_false", ""))
    return out


def _parse_tools(raw, P) -> dict[str, Tool]:
    if not isinstance(raw, list) or not raw:
        raise input_error(P, "tools", "a non-empty list of tools", raw)
    out = {}
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise input_error(P, f"{where}.name", "a tool name", t)
        if t["name"] in out:
            raise input_error(P, f"{where}.name", "a unique tool name", t["name"])
        if _VERSIONED.match(t["name"]):
            raise input_error(P, f"{where}.name", "a base name without a _vN suffix", t["name"])
        v = t.get("versions", 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v == 1:
            raise input_error(P, f"{where}.versions", "an integer >= 2 (or absent for an unversioned tool)", v)
        args = t.get("arguments") or []
        if not isinstance(args, list):
            raise input_error(P, f"{where}.arguments", "a list of {name, type, description, required}", args)
        seen = set()
        for j, a in enumerate(args):
            aw = f"{where}.arguments[{j}]"
            if not isinstance(a, dict) or not isinstance(a.get("name"), str):
                raise input_error(P, f"{aw}.name", "an argument name", a)
            if a["name"] in seen:
                raise input_error(P, f"{aw}.name", "a unique argument name", a["name"])
            seen.add(a["name"])
            if a.get("type") not in ("string", "integer", "number", "boolean"):
                raise input_error(P, f"{aw}.type", "string, integer, number or boolean", a.get("type"))
            if not isinstance(a.get("required", False), bool):
                raise input_error(P, f"{aw}.required", "true or false", a.get("required"))
        out[t["name"]] = Tool(t["name"], v, str(t.get("description", "")).strip(),
                              [{"required": False, **a} for a in args])
    return out


def _parse_cond(field: Field, c, P, where):
    if field.type == "category":
        vals = [c] if isinstance(c, str) else c
        if not isinstance(vals, list) or not vals or any(v not in field.values for v in vals):
            raise input_error(P, where, "a list of values from " + ", ".join(field.values), c)
        return tuple(v for v in field.values if v in vals)
    if field.type == "boolean":
        if not isinstance(c, bool):
            raise input_error(P, where, "true or false", c)
        return c
    if not isinstance(c, dict) or not c or set(c) - set(OPS):
        raise input_error(P, where, "a range such as {gt: 250, le: 750}", c)
    for k, v in c.items():
        if not _finite(v):
            raise input_error(P, f"{where}.{k}", "a finite number", v)
    if ("gt" in c and "ge" in c) or ("lt" in c and "le" in c):
        raise input_error(P, where, "at most one lower and one upper bound", c)
    return dict(sorted(c.items()))


def _parse_when(raw, fields, P, where) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise input_error(P, where, "a mapping of field -> condition", raw)
    out = {}
    for f, c in raw.items():
        if f not in fields:
            raise input_error(P, f"{where}.{f}", "one of the declared fields " + ", ".join(fields), f)
        out[f] = _parse_cond(fields[f], c, P, f"{where}.{f}")
    return out


def _parse_rule(r, i, fields, tools, callable_names, P) -> dict:
    where = f"rules[{i}]"
    if not isinstance(r, dict):
        raise input_error(P, where, "a mapping {id, tool, when, use}", r)
    rid = r.get("id")
    if not isinstance(rid, str) or not rid:
        raise input_error(P, f"{where}.id", "a rule id", rid)
    where = f"rules[{i}] ({rid})"
    if r.get("tool") not in tools:
        raise input_error(P, f"{where}.tool", "one of the tools " + ", ".join(tools), r.get("tool"))
    extra = sorted(set(r) - {"id", "tool", "when", "use"})
    if extra:
        raise input_error(P, f"{where}.{extra[0]}", "only id, tool, when, use")
    when = _parse_when(r.get("when"), fields, P, f"{where}.when")
    use = r.get("use")

    def target(name, w):
        if name not in callable_names:
            raise input_error(P, w, "a callable tool name (e.g. OCR_v1, MathOCR)", name)
        return name

    if isinstance(use, str):
        use = target(use, f"{where}.use")
        leaves = [Leaf(rid, "", r["tool"], tuple(when.items()), use)]
    elif isinstance(use, dict) and set(use) == {"when", "then", "else"}:
        inner = _parse_when(use["when"], fields, P, f"{where}.use.when")
        if len(inner) != 1 or set(inner) & set(when):
            raise input_error(P, f"{where}.use.when", "one condition on a field the rule's own `when` does not use",
                              use["when"])
        (f, c), = inner.items()
        use = {"when": inner, "then": target(use["then"], f"{where}.use.then"),
               "else": target(use["else"], f"{where}.use.else")}
        leaves = [Leaf(rid, "then", r["tool"], tuple(when.items()) + ((f, c),), use["then"]),
                  Leaf(rid, "else", r["tool"], tuple(when.items()) + ((f, Not(c)),), use["else"])]
    else:
        raise input_error(P, f"{where}.use", "a tool name or {when, then, else}", use)
    return {"id": rid, "tool": r["tool"], "when": when, "use": use, "leaves": leaves}


# ---------------------------------------------------------------------- conditions


def _items(d: dict):
    return tuple(d.items())


def _cond_holds(c, v) -> bool:
    if isinstance(c, Not):
        return not _cond_holds(c.cond, v)
    if isinstance(c, bool):
        return v is c
    if isinstance(c, tuple):
        return v in c
    return all({"gt": v > x, "ge": v >= x, "lt": v < x, "le": v <= x}[op] for op, x in c.items())


def _finite(v) -> bool:
    """A real number (bools are not numbers here), and not NaN or +-infinity."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _leaf_matches(leaf: Leaf, point: dict) -> bool:
    return all(_cond_holds(c, point[f]) for f, c in leaf.conds)


def _check_value(fd: Field, v, where, P):
    if fd.type == "category":
        if v not in fd.values:
            raise input_error(P, where, "one of " + ", ".join(fd.values), v)
    elif fd.type == "boolean":
        if not isinstance(v, bool):
            raise input_error(P, where, "true or false", v)
    else:
        # NaN compares false with every bound and int(NaN) raises: refuse it here, named
        if not _finite(v) or (fd.type == "integer" and v != int(v)):
            raise input_error(P, where, "an integer" if fd.type == "integer" else "a finite number", v)
        if (fd.min is not None and v < fd.min) or (fd.max is not None and v > fd.max):
            raise input_error(P, where, f"a value in [{fd.min}, {fd.max}]", v)
    return v


def _cells(fd: Field, conds) -> list[tuple[Any, str]]:
    """Finite cells of one axis on which every condition is constant: (representative, description)."""
    if fd.type == "category":
        return [(v, f"= {v}") for v in fd.values]
    if fd.type == "boolean":
        return [(False, "= false"), (True, "= true")]
    cuts = set()
    for c in conds:
        c = c.cond if isinstance(c, Not) else c
        cuts.update(c.values())
    lo, hi = fd.min, fd.max
    pts = sorted(p for p in cuts | {x for x in (lo, hi) if x is not None}
                 if (lo is None or p >= lo) and (hi is None or p <= hi))
    integer = fd.type == "integer"
    out = [(p, f"= {p:g}") for p in pts if not integer or p == int(p)]
    edges = ([None] if lo is None else []) + pts + ([None] if hi is None else [])
    for a, b in zip(edges, edges[1:]):
        if a is None and b is None:
            rep = 0
        elif a is None:
            rep = math.ceil(b) - 1 if integer else b - 1
        elif b is None:
            rep = math.floor(a) + 1 if integer else a + 1
        else:
            rep = math.floor(a) + 1 if integer else (a + b) / 2
            if integer and rep >= b:
                continue  # no integer strictly between two adjacent cuts
        desc = f"in ({'-inf' if a is None else f'{a:g}'}, {'inf' if b is None else f'{b:g}'})"
        out.append((rep, desc))
    return sorted(out, key=lambda x: x[0])


def _describe(fd: Field, c) -> str:
    if isinstance(c, Not):
        return "not (" + _describe(fd, c.cond) + ")"
    if isinstance(c, bool):
        return fd.label if c else (fd.label_false or f"not {fd.label}")
    if isinstance(c, tuple):
        vals = list(c)
        return f"{fd.label} is " + (vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " or " + vals[-1])
    lower = [(op, x) for op, x in c.items() if op in ("gt", "ge")]
    upper = [(op, x) for op, x in c.items() if op in ("lt", "le")]
    if lower and upper:
        (lop, lx), (uop, ux) = lower[0], upper[0]
        return f"{lx:g} {'<' if lop == 'gt' else '<='} {fd.label} {OPS[uop]} {ux:g}"
    op, x = (lower or upper)[0]
    return f"{fd.label} {OPS[op]} {x:g}"


# ---------------------------------------------------------------------- revisions


def permute_versions(spec: dict, tools: list[str], seed: int) -> dict:
    """A rewritten spec where, for each tool in ``tools``, every rule target among that tool's
    versions is mapped through a seeded derangement (e.g. OCR_v1 -> OCR_v3): the paper's
    "override" revision. Targets outside the tool's versions (MathOCR) are kept."""
    import copy
    import random

    rng = random.Random(seed)
    out = copy.deepcopy(spec)
    names = {t["name"]: t.get("versions", 0) for t in out.get("tools", [])}
    for tool in tools:
        n = names.get(tool, 0)
        if n < 2:
            raise input_error("override", tool, "a versioned tool of the policy", tool)
        vs = [f"{tool}_v{i}" for i in range(1, n + 1)]
        perm = vs[:]
        while any(a == b for a, b in zip(vs, perm)):
            rng.shuffle(perm)
        mapping = dict(zip(vs, perm))
        for r in out.get("rules", []):
            if isinstance(r.get("use"), str):
                r["use"] = mapping.get(r["use"], r["use"])
            elif isinstance(r.get("use"), dict):
                for k in ("then", "else"):
                    r["use"][k] = mapping.get(r["use"][k], r["use"][k])
    return out


# ---------------------------------------------------------------------- CLI: trimpi policy resolve


def configure_resolve(parser) -> None:
    parser.add_argument("--policy", default="policies/gta",
                        help="a GTA policy file, or a directory holding one (default: policies/gta)")
    parser.add_argument("--profile", required=True, help='user profile JSON, e.g. \'{"account_type":"B","credits":600,"age":30}\'')
    parser.add_argument("--tool", required=True, help="base tool name, e.g. OCR")
    parser.add_argument("--instance", default="{}", help='instance attributes JSON, e.g. \'{"image_has_math": true}\'')
    parser.add_argument("--json", action="store_true", help="print {name, rule, branch} as JSON")


def load_gta_policy(path: str | os.PathLike) -> GTAPolicy:
    """One GTA policy from a file, or the only one in a directory."""
    from pipeline.policy import load_policies, load_policy

    p = Path(path)
    if p.is_dir():
        pols = [x for x in load_policies(p).values() if isinstance(x, GTAPolicy)]
        if len(pols) != 1:
            raise input_error(p, None, "exactly one policy of kind gta", f"{len(pols)} found")
        return pols[0]
    pol = load_policy(p)
    if not isinstance(pol, GTAPolicy):
        raise input_error(p, "kind", "gta", pol.kind if hasattr(pol, "kind") else type(pol).__name__)
    return pol


def run_resolve(args) -> int:
    pol = load_gta_policy(args.policy)
    parsed = {}
    for flag in ("profile", "instance"):
        parsed[flag] = parse_json(getattr(args, flag), f"--{flag}", finite=True, expected="a JSON object")
        if not isinstance(parsed[flag], dict):
            raise input_error(f"--{flag}", None, "a JSON object", parsed[flag])
    res = pol.match(parsed["profile"], args.tool, parsed["instance"])
    print(json.dumps({"name": res.name, "rule": res.rule, "branch": res.branch}) if args.json else res.name)
    return 0
