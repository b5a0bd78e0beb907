"""Loss masks, checked token by token on a real processed example (tiny-xs tokenizer + processor)."""
import pytest
import torch
from PIL import Image

from pipeline.data.records import Record
from pipeline.model.masking import IGNORE, encode
from pipeline.model.prompts import build_messages, format_response
from pipeline.policy import RenderedPolicy


@pytest.fixture(scope="module")
def proc():
    from pipeline.model.presets import ModelInitConfig
    from pipeline.model.processor import build_processor
    from pipeline.model.tokenizer import build_tokenizer

    cfg = ModelInitConfig(vocab_size=1024)
    return build_processor(build_tokenizer(cfg.vocab_size), cfg.min_pixels, cfg.max_pixels)


def _example():
    rec = Record(id="r", task="clevr", split="train", query="According to Policy: L2-Suri, what is the response?",
                 answer="Case 2", images=["images/s.zip/1.png"], policy="L2-Suri",
                 cot="Condition 1 holds: there is a cyan object.")
    policy = RenderedPolicy("L2-Suri", "v", ["Policy: L2-Suri\n# Condition 1: If there is a ",
                                            Image.new("RGB", (56, 56), (0, 200, 200)), " object, Case 2."])
    img = Image.new("RGB", (112, 84), (120, 120, 120))
    return rec, policy, img


def _tokens(proc, ids):
    return proc.tokenizer.convert_ids_to_tokens(ids)


def test_all_but_visual_masks_exactly_the_visual_tokens_and_padding(proc):
    rec, policy, img = _example()
    resp = format_response(rec.cot, rec.answer)
    convs = [build_messages(rec, [img], policy, resp), build_messages(rec, [img], None, resp)]
    b = encode(proc, convs, labels="all_but_visual")
    grid = b["image_grid_thw"]
    assert grid.shape[0] == 3                                   # policy image + input image, then input image
    n_vis = (grid.prod(1) // 4).tolist()                        # merge 2x2 -> tokens per image
    visual = {"<|image_pad|>", "<|vision_start|>", "<|vision_end|>"}
    for row, n_images in ((0, 2), (1, 1)):
        toks = _tokens(proc, b["input_ids"][row].tolist())
        lab = b["labels"][row].tolist()
        pad = (b["attention_mask"][row] == 0).tolist()
        for t, l, p, i in zip(toks, lab, pad, b["input_ids"][row].tolist()):
            if p or t in visual:
                assert l == IGNORE, t
            else:
                assert l == i, t
        # the masked visual block is exactly the image tokens + 2 markers per image
        n_masked_real = sum(1 for l, p in zip(lab, pad) if l == IGNORE and not p)
        expect = sum(n_vis[:2]) + 4 if row == 0 else n_vis[2] + 2
        assert n_masked_real == expect
    # policy text, query, CoT and answer are all learned in row 0
    learned = proc.tokenizer.decode([l for l in b["labels"][0].tolist() if l != IGNORE])
    for piece in ("Policy: L2-Suri", "# Condition 1", " object, Case 2.", rec.query, rec.cot, "\\boxed{Case 2}"):
        assert piece in learned


def test_response_labels_are_exactly_the_assistant_text_plus_im_end(proc):
    rec, policy, img = _example()
    resp = format_response(rec.cot, rec.answer)
    short = format_response("", "Case 10")
    b = encode(proc, [build_messages(rec, [img], policy, resp), build_messages(rec, [img], None, short)],
               labels="response")
    tok = proc.tokenizer
    for row, text in ((0, resp), (1, short)):
        ids = b["input_ids"][row].tolist()
        lab = b["labels"][row].tolist()
        want = tok(text + "<|im_end|>", add_special_tokens=False).input_ids
        kept = [i for i, l in enumerate(lab) if l != IGNORE]
        assert [ids[i] for i in kept] == want and [lab[i] for i in kept] == want
        assert kept == list(range(kept[0], kept[0] + len(want)))          # one contiguous span
        assert kept[-1] == len(ids) - 2                                   # only the final "\n" follows
        header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        assert ids[kept[0] - len(header):kept[0]] == header


def test_generation_batch_has_no_labels_and_is_left_padded(proc):
    rec, policy, img = _example()
    b = encode(proc, [build_messages(rec, [img], policy), build_messages(rec, [img])], add_generation_prompt=True)
    assert "labels" not in b
    assert b["attention_mask"][1, 0] == 0 and b["attention_mask"][:, -1].all()
    header = proc.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert b["input_ids"][0, -len(header):].tolist() == header
    with pytest.raises(ValueError):
        encode(proc, [build_messages(rec, [img])], add_generation_prompt=True, labels="response")


def test_policy_free_tokens_are_the_policy_aware_tokens_minus_a_contiguous_span(proc):
    rec, policy, img = _example()
    a = encode(proc, [build_messages(rec, [img], policy)], add_generation_prompt=True)["input_ids"][0].tolist()
    b = encode(proc, [build_messages(rec, [img])], add_generation_prompt=True)["input_ids"][0].tolist()
    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert a[:k] == b[:k] and a[len(a) - (len(b) - k):] == b[k:]
    assert torch.tensor(a).shape[0] > len(b)


def test_trimmed_logits_give_exactly_the_full_loss():
    """Engine.forward computes the LM head only from one position before the first label: same loss."""
    from pipeline.model.presets import build_tiny
    from pipeline.train.engine import keep_labelled_logits

    torch.manual_seed(0)
    model, proc = build_tiny("tiny-xs", seed=0)
    rec, policy, img = _example()
    convs = [build_messages(rec, [img], policy, format_response(rec.cot, rec.answer)),
             build_messages(rec, [img], None, format_response("", rec.answer))]
    b = encode(proc, convs, labels="response")
    kept = keep_labelled_logits(b["labels"])
    assert 0 < kept["logits_to_keep"] < b["input_ids"].shape[1]  # the short answer-only row sets no bound
    full = model(**b).loss
    trimmed = model(**{**b, **kept})
    assert trimmed.logits.shape[1] == kept["logits_to_keep"]
    torch.testing.assert_close(trimmed.loss, full, rtol=1e-6, atol=1e-6)
    cpt = encode(proc, convs, labels="all_but_visual")
    assert keep_labelled_logits(cpt["labels"]) == {}  # labels from the first token: nothing to trim
