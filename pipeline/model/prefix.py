"""Encode a prompt once, continue it many times: prompt caches shared by samples (RL rollouts).

``generate(num_return_sequences=G)`` expands the batch to G rows per prompt *before* the first
forward pass, so each prompt's prefill ran G times (only its images were encoded once), and every
decode step read G copies of its key/value cache. Under PolicyRollout the policy-aware prompt is
several times longer than the policy-free one (~400 tokens at depth 2, ~1,800 at depth 6), and
that made a PoRo step 1.37x a GRPO step (issue 17). Here:

* :func:`prefill` — one forward pass over a left-padded batch of prompts *without their last
  token*; the :class:`Prefix` keeps the per-layer key/value tensors, the ids and mask of what was
  cached, each prompt's last token and its mRoPE position delta (Qwen2/2.5-VL).
  :func:`prefill_rows` does the same for prompts of which groups share a leading run of tokens
  (the policy-aware prompts of one policy: system turn + policy text): the run is prefilled once
  per group, then each prompt's tail on a copy of its cache.
* :func:`generate_from` — ``model.generate`` for ``repeats`` samples per cached prompt. The cache
  it is given holds only the tokens fed from there on (each prompt's last token, then the new
  ones) in a preallocated buffer (:func:`buffered_cache`: ``DynamicLayer.update`` would copy the
  whole cache every step, which took 6 s of a 14 s PoRo rollout on the tiny preset), and the
  prompts' caches ride along with it: :func:`shared_head_attention`, registered in transformers'
  ``AttentionInterface`` and selected for the language model during the call, attends each sample
  over ONE copy of its prompt's cache plus its own tokens, in one softmax. Several
  :class:`Prefix` blocks (the policy-free and policy-aware halves) decode in one loop without being
  padded to each other's length. Logits processors, stopping and the random stream are
  ``generate``'s own, so under a fixed seed the tokens are those of a plain ``generate`` call on
  the same rows, and the per-step log-probs agree to float rounding (tests/test_rl.py).

Positions. Qwen2/2.5-VL give the text after an image the position ``index + delta`` (an image
takes fewer positions than tokens), ``delta`` per row. The prefill is passed the position ids
``generate`` builds for a first call (text positions from the attention mask, 3-D mRoPE positions
from ``get_rope_index``), so left padding never shifts a position; :func:`generate_from` passes
each row's next position explicitly (``prompt length - 1 + delta`` for the last prompt token, +1
per step, as ``generate`` extends given position ids), so it never reads the prompt's length from
the cache or a stale ``rope_deltas``.

:func:`prefill_one` / :func:`prefill_batch` / :func:`shared_prefix_len` / :func:`head` serve the
evaluation decoder too (``decode.py``).
"""
from __future__ import annotations

import functools
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
    """Whether :func:`generate_from` applies: a decoder-only model whose attention is dispatched by
    its config (transformers' ``AttentionInterface``), so the shared-head attention can be selected."""
    core = _core(model)
    can_set = getattr(core, "_can_set_attn_implementation", lambda: True)
    return (not getattr(core.config, "is_encoder_decoder", False) and hasattr(core, "generate")
            and hasattr(core.config, "get_text_config") and bool(can_set()))


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


def _forward(model, inputs: dict, cache, pos):
    import torch

    with torch.no_grad():
        return _core(model)(**inputs, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)


def prefill_one(model, enc: dict, prefix: tuple | None = None):
    """(kv, last logits [V] float32, length, delta) of one prompt; ``prefix`` = (kv, k) of its first k tokens."""
    from transformers import DynamicCache

    core = _core(model)
    dev = next(core.parameters()).device
    inputs = {k: v.to(dev) for k, v in enc.items() if v is not None and k != "labels"}
    pos, deltas = _positions(model, inputs)
    delta = int(deltas[0, 0]) if deltas is not None else 0
    n = inputs["input_ids"].shape[1]
    if prefix is None:
        cache = DynamicCache(config=core.config)
        out = _forward(model, inputs, cache, pos)
    else:
        kv, k = prefix
        cache = DynamicCache(ddp_cache_data=kv, config=core.config)  # update() concatenates: kv is not modified
        tail = {key: (v[:, k:] if key in SEQ_KEYS and key != "attention_mask" else v) for key, v in inputs.items()}
        tail.update(_images_from(inputs, k, image_token_id(model)))
        out = _forward(model, tail, cache, pos[..., k:])
    kv = [(layer[0], layer[1]) for layer in cache]
    return kv, out.logits[0, -1].float(), n, delta


