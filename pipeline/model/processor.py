"""Qwen-VL processor without torchvision, and the one way to load a processor from a directory.

transformers 5 makes ``Qwen2VLProcessor`` require a video processor, and the video processor
requires torchvision, which cannot be installed beside the CPU torch 2.13 wheel (recipe pitfalls
1-2). :class:`ImageOnlyProcessor` drops the video processor and keeps everything else (image-token
expansion, ``mm_token_type_ids``, chat template, decoding). Its saved folder names the stock
class and carries the nested ``video_processor`` entry, so on a GPU box with torchvision the stock
``AutoProcessor`` loads the same folder.

:func:`load_processor` tries ``AutoProcessor`` first (real checkpoints on a machine with
torchvision) and falls back to the image-only class; it never reaches a hub.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_CLASS = None


def _image_only_class():
    """Define the subclass lazily so importing this module does not import transformers."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from transformers import Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` minus the video processor (serves Qwen2-VL and Qwen2.5-VL alike)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin zips positional args with ["image_processor", "tokenizer"]; the parent's
            # third positional (video_processor) is passed as None and dropped.
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self):
            d = super().to_dict()
            d["processor_class"] = "Qwen2VLProcessor"
            ip = self.image_processor
            d.setdefault("video_processor", {
                "video_processor_type": "Qwen2VLVideoProcessor", "size": _size_dict(ip.size),
                "patch_size": ip.patch_size, "temporal_patch_size": ip.temporal_patch_size,
                "merge_size": ip.merge_size, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
            })
            return d

        def save_pretrained(self, save_directory, **kwargs):
            out = super().save_pretrained(save_directory, **kwargs)
            p = Path(save_directory) / "tokenizer_config.json"
            if p.exists():  # the tokenizer records the processor class too
                cfg = json.loads(p.read_text())
                cfg["processor_class"] = "Qwen2VLProcessor"
                p.write_text(json.dumps(cfg, indent=2))
            return out

    ImageOnlyProcessor.__module__ = __name__
    _CLASS = ImageOnlyProcessor
    return _CLASS


def build_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224,
                    patch_size: int = 14, merge_size: int = 2):
    """Image-only Qwen-VL processor around ``tokenizer`` with the PIL image backend."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},  # v5 spelling of min/max_pixels
        patch_size=patch_size, temporal_patch_size=2, merge_size=merge_size,
    )
    return _image_only_class()(image_processor=ip, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
    """Processor of a local checkpoint dir: stock AutoProcessor where it works, else image-only.

    ``min_pixels``/``max_pixels`` override the saved image size limits (real checkpoints ship
    max 12845056 px, far too many visual tokens for a CPU run).
    """
    import logging

    from transformers import AutoProcessor

    path = str(path)
    proc = None
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)  # the failed AutoProcessor attempt and the PIL fallback both warn
    try:
        try:
            proc = AutoProcessor.from_pretrained(path, local_files_only=True)
            if getattr(proc, "image_processor", None) is None:
                proc = None
        except (ImportError, OSError, ValueError, TypeError, AttributeError):
            proc = None  # no torchvision -> video processor unavailable; use the image-only class
        if proc is None:
            proc = _image_only_class().from_pretrained(path, local_files_only=True)
    finally:
        log.setLevel(level)
    if min_pixels or max_pixels:
        set_pixel_limits(proc, min_pixels, max_pixels)
    proc.tokenizer.padding_side = "left"
    return proc


def _size_dict(size) -> dict:
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def set_pixel_limits(proc, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Change the image area limits in place (``size`` is a SizeDict in v5, a dict in older layouts)."""
    import dataclasses

    ip = proc.image_processor
    new = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v}
    if dataclasses.is_dataclass(ip.size):
        ip.size = dataclasses.replace(ip.size, **new)
    else:
        ip.size = {**_size_dict(ip.size), **new}
    for attr, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v and getattr(ip, attr, None) is not None:  # legacy attributes some versions still read
            setattr(ip, attr, v)
