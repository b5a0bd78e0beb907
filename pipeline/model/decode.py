"""Greedy decoding of many prompts with continuous batching over one key/value cache (evaluation).

``generate`` decodes a batch until its LONGEST response ends: rows that stopped are still computed
(as padding) and the next batch waits for the slowest row. Evaluation decodes hundreds of prompts
greedily, so :func:`greedy` keeps ``rows`` prompts in flight and replaces a row that stops by the
next prompt at once: decode steps ~ (all generated tokens) / rows instead of batches x longest.
(On the default data the responses are of similar length and this saves ~6 % of the steps, and
~10 % of the CPU time with the points below; it matters more when lengths vary, e.g. CoTs over
policies of several depths, or a model that stops early on some prompts and not on others.)

* Prompts are prefilled in padded runs of similar length (``prefill_batch``); each one's
  key/value tensors join the running cache right-aligned (every row's tokens
  end at the last column, masked padding to their left), and columns that are padding for every
  live row are dropped, so attention spans only the longest live row.
* Positions are those ``generate`` gives: the prompt's own (``prefix._positions``: text positions
  plus Qwen2/2.5-VL mRoPE), then ``prompt length + delta + k`` for the k-th new token.
* Prompts that start with the same run of tokens (the in-context suite: every record of a policy
  begins with the system turn and the policy text) may name it with ``shared``: it is prefilled
  once and each prompt runs only its own tail on a copy of that cache (:func:`shared_prefix_len`
  finds the run; it stops before any image whose pixels differ, since every image's placeholder
  tokens are the same ids).
* The cache is a ``prefix.buffered_cache`` (new tokens written in place, no per-step copy of the
  whole cache) rebuilt only when rows leave or join, and the boolean SDPA mask is passed ready-made.
* Greedy is the argmax of the float32 logits, as ``generate(do_sample=False)``. Use it only when
  :func:`plain_greedy` says the model's generation config adds no logits processor (a real Qwen
  checkpoint ships ``repetition_penalty: 1.05``); callers fall back to ``generate`` otherwise.
  Prefill helpers (``prefill_one``, ``prefill_batch``, ``head``, ``shared_prefix_len``) live in
  ``prefix.py``, shared with the RL rollout.

The prompts' order does not change a row's result in exact arithmetic; in floating point a row's
sums could in principle depend on its batch neighbours, so tests/test_decode.py compares the token
ids with ``generate`` on padded batches, and the evaluation figures were compared on the default
data before and after (benchmarks/bench_evaluate.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pipeline.model.prefix import (_core, _forward, buffered_cache, head, image_token_id,  # noqa: F401 (re-exported)
                                   prefill_batch, prefill_one, shared_prefix_len)

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


def greedy(model, prompts: Iterable[Prompt], rows: int, max_new_tokens: int, eos_ids: Iterable[int],
           on_done: Callable[[Any, list], None] | None = None) -> dict:
    """Greedy completions of ``prompts``, ``rows`` decoded together; returns {key: token ids}.

    A completion's ids stop at (and include) its first EOS, or at ``max_new_tokens``.
    ``on_done(key, ids)`` is called as each completion ends (progress bars).
    """
    import torch

    core = _core(model)
    dev = next(core.parameters()).device
    sdpa = getattr(core.config.get_text_config(), "_attn_implementation", None) == "sdpa"
    eos = set(int(e) for e in eos_ids)
    img_id = image_token_id(model)
    source = iter(prompts)
    shared: dict = {}  # name -> (kv, k): a prefilled shared run of tokens
    results: dict = {}
    live: list[_Row] = []
    cache = None  # a buffered_cache, one row per live row, right-aligned
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
            rows_kv = [] if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
            if keep is not None and rows_kv:
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                rows_kv = [(k[idx], v[idx]) for k, v in rows_kv]
            live += [r for r, _ in new]
            if not live:
                break
            L = max(r.length for r in live)
            kv = _align(rows_kv, [k for _, k in new], [r.length for r, _ in new], L)
            # written in place up to the longest any live row can grow before the next rebuild (a
            # DynamicCache would copy the whole cache at every step)
            cache = buffered_cache(kv, L + max_new_tokens)
            first = torch.tensor([r.out[0] for r, _ in new], dtype=torch.long, device=dev)
            pending = first if pending is None or not len(pending) else torch.cat([pending, first])
            keep = None
        if not live:
            break
        L = int(cache.get_seq_length())
        lengths = torch.tensor([r.length for r in live], device=dev)
        mask = torch.arange(L + 1, device=dev)[None, :] >= (L - lengths)[:, None]  # its tokens + the one fed now
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