def prefill_batch(model, encs: list[dict]) -> list:
    """``prefill_one`` for several prompts in ONE forward pass (left-padded batch); the same per-row results."""
    from transformers import DynamicCache

    if len(encs) == 1:
        return [prefill_one(model, encs[0])]
    core = _core(model)
    dev = next(core.parameters()).device
    batch = {k: v.to(dev) for k, v in left_pad_cat(encs, 0).items() if v is not None and k != "labels"}
    pos, deltas = _positions(model, batch)
    cache = DynamicCache(config=core.config)
    out = _forward(model, batch, cache, pos)
    layers = [(layer[0], layer[1]) for layer in cache]
    res = []
    for i, e in enumerate(encs):
        n = int(e["input_ids"].shape[1])
        kv = [(k[i:i + 1, :, -n:], v[i:i + 1, :, -n:]) for k, v in layers]
        res.append((kv, out.logits[i, -1].float(), n, int(deltas[i, 0]) if deltas is not None else 0))
    return res


def image_token_id(model) -> int | None:
    cfg = _core(model).config
    return getattr(cfg, "image_token_id", None)


def _image_spans(input_ids, image_id: int | None) -> list[tuple[int, int]]:
    """[start, end) token spans of each image's placeholder run, in order."""
    if image_id is None:
        return []
    ids = input_ids[0].tolist()
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


def _patches(enc: dict) -> list[int]:
    """Rows of ``pixel_values`` per image (t*h*w patches)."""
    grid = enc.get("image_grid_thw")
    return [] if grid is None else [int(g.prod()) for g in grid]


def _images_from(enc: dict, k: int, image_id: int | None) -> dict:
    """pixel_values / image_grid_thw of the images whose placeholders start at or after token k."""
    grid = enc.get("image_grid_thw")
    if grid is None:
        return {}
    first = sum(1 for s, _ in _image_spans(enc["input_ids"], image_id) if s < k)
    if first >= len(grid):
        return {"pixel_values": None, "image_grid_thw": None}
    return {"pixel_values": enc["pixel_values"][sum(_patches(enc)[:first]):], "image_grid_thw": grid[first:]}


def head(enc: dict, k: int, image_id: int | None) -> dict:
    """The first k tokens of a prompt as an encoding of its own (its images lie wholly inside them)."""
    out = {key: (v[:, :k] if key in SEQ_KEYS else v) for key, v in enc.items() if v is not None and key != "labels"}
    grid = enc.get("image_grid_thw")
    if grid is not None:
        n_img = sum(1 for _, e in _image_spans(enc["input_ids"], image_id) if e <= k)
        if n_img == 0:
            out.pop("pixel_values", None)
            out.pop("image_grid_thw", None)
        else:
            out["pixel_values"] = enc["pixel_values"][:sum(_patches(enc)[:n_img])]
            out["image_grid_thw"] = grid[:n_img]
    return out


def shared_prefix_len(encs: list[dict], image_id: int | None) -> int:
    """Length of the leading run of tokens ALL ``encs`` (batches of one) share, identical images included.

    The run stops before an image whose pixels differ between prompts (every image's placeholder
    tokens are the same ids), never splits an image, and leaves each prompt a token of its own.
    """
    import torch

    if len(encs) < 2:
        return 0
    ids = [e["input_ids"][0] for e in encs]
    k = min(int(x.numel()) for x in ids) - 1
    for x in ids[1:]:
        neq = (x[:k] != ids[0][:k]).nonzero()
        if len(neq):
            k = int(neq[0])
    if k <= 0:
        return 0
    offset = 0
    for (s, e), r in zip(_image_spans(encs[0]["input_ids"], image_id), _patches(encs[0])):
        if s >= k:
            break
        px = encs[0]["pixel_values"][offset:offset + r]
        same = all(e2.get("pixel_values") is not None and e2["pixel_values"].shape[0] >= offset + r
                   and torch.equal(e2["pixel_values"][offset:offset + r], px) for e2 in encs[1:])
        if e > k or not same:
            return max(0, s - 1)  # stop before the image and its <|vision_start|>
        offset += r
    return k


def prefill(model, batch: dict) -> Prefix:
    """One forward over every prompt of ``batch`` (left-padded, as ``encode`` makes it) but its last token."""
    import torch
    from transformers import DynamicCache

    core = _core(model)
    dev = next(core.parameters()).device
    inputs = {k: v.to(dev) for k, v in batch.items() if v is not None and k != "labels"}
    pos, deltas = _positions(model, inputs)
    cached = _drop_last(inputs)
    cached["position_ids"] = pos[..., :-1]
    cache = DynamicCache(config=core.config)
    with torch.no_grad():
        core(**cached, past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer[0], layer[1]) for layer in cache]
    return Prefix(kv=kv, ids=cached["input_ids"], mask=cached["attention_mask"], last=inputs["input_ids"][:, -1],
                  deltas=deltas)


def _drop_last(enc: dict) -> dict:
    """The prompt without its last token (a text token: the images are untouched)."""
    return {k: (v[:, :-1] if k in SEQ_KEYS else v) for k, v in enc.items() if v is not None and k != "labels"}


