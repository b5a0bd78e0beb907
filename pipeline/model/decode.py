"""Greedy decoding of many prompts with continuous batching over one key/value cache (evaluation).

``generate`` decodes a batch until its LONGEST response ends: rows that stopped are still computed
(as padding) and the next batch waits for the slowest row. Evaluation decodes hundreds of prompts
greedily, so :func:`greedy` keeps ``rows`` prompts in flight and replaces a row that stops by the
next prompt at once: decode steps ~ (all generated tokens) / rows instead of batches x longest.

* Each prompt is prefilled on its own (a batch of one, no padding; :func:`prefill_one`) into a
  ``DynamicCache``; its key/value tensors join the running cache right-aligned (every row's tokens
  end at the last column, masked padding to their left), and columns that are padding for every
  live row are dropped, so attention spans only the longest live row.
* Positions are those ``generate`` gives: the prompt's own (``prefix._positions``: text positions
  plus Qwen2/2.5-VL mRoPE), then ``prompt length + delta + k`` for the k-th new token.
* Prompts that start with the same run of tokens (the in-context suite: every record of a policy
  begins with the system turn and the policy text) may name it with ``shared``: it is prefilled
  once and each prompt runs only its own tail on a copy of that cache (:func:`shared_prefix_len`
  finds the run; it stops before any image whose pixels differ, since every image's placeholder
  tokens are the same ids).
* Greedy is the argmax of the float32 logits, as ``generate(do_sample=False)``. Use it only when
  :func:`plain_greedy` says the model's generation config adds no logits processor (a real Qwen
  checkpoint ships ``repetition_penalty: 1.05``); callers fall back to ``generate`` otherwise.

The prompts' order does not change a row's result in exact arithmetic; in floating point a row's
sums could in principle depend on its batch neighbours, so tests/test_decode.py compares the token
ids with ``generate`` on padded batches, and the evaluation figures were compared on the default
data before and after (benchmarks/bench_evaluate.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pipeline.model.prefix import SEQ_KEYS, _core, _positions

# generation-config fields whose non-default values make generate() add a logits processor or change
# the search; greedy() reproduces generate() only without them
_PROCESSOR_FIELDS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "num_beams": (None, 1), "stop_strings": (None,), "max_time": (None,), "token_healing": (None, False),
}


def plain_greedy(model) -> bool:
    """True when ``generate(do_sample=False)`` on this model is a bare argmax (no logits processors)."""
    gc = getattr(_core(model), "generation_config", None)
    if gc is None:
        return True
    for name, ok in _PROCESSOR_FIELDS.items():
        v = getattr(gc, name, None)
        if v is not None and v not in ok and not (isinstance(v, (list, tuple)) and len(v) == 0):
            return False
    return True


@dataclass
class Prompt:
    """One prompt to decode: ``key`` identifies it in the result, ``enc`` is its encoding (batch of one)."""

    key: Any
    enc: dict
    shared: Any = None
    """Name of a leading run of tokens this prompt shares with others (its cache is computed once), or None."""
    shared_len: int = 0
    """Length in tokens of that run (0 = no sharing)."""


@dataclass
class _Row:
    key: Any
    pos: int
    """mRoPE/text position of the next token to feed."""
    length: int
    """Tokens of this row in the cache (prompt + fed)."""
    out: list = field(default_factory=list)


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

    from pipeline.model.prefix import left_pad_cat

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


def greedy(model, prompts: Iterable[Prompt], rows: int, max_new_tokens: int, eos_ids: Iterable[int],
           on_done: Callable[[Any, list], None] | None = None) -> dict:
    """Greedy completions of ``prompts``, ``rows`` decoded together; returns {key: token ids}.

    A completion's ids stop at (and include) its first EOS, or at ``max_new_tokens``.
    ``on_done(key, ids)`` is called as each completion ends (progress bars).
    """
    import torch
    from transformers import DynamicCache, StaticCache

    core = _core(model)
    dev = next(core.parameters()).device
    sdpa = getattr(core.config.get_text_config(), "_attn_implementation", None) == "sdpa"
    eos = set(int(e) for e in eos_ids)
    img_id = image_token_id(model)
    source = iter(prompts)
    shared: dict = {}  # name -> (kv, k): a prefilled shared run of tokens
    results: dict = {}
    live: list[_Row] = []
    cache = None  # one row per live row, right-aligned (StaticCache with SDPA, else DynamicCache)
    pending = None  # [len(live)] each live row's next token (not yet in the cache)
    keep = None  # rows of the cache still live after the last step (None = all)

    def finish(row: _Row) -> None:
        results[row.key] = row.out
        if on_done:
            on_done(row.key, row.out)

    queue: list = []  # prefilled rows waiting for a slot: (row, kv)

    def prefill_some() -> bool:
        """Prefill the next ``rows`` prompts: runs of prompts with the same inputs as ONE padded batch
        (sorted input keeps the padding small); prompts with a shared run on top of its cache."""
        chunk = list(itertools.islice(source, rows))
        done_rows = []
        i = 0
        while i < len(chunk):
            p = chunk[i]
            if p.shared is not None and p.shared_len > 0:
                if p.shared not in shared:
                    head_kv, _, k, _ = prefill_one(model, head(p.enc, p.shared_len, img_id))
                    shared[p.shared] = (head_kv, k)
                done_rows.append((p, *prefill_one(model, p.enc, shared[p.shared])))
                i += 1
                continue
            j = i
            while (j < len(chunk) and (chunk[j].shared is None or chunk[j].shared_len <= 0)
                   and set(chunk[j].enc) == set(p.enc)):
                j += 1
            done_rows += [(q, *r) for q, r in zip(chunk[i:j], prefill_batch(model, [q.enc for q in chunk[i:j]]))]
            i = j
        for p, row_kv, logits, n, delta in done_rows:
            row = _Row(key=p.key, pos=n + delta, length=n, out=[int(logits.argmax())])
            if row.out[0] in eos or max_new_tokens <= 1:
                finish(row)
            else:
                queue.append((row, row_kv))
        return bool(chunk)

    def admit():
        """The next prefilled row, or None when every prompt has been admitted."""
        while not queue:
            if not prefill_some():
                return None
        return queue.pop(0)

    while True:
        new = []
        while len(live) + len(new) < rows:
            got = admit()
            if got is None:
                break
            new.append(got)
        if new or keep is not None:  # the row set changed: rebuild the cache, right-aligned and trimmed
            n_cached = 0 if cache is None else int(cache.get_seq_length())
            rows_kv = [] if cache is None else [(layer.keys[:, :, :n_cached], layer.values[:, :, :n_cached])
                                                for layer in cache.layers]
            if keep is not None and rows_kv:
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                rows_kv = [(k[idx], v[idx]) for k, v in rows_kv]
            live += [r for r, _ in new]
            if not live:
                break
            L = max(r.length for r in live)
            kv = _align(rows_kv, [k for _, k in new], [r.length for r, _ in new], L)
            if sdpa:
                # written in place up to the longest any live row can grow before the next rebuild; a
                # DynamicCache would copy the whole cache at every step
                cache = StaticCache(config=core.config, max_cache_len=L + max_new_tokens)
                for li, (k, v) in enumerate(kv):
                    cache.update(k, v, li)
            else:
                cache = DynamicCache(ddp_cache_data=kv, config=core.config)
            first = torch.tensor([r.out[0] for r, _ in new], dtype=torch.long, device=dev)
            pending = first if pending is None or not len(pending) else torch.cat([pending, first])
            keep = None
        if not live:
            break
        L = int(cache.get_seq_length())
        lengths = torch.tensor([r.length for r in live], device=dev)
        cols = torch.arange(cache.get_max_length() if sdpa else L + 1, device=dev)[None, :]
        mask = (cols >= (L - lengths)[:, None]) & (cols <= L)  # the row's tokens + the one fed now
        # SDPA takes the boolean [rows, 1, 1, columns] mask transformers would build from a 2-D one
        # (one query per row, no causal part); passing it skips rebuilding it every step (~10 %)
        mask = mask[:, None, None, :] if sdpa else mask.long()
        pos = torch.tensor([r.pos for r in live], device=dev).view(1, -1, 1).expand(3, -1, -1)
        out = _forward(model, {"input_ids": pending[:, None], "attention_mask": mask}, cache, pos)
        pending = out.logits[:, -1].float().argmax(-1)
        done = []
        for i, (r, t) in enumerate(zip(live, pending.tolist())):
            r.pos += 1
            r.length += 1
            r.out.append(t)
            if t in eos or len(r.out) >= max_new_tokens:
                done.append(i)
        if done:
            for i in done:
                finish(live[i])
            keep = [i for i in range(len(live)) if i not in set(done)]
            live = [live[i] for i in keep]
            pending = pending[torch.tensor(keep, dtype=torch.long, device=dev)]
    return results


def _align(old: list, new_kv: list, new_len: list[int], L: int) -> list:
    """Per layer (keys, values): the old rows then the new ones, each keeping its last real columns,
    left-padded with zeros (masked) to length L."""
    import torch
    import torch.nn.functional as F

    def fit(t, n):
        t = t[:, :, -n:] if n < t.shape[2] else t
        t = t[:, :, -L:] if t.shape[2] > L else t
        return F.pad(t, (0, 0, L - t.shape[2], 0)) if t.shape[2] < L else t

    n_layers = len(old) if old else len(new_kv[0])
    out = []
    for li in range(n_layers):
        ks = ([fit(old[li][0], L)] if old else []) + [fit(kv[li][0], n) for kv, n in zip(new_kv, new_len)]
        vs = ([fit(old[li][1], L)] if old else []) + [fit(kv[li][1], n) for kv, n in zip(new_kv, new_len)]
        out.append((torch.cat(ks), torch.cat(vs)))
    return out
