"""Model layer API: ``load`` a checkpoint dir, ``generate`` from conversations, ``save``.

* ``load(path, threads=1) -> (model, processor)`` — a local directory only (``local_files_only``;
  ``HF_HUB_OFFLINE=1``): the tiny presets, smollm2-vl and real Qwen2/2.5-VL checkpoints alike, via
  ``AutoModelForImageTextToText`` + :func:`pipeline.model.processor.load_processor`. float32 on CPU,
  bfloat16 on CUDA.
* ``generate(model, processor, conversations, ...) -> list[str]`` — batched, left-padded, greedy by
  default; returns the completions decoded without special tokens (``<think>`` and ``<tool_call>``
  are added, not special, so they survive).
* ``save(model, processor, out_dir)`` — safetensors + processor files; a peft model is merged first.

Prompts live in ``prompts.py``, batching and loss masks in ``masking.py``, presets in ``presets.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.io import input_error


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def device_of(model):
    return next(model.parameters()).device


def vision_tower(model):
    """The vision tower + merger (``visual``) of a Qwen2-VL / Qwen2.5-VL model, PEFT-wrapped or not."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "visual":
            return module
    raise ValueError(f"{type(model).__name__} has no vision tower ('visual' module)")


def load(path: str | os.PathLike, threads: int = 1, device: str | None = None,
         min_pixels: int | None = None, max_pixels: int | None = None, dtype=None):
    """(model, processor) from a local checkpoint directory; never reaches a hub.

    ``device`` defaults to CUDA when present; ``dtype`` to bfloat16 on CUDA, float32 on CPU.
    Trainers pass ``device="cpu"`` and let DeepSpeed place each rank's copy.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise input_error(p, "config.json", "a local checkpoint directory (save_pretrained layout)",
                          "missing" if p.exists() else "no such directory")
    import torch
    from transformers import AutoModelForImageTextToText

    from pipeline.model.processor import load_processor

    set_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise input_error(p, "model", "a loadable vision-language checkpoint", f"{type(e).__name__}: {e}") from None
    model.to(device).eval()
    proc = load_processor(p, min_pixels=min_pixels, max_pixels=max_pixels)
    tok = proc.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return model, proc


def save(model, processor, out_dir: str | os.PathLike) -> None:
    """Write a ``save_pretrained`` checkpoint (safetensors) + processor into ``out_dir``."""
    from pipeline.io import disk_writes

    if hasattr(model, "merge_and_unload"):  # peft: ship merged weights, not base + adapter
        model = model.merge_and_unload()
    with disk_writes(out_dir):
        model.save_pretrained(str(out_dir), safe_serialization=True)
        processor.save_pretrained(str(out_dir))


def generate_ids(model, processor, batch: dict, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0):
    """Completion token ids (batch x new tokens, right-padded with pad id) for an encoded batch."""
    import torch

    tok = processor.tokenizer
    dev = device_of(model)
    inputs = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), min_new_tokens=min_new_tokens or None)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # silence "temperature is set but do_sample=False" from checkpoints with sampling defaults
        kw.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    model.train(was_training)
    return out[:, inputs["input_ids"].shape[1]:]


def generate(model, processor, conversations: list[list[dict]], max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int | None = None) -> list[str]:
    """Generate one completion per conversation (which must end with a user turn)."""
    from pipeline.model.masking import encode

    texts: list[str] = []
    bs = batch_size or len(conversations) or 1
    for i in range(0, len(conversations), bs):
        chunk = conversations[i:i + bs]
        batch = encode(processor, chunk, add_generation_prompt=True)
        ids = generate_ids(model, processor, batch, max_new_tokens, do_sample, temperature, top_p)
        texts += processor.batch_decode(ids, skip_special_tokens=True)
    return texts