def prefill_rows(model, encs: list[dict], pad_id: int, groups: list | None = None) -> Prefix:
    """:func:`prefill` of single-prompt encodings, where the prompts of a group share their leading run.

    ``groups[i]`` names prompt i's group (e.g. its policy: every prompt of a policy starts with the
    same system turn and policy text; None = on its own). For a group of two or more, the run they
    share (:func:`shared_prefix_len`) is prefilled ONCE and each prompt runs only its tail on it, a
    batch of one each; without any such group this is :func:`prefill` on the padded batch.
    """
    import torch
    import torch.nn.functional as F

    img = image_token_id(model)
    members: dict = {}
    for i, g in enumerate(groups or []):
        if g is not None:
            members.setdefault(g, []).append(i)
    heads: dict = {}
    for idx in members.values():
        k = shared_prefix_len([_drop_last(encs[i]) for i in idx], img) if len(idx) > 1 else 0
        if k > 0:
            run = (prefill_one(model, head(encs[idx[0]], k, img))[0], k)
            heads.update({i: run for i in idx})
    if not heads:
        return prefill(model, left_pad_cat(encs, pad_id))
    core = _core(model)
    dev = next(core.parameters()).device
    rows = [prefill_one(model, _drop_last(e), heads.get(i)) for i, e in enumerate(encs)]
    L = max(n for _, _, n, _ in rows)
    kv = [(torch.cat([F.pad(r[0][li][0], (0, 0, L - r[2], 0)) for r in rows]),
           torch.cat([F.pad(r[0][li][1], (0, 0, L - r[2], 0)) for r in rows])) for li in range(len(rows[0][0]))]
    ids = torch.cat([F.pad(e["input_ids"][:, :-1], (L - e["input_ids"].shape[1] + 1, 0), value=pad_id) for e in encs])
    mask = torch.cat([F.pad(torch.ones_like(e["input_ids"][:, :-1]), (L - e["input_ids"].shape[1] + 1, 0)) for e in encs])
    deltas = torch.tensor([[r[3]] for r in rows], device=dev) if _mrope(model) is not None else None
    return Prefix(kv=kv, ids=ids.to(dev), mask=mask.to(dev), last=torch.cat([e["input_ids"][:, -1] for e in encs]).to(dev),
                  deltas=deltas)


