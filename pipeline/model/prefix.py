"""Encode a prompt once, continue it many times: prompt-prefix key/value caches for ``generate``.

``generate(num_return_sequences=G)`` expands the batch to G rows per prompt *before* the first
forward pass, so each prompt's prefill runs G times (only its images are encoded once). Under
PolicyRollout the policy-aware prompt is several times longer than the policy-free one (~1,800
tokens at depth 6), and that repeated prefill was most of the rollout's extra cost (issue 17).
Here a prompt is run once and its cache is shared by all its samples:

* :func:`prefill` — one forward pass over a left-padded batch of prompts *without their last
  token*, into a ``DynamicCache``. The :class:`Prefix` keeps the per-layer key/value tensors, the
  token ids and attention mask of what was cached, each prompt's last token and, for Qwen2/2.5-VL,
  each row's mRoPE position delta.
* :func:`merge` — the rows of several prefixes in one, left-padded with masked zeros to the
  longest (the two PolicyRollout halves differ in length but decode in one loop).
* :func:`generate_from` — ``model.generate`` on the full prompts, each repeated ``repeats`` times,
  starting from a copy of the cache (transformers' "continue from a cache" path: ``_prefill``
  runs only the uncached tail, here the last prompt token, then decoding proceeds as usual).
  Logits processors, stopping and the random stream are ``generate``'s own, so under a fixed seed
  the tokens are those of a plain ``generate`` call on the same rows (tests/test_rl.py).

The copy is a ``StaticCache`` sized prompt + ``max_new_tokens``, written in place at each step.
A ``DynamicCache`` concatenates every layer's whole cache at every step; with G copies of a
400-token policy prefix that copying was 6 of a 14-second PoRo rollout on the tiny preset
(profiled), more than the attention itself. ``disable_compile`` is set because transformers would
otherwise ``torch.compile`` the forward on a GPU as soon as it sees a static cache.

Positions. Qwen2/2.5-VL give the text after an image the position ``index + delta`` (an image
takes fewer positions than tokens), ``delta`` per row. When a cache is continued, ``generate``
takes the deltas from ``model.model.rope_deltas``, which it assumes an earlier call on the same
model left there; :func:`generate_from` sets them from the prefix, row for row, so positions are
those a full prefill would have given. The prefill itself is passed the same position ids
``generate`` builds for a first call (text positions from the attention mask + the 3-D mRoPE
positions from ``get_rope_index``), so left padding never shifts a position, and padded cache
entries are masked out of attention (zero-filled ones in :func:`merge` are never read).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def left_pad_cat(encs: list[dict], pad_id: int) -> dict:
    """Collate single-prompt encodings into one left-padded batch (generation needs left padding)."""
    import torch

    n = max(e["input_ids"].shape[1] for e in encs)
    out: dict = {}
    for key in encs[0]:
        vals = [e[key] for e in encs]
        if key in SEQ_KEYS:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(v, (n - v.shape[1], 0), value=fill) for v in vals])
        else:
            out[key] = torch.cat(vals)
    return out


@dataclass
class Prefix:
    """Rows of prompts whose all-but-last tokens sit in a key/value cache."""

    kv: list
    """Per decoder layer ``(keys, values)``, each ``[rows, kv_heads, length, head_dim]``."""
    ids: Any
    """``[rows, length]`` the cached token ids (pad id on left padding)."""
    mask: Any
    """``[rows, length]`` attention mask of the cached tokens (0 on left padding)."""
    last: Any
    """``[rows]`` each prompt's last token: the first one ``generate`` runs."""
    deltas: Any
    """``[rows, 1]`` mRoPE position deltas (Qwen2/2.5-VL), or None for 1-D RoPE models."""

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def _core(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model


def _mrope(model):
    """The inner model that owns ``get_rope_index``/``rope_deltas`` (Qwen2/2.5-VL), else None."""
    inner = getattr(_core(model), "model", None)
    if inner is not None and hasattr(inner, "get_rope_index") and hasattr(inner, "rope_deltas"):
        return inner
    return None


def supported(model) -> bool:
    """Whether :func:`generate_from` can continue this model's cache (decoder-only, DynamicCache)."""
    core = _core(model)
    return not getattr(core.config, "is_encoder_decoder", False) and hasattr(core, "generate")


def _positions(model, batch: dict):
    """(position_ids, deltas) exactly as ``generate`` builds them for a first call on ``batch``."""
    import torch

    mask = batch["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inner = _mrope(model)
    if inner is None:
        return text, None
    if batch.get("image_grid_thw") is not None and batch.get("mm_token_type_ids") is not None:
        vision, deltas = inner.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                              image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    else:
        vision = text.unsqueeze(0).expand(3, -1, -1)
        deltas = torch.zeros(text.shape[0], 1, dtype=torch.long, device=text.device)
    return torch.cat([text[None], vision.to(text.device)], 0), deltas


def prefill(model, batch: dict) -> Prefix:
    """One forward over every prompt of ``batch`` (left-padded, as ``encode`` makes it) but its last token."""
    import torch
    from transformers import DynamicCache

    core = _core(model)
    dev = next(core.parameters()).device
    inputs = {k: v.to(dev) for k, v in batch.items() if v is not None and k != "labels"}
    pos, deltas = _positions(model, inputs)
    head = {k: (v[:, :-1] if k in SEQ_KEYS else v) for k, v in inputs.items()}
    head["position_ids"] = pos[..., :-1]
    cache = DynamicCache(config=core.config)
    with torch.no_grad():
        core(**head, past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer[0], layer[1]) for layer in cache]
    return Prefix(kv=kv, ids=head["input_ids"], mask=head["attention_mask"], last=inputs["input_ids"][:, -1],
                  deltas=deltas)


def merge(prefixes: list[Prefix], pad_id: int) -> Prefix:
    """Rows of ``prefixes`` in order, left-padded to the longest (padding masked, zero keys/values)."""
    import torch
    import torch.nn.functional as F

    if len(prefixes) == 1:
        return prefixes[0]
    n = max(p.length for p in prefixes)

    def pad(t, value, dim):  # left-pad dim ``dim`` (the sequence) of t to n
        k = n - t.shape[dim]
        if k == 0:
            return t
        widths = [0, 0] * (t.dim() - 1 - dim) + [k, 0]
        return F.pad(t, widths, value=value)

    kv = [(torch.cat([pad(p.kv[i][0], 0.0, 2) for p in prefixes]), torch.cat([pad(p.kv[i][1], 0.0, 2) for p in prefixes]))
          for i in range(len(prefixes[0].kv))]
    deltas = None if prefixes[0].deltas is None else torch.cat([p.deltas for p in prefixes])
    return Prefix(kv=kv, ids=torch.cat([pad(p.ids, pad_id, 1) for p in prefixes]),
                  mask=torch.cat([pad(p.mask, 0, 1) for p in prefixes]),
                  last=torch.cat([p.last for p in prefixes]), deltas=deltas)


def generate_from(model, prefix: Prefix, repeats: int = 1, **generate_kwargs):
    """``model.generate`` continuing every row of ``prefix``, ``repeats`` samples per row (adjacent).

    Returns what ``generate`` returns: the full sequences ``[rows * repeats, prefix.length + 1 + new]``
    (cached tokens, last prompt token, generated tokens) or the dict output when asked for one.
    """
    import torch
    from transformers import DynamicCache

    core = _core(model)
    r = int(repeats)
    new = int(generate_kwargs.get("max_new_tokens") or 0)
    if new:
        from transformers import StaticCache

        cache = StaticCache(config=core.config, max_cache_len=prefix.length + 1 + new)
        for i, (k, v) in enumerate(prefix.kv):
            cache.update(k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), i)
        generate_kwargs.setdefault("disable_compile", True)
    else:
        kv = [(k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)) for k, v in prefix.kv]
        cache = DynamicCache(ddp_cache_data=kv, config=core.config)
    ids = torch.cat([prefix.ids, prefix.last[:, None]], 1).repeat_interleave(r, 0)
    mask = torch.cat([prefix.mask, prefix.mask.new_ones(prefix.rows, 1)], 1).repeat_interleave(r, 0)
    inner = _mrope(model)
    if inner is not None:
        # generate continues a cache with the deltas an earlier call left on the model (see the module docstring)
        inner.rope_deltas = prefix.deltas.repeat_interleave(r, 0)
    generate_kwargs.pop("num_return_sequences", None)
    return core.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **generate_kwargs)
