"""Rollouts for PolicyRollout RL: prompts, sampling, rewards, and scoring on the policy-free prompt.

* :class:`PromptCache` encodes each record's two prompts (without / with the policy) once and
  keeps them; policies are rendered once per name, images decoded once per record.
* :func:`rollout` samples G responses per prompt from the policy-free prompt and, under
  PolicyRollout, G more from the policy-aware prompt. Each prompt is prefilled ONCE (the
  policy-aware prompts of one policy share the prefill of its text) and its G samples attend over
  one copy of its key/value cache; one ``generate`` call per chunk samples all 2G responses per
  prompt (``pipeline/model/prefix.py``). Before, ``num_return_sequences=G`` prefilled every
  sample's copy of the long policy prompt, which made a PoRo step 1.37x a GRPO step (issue 17).
  The sampled token ids are kept as sampled; they are never re-tokenized from text, so the scores
  below are of exactly the tokens that were generated.
* :func:`response_logprobs` scores responses as continuations of ONE prompt, always the
  policy-free one in training: the prompt is shared by all rows, the images go through the
  vision tower once per call (``mm_encoder_outputs``) with gradient.

Advantages and the loss live in ``rl.py``; this module only produces (prompt, responses, rewards).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.model.prefix import SEQ_KEYS, left_pad_cat  # noqa: F401 (re-exported: rl.py, tests)
from pipeline.train.rl_config import RLConfig


# ----------------------------------------------------------------------------- rewards


def task_reward(record, text: str) -> tuple[float, float]:
    """(accuracy, format) of one response. ClevrPolicy: exact match of the boxed answer; GTAPolicy:
    0.5 tool + 0.5 args from the GTA scorers; anything else: exact match."""
    from pipeline.model.prompts import format_ok, parse_answer

    fmt = 1.0 if format_ok(text) else 0.0
    pred = parse_answer(text)
    if pred is None:
        return 0.0, fmt
    if record.task == "gta":
        from pipeline.evaluate.gta_scoring import reward

        return float(reward(pred, record.answer)), fmt
    return (1.0 if pred.strip() == record.answer.strip() else 0.0), fmt


# ----------------------------------------------------------------------------- prompts and rollouts


@dataclass
class Group:
    """One prompt and all its sampled responses (G free + G policy-aware under PoRo)."""

    record: Any
    prompt: dict
    """The POLICY-FREE prompt, batch of one, as the processor encoded it: every score uses this."""
    responses: list = field(default_factory=list)
    """Sampled token ids per response (EOS included when the model stopped)."""
    with_policy: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    acc: list = field(default_factory=list)
    fmt: list = field(default_factory=list)
    rewards: Any = None
    adv: Any = None
    old_logp: list | None = None
    ref_logp: list | None = None


class PromptCache:
    """Encodes each record's policy-free and policy-aware prompt once and keeps the last ``size``.

    Policies are rendered once per name; images are decoded once per record. The two prompts of a
    record differ only by the policy parts (``build_messages`` contract).
    """

    def __init__(self, processor, stores: dict, policies: dict, multimodal: dict, size: int = 512):
        from pipeline.policy import RenderCache

        self.processor, self.stores, self.policies, self.multimodal = processor, stores, policies, multimodal
        self.size = size
        self._render = RenderCache()
        self._cache: OrderedDict = OrderedDict()

    def rendered(self, source: str, record):
        from pipeline.policy import resolve_policy

        return self._render(resolve_policy(record, self.policies, source), self.multimodal.get(source, False))

    def get(self, item, with_policy: bool) -> dict:
        """Encoded prompt of ``item`` = (source data dir, record), with or without its policy."""
        source, record = item
        k = (source, record.id, with_policy)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        from pipeline.model.masking import encode
        from pipeline.model.prompts import build_messages

        store = self.stores[source]
        images = [store.open(ref) for ref in record.images]
        policy = self.rendered(source, record) if with_policy else None
        enc = encode(self.processor, [build_messages(record, images, policy=policy)], add_generation_prompt=True)
        enc = {k2: v for k2, v in enc.items() if v is not None and k2 != "labels"}
        self._cache[k] = enc
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return enc


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def split_responses(rows, eos: set[int], pad_id: int) -> list:
    """Generated rows -> per-row token ids up to and including the first EOS (no padding)."""
    out = []
    for row in rows:
        ids = row.tolist()
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
        if cut is None:  # truncated at max_response_len: generate pads only after EOS, so keep all
            cut = len(ids)
        out.append(row[:cut].clone())
    return out


@contextlib.contextmanager
def gathered(model, zero_stage: int):
    """ZeRO-3 shards parameters: gather them ONCE around all generate calls of a rollout batch."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def rollout(model, processor, items: list, prompts: PromptCache, cfg: RLConfig,
            reward_fn: Callable = task_reward, share_prefix: bool = True) -> list[Group]:
    """Sample G (or G + G with the policy) responses per item = (source, record) and score them.

    Per chunk of ``generation_batch`` prompts, each prompt is prefilled ONCE
    (:func:`pipeline.model.prefix.prefill_rows`) and ONE ``generate`` call samples all 2G responses
    per prompt, each prompt's samples attending over one copy of its cache
    (:func:`pipeline.model.prefix.generate_from`). ``share_prefix=False`` is the reference path:
    one plain ``generate`` over the same rows, every sample prefilling its own copy of the prompt;
    under a fixed seed both give the same tokens.
    """
    import torch

    from pipeline.model import prefix as px
    from pipeline.model.masking import visual_token_ids

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = _eos_ids(model, tok)
    G = cfg.group_size
    dev = next(model.parameters()).device
    # a sampled <|image_pad|> would be taken for an image slot when the response is scored
    suppress = visual_token_ids(tok)
    halves = (False, True) if cfg.policy_rollout else (False,)
    kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
              max_new_tokens=cfg.max_response_len, pad_token_id=pad_id, eos_token_id=sorted(eos),
              suppress_tokens=suppress)
    share = share_prefix and px.supported(model)
    groups = []
    for start in range(0, len(items), cfg.generation_batch):
        chunk = items[start:start + cfg.generation_batch]
        encs = {wp: [prompts.get(it, wp) for it in chunk] for wp in halves}
        with torch.no_grad():
            if share:
                # each half prefilled as its own batch (a short policy-free prompt is never padded to the
                # policy-aware length); the policy-aware prompts of one policy share its text, prefilled
                # once per chunk; then one decode loop for all 2G samples of every prompt
                pres = [px.prefill_rows(model, encs[wp], pad_id, [it[1].policy for it in chunk] if wp else None)
                        for wp in halves]
                out = px.generate_from(model, pres, G, **kw)
                rows = split_responses(out[:, 1:].cpu(), eos, pad_id)  # after the last prompt token
            else:
                batch = left_pad_cat([e for wp in halves for e in encs[wp]], pad_id)
                batch = {k: v.to(dev) for k, v in batch.items()}
                out = model.generate(**batch, num_return_sequences=G, **kw)
                rows = split_responses(out[:, batch["input_ids"].shape[1]:].cpu(), eos, pad_id)
        n = len(chunk) * G
        resp = {wp: rows[h * n:(h + 1) * n] for h, wp in enumerate(halves)}
        for i, item in enumerate(chunk):
            rec = item[1]
            g = Group(record=rec, prompt=prompts.get(item, False))
            for wp in halves:
                part = resp[wp][i * G:(i + 1) * G]
                g.responses += part
                g.with_policy += [wp] * len(part)
            g.texts = tok.batch_decode(g.responses, skip_special_tokens=True)
            for text in g.texts:
                a, f = reward_fn(rec, text)
                g.acc.append(a)
                g.fmt.append(f)
            g.rewards = torch.tensor([cfg.w_acc * a + cfg.w_fmt * f for a, f in zip(g.acc, g.fmt)])
            groups.append(g)
    return groups


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def response_logprobs(model, prompt: dict, responses: list, temperature: float = 1.0):
    """log pi(response token | prompt, previous tokens) for responses continuing ONE prompt.

    The prompt's images go through the vision tower once and the features are shared by every row
    (``mm_encoder_outputs``), so a micro-batch of n responses costs one image encoding, with
    gradient. Returns (logp [n, L], mask [n, L]) with responses right-padded to L.
    """
    import torch

    core = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    dev = next(core.parameters()).device
    prompt = {k: v.to(dev) for k, v in prompt.items()}
    n = len(responses)
    L = max(int(r.numel()) for r in responses)
    P = prompt["input_ids"].shape[1]
    resp = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :r.numel()] = r
        mask[i, :r.numel()] = 1
    resp, mask = resp.to(dev), mask.to(dev)
    kw = {"input_ids": torch.cat([prompt["input_ids"].expand(n, P), resp], 1),
          "attention_mask": torch.cat([prompt["attention_mask"].expand(n, P), mask], 1)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in prompt:
            kw[key] = torch.cat([prompt[key].expand(n, P), torch.zeros(n, L, dtype=prompt[key].dtype, device=dev)], 1)
    if "pixel_values" in prompt:
        grid = prompt.get("image_grid_thw")
        if grid is not None:
            kw["image_grid_thw"] = grid.repeat(n, 1)
        if _accepts(core, "mm_encoder_outputs") and hasattr(core, "get_image_features"):
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            feats = core.get_image_features(prompt["pixel_values"], grid, return_dict=True).pooler_output
            kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats) * n)}
        else:
            kw["pixel_values"] = prompt["pixel_values"].repeat(n, *([1] * (prompt["pixel_values"].dim() - 1)))
    logits = model(**kw, logits_to_keep=L + 1).logits[:, :L].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, resp[..., None])[..., 0]
    return logp * mask, mask


def chunks(n: int, size: int):
    """Index lists of consecutive micro-batches."""
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def score_groups(model, groups: list[Group], cfg: RLConfig, attr: str) -> None:
    """Fill ``group.<attr>`` (``old_logp`` / ``ref_logp``) with per-response log-probs on the policy-free prompt."""
    import torch

    with torch.no_grad():
        for g in groups:
            rows: list = []
            for idx in chunks(len(g.responses), cfg.micro_batch):
                lp, m = response_logprobs(model, g.prompt, [g.responses[i] for i in idx], cfg.temperature)
                rows += [lp[j, :int(m[j].sum())].float().cpu() for j in range(len(idx))]
            setattr(g, attr, rows)
