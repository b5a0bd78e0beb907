"""``trimpi report``: results tables across trained variants, seeds and policy depths (the paper's Table 2).

Orchestration decides which variants exist and passes them in; this module only aggregates::

    trimpi report --variant "In-Context=metrics/eval_init.json@in_context" \\
                  --variant "CoT SFT=metrics/eval_sft.json" \\
                  --variant "TriMPI w/ PoRo-GRPO=metrics/eval_rl_s0.json,metrics/eval_rl_s1.json" \\
                  --out reports/ablations.md                # + .svg and .json next to it

    trimpi report --group "Depth 2" --variant "CoT SFT=d2/s0.json,d2/s1.json" ... \\
                  --group "Depth 4" --variant "CoT SFT=d4/s0.json,d4/s1.json" ... --out reports/results.md

* ``NAME=a.json,b.json`` — several metrics files are seeds of one variant: each cell shows the
  mean ± sample std over them; the ``n`` column counts the seeds, and a cell measured on fewer
  seeds than its row says so (``(n=2)``).
* ``@in_context`` — read that row's accuracy columns from the ``in_context`` suite instead of
  ``main``: the paper's "In-Context" baseline is the untrained model *with* the policy (marked †).
* ``--group LABEL`` — the variants after it form one table (``scripts/results.py``: one per policy
  depth, whose policies and so per-policy columns differ). Without it there is one table.
* Columns: policy-free accuracy per policy (``main.clevr.by_policy``) and their mean (per seed,
  then over seeds), GTA scores, in-context, override, referral precision/recall, branching
  error, judge, forgetting drop, prompt tokens and prefill time saved. Columns with no value for
  any row are dropped; a missing cell is ``–``.

**Tie rule.** Two rows A and B (means m_A, m_B of a column over seeds, sample std s_A, s_B) are
*tied* when ``|m_A - m_B| <= max(s_A, s_B)``: the difference is no larger than the seed-to-seed
spread of either row, so ranking them would rank noise. A row measured on one seed has no seed
spread; for an accuracy column its s is then the sampling error of that accuracy on its test
set, ``100 * sqrt(p (1 - p) / N)`` (N prompts; 1.5 points at 95 % on 200, 3.3 at 68.5 %), so that
one seed cannot rank two rows a few test prompts apart; other single-seed cells have s = 0. A
verdict that rests on single-seed rows only is flagged ``1 seed``. The same rule drives:

* the ``Rank`` column (by the table's primary column, policy-free mean accuracy): a row's rank
  is 1 + the number of rows *clearly* above it (difference larger than the spread); rows that
  share a rank are marked ``=``;
* the paper's orderings (:data:`CLAIMS`), each per group: ``holds`` when A - B > spread,
  ``does not hold`` when B - A > spread, else ``tie`` (for the ``>=`` claim a tie is consistent
  with it, and still reported as a tie). A claim whose rows are not in a group reads ``n/a``.

The plot is a small hand-written SVG (matplotlib is not a dependency): per method, one bar per
group (depth) of the primary column's mean, a min-max whisker over seeds and a dot per seed.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from pipeline.config import get_dotted
from pipeline.io import atomic_write_json, atomic_write_text, input_error, read_json

ACC = "Acc mean"
"""Policy-free accuracy averaged over the policies (per seed; the primary column)."""

# (header, dotted key with {main} standing for the suite the row reads accuracies from);
# the per-policy "Acc <name>" columns and ACC come before these
COLUMNS = [
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
PRIMARY = (ACC, "GTA Overall")
"""Rank, orderings and plot use the first of these that has data in the table."""
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2"]

# The row names scripts/results.py gives the paper's methods (paper Table 2 and its ablations).
IN_CONTEXT, DIRECT, COT = "In-Context", "Direct SFT", "CoT SFT"
COT_GRPO, COT_DAPO = "CoT SFT + GRPO", "CoT SFT + DAPO"
CPT_COT, TRIMPI_NOPORO = "VM-CPT + CoT SFT", "TriMPI w/o PoRo (GRPO)"
PORO_GRPO, PORO_DAPO = "TriMPI w/ PoRo-GRPO", "TriMPI w/ PoRo-DAPO"
NOCPT_PORO = "CoT SFT + PoRo-GRPO (w/o VM-CPT)"

CLAIMS = [
    # (claim, row A, column of A, relation, row B, column of B); None = the table's primary column.
    # Like for like: each TriMPI variant against the baseline with the same RL algorithm.
    ("TriMPI > CoT SFT + RL", PORO_GRPO, None, ">", COT_GRPO, None),
    ("TriMPI > CoT SFT + RL", PORO_DAPO, None, ">", COT_DAPO, None),
    ("CoT SFT + RL > CoT SFT", COT_GRPO, None, ">", COT, None),
    ("CoT SFT + RL > CoT SFT", COT_DAPO, None, ">", COT, None),
    ("CoT SFT > Direct SFT", COT, None, ">", DIRECT, None),
    ("PoRo > no PoRo", PORO_GRPO, None, ">", TRIMPI_NOPORO, None),
    # paper Table 3: the internalized model follows an updated policy in context at least as well
    # as the untrained model follows the original one in context (the In-Context row)
    ("override >= in-context", PORO_GRPO, "Override", ">=", IN_CONTEXT, None),
    ("override >= in-context", PORO_DAPO, "Override", ">=", IN_CONTEXT, None),
    # paper §8.2 ablations: VM-CPT helps SFT and RL
    ("VM-CPT helps", CPT_COT, None, ">", COT, None),
    ("VM-CPT helps", PORO_GRPO, None, ">", NOCPT_PORO, None),
]


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


# ----------------------------------------------------------------------------- aggregation


def cell(values: list) -> dict:
    """Mean, sample std (None below 2 values), min, max and n of the numeric ``values``."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": round(statistics.mean(vals), 2), "std": None if std is None else round(std, 2),
            "min": round(min(vals), 2), "max": round(max(vals), 2), "n": len(vals),
            "values": [round(v, 2) for v in vals]}


