"""``trimpi report``: one results table across trained variants (and seeds), like the paper's Table 2.

Orchestration decides which variants exist and passes them in; this module only aggregates::

    trimpi report --variant "In-Context=metrics/eval_init.json@in_context" \\
                  --variant "CoT SFT=metrics/eval_sft.json" \\
                  --variant "TriMPI w/ PoRo-GRPO=metrics/eval_rl_s0.json,metrics/eval_rl_s1.json" \\
                  --out reports/results.md --svg reports/results.svg

* ``NAME=a.json,b.json`` — several metrics files are seeds of one variant: the table shows
  mean ± sample std (and n) per cell.
* ``@in_context`` — read that row's accuracy columns from the ``in_context`` suite instead of
  ``main``: the paper's "In-Context" baseline is the untrained model *with* the policy.
* Columns with no value for any variant are dropped; a missing cell is ``–``.

The plot is a small hand-written SVG (grouped bars per variant; matplotlib is not a dependency).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from pipeline.config import get_dotted
from pipeline.io import atomic_write_json, atomic_write_text, input_error, read_json

# (header, dotted key with {main} standing for the suite the row reads accuracies from)
COLUMNS = [
    ("Clevr acc", "{main}.clevr.accuracy"),
    ("GTA Tool", "{main}.gta.tool_acc"),
    ("GTA Arg", "{main}.gta.arg_score"),
    ("GTA Overall", "{main}.gta.overall"),
    ("In-context", "in_context.score"),
    ("Override", "override.score"),
    ("Referral P", "referral.precision"),
    ("Referral R", "referral.recall"),
    ("Branching err", "referral.branching_error"),
    ("Judge 0-10", "referral.judge.score"),
    ("Forgetting drop", "forgetting.drop"),
    ("Tokens -%", "efficiency.token_reduction_pct"),
    ("Prefill -%", "efficiency.prefill_reduction_pct"),
]
PLOTTED = [("Main", "{main}.score"), ("In-context", "in_context.score"), ("Override", "override.score")]
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#b279a2"]


def parse_variant(spec: str) -> tuple[str, list[str], str]:
    """``"Name=a.json,b.json@in_context"`` -> (name, files, suite)."""
    if "=" not in spec:
        raise input_error("--variant", spec, "NAME=metrics.json[,seed2.json...][@suite]")
    name, rest = spec.split("=", 1)
    suite = "main"
    if "@" in rest:
        rest, suite = rest.rsplit("@", 1)
        if suite not in ("main", "in_context"):
            raise input_error("--variant", name, "@main or @in_context", suite)
    files = [f for f in rest.split(",") if f]
    if not name.strip() or not files:
        raise input_error("--variant", spec, "a name and at least one metrics file")
    return name.strip(), files, suite


def cell(values: list[float]) -> dict:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": round(statistics.mean(vals), 2), "std": None if std is None else round(std, 2), "n": len(vals)}


def aggregate(variants: list[tuple[str, list[str], str]]) -> dict:
    """{"columns": [...], "rows": [{"variant", "suite", "seeds", "cells": {header: cell}}]}."""
    rows = []
    for name, files, suite in variants:
        metrics = [read_json(f) for f in files]
        cells = {}
        for header, key in COLUMNS + PLOTTED:
            k = key.format(main=suite)
            cells[header] = cell([get_dotted(m, k) for m in metrics])
        rows.append({"variant": name, "suite": suite, "seeds": len(files), "files": files, "cells": cells})
    columns = [h for h, _ in COLUMNS if any(r["cells"][h]["n"] for r in rows)]
    return {"columns": columns, "rows": rows}


def fmt(c: dict) -> str:
    if c["mean"] is None:
        return "–"
    return f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if c["std"] is not None else "")


def markdown(table: dict) -> str:
    cols = table["columns"]
    lines = ["# Results", "",
             "Accuracies in %, higher is better; branching error and forgetting drop in points, lower is better.",
             "Rows with several seeds show mean ± sample std. \"In-Context\"-style rows (marked †) read accuracy "
             "with the policy in the prompt; every other row answers without it.", "",
             "| Method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in table["rows"]:
        name = r["variant"] + (" †" if r["suite"] == "in_context" else "")
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(fmt(r["cells"][c]) for c in cols) + " |")
    lines += ["", "Sources: " + "; ".join(f"{r['variant']}: {', '.join(r['files'])}" for r in table["rows"]), ""]
    return "\n".join(lines)


def svg(table: dict, width: int = 720) -> str:
    """Grouped bar chart (0-100) of the plotted scores per variant, with seed std as error bars."""
    series = [(h, PALETTE[i % len(PALETTE)]) for i, (h, _) in enumerate(PLOTTED)
              if any(r["cells"][h]["n"] for r in table["rows"])]
    rows = table["rows"]
    left, top, bar_h, gap = 190, 40, 12, 14
    group_h = max(1, len(series)) * bar_h + gap
    height = top + len(rows) * group_h + 40
    plot_w = width - left - 30
    x = lambda v: left + plot_w * max(0.0, min(100.0, v)) / 100.0  # noqa: E731
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for t in range(0, 101, 20):
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 6}" x2="{x(t):.1f}" y2="{height - 34}" stroke="#ddd"/>')
        out.append(f'<text x="{x(t):.1f}" y="{height - 20}" text-anchor="middle">{t}</text>')
    for i, (h, color) in enumerate(series):
        out.append(f'<rect x="{left + i * 110}" y="10" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + i * 110 + 14}" y="19">{esc(h)} (%)</text>')
    for g, r in enumerate(rows):
        y0 = top + g * group_h
        label = r["variant"] + (" †" if r["suite"] == "in_context" else "")
        out.append(f'<text x="{left - 8}" y="{y0 + len(series) * bar_h / 2 + 4:.1f}" text-anchor="end">{esc(label)}</text>')
        for i, (h, color) in enumerate(series):
            c = r["cells"][h]
            if c["mean"] is None:
                continue
            y = y0 + i * bar_h
            out.append(f'<rect x="{left}" y="{y}" width="{x(c["mean"]) - left:.1f}" height="{bar_h - 2}" fill="{color}">'
                       f'<title>{esc(r["variant"])} {esc(h)}: {fmt(c)}</title></rect>')
            if c["std"]:
                lo, hi = x(c["mean"] - c["std"]), x(c["mean"] + c["std"])
                out.append(f'<line x1="{lo:.1f}" y1="{y + bar_h / 2 - 1}" x2="{hi:.1f}" y2="{y + bar_h / 2 - 1}" '
                           f'stroke="black"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def configure_report(p) -> None:
    p.add_argument("--variant", action="append", required=True, metavar="NAME=eval.json[,seed2.json][@in_context]",
                   help="one row of the table (repeatable, in display order)")
    p.add_argument("--out", default="reports/results.md", help="markdown table")
    p.add_argument("--svg", default=None, help="SVG bar chart (default: next to --out)")
    p.add_argument("--json", default=None, help="aggregated table as JSON (default: next to --out)")


def run_report(args) -> int:
    variants = [parse_variant(v) for v in args.variant]
    table = aggregate(variants)
    out = Path(args.out)
    atomic_write_text(out, markdown(table))
    atomic_write_text(args.svg or out.with_suffix(".svg"), svg(table))
    atomic_write_json(args.json or out.with_suffix(".json"), table)
    print(markdown(table))
    print(f"report: {out}, {args.svg or out.with_suffix('.svg')}")
    return 0