def buffered_cache(kv: list, capacity: int):
    """A ``DynamicCache`` holding ``kv`` whose layers write each new token into a preallocated buffer.

    Attention sees exactly what a ``DynamicCache`` shows it (the filled part, as a view), but a step
    does not concatenate the whole cache again (``DynamicLayer.update`` copies every layer's cache at
    every step). The buffer grows (doubling) past ``capacity``.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_buffered_layer_class()(k, v, capacity) for k, v in kv]
    cache.layer_class_to_replicate = None
    return cache


@functools.lru_cache(maxsize=None)
def _buffered_layer_class():
    """The layer class, built on first use (this module's top level imports no torch/transformers)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer over a preallocated buffer (see :func:`buffered_cache`)."""

        def __init__(self, keys, values, capacity: int, heads=None):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            n = keys.shape[2]
            self._k = keys.new_zeros(*keys.shape[:2], max(capacity, n, 1), keys.shape[3])
            self._v = values.new_zeros(*values.shape[:2], max(capacity, n, 1), values.shape[3])
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self._n = n
            self.heads = heads
            self._view()

        def _view(self):
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
            if self.heads is not None:  # read by shared_head_attention
                self.keys.trimpi_heads = self.heads

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            m = key_states.shape[2]
            if self._n + m > self._k.shape[2]:
                grow = max(self._n + m, 2 * self._k.shape[2]) - self._k.shape[2]
                self._k = torch.cat([self._k, self._k.new_zeros(*self._k.shape[:2], grow, self._k.shape[3])], 2)
                self._v = torch.cat([self._v, self._v.new_zeros(*self._v.shape[:2], grow, self._v.shape[3])], 2)
            self._k[:, :, self._n:self._n + m] = key_states
            self._v[:, :, self._n:self._n + m] = value_states
            self._n += m
            self._view()
            return self.keys, self.values

        def _unsupported(self, *a, **k):
            raise NotImplementedError("this cache is only ever extended")

        crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported

    return BufferedLayer


# ----------------------------------------------------------------------------- shared-head attention

ATTENTION = "trimpi_shared_head"
"""Name of :func:`shared_head_attention` in transformers' ``AttentionInterface``."""


def shared_head_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode-step attention of ``r`` samples per prompt over ONE copy of their prompt's cache.

    ``key``/``value`` hold each row's own tokens (fed since the prompt); ``key.trimpi_heads`` is a
    list of blocks ``(head keys, head values, head mask, r)``: prompts' caches ``[prompts, kv_heads,
    L, dim]`` (left-padded, mask ``[prompts, L]``), the block's rows being its prompts' ``r`` samples
    each, blocks in row order. Scores over the head and the row's own tokens share one softmax: the
    attention over their concatenation, without reading a prompt's cache once per sample. A prefill
    or a plain cache goes to SDPA.
    """
    import torch

    blocks = getattr(key, "trimpi_heads", None)
    if blocks is None or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n, h, _, d = query.shape
    kvh, m = key.shape[1], key.shape[2]
    rep = h // kvh
    scale = scaling if scaling is not None else d ** -0.5
    q_all, k_all, v_all = query.float(), key.float(), value.float()
    outs, start = [], 0
    for hk, hv, hmask, r in blocks:
        g = hk.shape[0]
        rows = slice(start, start + g * r)
        start += g * r
        # the block's queries grouped by prompt: [prompts, kv_heads, r * rep, dim]
        q = q_all[rows].reshape(g, r, kvh, rep, d).transpose(1, 2).reshape(g, kvh, r * rep, d)
        s_head = torch.matmul(q, hk.float().transpose(-1, -2)) * scale
        s_head = s_head.masked_fill(~hmask[:, None, None, :], float("-inf"))
        s_own = torch.matmul(q_all[rows].reshape(g * r, kvh, rep, d), k_all[rows].transpose(-1, -2)) * scale
        s_own = s_own.reshape(g, r, kvh, rep, m).transpose(1, 2).reshape(g, kvh, r * rep, m)
        w = torch.softmax(torch.cat([s_head, s_own], -1), -1)
        L = hk.shape[2]
        out = torch.matmul(w[..., :L], hv.float())  # [prompts, kv_heads, r * rep, dim]
        w_own = w[..., L:].reshape(g, kvh, r, rep, m).transpose(1, 2).reshape(g * r, kvh, rep, m)
        out = out.reshape(g, kvh, r, rep, d).transpose(1, 2).reshape(g * r, kvh, rep, d)
        outs.append(out + torch.matmul(w_own, v_all[rows]))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.reshape(n, h, 1, d).transpose(1, 2).to(query.dtype), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, shared_head_attention)


class _attention:
    """Context: the language model attends with ``name`` (its text config's attention implementation)."""

    def __init__(self, model, name: str):
        self.cfg = _core(model).config.get_text_config()
        self.name = name

    def __enter__(self):
        self.saved = self.cfg._attn_implementation
        self.cfg._attn_implementation = self.name

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.saved


def generate_from(model, prefixes, repeats: int = 1, **generate_kwargs):
    """``model.generate`` continuing every row of ``prefixes`` (a Prefix or a list of them, rows in
    order), ``repeats`` samples per row, adjacent.

    The ``repeats`` samples of a prompt attend over ONE copy of its cached prompt
    (:func:`shared_head_attention`); blocks of different lengths are not padded to each other. The
    cache holds only the tokens fed from here on (each prompt's last token, then the new ones) in a
    preallocated buffer. ``generate`` gets each row's position explicitly (``prompt length - 1 +
    mRoPE delta`` for the last prompt token), so it never needs the cached prompt's length.
    Returns what ``generate`` returns: sequences ``[rows * repeats, 1 + new]`` (the last prompt
    token, then the generated ones), or the dict output when asked for one.
    """
    import torch
    from transformers import DynamicCache

    core = _core(model)
    blocks = [prefixes] if isinstance(prefixes, Prefix) else list(prefixes)
    r = int(repeats)
    new = int(generate_kwargs.get("max_new_tokens") or 0)
    _register_attention()
    layers = []
    for li in range(len(blocks[0].kv)):
        k0, v0 = blocks[0].kv[li]
        rows = sum(b.rows for b in blocks) * r
        heads = [(b.kv[li][0], b.kv[li][1], b.mask.bool(), r) for b in blocks]
        layers.append(_buffered_layer_class()(k0.new_zeros(rows, k0.shape[1], 0, k0.shape[3]),
                                              v0.new_zeros(rows, v0.shape[1], 0, v0.shape[3]),
                                              1 + max(new, 1), heads=heads))
    cache = DynamicCache()
    cache.layers = layers
    cache.layer_class_to_replicate = None
    pos = []
    for b in blocks:
        p = b.mask.long().sum(1, keepdim=True)  # text index of the last prompt token
        pos.append(p + b.deltas.to(p.device) if b.deltas is not None else p)
    ids = torch.cat([b.last for b in blocks])[:, None].repeat_interleave(r, 0)
    generate_kwargs.pop("num_return_sequences", None)
    with _attention(model, ATTENTION):
        return core.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.cat(pos).repeat_interleave(r, 0), past_key_values=cache,
                             **generate_kwargs)