def policy_accuracies(metrics: dict, suite: str) -> dict[str, float]:
    """Accuracy per ClevrPolicy policy in ``suite`` (names may contain dots: read the dict directly)."""
    by = get_dotted(metrics, f"{suite}.clevr") or {}
    by = by.get("by_policy") if isinstance(by, dict) else None
    return {str(k): v for k, v in by.items() if isinstance(v, (int, float))} if isinstance(by, dict) else {}


def mean_accuracy(metrics: dict, suite: str):
    """Mean over policies of one metrics file (the pooled accuracy when there is no breakdown)."""
    per = policy_accuracies(metrics, suite)
    return statistics.mean(per.values()) if per else get_dotted(metrics, f"{suite}.clevr.accuracy")


# accuracy columns -> where their number of test prompts is (for a single seed's sampling error)
TEST_N = {ACC: "{main}.clevr.n", "In-context": "in_context.clevr.n", "Override": "override.clevr.n"}


def with_test_n(c: dict, metrics: list[dict], key: str | None) -> dict:
    """``c`` plus ``n_test``, the fewest test prompts behind one of its values (None if unknown)."""
    ns = [get_dotted(m, key) for m in metrics] if key else []
    c["n_test"] = min(ns) if ns and all(isinstance(n, int) and n > 0 for n in ns) else None
    return c


def aggregate(variants: list[tuple[str, list[str], str]], label: str = "") -> dict:
    """One table: {"label", "columns", "primary", "rows": [{"variant", "suite", "seeds", "files", "cells", "rank"}]}."""
    rows, policies = [], []
    for name, files, suite in variants:
        metrics = [read_json(f) for f in files]
        per = [policy_accuracies(m, suite) for m in metrics]
        for p in per:
            policies += [k for k in p if k not in policies]
        cells = {f"Acc {p}": cell([x.get(p) for x in per]) for p in policies}
        cells[ACC] = cell([mean_accuracy(m, suite) for m in metrics])
        for header, key in COLUMNS:
            cells[header] = cell([get_dotted(m, key.format(main=suite)) for m in metrics])
        for header, key in TEST_N.items():
            with_test_n(cells[header], metrics, key.format(main=suite))
        rows.append({"variant": name, "suite": suite, "seeds": len(files), "files": files, "cells": cells})
    headers = [f"Acc {p}" for p in policies] + [ACC] + [h for h, _ in COLUMNS]
    empty = cell([])
    for r in rows:
        r["cells"] = {h: r["cells"].get(h, empty) for h in headers}
    columns = [h for h in headers if any(r["cells"][h]["n"] for r in rows)]
    primary = next((h for h in PRIMARY if h in columns), None)
    table = {"label": label, "columns": columns, "primary": primary, "rows": rows}
    rank(table)
    return table


