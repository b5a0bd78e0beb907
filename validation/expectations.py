"""The shared validation runner: great-expectations suites + Python checks -> one report.

Every dataset validator (``validation/clevr.py``, ``validation/gta.py``) returns a list of
:class:`CheckResult`; they come from two places:

* :func:`run_expectations` runs a list of great-expectations expectations, written as plain
  dicts (``{"type": "expect_column_values_to_be_in_set", "column": "split", "value_set": [...]}``,
  any GE kwargs, plus an optional ``"name"``), as ONE suite over a pandas DataFrame in an
  ephemeral GE context (no ``gx/`` project directory, nothing written to disk). GE is
  imported lazily: its import costs ~4 s, which ``trimpi --help`` must not pay.
* :func:`python_check` wraps what GE cannot express (labels re-derived from scene graphs,
  images decoding, split disjointness by content hash) into the same shape.

:func:`write_report` writes the JSON report (a DVC metric) and :func:`format_report`
gives the readable text: failing checks first, each with example rows.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.io import atomic_write_json

EXAMPLE_ROWS = 5  # example failing rows kept per check


@dataclass
class CheckResult:
    """The outcome of one expectation or Python check."""

    name: str
    """What was checked, e.g. ``"test.jsonl: answer in the policy's cases (L2-Surinu)"``."""
    success: bool
    """True when no row violates it."""
    details: str = ""
    """One line for a person: counts, the observed value, the reason for failing."""
    failing_rows: list[dict] = field(default_factory=list)
    """Up to a few example rows that violate it (identifying fields + the offending value)."""
    source: str = "python"
    """``great_expectations`` or ``python``."""

    def to_dict(self) -> dict:
        return asdict(self)


def read_lenient(path) -> tuple[list[tuple[int, dict, Any]], list[dict]]:
    """Parse a records JSONL file without stopping at the first bad line.

    Returns ``(good, bad)``: ``good`` holds ``(line, raw dict, Record)`` for every valid record
    (``context`` and ``meta`` must be objects: every check reads them); ``bad`` holds one failing
    row per truncated, non-object or schema-violating line, naming file and line. Validation
    must list everything wrong at once and exit 1 (bad data), not 2 (bad invocation).
    """
    from pathlib import Path

    from pipeline.data.records import Record
    from pipeline.io import InputError

    from pipeline.io import parse_json

    path = Path(path)
    good, bad = [], []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                raw.decode("utf-8")  # the same strictness as the trainers' reader (pipeline.io.read_jsonl)
                d = parse_json(line, path.name, f"line {i}", finite=True)
                if not isinstance(d, dict):
                    raise ValueError(f"a JSON {type(d).__name__}, not an object")
                r = Record.from_dict(d, path, i)
                if not isinstance(r.context, dict) or not isinstance(r.meta, dict):
                    raise ValueError("context and meta must be JSON objects")
            except (ValueError, TypeError, InputError) as e:
                bad.append({"file": path.name, "line": i, "error": str(e)[:200], "text": line[:80]})
                continue
            good.append((i, d, r))
    return good, bad


def python_check(name: str, failing_rows: list[dict], details: str = "", max_rows: int = EXAMPLE_ROWS) -> CheckResult:
    """A check done in Python: it fails iff ``failing_rows`` is non-empty (examples are truncated)."""
    n = len(failing_rows)
    msg = details or ("ok" if not n else "")
    if n:
        msg = f"{n} failing row{'s' if n != 1 else ''}" + (f": {details}" if details else "")
    return CheckResult(name, not n, msg, failing_rows[:max_rows], "python")


_CONTEXT = None


def _context():
    """One ephemeral GE context per process, with its progress bars off."""
    global _CONTEXT
    if _CONTEXT is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _CONTEXT = gx.get_context(mode="ephemeral")
        _CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return _CONTEXT


def _class_name(type_name: str) -> str:
    return "".join(p.capitalize() for p in type_name.split("_"))


def _default_name(suite: str, spec: dict) -> str:
    what = spec["type"].removeprefix("expect_").replace("_", " ")
    col = spec.get("column")
    cond = spec.get("row_condition")
    return f"{suite}: {col + ' ' if col else ''}{what}" + (f" where {cond}" if cond else "")


def run_expectations(name: str, df, expectations: list[dict], max_rows: int = EXAMPLE_ROWS,
                     id_columns: str | list[str] = "id") -> list[CheckResult]:
    """Run ``expectations`` (dicts, see the module docstring) as one GE suite over ``df``.

    Failing rows are reported by ``id_columns`` (those present) and the offending value; an
    expectation that cannot even run (a missing column) is a failed check whose details
    carry GE's error message, never an exception. One suite per call: GE's cost is per
    expectation and per validation, so validators should pass one DataFrame for all files
    (with a ``file`` column and row conditions) rather than one call per file.
    """
    import great_expectations as gx

    ctx = _context()
    key = re.sub(r"[^A-Za-z0-9_]", "_", name)
    ds_name = f"ds_{key}"
    if ds_name in ctx.data_sources.all():  # re-validating in the same process replaces the batch
        ctx.data_sources.delete(ds_name)
    batch = (ctx.data_sources.add_pandas(ds_name).add_dataframe_asset("records")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df}))
    suite = gx.ExpectationSuite(name=f"suite_{key}")
    names = []
    for i, spec in enumerate(expectations):
        spec = dict(spec)
        check = spec.pop("name", None) or _default_name(name, spec)
        cls = getattr(gx.expectations, _class_name(spec.pop("type")))
        suite.add_expectation(cls(**spec, meta={"check_index": i}))
        names.append(check)
    fmt: dict[str, Any] = {"result_format": "COMPLETE"}
    ids = [c for c in ([id_columns] if isinstance(id_columns, str) else id_columns) if c in df.columns]
    if ids:
        fmt["unexpected_index_column_names"] = ids
    res = batch.validate(suite, result_format=fmt)
    out: list[CheckResult | None] = [None] * len(names)
    for r in res.results:
        i = int(r.expectation_config.meta["check_index"])
        info = r.exception_info or {}
        errors = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
        if info.get("raised_exception"):
            errors.append(info.get("exception_message"))
        result = r.result or {}
        rows = list(result.get("partial_unexpected_index_list") or [])[:max_rows]
        if not rows and result.get("partial_unexpected_list"):
            rows = [{"value": v} for v in result["partial_unexpected_list"][:max_rows]]
        if errors:
            details = "could not run: " + "; ".join(str(e) for e in errors if e)
        elif "unexpected_count" in result:
            details = f"{result['unexpected_count']} of {result.get('element_count')} rows unexpected"
        else:
            details = f"observed {json.dumps(result.get('observed_value'), default=str)}"
            if result.get("details"):
                details += f"; {json.dumps(result['details'], default=str)}"
        out[i] = CheckResult(names[i], bool(r.success) and not errors, details, rows, "great_expectations")
    return [c for c in out if c is not None]


def format_report(results: list[CheckResult], max_rows: int = 3) -> str:
    """Readable summary: a verdict line, every failing check with example rows, then the passes."""
    failed = [r for r in results if not r.success]
    lines = [f"validation {'FAILED' if failed else 'passed'}: {len(results) - len(failed)}/{len(results)} checks pass"]
    for r in failed:
        lines.append(f"  FAIL [{r.source}] {r.name}: {r.details}")
        for row in r.failing_rows[:max_rows]:
            text = json.dumps(row, ensure_ascii=False, default=str)
            lines.append(f"       e.g. {text if len(text) < 240 else text[:240] + '...'}")
    # passes grouped by their prefix ("train.jsonl: ..."), so the failures stay on screen
    groups: dict[str, int] = {}
    for r in results:
        if r.success:
            key = r.name.split(": ", 1)[0] if ": " in r.name else r.name
            groups[key] = groups.get(key, 0) + 1
    for key, n in groups.items():
        lines.append(f"  ok   {key}" + (f" ({n} checks)" if n > 1 else ""))
    return "\n".join(lines)


def write_report(path, results: list[CheckResult], extra: dict | None = None) -> bool:
    """Write the JSON report (atomically); returns True when every check passed."""
    ok = all(r.success for r in results)
    atomic_write_json(path, {"success": ok, "n_checks": len(results),
                             "n_failed": sum(not r.success for r in results), **(extra or {}),
                             "checks": [r.to_dict() for r in results]})
    return ok
