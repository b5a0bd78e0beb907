"""The policy-change check: did anything the production model learned from change?

A scheduled run must not retrain a model for nothing. What the production model was trained
on is recorded in its registry card (``pipeline/registry.py``: ``policies`` as name + version,
and the full ``params``). This module computes the same fingerprint for the workspace and
compares:

* ``policies`` — ``pipeline.policy.policies_version(policies/)``, i.e. one hash over every
  policy's content hash (a YAML re-format is not a change);
* the watched params (``orchestrate.watch_params``: the data generators' sections and
  ``base.seed`` by default) — the inputs that change the training data.

Anything else (training knobs, model preset) is a deliberate experiment: run it with
``--force`` or ``dvc repro``. No production model, no registry yet, or a card without the
fields counts as "changed", so the first run always runs. Reading the registry is the only
I/O; a registry that cannot be read is reported, not guessed around.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import stable_hash


@dataclass
class ChangeCheck:
    changed: bool
    reason: str
    current: dict = field(default_factory=dict)
    production: dict | None = None
    """The incumbent: ``{"version", "card", "metrics"}`` or None when there is no production model."""
    policies_changed: bool = False
    """True when the policies themselves differ from production's (not only data params, not a first run)."""


def watched_params(params: dict, keys: list[str]) -> dict:
    from pipeline.config import get_dotted

    return {k: get_dotted(params, k) for k in keys}


def fingerprint(root: str | os.PathLike, params: dict, watch: list[str]) -> dict:
    """What the workspace would train on: policies hash + the watched params (and their hash)."""
    from pipeline.policy import policies_version

    watched = watched_params(params, watch)
    return {"policies": policies_version(Path(root) / "policies"), "params": watched,
            "params_hash": stable_hash(watched)}


def card_fingerprint(card: dict, watch: list[str]) -> dict:
    """The same fingerprint, rebuilt from a registry card (policies list + params snapshot)."""
    pols = card.get("policies")
    if isinstance(pols, list):
        pols = {p.get("name"): p.get("version") for p in pols if isinstance(p, dict)}
    watched = watched_params(card.get("params") or {}, watch)
    return {"policies": stable_hash(pols) if isinstance(pols, dict) else None, "params": watched,
            "params_hash": stable_hash(watched)}


def registry_for(root: str | os.PathLike, params_file: str | os.PathLike):
    """The workspace's registry (``params.yaml: registry``); a relative local root is under ``root``."""
    from pipeline.config import load_section
    from pipeline.registry import RegistryConfig, open_registry

    cfg = load_section(RegistryConfig, "registry", params_file)
    if "://" not in cfg.root and not os.path.isabs(cfg.root):
        cfg.root = str(Path(root) / cfg.root)
    return open_registry(cfg)


def production(root: str | os.PathLike, params_file: str | os.PathLike) -> dict | None:
    """``{"version", "card", "metrics", "url"}`` of the production model, or None if there is none."""
    reg = registry_for(root, params_file)
    ptr = reg.alias("production")
    if ptr is None:
        return None
    v = ptr["version"]
    return {"version": v, "card": reg.card(v), "metrics": reg.metrics(v), "url": reg.s.where(reg._k(v))}


def check(root: str | os.PathLike, params: dict, params_file: str | os.PathLike, watch: list[str]) -> ChangeCheck:
    current = fingerprint(root, params, watch)
    prod = production(root, params_file)
    if prod is None:
        return ChangeCheck(True, "no production model yet", current)
    trained = card_fingerprint(prod["card"], watch)
    if trained["policies"] != current["policies"]:
        why = ("the production card records no policies" if trained["policies"] is None else
               f"policies changed since production {prod['version']} "
               f"({trained['policies']} -> {current['policies']})")
        return ChangeCheck(True, why, current, prod, policies_changed=True)
    if trained["params_hash"] != current["params_hash"]:
        diff = [k for k in watch if trained["params"].get(k) != current["params"].get(k)]
        return ChangeCheck(True, f"data params changed since production {prod['version']}: {', '.join(diff)}",
                           current, prod)
    return ChangeCheck(False, f"policies unchanged since production {prod['version']} "
                              f"(policies {current['policies']}, data params {current['params_hash']})", current, prod)


def production_policies(prod: dict, root: str | os.PathLike) -> tuple[dict, list[str]]:
    """(the production model's policies by name, names whose text could not be recovered).

    Cards written since ``pipeline/registry.py: build_card`` keeps each policy's normalized spec
    are self-contained. For older cards the file is read from git at the card's revision; a
    text whose version does not match the card's (a dirty tree at promotion) is not trusted.
    """
    from pipeline.io import InputError
    from pipeline.policy import policy_from_spec

    card = prod.get("card") or {}
    rev = (card.get("git") or {}).get("revision")
    out, missing = {}, []
    for p in card.get("policies") or []:
        if not isinstance(p, dict) or not p.get("name"):
            continue
        pol = None
        try:
            if isinstance(p.get("spec"), dict):
                pol = policy_from_spec(p["spec"], f"registry card {prod.get('version')}: policy {p['name']}")
            if (pol is None or pol.version != p.get("version")) and rev and rev != "unknown" and p.get("path"):
                pol = _policy_at_rev(root, rev, p["path"])
        except InputError:
            pol = None
        if pol is not None and pol.version == p.get("version"):
            out[pol.name] = pol
        else:
            missing.append(p["name"])
    return out, missing


def _policy_at_rev(root: str | os.PathLike, rev: str, path: str):
    import subprocess

    import yaml

    from pipeline.policy import policy_from_spec

    rel = os.path.relpath(path, root) if os.path.isabs(path) else path
    r = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return None
    try:
        return policy_from_spec(yaml.safe_load(r.stdout), f"{rev}:{rel}")
    except yaml.YAMLError:
        return None