# ----------------------------------------------------------------------------- ties, ranks, orderings


def spread(c: dict) -> float:
    """The spread a difference must exceed: the seed std; with one seed, the sampling error of an
    accuracy on its test set where the cell knows it (``n_test``), else 0."""
    if c["std"] is not None:
        return c["std"]
    n, mean = c.get("n_test"), c["mean"]
    if c["n"] == 1 and n and mean is not None and 0 <= mean <= 100:
        return round(100 * math.sqrt(mean / 100 * (1 - mean / 100) / n), 2)
    return 0.0


def compare(a: dict, b: dict, relation: str = ">") -> dict:
    """Verdict of "a <relation> b" for two cells under the tie rule (module docstring)."""
    if a["mean"] is None or b["mean"] is None:
        return {"verdict": "n/a", "diff": None, "spread": None, "n": [a["n"], b["n"]]}
    diff = round(a["mean"] - b["mean"], 2)
    s = max(spread(a), spread(b))
    verdict = "tie" if abs(diff) <= s else ("holds" if diff > 0 else "does not hold")
    out = {"verdict": verdict, "diff": diff, "spread": round(s, 2), "n": [a["n"], b["n"]]}
    if a["n"] < 2 and b["n"] < 2:
        out["note"] = "1 seed"
    return out


def rank(table: dict) -> None:
    """``row["rank"]`` = 1 + rows clearly above it in the primary column (None without a value)."""
    col = table["primary"]
    cells = [r["cells"][col] if col else cell([]) for r in table["rows"]]
    for r, c in zip(table["rows"], cells):
        r["rank"] = None if c["mean"] is None else 1 + sum(
            compare(o, c)["verdict"] == "holds" for o in cells if o is not c and o["mean"] is not None)
    ranks = [r["rank"] for r in table["rows"] if r["rank"] is not None]
    for r in table["rows"]:
        r["rank_shared"] = r["rank"] is not None and ranks.count(r["rank"]) > 1


def orderings(tables: list[dict]) -> list[dict]:
    """Each claim of :data:`CLAIMS` whose rows appear in some table, with a verdict per table."""
    out = []
    for claim, a, col_a, rel, b, col_b in CLAIMS:
        by_group, seen = {}, False
        for t in tables:
            rows = {r["variant"]: r for r in t["rows"]}
            ca, cb = col_a or t["primary"], col_b or t["primary"]
            if a in rows and b in rows and ca and cb:
                seen = True
                by_group[t["label"]] = compare(rows[a]["cells"].get(ca, cell([])), rows[b]["cells"].get(cb, cell([])), rel)
            else:
                by_group[t["label"]] = {"verdict": "n/a", "diff": None, "spread": None}
        if seen:
            lhs = a + (f" ({col_a.lower()})" if col_a else "")
            rhs = b + (f" ({col_b.lower()})" if col_b else "")
            out.append({"claim": claim, "comparison": f"{lhs} {rel} {rhs}", "by_group": by_group})
    return out


def build(groups: list[tuple[str, list[tuple[str, list[str], str]]]]) -> dict:
    """All tables (one per group) plus the orderings computed from them."""
    tables = [aggregate(variants, label) for label, variants in groups]
    return {"tables": tables, "orderings": orderings(tables)}


# ----------------------------------------------------------------------------- rendering


def fmt(c: dict, row_n: int | None = None) -> str:
    if c["mean"] is None:
        return "–"
    s = f"{c['mean']:.1f}" + (f" ± {c['std']:.1f}" if c["std"] is not None else "")
    return s + (f" (n={c['n']})" if row_n is not None and c["n"] != row_n else "")


