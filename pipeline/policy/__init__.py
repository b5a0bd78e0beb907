"""Policy specs: the source of truth for what the model must internalize.

A policy is a YAML file under ``policies/`` with a ``kind`` (``clevr`` decision tree or
``gta`` tool-use rules). Whatever its kind, a loaded policy offers the same surface:

* ``name`` — the unique name queries refer to (``"L2-Surinu"``, ``"GTAPolicy"``);
* ``version`` — the content hash of its normalized spec (a YAML re-format is not a new version);
* ``render(multimodal=False) -> RenderedPolicy`` — the exact text (and policy images) that
  goes in context. There is exactly one renderer per kind; training, evaluation and the
  efficiency suite all call it.

A record names the policy it was labelled under (``policy``, ``policy_version``);
:func:`resolve_policy` is the one lookup every reader of records uses (training, RL, the
evaluation suites, the validators), so stale data fails the same way everywhere, and
:class:`RenderCache` renders each policy once per run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io import InputError, input_error, load_yaml, stable_hash


@dataclass
class RenderedPolicy:
    """A policy as the model sees it: text interleaved with optional policy images."""

    name: str
    version: str
    parts: list[Any] = field(default_factory=list)
    """``str`` for text, ``PIL.Image.Image`` for an inline policy image (multimodal variant)."""

    @property
    def images(self) -> list:
        return [p for p in self.parts if not isinstance(p, str)]

    @property
    def text(self) -> str:
        """Text with ``<image>`` where an image sits (for display, hashing and token counts of text)."""
        return "".join(p if isinstance(p, str) else "<image>" for p in self.parts)


KINDS = ("clevr", "gta")


def load_policy(path: str | os.PathLike):
    """Load and validate one policy file; raises InputError naming the file and node."""
    path = Path(path)
    return policy_from_spec(load_yaml(path), path)


def policy_from_spec(spec: Any, path: str | os.PathLike | None = None):
    """Validate a parsed spec of any kind (``path`` only names it in errors, e.g. ``HEAD:policies/x.yaml``).

    Every kind's ``.spec`` is its normalized spec, and ``policy_from_spec(p.spec)`` has ``p``'s version.
    """
    where = path or "<spec>"
    if not isinstance(spec, dict):
        raise input_error(where, None, "a mapping with 'kind' and 'name'", type(spec).__name__)
    kind = spec.get("kind")
    if kind == "clevr":
        from pipeline.policy.clevr import ClevrPolicy

        return ClevrPolicy.from_spec(spec, path)
    if kind == "gta":
        from pipeline.policy.gta import GTAPolicy

        return GTAPolicy.from_spec(spec, path)
    raise input_error(where, "kind", "one of " + ", ".join(KINDS), kind)


POLICY_SUFFIXES = (".yaml", ".yml")


def policy_files(root: str | os.PathLike = "policies", kind: str | None = None) -> list[Path]:
    """Every policy file under ``root`` (or ``root/<kind>``): ``*.yaml`` and ``*.yml`` alike, so
    a file is never silently left out because of its spelling."""
    root = Path(root)
    sub = root / kind if kind else root
    if not sub.exists():
        return []
    return sorted(p for p in sub.rglob("*") if p.suffix in POLICY_SUFFIXES and p.is_file())


def load_policies(root: str | os.PathLike = "policies", kind: str | None = None) -> dict[str, Any]:
    """All policies under ``root`` (or ``root/<kind>``) by name; duplicate names are an error."""
    out: dict[str, Any] = {}
    where: dict[str, Path] = {}
    for p in policy_files(root, kind):
        pol = load_policy(p)
        if pol.name in out:
            raise input_error(p, "name", f"a name unique across policies/ (also used by {where[pol.name]})", pol.name)
        out[pol.name] = pol
        where[pol.name] = p
    return out


def policies_version(root: str | os.PathLike = "policies", kind: str | None = None) -> str:
    """One hash over every policy's version: what 'the policies changed' means to the pipeline."""
    return stable_hash({name: pol.version for name, pol in load_policies(root, kind).items()})


# ----------------------------------------------------------------------------- a record's policy


class StaleRecord(InputError):
    """A record labelled under another version of its policy (the data must be regenerated)."""

    def __init__(self, message: str, policy):
        super().__init__(message)
        self.policy = policy
        """The current policy of that name (validators still re-derive labels with it)."""


def resolve_policy(record, policies: dict, where: str | os.PathLike | None = None, *, require_version: bool = False):
    """The policy ``record`` was labelled under: looked up by name, at the version the record names.

    An unknown name is an InputError, a version mismatch a :class:`StaleRecord` (an InputError);
    both name ``where`` and the record. A record without a version passes unless
    ``require_version`` (the validators: every generator records it).
    """
    pol = policies.get(record.policy)
    if pol is None:
        raise input_error(where, f"{record.id}.policy",
                          "a policy under --policies (" + ", ".join(sorted(policies)) + ")", record.policy)
    if (record.policy_version or require_version) and record.policy_version != pol.version:
        err = input_error(where, f"{record.id}.policy_version",
                          f"{pol.version} (the current {pol.path or pol.name}); the data is stale: "
                          "re-run `trimpi generate`", record.policy_version)
        raise StaleRecord(str(err), pol)
    return pol


class RenderCache:
    """One rendering per (policy name, version, multimodal): the text is built once and the policy
    images are shared PIL objects, however many records refer to the policy."""

    def __init__(self):
        self._done: dict[tuple[str, str, bool], RenderedPolicy] = {}

    def __call__(self, policy, multimodal: bool = False) -> RenderedPolicy:
        key = (policy.name, policy.version, bool(multimodal))
        if key not in self._done:
            self._done[key] = policy.render(multimodal=multimodal)
        return self._done[key]
