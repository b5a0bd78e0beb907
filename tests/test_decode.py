"""Greedy continuous-batching decoder (pipeline/model/decode.py): the same token ids as ``generate``.

Evaluation figures must not move when decoding gets faster (issue 17), so every case here compares
the decoder's ids with ``generate(do_sample=False)`` on ordinary left-padded batches: prompts of
different lengths, with and without images, rows replaced mid-flight, a prefix shared by prompts
(with an identical policy image inside it), early stops.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipeline.model import decode as D  # noqa: E402
from pipeline.model.masking import encode  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """tiny-xs with its weights redrawn larger: fresh from init its greedy output is one token repeated
    whatever the prompt; with these, every output depends on the prompt, so a wrong position, mask or
    cache row changes the tokens."""
    from pipeline.model.presets import build_tiny

    torch.set_num_threads(1)
    model, proc = build_tiny("tiny-xs", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08, generator=g)
    return model, proc


def _conv(text, imgs):
    return [{"role": "user", "content": [{"type": "image", "image": i} for i in imgs] + [{"type": "text", "text": text}]}]


def _images():
    from PIL import Image

    return [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (84, 56), (30, 200, 30)),
            Image.new("RGB", (56, 56), (20, 20, 200)), Image.new("RGB", (112, 84), (120, 120, 0))]


def _reference(model, proc, convs, max_new, eos, batch=3):
    """``generate`` on left-padded batches of ``batch`` conversations (the evaluation path before issue 17)."""
    out = []
    for i in range(0, len(convs), batch):
        enc = encode(proc, convs[i:i + batch], add_generation_prompt=True)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=proc.tokenizer.pad_token_id,
                                 eos_token_id=eos)
        for row in ids[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def _enc(proc, conv):
    return {k: v for k, v in encode(proc, [conv], add_generation_prompt=True).items() if v is not None}


def test_greedy_equals_generate_with_rows_replaced_and_early_stops(tiny):
    model, proc = tiny
    a, b, c, d = _images()
    convs = [_conv("What colour is the square?", [a]), _conv("Count the objects " * 6, [b]),
             _conv("A text-only question about nothing in particular?", []), _conv("Two images?", [c, d]),
             _conv("Short?", [d]), _conv("Which case applies under the policy? " * 4, [a, b]),
             _conv("Another text question", [])]
    probe = _reference(model, proc, convs, 14, [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    # a token the random model emits mid-response, as EOS: rows then stop at different steps

    def stops(t):
        return len({row.index(t) if t in row else len(row) for row in probe})

    stop = max(sorted({t for row in probe for t in row}), key=stops)
    eos = [stop, proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ref = _reference(model, proc, convs, 14, eos)
    assert len({len(r) for r in ref}) > 2, [len(r) for r in ref]  # rows do stop early, at different steps
    order = [2, 5, 0, 6, 3, 1, 4]  # any order: results are keyed, and rows are refilled as others stop
    got = D.greedy(model, [D.Prompt(i, _enc(proc, convs[i])) for i in order], rows=2, max_new_tokens=14, eos_ids=eos)
    assert [got[i] for i in range(len(convs))] == ref
    assert D.greedy(model, [D.Prompt(i, _enc(proc, convs[i])) for i in range(len(convs))], rows=8,
                    max_new_tokens=14, eos_ids=eos) == dict(enumerate(ref))


def test_shared_prefix_is_prefilled_once_and_changes_nothing(tiny, monkeypatch):
    model, proc = tiny
    a, b, c, d = _images()
    policy = [{"type": "text", "text": "Policy: if a red object exists answer Case 1, else look at "},
              {"type": "image", "image": c}, {"type": "text", "text": " and answer Case 2.\n\n"}]

    def conv(img, q):
        return [{"role": "user", "content": policy + [{"type": "image", "image": img}, {"type": "text", "text": q}]}]

    convs = [conv(a, "Which case?"), conv(b, "Which case applies here, given the policy?"), conv(d, "Case?")]
    encs = [_enc(proc, x) for x in convs]
    k = D.shared_prefix_len(encs, D.image_token_id(model))
    # the run covers the policy text and its image, and stops before the records' own images
    ids = encs[0]["input_ids"][0].tolist()
    img_id = D.image_token_id(model)
    first_img = ids.index(img_id)
    second_img = next(i for i in range(first_img, len(ids)) if ids[i] != img_id)
    second_img = ids.index(img_id, second_img)
    assert first_img < k < second_img
    assert D.shared_prefix_len([encs[0], _enc(proc, conv(a, "Other question"))], img_id) > second_img  # same image: shared
    eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ref = _reference(model, proc, convs, 10, eos)
    calls = []
    real = D.prefill_one
    monkeypatch.setattr(D, "prefill_one", lambda m, e, prefix=None: calls.append(int(e["input_ids"].shape[1]))
                        or real(m, e, prefix))
    got = D.greedy(model, [D.Prompt(i, e, "policy", k) for i, e in enumerate(encs)], rows=2, max_new_tokens=10,
                   eos_ids=eos)
    assert [got[i] for i in range(3)] == ref
    assert calls.count(k) == 1 and len(calls) == 4  # the shared run once, then each prompt's tail


def test_plain_greedy_refuses_configs_with_logits_processors(tiny):
    model, _ = tiny
    assert D.plain_greedy(model)
    saved = model.generation_config.repetition_penalty
    try:
        model.generation_config.repetition_penalty = 1.05  # as real Qwen2.5-VL checkpoints ship
        assert not D.plain_greedy(model)
    finally:
        model.generation_config.repetition_penalty = saved