def verdict_text(v: dict) -> str:
    if v["verdict"] == "n/a":
        return "n/a"
    # no "|" here: the text goes into a markdown table cell
    text = f"{v['verdict']} (Δ {v['diff']:+.1f}, spread {v['spread']:.1f}"
    return text + (f", {v['note']})" if v.get("note") else ")")


def markdown(result: dict, title: str = "Results", notes: list[str] | tuple = (), appendix: list[str] | tuple = ()) -> str:
    lines = [f"# {title}", ""]
    for n in notes:
        lines += [n, ""]
    lines += ["Accuracies in %, higher is better; branching error and forgetting drop in points, lower is better. "
              "Cells: mean ± sample std over seeds (`n` = seeds; a cell with fewer says so). Rows marked † read "
              "accuracy with the policy in the prompt; every other row answers without it. `Rank` orders the "
              "policy-free mean accuracy; two rows whose difference is no larger than the larger of their seed stds "
              "(for a single-seed accuracy: its sampling error on the test set, 100·sqrt(p(1-p)/N)) "
              "are a tie and share a rank (`=`); see `pipeline/evaluate/report.py`.", ""]
    tables = result["tables"]
    for t in tables:
        cols = t["columns"]
        if t["label"]:
            lines += [f"## {t['label']}", ""]
        lines += ["| Rank | Method | n | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for r in t["rows"]:
            name = r["variant"] + (" †" if r["suite"] == "in_context" else "")
            rk = "–" if r["rank"] is None else f"{r['rank']}{'=' if r['rank_shared'] else ''}"
            lines.append(f"| {rk} | {name} | {r['seeds']} | "
                         + " | ".join(fmt(r["cells"][c], r["seeds"]) for c in cols) + " |")
        lines.append("")
    if result["orderings"]:
        labels = [t["label"] or "this table" for t in tables]
        lines += ["## The paper's orderings at this scale", "",
                  "Computed from the tables above: Δ = A - B of the compared column, spread = the larger seed std "
                  "of the two rows (a single-seed accuracy: its test-set sampling error); holds when Δ > spread, does not hold when -Δ > spread, else tie.", "",
                  "| Claim | Comparison | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for o in result["orderings"]:
            lines.append(f"| {o['claim']} | {o['comparison']} | "
                         + " | ".join(verdict_text(o["by_group"][t["label"]]) for t in tables) + " |")
        lines.append("")
    lines += ["Sources: " + "; ".join(f"{t['label'] + ' ' if t['label'] else ''}{r['variant']}: {', '.join(r['files'])}"
                                     for t in tables for r in t["rows"]), ""]
    for a in appendix:
        lines += [a, ""]
    return "\n".join(lines)


def svg(result: dict, width: int = 760) -> str:
    """Per method, one bar per group of the primary column (mean), min-max whisker and seed dots."""
    tables = result["tables"]
    groups = [(t["label"] or "all", t, PALETTE[i % len(PALETTE)]) for i, t in enumerate(tables)]
    methods: list[str] = []
    for t in tables:
        methods += [r["variant"] + (" †" if r["suite"] == "in_context" else "") for r in t["rows"]
                    if r["variant"] + (" †" if r["suite"] == "in_context" else "") not in methods]
    primary = next((t["primary"] for t in tables if t["primary"]), ACC)
    left, top, bar_h, gap = 230, 44, 12, 12
    group_h = max(1, len(groups)) * bar_h + gap
    height = top + len(methods) * group_h + 58
    plot_w = width - left - 30
    x = lambda v: left + plot_w * max(0.0, min(100.0, v)) / 100.0  # noqa: E731
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="14" font-weight="bold">{"Policy-free accuracy, mean over the policies" if primary == ACC else esc(primary)}'
           f' (%)</text>',
           f'<text x="10" y="{height - 8}" fill="#555">bar: mean over seeds · whisker: min–max over seeds · dot: one seed'
           f' · †: the policy in context (In-Context baseline)</text>']
    for t in range(0, 101, 20):
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 6}" x2="{x(t):.1f}" y2="{height - 48}" stroke="#ddd"/>')
        out.append(f'<text x="{x(t):.1f}" y="{height - 34}" text-anchor="middle">{t}</text>')
    for i, (label, _, color) in enumerate(groups):
        out.append(f'<rect x="{left + i * 110}" y="22" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + i * 110 + 14}" y="31">{esc(label)}</text>')
    for g, m in enumerate(methods):
        y0 = top + g * group_h
        out.append(f'<text x="{left - 8}" y="{y0 + len(groups) * bar_h / 2 + 4:.1f}" text-anchor="end">{esc(m)}</text>')
        for i, (label, t, color) in enumerate(groups):
            row = next((r for r in t["rows"] if r["variant"] + (" †" if r["suite"] == "in_context" else "") == m), None)
            c = row["cells"].get(t["primary"]) if row and t["primary"] else None
            if not c or c["mean"] is None:
                continue
            y = y0 + i * bar_h
            mid = y + (bar_h - 2) / 2
            out.append(f'<rect x="{left}" y="{y}" width="{x(c["mean"]) - left:.1f}" height="{bar_h - 2}" fill="{color}">'
                       f'<title>{esc(m)}, {esc(label)}: {fmt(c)} (n={c["n"]})</title></rect>')
            if c["n"] > 1:
                out.append(f'<line x1="{x(c["min"]):.1f}" y1="{mid:.1f}" x2="{x(c["max"]):.1f}" y2="{mid:.1f}" '
                           f'stroke="black"/>')
            for v in c["values"]:
                out.append(f'<circle cx="{x(v):.1f}" cy="{mid:.1f}" r="2" fill="black"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(result: dict, out: str | Path, svg_path: str | Path | None = None, json_path: str | Path | None = None,
          title: str = "Results", notes=(), appendix=(), extra: dict | None = None) -> tuple[Path, Path, Path]:
    """Write the markdown, SVG and JSON (each atomically); returns their paths."""
    out = Path(out)
    svg_path = Path(svg_path or out.with_suffix(".svg"))
    json_path = Path(json_path or out.with_suffix(".json"))
    atomic_write_text(out, markdown(result, title, notes, appendix))
    atomic_write_text(svg_path, svg(result))
    atomic_write_json(json_path, {**result, "notes": list(notes), **(extra or {})})
    return out, svg_path, json_path


