"""Pure scoring functions for the evaluation suites: no model, no I/O, no torch.

Everything here takes predictions that were already generated (strings, possibly malformed)
and returns numbers, so each metric can be tested on hand-made predictions. All accuracies
are **percentages** (0-100) like the paper's tables; differences between them are "points".

Departures from the obvious, on purpose:

* ``exact_match`` compares *normalized* answers (case, surrounding whitespace, a trailing
  period, inner whitespace runs). ``"case 3."`` matches ``"Case 3"``; ``"Case 30"`` does not.
  A prediction of ``None`` (no ``\\boxed{}`` found) is simply wrong, never an error.
* Policy referral is computed exactly, without a judge, from the condition ids a response
  cites ("Condition 1.2"). Precision/recall are *micro*-averaged over all citations, so a
  response that cites nothing contributes to recall's denominator but not precision's.
* The branching-error statistic (paper §5.6: "average absolute difference" between the
  distributions of referenced condition ids in model vs gold outputs) is not specified beyond
  that sentence. We define the distribution of a condition id as the percentage of a policy's
  responses that cite it, keyed by (policy, id) because "Condition 1.2" of two policies are
  different rules, and average |model % - gold %| over the union of ids seen in either. A
  perfect model scores 0; a model that cites nothing scores the mean gold citation rate.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

CONDITION_RE = re.compile(r"\bCondition\s+(\d+(?:\.\d+)*)", re.IGNORECASE)
_WS = re.compile(r"\s+")
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- answers


def normalize_answer(text: str | None) -> str:
    if text is None:
        return ""
    return _WS.sub(" ", str(text).strip()).rstrip(".").strip().casefold()


def exact_match(pred: str | None, gold: str) -> bool:
    return pred is not None and normalize_answer(pred) != "" and normalize_answer(pred) == normalize_answer(gold)


def choice_match(pred: str | None, gold: str, choices: Sequence[str] | None = None) -> bool:
    """Multiple-choice match: a letter ("B", "(b)") or the choice text itself both count.

    ``gold`` may be given as a letter or as the choice text. Without ``choices`` this is
    ``exact_match``.
    """
    if not choices:
        return exact_match(pred, gold)
    norm = [normalize_answer(c) for c in choices]

    def to_index(x: str | None) -> int | None:
        s = normalize_answer(x).strip("()[] ")
        if len(s) == 1 and s.upper() in CHOICE_LETTERS[:len(choices)]:
            return CHOICE_LETTERS.index(s.upper())
        return norm.index(s) if s in norm else None

    p, g = to_index(pred), to_index(gold)
    return p is not None and p == g


def pct(hits: float, n: int) -> float | None:
    """Percentage rounded to 2 decimals; ``None`` when there is nothing to score."""
    return None if n == 0 else round(100.0 * hits / n, 2)


def accuracy(flags: Iterable[bool | float]) -> float | None:
    flags = list(flags)
    return pct(sum(float(f) for f in flags), len(flags))


def grouped_accuracy(rows: Iterable[Mapping[str, Any]], key: str, value: str = "correct") -> dict[str, float]:
    """Accuracy of ``rows[value]`` per distinct ``rows[key]`` (keys stringified, sorted)."""
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[str(r.get(key))].append(r[value])
    return {k: accuracy(v) for k, v in sorted(groups.items(), key=lambda kv: _natural(kv[0]))}


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------- policy referral


def cited_conditions(text: str | None) -> list[str]:
    """Condition ids a response cites, in order of first mention ("Condition 1.2" -> "1.2")."""
    if not text:
        return []
    seen: dict[str, None] = {}
    for m in CONDITION_RE.finditer(text):
        seen.setdefault(m.group(1), None)
    return list(seen)


def gold_path_ids(gold_path: Any) -> list[str]:
    """Condition ids of a gold path, tolerant of its encodings.

    Accepts ``["1", "1.2"]``, ``[["1", true], ["1.2", false]]`` or
    ``[{"id"|"condition"|"condition_id": "1", ...}]``.
    """
    out = []
    for step in gold_path or []:
        if isinstance(step, (list, tuple)) and step:
            step = step[0]
        elif isinstance(step, dict):
            step = step.get("id", step.get("condition", step.get("condition_id")))
        if step is None:
            continue
        s = str(step)
        m = CONDITION_RE.search(s)
        out.append(m.group(1) if m else s)
    return out


def referral_scores(examples: Iterable[tuple[Sequence[str], Sequence[str]]],
                    known_ids: Iterable[Sequence[str] | None] | None = None) -> dict[str, float | None]:
    """Micro precision/recall of cited ids vs gold-path ids, exact-path rate, non-existent-id rate.

    ``examples`` = (cited ids, gold path ids) per response; ``known_ids`` (optional, aligned) =
    every condition id that exists in that response's policy, to count citations of ids that
    do not exist at all (the paper's "branching to a non-existent Condition ID").
    """
    examples = list(examples)
    known = list(known_ids) if known_ids is not None else [None] * len(examples)
    tp = n_cited = n_gold = exact = nonexistent = n_checkable = 0
    for (cited, gold), ids in zip(examples, known):
        c, g = set(cited), set(gold)
        tp += len(c & g)
        n_cited += len(c)
        n_gold += len(g)
        exact += int(c == g and bool(g))
        if ids is not None:
            n_checkable += len(c)
            nonexistent += len(c - set(ids))
    return {
        "precision": pct(tp, n_cited),
        "recall": pct(tp, n_gold),
        "exact_path": pct(exact, len(examples)),
        "nonexistent_ids": pct(nonexistent, n_checkable),
        "cited_per_response": round(n_cited / len(examples), 3) if examples else None,
    }


def citation_distribution(responses: Iterable[tuple[str, Sequence[str]]]) -> dict[tuple[str, str], float]:
    """% of each policy's responses citing each condition id: {(policy, id): pct}."""
    per_policy = Counter()
    cites: Counter = Counter()
    for policy, ids in responses:
        per_policy[policy] += 1
        for i in set(ids):
            cites[(policy, i)] += 1
    return {k: 100.0 * v / per_policy[k[0]] for k, v in cites.items()}


def branching_error(model: Iterable[tuple[str, Sequence[str]]], gold: Iterable[tuple[str, Sequence[str]]]) -> float | None:
    """Mean |model % - gold %| over every (policy, condition id) cited by either side (see module doc)."""
    dm, dg = citation_distribution(model), citation_distribution(gold)
    keys = set(dm) | set(dg)
    if not keys:
        return None
    return round(sum(abs(dm.get(k, 0.0) - dg.get(k, 0.0)) for k in keys) / len(keys), 2)


# ----------------------------------------------------------------------------- comparisons


def drop(before: float | None, after: float | None) -> float | None:
    """Points lost from ``before`` to ``after`` (positive = forgetting)."""
    if before is None or after is None:
        return None
    return round(before - after, 2)


def reduction_pct(with_policy: float | None, internalized: float | None) -> float | None:
    """How much smaller ``internalized`` is than ``with_policy``, in % of ``with_policy``."""
    if not with_policy or internalized is None:
        return None
    return round(100.0 * (with_policy - internalized) / with_policy, 2)


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(sum(vals) / len(vals), 2) if vals else None
