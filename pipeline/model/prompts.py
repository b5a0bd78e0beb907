r"""The only prompt builder: chat messages for a Record, the response format, the answer parser.

Every stage and every evaluation suite builds prompts here, so "what the model sees" has one
definition. A conversation is a list of chat messages whose content is a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image", "image": PIL.Image}`` (Qwen-VL style).

User turn layout (the system turn is the chat template's default)::

    [policy parts ..., "\n\n"]            only when a policy is given (text + inline policy images)
    <task parts>                          clevr/generic/text: input images, then the query
                                          gta: see _gta_parts below

The policy block is a contiguous prefix of the user turn and every one of its parts carries
``"policy": True``. So the prompt "with policy" and the prompt "without policy" differ ONLY by
those parts (PolicyRollout relies on it), and :func:`strip_policy` recovers the policy-free
messages from the policy-aware ones. The chat template ignores the extra key.

GTA context (``record.context``), rendered in this fixed order::

    {instruction}

    User profile: {profile as compact JSON, keys sorted}
    Images:
    {image_names[0]}: <image 0>
    {image_names[1]}: <image 1>
    History:
    1. {"name": ..., "arguments": {...}}
    Output: {output}
    Query: {query}

(``History: none`` when the history is empty.)

Response format: ``<think>\n{cot}\n</think>\n\boxed{answer}``; with no CoT (Direct SFT) just
``\boxed{answer}``. :func:`parse_answer` takes the last complete top-level ``\boxed{...}``,
matching braces (GTA answers are JSON objects) and ignoring braces inside JSON strings.
"""
from __future__ import annotations

import json
import re
from typing import Any

BOX = "\\boxed{"


# ----------------------------------------------------------------------------- response format


def format_response(cot: str, answer: str) -> str:
    """Assistant text for training: CoT in ``<think>`` then the boxed answer; answer-only without CoT."""
    if cot and cot.strip():
        return f"<think>\n{cot.strip()}\n</think>\n{BOX}{answer}}}"
    return f"{BOX}{answer}}}"


def _closers(text: str, start: int, json_strings: bool) -> list[int]:
    """For every position ``i >= start``: where a scan that begins at ``i`` outside any string,
    at depth 1, meets its closing ``}`` (-1: never). Linear in the text.

    The obvious scan from each ``\\boxed{`` is quadratic when boxes never close (a truncated or
    hostile response of 4,000 unclosed boxes took ~30 s). Scans from different starts follow the
    same lexer transitions, so one backward pass over (position, lexer state) answers them all:
    outside a string ``}`` closes at once, ``{`` closes where the scan after it closes and then
    continues, anything else defers to the next position. States: 0 outside a string, 1 inside
    one, 2 the character after a backslash inside one (skipped). Plain matching (no strings) is
    the same pass with state 0 only.
    """
    n = len(text)
    out0 = [-1] * (n + 2)
    if json_strings:
        out1 = [-1] * (n + 2)  # in a string
        out2 = [-1] * (n + 2)  # escaped character in a string
    for i in range(n - 1, start - 1, -1):
        ch = text[i]
        if json_strings:
            out2[i] = out1[i + 1]
            out1[i] = out2[i + 1] if ch == "\\" else (out0[i + 1] if ch == '"' else out1[i + 1])
        if ch == "}":
            out0[i] = i
        elif ch == "{":
            inner = out0[i + 1]
            out0[i] = out0[inner + 1] if inner >= 0 else -1
        elif ch == '"' and json_strings:
            out0[i] = out1[i + 1]
        else:
            out0[i] = out0[i + 1]
    return out0


