"""``trimpi gate``: may the evaluated model be promoted? Thresholds and a comparison with production.

Contract with evaluation (``trimpi evaluate`` writes ``metrics/eval.json``; dotted keys):

* ``main.score`` — policy-free accuracy (mean of ClevrPolicy accuracy and GTA Overall when both
  exist); always checked: a gate that cannot see accuracy must not pass;
* ``override.score``, ``forgetting.drop`` — checked when present, skipped (and said so) when the
  suite did not run, unless ``gate.require_all``;
* ``gate.regression_metrics`` (default ``main.score``, ``override.score``) — compared with the
  production model's metrics read from the registry, only when both were measured on the same test
  sets (``test_sets``: file -> content hash); otherwise that check is skipped and says why.

Output ``metrics/gate.json``: ``passed``, every check with its value, threshold, operator, status and
note, the production version compared with, the time and the metrics file. Exit 0 passed, 1 refused;
``trimpi promote`` refuses a verdict that did not pass.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pipeline.config import get_dotted
from pipeline.io import atomic_write_json, read_json
from pipeline.registry import now


@dataclass
class GateConfig:
    """``params.yaml: gate`` — what an evaluated model must satisfy before promotion. Accuracies in %."""

    min_main_accuracy: float = 60.0
    """Minimum ``main.score`` (policy-free accuracy; mean of ClevrPolicy accuracy and GTA Overall when both exist).
    Embedded default: 60, far above what a model that did not internalize the policies reaches (chance is 25 %
    on the 4-case depth-2 policies, the base scores 0) and below what the default chain reaches (README
    "Measured"; ``tests/test_internalization.py``). Real runs set the floor they need."""
    min_override_accuracy: float = 0.0
    """Minimum ``override.score``. Skipped (and said so) when the override suite did not run."""
    max_forgetting_drop: float = 10.0
    """Maximum ``forgetting.drop`` in points (before - after). Skipped when no probe set exists."""
    max_regression: float = 5.0
    """Maximum points any of ``regression_metrics`` may fall below the production model's value."""
    regression_metrics: list[str] = field(default_factory=lambda: ["main.score", "override.score"])
    """Dotted metric keys compared with production (only those present in both metrics files)."""
    require_all: bool = False
    """True: a check whose metric is missing fails instead of being skipped."""


def _check(name: str, metric: str, value, threshold, op: str, require: bool, note: str = "") -> dict:
    if value is None:
        return {"name": name, "metric": metric, "value": None, "threshold": threshold, "op": op,
                "passed": not require, "status": "fail" if require else "skipped",
                "note": note or f"{metric} not measured" + ("" if require else " (gate.require_all is false)")}
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "metric": metric, "value": value, "threshold": threshold, "op": op,
            "passed": ok, "status": "pass" if ok else "fail", "note": note}


def evaluate_gate(metrics: dict, cfg: GateConfig, incumbent: dict | None, incumbent_version: str | None) -> dict:
    """Every check with its value and threshold; ``passed`` = all checks passed."""
    checks = [
        # the main score is never optional: a gate that cannot see accuracy must not pass
        _check("main accuracy", "main.score", get_dotted(metrics, "main.score"), cfg.min_main_accuracy, ">=", True),
        _check("override accuracy", "override.score", get_dotted(metrics, "override.score"),
               cfg.min_override_accuracy, ">=", cfg.require_all),
        _check("forgetting drop", "forgetting.drop", get_dotted(metrics, "forgetting.drop"),
               cfg.max_forgetting_drop, "<=", cfg.require_all),
    ]
    if incumbent is None:
        checks.append({"name": "no regression vs production", "metric": ",".join(cfg.regression_metrics),
                       "value": None, "threshold": cfg.max_regression, "op": "<=", "passed": True,
                       "status": "skipped", "note": "no production model yet"})
    else:
        mine, theirs = metrics.get("test_sets", {}), incumbent.get("test_sets", {})
        common = sorted(set(mine) & set(theirs))
        differ = [k for k in common if mine[k] != theirs[k]]
        for key in cfg.regression_metrics:
            a, b = get_dotted(metrics, key), get_dotted(incumbent, key)
            name = f"no regression vs production {incumbent_version}: {key}"
            if a is None or b is None:
                checks.append(_check(name, key, None, cfg.max_regression, "<=", False,
                                     f"{key} missing in {'candidate' if a is None else 'production'} metrics"))
            elif differ or not common:
                checks.append(_check(name, key, None, cfg.max_regression, "<=", False,
                                     "production was measured on different test sets "
                                     f"({', '.join(differ) or 'no common test set'}); not comparable"))
            else:
                c = _check(name, key, round(b - a, 2), cfg.max_regression, "<=", True,
                           f"candidate {a} vs production {b} (points lost)")
                checks.append(c)
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "production": incumbent_version,
            "at": now()}


def print_verdict(verdict: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"gate: {'PASSED' if verdict['passed'] else 'FAILED'}", file=out)
    for c in verdict["checks"]:
        val = "-" if c["value"] is None else c["value"]
        line = f"  [{c['status']:>7}] {c['name']}: {val} {c['op']} {c['threshold']}"
        print(line + (f"  ({c['note']})" if c["note"] else ""), file=out)


def configure_gate(p) -> None:
    p.add_argument("--metrics", default="metrics/eval.json", help="metrics written by `trimpi evaluate`")
    p.add_argument("--out", default="metrics/gate.json", help="where to write the verdict")


def run_gate(args) -> int:
    from pipeline.config import load_section
    from pipeline.registry import RegistryConfig, open_registry

    cfg = load_section(GateConfig, "gate", args.params, args.overrides)
    rcfg = load_section(RegistryConfig, "registry", args.params)
    metrics = read_json(args.metrics)
    reg = open_registry(rcfg)
    ptr = reg.alias()
    incumbent = reg.metrics(ptr["version"]) if ptr else None
    verdict = evaluate_gate(metrics, cfg, incumbent, ptr["version"] if ptr else None)
    verdict["metrics_file"] = str(args.metrics)
    atomic_write_json(args.out, verdict)
    print_verdict(verdict)
    return 0 if verdict["passed"] else 1
