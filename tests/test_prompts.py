"""Prompt builder: response format, answer parser, policy placement, GTA context rendering."""
import json

import pytest
from PIL import Image

from pipeline.data.records import Record
from pipeline.io import InputError
from pipeline.model.prompts import (build_messages, format_ok, format_response, parse_answer, policy_free,
                                    strip_policy)
from pipeline.policy import RenderedPolicy


def test_format_response_with_and_without_cot():
    assert format_response("Condition 1 holds.", "Case 3") == "<think>\nCondition 1 holds.\n</think>\n\\boxed{Case 3}"
    assert format_response("", "Case 3") == "\\boxed{Case 3}"
    assert format_response("  \n", "yes") == "\\boxed{yes}"


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{Case 3}", "Case 3"),
    ("<think>x</think>\n\\boxed{ Case 28 }", "Case 28"),
    ("first \\boxed{Case 1} then \\boxed{Case 2}", "Case 2"),               # the LAST box wins
    ('\\boxed{{"name": "OCR_v1", "arguments": {"image": "image/image_1.jpg"}}}',
     '{"name": "OCR_v1", "arguments": {"image": "image/image_1.jpg"}}'),      # nested braces
    ('\\boxed{{"name": "AddText", "arguments": {"text": "a } b"}}}',
     '{"name": "AddText", "arguments": {"text": "a } b"}}'),                  # brace inside a JSON string
    ('\\boxed{He said "hi} tail', 'He said "hi'),                             # stray quote: plain matching
    ("\\boxed{Case 1} and \\boxed{Case 2", "Case 1"),                        # truncated last box ignored
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box here", None), ("", None), (None, None), ("\\boxed{", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("text,ok", [
    ("<think>\nreason\n</think>\n\\boxed{Case 3}", True),
    ("  <think>r</think>\\boxed{Case 3}\n", True),
    ('<think>r</think> \\boxed{{"name": "OCR_v2", "arguments": {}}}', True),
    ("\\boxed{Case 3}", False),                                  # no think block (Direct SFT output)
    ("<think>r</think>\nCase 3", False),                         # no box
    ("<think>r</think>\\boxed{Case 3} and more prose", False),   # trailing text
    ("<think>r\\boxed{Case 3}", False),                          # unclosed think
    ("<think>a<think>b</think>\\boxed{x}", False),               # nested think
    ("<think>r</think>\\boxed{Case 3", False),                   # unclosed box
    ("preface <think>r</think>\\boxed{x}", False),
    ("", False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def _img(c=(255, 0, 0)):
    return Image.new("RGB", (56, 56), c)


def _clevr():
    return Record(id="p/train/1", task="clevr", split="train", query="According to Policy: L2-Suri, what?",
                  answer="Case 1", images=["images/shard-00000.zip/1.png"], policy="L2-Suri", cot="c")


def test_policy_block_is_a_marked_prefix_and_strip_recovers_policy_free():
    rec, img, pimg = _clevr(), _img(), _img((0, 0, 255))
    pol = RenderedPolicy("L2-Suri", "v1", ["Policy: L2-Suri\n# Condition 1: a ", pimg, " object."])
    with_p = build_messages(rec, [img], pol, response="\\boxed{Case 1}")
    without = policy_free(rec, [img], response="\\boxed{Case 1}")
    user = with_p[0]["content"]
    n_pol = sum(1 for p in user if p.get("policy"))
    assert n_pol == 4 and all(p.get("policy") for p in user[:n_pol])          # 3 policy parts + separator
    assert user[1]["image"] is pimg and user[n_pol]["image"] is img            # policy image before input image
    assert user[-1] == {"type": "text", "text": rec.query}
    assert strip_policy(with_p) == without
    assert with_p[1] == {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{Case 1}"}]}
    assert len(without) == 2 and not any(p.get("policy") for p in without[0]["content"])


def test_image_count_must_match_record():
    with pytest.raises(InputError, match="images"):
        build_messages(_clevr(), [])


def test_gta_context_rendering_fixed_order():
    rec = Record(id="g1", task="gta", split="train", query="What does the sign say?", answer="{}",
                 images=["images/s.zip/a.jpg", "images/s.zip/b.jpg"], policy="GTAPolicy",
                 context={"instruction": "Call exactly one tool.", "profile": {"credits": 600, "age": 30,
                                                                             "account_type": "B"},
                          "image_names": ["image/image_1.jpg", "image/image_2.jpg"],
                          "history": [{"name": "OCR_v4", "arguments": {"image": "image/image_1.jpg"},
                                       "output": "STOP"}]})
    a, b = _img(), _img((0, 255, 0))
    parts = build_messages(rec, [a, b])[0]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image", "text", "text", "image", "text", "text"]
    assert parts[2]["image"] is a and parts[5]["image"] is b
    text = "".join(p.get("text", "<IMG>") for p in parts)
    prof = json.dumps({"account_type": "B", "age": 30, "credits": 600})
    assert text == ("Call exactly one tool.\n\nUser profile: " + prof + "\nImages:\n"
                    "image/image_1.jpg: <IMG>\nimage/image_2.jpg: <IMG>\n"
                    'History:\n1. {"name": "OCR_v4", "arguments": {"image": "image/image_1.jpg"}}\nOutput: STOP\n'
                    "Query: What does the sign say?")
    rec.context["history"] = []
    text = "".join(p.get("text", "<IMG>") for p in build_messages(rec, [a, b])[0]["content"])
    assert text.endswith("History: none\nQuery: What does the sign say?")
    rec.context["image_names"] = ["only_one.jpg"]
    with pytest.raises(InputError, match="image_names"):
        build_messages(rec, [a, b])