def _boxes(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of the contents of every complete top-level ``\\boxed{...}``.

    Each box is matched JSON-aware first (``{"text": "a}"}``), plain if a stray quote never
    closes; an unclosed box (a truncated generation) is skipped and the search goes on inside it.
    """
    first = text.find(BOX)
    if first < 0:
        return []
    json_end = plain_end = None  # computed once, only for texts that have a box
    spans, pos = [], first
    while True:
        k = text.find(BOX, pos)
        if k < 0:
            return spans
        start = k + len(BOX)
        if json_end is None:
            json_end, plain_end = _closers(text, first, True), _closers(text, first, False)
        end = json_end[start] if start < len(text) else -1
        if end < 0:
            end = plain_end[start] if start < len(text) else -1
        if end < 0:
            pos = start
            continue
        spans.append((start, end))
        pos = end + 1


def parse_answer(text: str | None) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (stripped), or None when there is none."""
    if not text:
        return None
    spans = _boxes(text)
    if not spans:
        return None
    s, e = spans[-1]
    return text[s:e].strip()


_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


def format_ok(text: str | None) -> bool:
    """True iff the text is ``<think>...</think>`` followed by one ``\\boxed{...}`` and nothing else.

    Stricter than EasyR1's regex (which allows text around the box): trailing prose after the
    answer or a second ``<think>`` block fails, so the format reward cannot be earned by rambling.
    """
    if not text:
        return False
    m = _THINK.match(text)
    if not m or "<think>" in m.group(1):
        return False
    rest = text[m.end():]
    if not rest.startswith(BOX):
        return False
    spans = _boxes(rest)
    return bool(spans) and spans[0][0] == len(BOX) and not rest[spans[0][1] + 1:].strip()


# ----------------------------------------------------------------------------- messages


def _text(t: str, **mark) -> dict:
    return {"type": "text", "text": t, **mark}


def _image(img, **mark) -> dict:
    return {"type": "image", "image": img, **mark}


def policy_parts(policy) -> list[dict]:
    """Content parts of a RenderedPolicy (text and inline images), each marked ``policy: True``."""
    parts = [_text(p, policy=True) if isinstance(p, str) else _image(p, policy=True) for p in policy.parts]
    return parts + [_text("\n\n", policy=True)]


def _gta_parts(record, images: list) -> list[dict]:
    from pipeline.io import input_error

    ctx = record.context or {}
    names = ctx.get("image_names") or [f"image/image_{i + 1}.jpg" for i in range(len(images))]
    if len(names) != len(images):
        raise input_error(record.id, "context.image_names", f"one name per input image ({len(images)})", names)
    head = ""
    if ctx.get("instruction"):
        head += f"{ctx['instruction'].strip()}\n\n"
    if ctx.get("profile") is not None:
        head += "User profile: " + json.dumps(ctx["profile"], sort_keys=True, ensure_ascii=False) + "\n"
    parts = [_text(head + "Images:\n")] if images else ([_text(head)] if head else [])
    for name, img in zip(names, images):
        parts += [_text(f"{name}: "), _image(img), _text("\n")]
    hist = ctx.get("history") or []
    lines = ["History:" + (" none" if not hist else "")]
    for i, h in enumerate(hist, 1):
        if not isinstance(h, dict) or "name" not in h:
            raise input_error(record.id, f"context.history[{i - 1}]", "a mapping with name/arguments/output", h)
        call = json.dumps({"name": h["name"], "arguments": h.get("arguments", {})}, ensure_ascii=False)
        lines += [f"{i}. {call}", f"Output: {h.get('output', '')}"]
    parts.append(_text("\n".join(lines) + f"\nQuery: {record.query}"))
    return parts


def task_parts(record, images: list) -> list[dict]:
    """The policy-free part of the user turn: task context, input images and the query."""
    if record.task == "gta":
        return _gta_parts(record, images)
    return [_image(img) for img in images] + [_text(record.query)]


def build_messages(record, images: list, policy=None, response: str | None = None) -> list[dict]:
    """Chat messages for one Record; ``policy`` (RenderedPolicy) goes first in the user turn."""
    from pipeline.io import input_error

    if len(images) != len(record.images):
        raise input_error(record.id, "images", f"{len(record.images)} loaded images (one per reference)",
                          len(images))
    content = (policy_parts(policy) if policy is not None else []) + task_parts(record, images)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if response is not None:
        msgs.append({"role": "assistant", "content": [_text(response)]})
    return msgs


def policy_free(record, images: list, response: str | None = None) -> list[dict]:
    """The messages of :func:`build_messages` without the policy (what the model sees at inference)."""
    return build_messages(record, images, None, response)


def strip_policy(messages: list[dict]) -> list[dict]:
    """Remove the policy parts from policy-aware messages (equal to :func:`policy_free`'s output)."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [p for p in c if not p.get("policy")]
        out.append({**m, "content": c})
    return out


def training_response(record, direct: bool = False) -> str:
    """The gold assistant text of a record: CoT + answer, or answer only for Direct SFT."""
    return format_response("" if direct else record.cot, record.answer)


def response_budget(tokenizer, records, margin: float = 0.25, extra: int = 8) -> int:
    """New-token budget that fits the longest gold response of ``records``, with a margin.

    A fixed budget tuned for depth-2 CoTs cuts depth-6 ones before ``\\boxed{}`` (they then score as
    malformed), so evaluation and RL rollouts derive theirs from the data they run on: the longest
    :func:`training_response` in tokens, + ``margin`` of it, + ``extra`` (the end-of-turn token and
    a generated object description a little longer than the gold one).
    """
    import math

    texts = [training_response(r) for r in records]
    if not texts:
        return extra
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)
    return int(math.ceil(longest * (1 + margin))) + extra


def images_of(messages: list[dict]) -> list:
    """PIL images of a conversation in the order the chat template emits their placeholders."""
    return [p["image"] for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and (p.get("type") == "image" or "image" in p)]