# ----------------------------------------------------------------------------- CLI


class _Ordered(argparse.Action):
    """--group and --variant append to one list in command-line order (a group owns the variants after it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "items", None) or [])
        items.append((self.dest, values))
        namespace.items = items


def configure_report(p) -> None:
    p.add_argument("--variant", action=_Ordered, metavar="NAME=eval.json[,seed2.json][@in_context]",
                   help="one row of the table (repeatable, in display order)")
    p.add_argument("--group", action=_Ordered, metavar="LABEL",
                   help="start a new table (e.g. 'Depth 4'); the variants after it belong to it")
    p.add_argument("--out", default="reports/ablations.md", help="markdown table")
    p.add_argument("--svg", default=None, help="SVG plot (default: next to --out)")
    p.add_argument("--json", default=None, help="aggregated tables as JSON (default: next to --out)")
    p.add_argument("--title", default="Results", help="markdown title")
    p.set_defaults(items=None)


def groups_of(items: list[tuple[str, str]]) -> list[tuple[str, list]]:
    groups: list[tuple[str, list]] = []
    for kind, value in items:
        if kind == "group":
            if not value.strip():
                raise input_error("--group", None, "a non-empty label")
            groups.append((value.strip(), []))
        else:
            if not groups:
                groups.append(("", []))
            groups[-1][1].append(parse_variant(value))
    empty = [label for label, vs in groups if not vs]
    if not groups or empty:
        raise input_error("--variant", empty[0] if empty else None, "at least one --variant (after each --group)")
    return groups


def run_report(args) -> int:
    items = getattr(args, "items", None) or [("variant", v) for v in getattr(args, "variant", None) or []]
    result = build(groups_of(items))
    out, svg_path, _ = write(result, args.out, args.svg, args.json, title=getattr(args, "title", "Results"))
    print(markdown(result, getattr(args, "title", "Results")))
    print(f"report: {out}, {svg_path}")
    return 0
