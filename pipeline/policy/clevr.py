"""ClevrPolicy: decision-tree policies over CLEVR scenes (spec, sampler, evaluator, renderer).

A spec is YAML::

    kind: clevr
    name: L2-Surinu
    depth: 2                      # decision nodes on the longest root-to-leaf path
    tree:                         # the first entry is the root
      - {id: "1",   attribute: color, value: cyan, if_true: "2.1",  if_false: "2.2"}
      - {id: "2.1", attribute: shape, value: cube, if_true: Case 2, if_false: Case 0}
      - {id: "2.2", attribute: size,  value: small, if_true: Case 3, if_false: Case 1}

Condition semantics (the paper leaves them open; these are exact and used everywhere):

* Conditions are **existence checks over a cumulative object description**. The *context*
  of a node is the conjunction of the conditions of its ancestors whose TRUE edge the path
  took. A node with condition ``attr=value`` asks "is there at least one object that
  satisfies the context AND attr=value?" — e.g. under "cyan" (true) a "cube" node asks
  "is there a cyan cube?". Its FALSE edge keeps the context and adds a negative fact
  ("there is no cyan cube").
* A node may not test an attribute type already fixed by its context (the paper's
  true-edge rule, generalized from the parent to all true-edge ancestors): "cyan" then
  "red" on the true path is a contradiction, "cyan" then "cyan" a tautology.
* Every branch must be possible: a condition is admissible only if some scene reaches
  each of its two children given all the facts above it. This is decided exactly by brute
  force over the 96 attribute combinations (the positive facts form a chain, so one
  witness object satisfying context+condition and no negative fact proves the true
  branch; one satisfying the context, not the condition and no negative fact proves the
  false branch). Hence every leaf is reachable, and the sampler makes a node a leaf early
  when no condition is admissible: after four true edges every attribute type is used, and
  a "no" on a binary attribute (size, material) under a context fixes it for the objects
  of that context just like a "yes" on the other value. Every tree we sampled has 4, 8, 16,
  28 and 40 leaves at depths 2-6 (the paper reports 4, 16 and 55 at depths 2, 4, 6 without
  saying why 55; our depth-6 trees are smaller than theirs).

Condition ids are ``1`` for the root and ``<level>.<k>`` below it (level 2 = the root's
children, ``k`` counts that level's conditions left to right, true child first), as in
the paper's "Condition 3.2". Ids do not spell the path, so following the policy needs the
"go to" statements. Case numbers are a random permutation (they carry no path either).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.scenes import ATTR_NOUN, ATTRIBUTES, all_combos, describe
from pipeline.scenes import holds as _holds  # a local `holds` (a condition's truth) is common below
from pipeline.io import input_error, stable_hash
from pipeline.policy import RenderedPolicy

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CASE_RE = re.compile(r"^Case [0-9]+$")
SPEC_KEYS = {"kind", "name", "depth", "tree"}
NODE_KEYS = {"id", "attribute", "value", "if_true", "if_false"}
COMBOS = all_combos()

Conj = tuple[tuple[str, str], ...]  # a conjunction of attr=value facts, attr-sorted

# The deepest admissible tree. On one root-to-leaf path every condition must leave both answers
# possible: a "no" rules out one value of its attribute, and once one value is left a condition
# on that attribute can no longer go both ways ("yes" fixes the attribute instead). So a path
# asks about an attribute with n values at most n - 1 times; the sampler reaches this bound.
MAX_DEPTH = sum(len(v) - 1 for v in ATTRIBUTES.values())
DEPTH_WHY = (f"at most {MAX_DEPTH}: every condition must leave both answers possible, so one path can ask about "
             "an attribute with n values at most n-1 times ("
             + ", ".join(f"{ATTR_NOUN[a]} {len(v)}" for a, v in ATTRIBUTES.items()) + " values)")


@dataclass(frozen=True)
class Condition:
    """One decision node. Children are condition ids or case labels (``"Case 3"``)."""

    id: str
    attribute: str
    value: str
    if_true: str
    if_false: str


def _with(conj: Conj, attr: str, value: str) -> Conj:
    return tuple(sorted(conj + ((attr, value),)))


def _possible(pos: Conj, negs: list[Conj], not_also: Conj | None = None) -> dict | None:
    """A witness object satisfying ``pos``, no negative fact, and (if given) not ``not_also``."""
    for o in COMBOS:
        if _holds(o, pos) and not any(_holds(o, n) for n in negs) and not (not_also and _holds(o, not_also)):
            return o
    return None


class ClevrPolicy:
    """A validated decision tree. Build with :meth:`from_spec` or :func:`sample_policy`."""

    kind = "clevr"

    def __init__(self, name: str, depth: int, nodes: list[Condition], path: str | os.PathLike | None = None):
        self.name = name
        self.depth = depth
        self.path = Path(path) if path else None
        self.nodes = {n.id: n for n in nodes}
        self.root = nodes[0].id
        # context (positive conjunction) and negative facts at every node and leaf
        self.context: dict[str, tuple[Conj, list[Conj]]] = {}
        self._walk(self.root, (), [])
        self.version = stable_hash(self.to_spec())

    def _walk(self, ref: str, pos: Conj, negs: list[Conj]) -> None:
        self.context[ref] = (pos, negs)
        if ref in self.nodes:
            n = self.nodes[ref]
            cond = _with(pos, n.attribute, n.value)
            self._walk(n.if_true, cond, negs)
            self._walk(n.if_false, pos, negs + [cond])

    # -------------------------------------------------------------------- spec I/O

    @classmethod
    def from_spec(cls, spec: Any, path: str | os.PathLike | None = None) -> "ClevrPolicy":
        """Validate a parsed YAML spec; every error names the file and the node."""
        where = path or "<spec>"
        if not isinstance(spec, dict):
            raise input_error(where, None, "a mapping with kind, name, depth, tree", type(spec).__name__)
        unknown = sorted(set(spec) - SPEC_KEYS)
        if unknown:
            raise input_error(where, unknown[0], "only the keys " + ", ".join(sorted(SPEC_KEYS)), unknown[0])
        if spec.get("kind") != "clevr":
            raise input_error(where, "kind", "'clevr'", spec.get("kind"))
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise input_error(where, "name", "a policy name of letters, digits, '-', '_' or '.' (e.g. L2-Surinu)", name)
        depth = spec.get("depth")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise input_error(where, "depth", "a positive integer", depth)
        tree = spec.get("tree")
        if not isinstance(tree, list) or not tree:
            raise input_error(where, "tree", "a non-empty list of conditions (the first is the root)", tree)
        nodes: list[Condition] = []
        index: dict[str, int] = {}
        for i, raw in enumerate(tree):
            f = f"tree[{i}]"
            if not isinstance(raw, dict):
                raise input_error(where, f, "a condition mapping with " + ", ".join(sorted(NODE_KEYS)), raw)
            nid = _ref(raw.get("id"), where, f"{f}.id")
            f = f"tree[{i}] (condition {nid})"
            if not ID_RE.match(nid):
                raise input_error(where, f"{f}.id", "a condition id such as 1 or 2.1", nid)
            if nid in index:
                raise input_error(where, f"{f}.id", f"a unique condition id (tree[{index[nid]}] already uses it)", nid)
            index[nid] = i
            extra = sorted(set(raw) - NODE_KEYS)
            if extra:
                raise input_error(where, f"{f}.{extra[0]}", "only the keys " + ", ".join(sorted(NODE_KEYS)), extra[0])
            attr = raw.get("attribute")
            if attr not in ATTRIBUTES:
                raise input_error(where, f"{f}.attribute", "one of " + ", ".join(ATTRIBUTES), attr)
            val = raw.get("value")
            if val not in ATTRIBUTES[attr]:
                raise input_error(where, f"{f}.value", f"a {attr}: one of " + ", ".join(ATTRIBUTES[attr]), val)
            kids = []
            for edge in ("if_true", "if_false"):
                if edge not in raw or raw[edge] is None:
                    raise input_error(where, f"{f}.{edge}", "a child: a condition id or a case label like 'Case 3'")
                kids.append(_ref(raw[edge], where, f"{f}.{edge}"))
            nodes.append(Condition(nid, attr, val, kids[0], kids[1]))
        _check_structure(nodes, index, depth, where)
        return cls(name, depth, nodes, path)

    @property
    def spec(self) -> dict:
        """The normalized spec (as ``GTAPolicy.spec``): what the version hashes and a registry card keeps."""
        return self.to_spec()

    def to_spec(self) -> dict:
        """The normalized spec: conditions in depth-first order from the root (what the version hashes)."""
        out = []

        def visit(ref: str) -> None:
            if ref in self.nodes:
                n = self.nodes[ref]
                out.append({"id": n.id, "attribute": n.attribute, "value": n.value,
                            "if_true": n.if_true, "if_false": n.if_false})
                visit(n.if_true)
                visit(n.if_false)

        visit(self.root)
        return {"kind": "clevr", "name": self.name, "depth": self.depth, "tree": out}

    # -------------------------------------------------------------------- semantics

    @property
    def leaves(self) -> list[str]:
        """Case labels in depth-first order (true branch first)."""
        return [ref for ref in self.context if ref not in self.nodes]

    def question(self, node_id: str) -> Conj:
        """The full conjunction a node asks about (its context plus its own condition)."""
        n = self.nodes[node_id]
        return _with(self.context[node_id][0], n.attribute, n.value)

    def evaluate(self, scene: dict) -> tuple[str, list[tuple[str, bool]]]:
        """Walk the tree on a scene graph: ``(case, [(condition id, holds), ...])``."""
        objs = scene["objects"]
        ref, path = self.root, []
        while ref in self.nodes:
            q = self.question(ref)
            holds = any(_holds(o, q) for o in objs)
            path.append((ref, holds))
            ref = self.nodes[ref].if_true if holds else self.nodes[ref].if_false
        return ref, path

    def witness_objects(self, case: str, n: int, rng: random.Random) -> list[dict[str, str]]:
        """``n`` random objects (attribute dicts) whose scene evaluates to ``case``.

        One object satisfies the leaf's context, every object avoids all its negative facts;
        this samples uniformly among such objects, so labels can be balanced without
        rejection sampling (rare leaves cost nothing extra).
        """
        pos, negs = self.context[case]
        allowed = [o for o in COMBOS if not any(_holds(o, c) for c in negs)]
        first = [o for o in allowed if _holds(o, pos)]
        objs = [dict(rng.choice(first))] + [dict(rng.choice(allowed)) for _ in range(n - 1)]
        rng.shuffle(objs)
        return objs

    # -------------------------------------------------------------------- text

    def reasoning(self, scene: dict) -> str:
        """Gold chain of thought: walks the tree citing condition ids; the last sentence states the case.

        The object named for a condition that holds is the one that also satisfies the most later
        holding conditions of the path (the first in scene order among equals), so one object carries
        the chain where it can: "is there a cube? Yes, a small brown rubber cube ..." then "is there a
        rubber cube? Yes, a small brown rubber cube ...". Naming the first cube instead (a metal one)
        taught the model chains that contradict themselves at the next step.
        """
        case, path = self.evaluate(scene)
        parts = [f"I follow Policy: {self.name} from Condition {self.root}."]
        for i, (cid, holds) in enumerate(path):
            q = self.question(cid)
            n = self.nodes[cid]
            nxt = n.if_true if holds else n.if_false
            go = f"the response is {nxt}" if nxt not in self.nodes else f"I go to Condition {nxt}"
            if holds:
                later = [self.question(c) for c, h in path[i + 1:] if h]
                obj = max((o for o in scene["objects"] if _holds(o, q)),
                          key=lambda o: sum(_holds(o, q2) for q2 in later))  # max keeps the first of equals
                full = tuple(sorted((a, obj[a]) for a in ATTRIBUTES))
                parts.append(f"Condition {cid} asks: is there {describe(q)}? Yes, {describe(full)} is in the image, so {go}.")
            else:
                parts.append(f"Condition {cid} asks: is there {describe(q)}? No, there is no {describe(q, False)}, so {go}.")
        parts.append(f"The answer is {case}.")
        return " ".join(parts)

    def render(self, multimodal: bool = False, image_size: int = 128, object_scale: float = 0.14) -> RenderedPolicy:
        """The exact in-context policy: general instruction, name, one section per condition.

        Multimodal (-M): every other condition (in depth-first order, starting with the root)
        shows its own attribute value as an icon (:func:`pipeline.scenes.attribute_icon`)
        instead of a word; values inherited from the context stay words.
        """
        from pipeline.scenes import attribute_icon

        parts: list[Any] = []

        def text(s: str) -> None:
            if parts and isinstance(parts[-1], str):
                parts[-1] += s
            else:
                parts.append(s)

        text(f"Policy: {self.name}\n\n"
             "This policy decides the response to an image of a scene of simple 3D objects. Every object "
             "has a shape (cube, sphere or cylinder), a colour (gray, red, blue, green, brown, purple, cyan "
             "or yellow), a size (small or large) and a material (rubber, which looks matte, or metal, which "
             "is shiny). Start at Condition 1. Each condition asks whether the image contains at least one "
             "object with all the properties it lists; depending on the answer, go to the condition it names "
             "or give the response it names. The response is exactly a case label such as \"Case 0\".\n")
        order = [c["id"] for c in self.to_spec()["tree"]]
        for k, cid in enumerate(sorted(order, key=_id_key)):
            n = self.nodes[cid]
            pos = self.context[cid][0]
            text(f"\n# Condition {cid}\n")
            if multimodal and order.index(cid) % 2 == 0:
                text(f"Is there {describe(pos)} with the {ATTR_NOUN[n.attribute]} shown in ")
                parts.append(attribute_icon(n.attribute, n.value, image_size, object_scale))
                text("?\n")
            else:
                text(f"Is there {describe(self.question(cid))}?\n")
            for label, child in (("Yes", n.if_true), ("No", n.if_false)):
                text(f"- {label}: " + (f"go to Condition {child}.\n" if child in self.nodes
                                       else f"the response is {child}.\n"))
        return RenderedPolicy(self.name, self.version, parts)


def _id_key(cid: str) -> tuple[int, ...]:
    return tuple(int(p) for p in cid.split("."))


def _ref(v: Any, where, field: str) -> str:
    """Condition ids / case labels are strings; YAML integers are accepted, floats are ambiguous."""
    if isinstance(v, bool) or v is None:
        raise input_error(where, field, "a condition id or case label string", v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        raise input_error(where, field, "a quoted condition id (YAML reads 2.10 as the number 2.1)", v)
    if not isinstance(v, str):
        raise input_error(where, field, "a condition id or case label string", v)
    return v.strip()


def _check_structure(nodes: list[Condition], index: dict[str, int], depth: int, where) -> None:
    """Tree shape, references, case labels, the true-edge rule, reachability and depth."""
    byid = {n.id: n for n in nodes}
    parent: dict[str, str] = {}
    cases: dict[str, str] = {}
    max_depth = 0

    def f(nid: str) -> str:
        return f"tree[{index[nid]}] (condition {nid})"

    # iterative DFS carrying (ref, ancestors, context, negatives)
    stack = [(nodes[0].id, (), (), [])]
    while stack:
        ref, anc, pos, negs = stack.pop()
        if ref not in byid:
            max_depth = max(max_depth, len(anc))
            continue
        n = byid[ref]
        used = {a for a, _ in pos}
        if n.attribute in used:
            raise input_error(where, f"{f(ref)}.attribute", "an attribute type not already fixed on the true path "
                              f"above it (context: {describe(pos)})", n.attribute)
        cond = _with(pos, n.attribute, n.value)
        if _possible(cond, negs) is None or _possible(pos, negs, not_also=cond) is None:
            branch = "yes" if _possible(cond, negs) is None else "no"
            raise input_error(where, f(ref), f"a condition whose yes and no branches are both possible given the "
                              f"conditions above it (the '{branch}' branch can never be taken)", f"{n.attribute}={n.value}")
        for edge, child in (("if_true", n.if_true), ("if_false", n.if_false)):
            if CASE_RE.match(child):
                if child in cases:
                    raise input_error(where, f"{f(ref)}.{edge}", f"a case label used by one leaf only "
                                      f"(condition {cases[child]} also leads to it)", child)
                cases[child] = ref
                continue
            if child not in byid:
                raise input_error(where, f"{f(ref)}.{edge}", "an existing condition id or a case label like 'Case 3'",
                                  child)
            if child == ref or child in anc:
                raise input_error(where, f"{f(ref)}.{edge}", "a tree: this edge leads back to an ancestor (cycle)", child)
            if child in parent or child == nodes[0].id:
                raise input_error(where, f"{f(ref)}.{edge}", f"a tree: condition {child} is already the child of "
                                  f"condition {parent.get(child, '(root)')}", child)
            parent[child] = ref
        stack.append((n.if_false, anc + (ref,), pos, negs + [cond]))
        stack.append((n.if_true, anc + (ref,), cond, negs))
    orphans = [n.id for n in nodes[1:] if n.id not in parent]
    if orphans:
        raise input_error(where, f(orphans[0]), "a condition reachable from the root tree[0]", orphans[0])
    if max_depth != depth:
        if depth > MAX_DEPTH:
            raise input_error(where, "depth", DEPTH_WHY, depth)
        raise input_error(where, "depth", f"the actual depth of the tree ({max_depth} conditions on the longest path)",
                          depth)


# ------------------------------------------------------------------------ sampling

_CONS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def sample_name(depth: int, rng: random.Random, taken: set[str] | frozenset = frozenset()) -> str:
    """A pronounceable unique name like ``L2-Surinu``."""
    for _ in range(1000):
        word = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(3)).capitalize()
        name = f"L{depth}-{word}"
        if name not in taken:
            return name
    raise RuntimeError("could not find an unused policy name")  # 14^3*5^3 names: unreachable in practice


def sample_policy(depth: int, rng: random.Random, name: str | None = None,
                  taken: set[str] | frozenset = frozenset()) -> ClevrPolicy:
    """A random tree of ``depth`` whose every condition is admissible (see the module docstring).

    Each node picks an attribute type uniformly among the types with an admissible value,
    then a value uniformly. If no condition is admissible the node becomes a leaf early.
    """
    if depth < 1:
        raise input_error(None, "depth", "a positive integer", depth)
    if depth > MAX_DEPTH:
        raise input_error(None, "depth", DEPTH_WHY, depth)

    def build(level: int, pos: Conj, negs: list[Conj]):
        if level > depth:
            return None
        used = {a for a, _ in pos}
        options: dict[str, list[str]] = {}
        for attr, values in ATTRIBUTES.items():
            if attr in used:
                continue
            ok = [v for v in values if _possible(_with(pos, attr, v), negs) is not None
                  and _possible(pos, negs, not_also=_with(pos, attr, v)) is not None]
            if ok:
                options[attr] = ok
        if not options:
            return None
        attr = rng.choice(sorted(options))
        val = rng.choice(options[attr])
        cond = _with(pos, attr, val)
        return [attr, val, build(level + 1, cond, negs), build(level + 1, pos, negs + [cond])]

    tree = build(1, (), [])
    # ids by level (true child first), cases as a random permutation
    level, ids, nodes_bfs = [tree], {}, []
    depth_i = 1
    while level:
        nxt = []
        for k, t in enumerate(level, 1):
            ids[id(t)] = "1" if depth_i == 1 else f"{depth_i}.{k}"
            nodes_bfs.append(t)
            nxt += [c for c in t[2:] if c is not None]
        level, depth_i = nxt, depth_i + 1
    n_leaves = sum(1 for t in nodes_bfs for c in t[2:] if c is None)
    labels = [f"Case {i}" for i in rng.sample(range(n_leaves), n_leaves)]
    conds, li = [], iter(labels)
    for t in nodes_bfs:
        kids = [ids[id(c)] if c is not None else None for c in t[2:]]
        kids = [k if k is not None else next(li) for k in kids]
        conds.append(Condition(ids[id(t)], t[0], t[1], kids[0], kids[1]))
    name = name or sample_name(depth, rng, taken)
    pol = ClevrPolicy(name, depth, conds)
    # re-validate through the public path: the sampler must only produce specs from_spec accepts
    return ClevrPolicy.from_spec(pol.to_spec())
