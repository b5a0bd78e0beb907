"""Stage 3: GRPO / DAPO with PolicyRollout for a vision-language model, as one compact loop.

One RL step, in the spirit of nanochat's ``chat_rl.py``::

    prompts   <- next rollout_batch records (query + images; never the policy)
    rollouts  <- per prompt, G samples WITHOUT the policy and (PolicyRollout) G samples WITH the
                 policy text + policy images in context; one ``generate`` call per half of every
                 generation_batch prompts, each prompt's images encoded once for its G samples
    rewards   <- w_acc * accuracy + w_fmt * format, per response
    advantage <- (r - mean) / (std + 1e-6) over the prompt's whole group (all 2G together)
    [DAPO]    <- drop groups whose rewards are all equal, sample new prompts, at most max_retries rounds
    update    <- clipped-ratio policy gradient (+ beta * k3 KL to the frozen start checkpoint),
                 rollout_batch / update_batch optimizer steps, micro-batched

Why our own loop rather than TRL's GRPOTrainer: TRL treats injected completions as on-policy
(its old log-probs are the sampling ones, i.e. the WITH-policy prompt for the PoRo half) and its
``rollout_func`` drops structured images, so an exact PolicyRollout needed surgery in
``_generate`` and ``_compute_loss`` (environment-notes §3.3). This file is the whole algorithm
instead, and every number in the loss has one obvious origin. Without PolicyRollout the loss is
TRL's: ``tests/test_rl_reference.py`` checks loss and gradient against ``GRPOTrainer._compute_loss``.

Where this departs from textbook GRPO (DeepSeekMath) and DAPO, on purpose:

* PolicyRollout (TriMPI §4.3): the G policy-aware responses are scored, for everything
  (old log-probs, ratio, reference KL, gradient), as continuations of the POLICY-FREE prompt, as
  if they had been sampled from it. Their importance ratio is therefore pi_theta(o|Q,I) /
  pi_old(o|Q,I), not a correction towards the distribution that actually sampled them
  (pi_old(o|Q,I,P)); the paper does the same. ``policy_rollout: false`` is plain GRPO/DAPO.
* Log-probs are taken at the sampling temperature (logits / T), as verl/TRL do, so ratios compare
  like with like; at T=1 this is the textbook quantity.
* When one optimizer step consumes the whole rollout batch (update_batch == rollout_batch and
  ppo_epochs == 1), old log-probs are the detached current ones (ratio exactly 1, as in TRL),
  saving a forward pass; otherwise they are recomputed on the policy-free prompt before updating.
* KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token, added to the loss (GRPO);
  DAPO has none and loads no reference model. DAPO's overlong-response reward shaping is not
  implemented (truncated responses simply score 0 accuracy unless they already boxed an answer).
* Visual placeholder tokens (``<|image_pad|>`` ...) are suppressed while sampling (a sampled one
  would be read as an image slot when scoring); the scored log-probs ignore that suppression.
* std is the unbiased group standard deviation; a zero-variance group gets advantage exactly 0,
  so it contributes no policy-gradient term (only KL, for GRPO).
* DAPO dynamic sampling counts one "retry" per extra generation round of a step; when the cap is
  hit the run stops early (paper Table 6 '*'), keeping the model from the last full step.

Distributed (same DeepSpeed engine as cpt/sft, ``pipeline/train/engine.py``):

* laptop / CI: ``trimpi train rl --model models/sft --data data/clevr --policies policies --out models/rl``
  (one process, gloo, ZeRO-0).
* one node, 8 GPUs: ``deepspeed --no_local_rank --num_gpus 8 -m pipeline.cli train rl ... --set deepspeed=zero2``
* several nodes: ``deepspeed --no_local_rank --hostfile infra/deepspeed/hostfile -m pipeline.cli train rl ...
  --set deepspeed=zero3``. ``rollout_batch`` is per rank (each rank draws its own prompts; a DAPO
  early stop is agreed by all ranks); under ZeRO-3 the
  parameters are gathered once per rollout batch (``deepspeed.zero.GatheredParameters`` around all
  ``generate`` calls of a step), never per token.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

from pipeline.train.rl_config import RLConfig
from pipeline.train.rl_rollout import (Group, PromptCache, chunks, gathered, response_logprobs,  # noqa: F401
                                       rollout, score_groups, task_reward)

log = logging.getLogger("trimpi.rl")

# ----------------------------------------------------------------------------- the math (pure tensors)


def group_advantages(rewards, eps: float = 1e-6):
    """[n_groups, n_per_group] rewards -> advantages normalized within each row (all 2G together)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else rewards.new_zeros(rewards.shape[0], 1)
    return (rewards - mean) / (std + eps)


def zero_variance(rewards) -> list[bool]:
    """Per group: are all rewards equal (no learning signal, DAPO drops it)?"""
    return [bool((r.max() - r.min()).abs() <= 1e-9) for r in rewards]


def policy_loss(logp, old_logp, adv, mask, clip_low: float, clip_high: float, *, ref_logp=None,
                beta: float = 0.0, agg: str = "token_mean", denom: float | None = None):
    """Clipped surrogate (+ beta * k3 KL) for a micro-batch of responses.

    ``logp``/``old_logp``/``ref_logp``/``mask``: [n, L] per response token; ``adv``: [n].
    ``denom`` is the normalizer of the WHOLE update batch (its token count for ``token_mean``,
    its response count for ``seq_mean_token_mean``), so summing the micro-batch losses gives the
    batch loss exactly. Returns (loss, stats) where stats hold sums for logging.
    """
    import torch

    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.to(logp.device, logp.dtype)[:, None]
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_tok = torch.maximum(unclipped, clipped)
    kl = None
    if beta and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_tok = per_tok + beta * kl
    if agg == "token_mean":
        loss = (per_tok * mask).sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    elif agg == "seq_mean_token_mean":
        per_seq = (per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_seq.sum() / (denom if denom is not None else per_seq.numel())
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")
    with torch.no_grad():
        stats = {"tokens": float(mask.sum()),
                 "clipped": float(((clipped > unclipped) * mask).sum()),
                 "kl_sum": float((kl * mask).sum()) if kl is not None else 0.0,
                 "approx_kl_old_sum": float(((old_logp - logp) * mask).sum())}
    return loss, stats


def _pad(rows: list, L: int):
    import torch

    out = torch.zeros(len(rows), L)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out


def update(engine, groups: list[Group], cfg: RLConfig) -> dict:
    """Optimizer steps over one rollout batch; returns summed statistics for the step's log row.

    ``cfg`` must be :meth:`RLConfig.resolved`. Every forward here scores responses on the
    policy-free prompt (``group.prompt``), the PolicyRollout half included.
    """
    agg = {"tokens": 0.0, "clipped": 0.0, "kl_sum": 0.0, "approx_kl_old_sum": 0.0, "loss": 0.0,
           "grad_norm": 0.0, "updates": 0}
    for _ in range(cfg.ppo_epochs):
        for ub in (groups[s:s + cfg.update_batch] for s in range(0, len(groups), cfg.update_batch)):
            n_resp = sum(len(g.responses) for g in ub)
            n_tok = sum(int(r.numel()) for g in ub for r in g.responses)
            denom = float(n_tok if cfg.loss_agg == "token_mean" else n_resp)
            for g in ub:
                for idx in chunks(len(g.responses), cfg.micro_batch):
                    resp = [g.responses[i] for i in idx]
                    logp, mask = response_logprobs(engine, g.prompt, resp, cfg.temperature)
                    L = logp.shape[1]
                    old = _pad([g.old_logp[i] for i in idx], L).to(logp) if g.old_logp is not None else logp.detach()
                    ref = _pad([g.ref_logp[i] for i in idx], L).to(logp) if g.ref_logp is not None else None
                    loss, st = policy_loss(logp, old, g.adv[idx], mask, cfg.clip_low, cfg.clip_high,
                                           ref_logp=ref, beta=cfg.kl_beta, agg=cfg.loss_agg, denom=denom)
                    engine.backward(loss)
                    agg["loss"] += float(loss.detach())
                    for k in ("tokens", "clipped", "kl_sum", "approx_kl_old_sum"):
                        agg[k] += st[k]
            agg["grad_norm"] += float(engine.step() or 0.0)
            agg["updates"] += 1
    return agg


# ----------------------------------------------------------------------------- prompt stream + dynamic sampling


class PromptStream:
    """Endless shuffled passes over the training prompts (a new permutation per pass, from the seed).

    Its (pass, position) state is checkpointed, so a resumed run sees exactly the prompts an
    uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.pass_, self.pos = n, seed, 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1000003 + self.pass_).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.pass_, self.pos = self.pass_ + 1, 0
            order = self._order()
            m = min(k - len(out), self.n - self.pos)
            out += order[self.pos:self.pos + m]
            self.pos += m
        return out

    def state(self) -> dict:
        return {"pass": self.pass_, "pos": self.pos}

    def load(self, st: dict) -> None:
        self.pass_, self.pos = int(st["pass"]), int(st["pos"])


def collect_groups(stream: PromptStream, items: list, need: int, rollout_fn: Callable, cfg: RLConfig):
    """Rollouts for one step. With dynamic sampling, groups with all-equal rewards are dropped and
    new prompts are sampled; each extra round is a retry and at most ``cfg.max_retries`` are made.

    Returns (kept groups, info); ``info["exhausted"]`` is True when the cap left the batch short.
    """
    kept: list[Group] = []
    info = {"generated": 0, "zero_var": 0, "retries": 0, "exhausted": False, "groups": []}
    rounds = 0
    while len(kept) < need:
        if rounds > 0:
            if info["retries"] >= cfg.max_retries:
                info["exhausted"] = True
                break
            info["retries"] += 1
        rounds += 1
        groups = rollout_fn([items[i] for i in stream.take(need - len(kept))])
        for g in groups:  # advantages over the prompt's WHOLE group: free and policy-aware together
            g.adv = group_advantages(g.rewards[None])[0]
        for g, zv in zip(groups, zero_variance([g.rewards for g in groups])):
            info["generated"] += 1
            info["zero_var"] += int(zv)
            info["groups"].append(g)
            if not (zv and cfg.dynamic_sampling):
                kept.append(g)
        if not cfg.dynamic_sampling:
            break
    return kept[:need], info


# ----------------------------------------------------------------------------- one step, logged


def step_row(step: int, info: dict, kept: list[Group], upd: dict, cfg: RLConfig) -> dict:
    """The train_log.csv row of one step: rewards per half over every generated group (the policy
    being trained), zero-variance fraction, KL, clip fraction, response lengths."""
    def mean(xs):
        return round(sum(xs) / len(xs), 6) if xs else None

    allg = info["groups"]
    half = {wp: [(float(r), a, len(t)) for g in allg for r, a, t, w in
                 zip(g.rewards.tolist(), g.acc, g.responses, g.with_policy) if w == wp] for wp in (False, True)}
    tok = max(upd["tokens"], 1.0)
    return {
        "step": step,
        "reward": mean([x[0] for h in half.values() for x in h]),
        "reward_free": mean([x[0] for x in half[False]]),
        "reward_policy": mean([x[0] for x in half[True]]),
        "acc_free": mean([x[1] for x in half[False]]),
        "acc_policy": mean([x[1] for x in half[True]]),
        "zero_var_frac": round(info["zero_var"] / max(info["generated"], 1), 6),
        "groups_kept": len(kept),
        "retries": info["retries"],
        "kl": round(upd["kl_sum"] / tok, 8) if cfg.kl_beta else None,
        "approx_kl_old": round(upd["approx_kl_old_sum"] / tok, 8),
        "clip_frac": round(upd["clipped"] / tok, 6),
        "resp_len": mean([x[2] for h in half.values() for x in h]),
        "resp_len_free": mean([x[2] for x in half[False]]),
        "resp_len_policy": mean([x[2] for x in half[True]]),
        "loss": round(upd["loss"] / max(upd["updates"], 1), 8),
        "grad_norm": round(upd["grad_norm"] / max(upd["updates"], 1), 6),
    }


LOG_FIELDS = ["step", "reward", "reward_free", "reward_policy", "acc_free", "acc_policy", "zero_var_frac",
              "groups_kept", "retries", "kl", "approx_kl_old", "clip_frac", "resp_len", "resp_len_free",
              "resp_len_policy", "loss", "grad_norm", "gen_s", "update_s"]


def rl_step(engine, ref_model, stream: PromptStream, items: list, prompts: PromptCache, processor,
            cfg: RLConfig, step: int, seed: int, reward_fn: Callable = task_reward):
    """Collect one rollout batch and update on it. Returns (log row, stopped_early)."""
    import torch

    model = getattr(engine, "module", engine)
    t0 = time.time()
    model.eval()
    torch.manual_seed(seed * 7919 + step)  # sampling is reproducible per step (and across a resume)
    with gathered(model, getattr(engine, "zero_stage", 0)):
        kept, info = collect_groups(stream, items, cfg.rollout_batch,
                                    lambda batch: rollout(model, processor, batch, prompts, cfg, reward_fn), cfg)
    if info["exhausted"]:
        return step_row(step, info, kept, _empty_update(), cfg) | {"gen_s": round(time.time() - t0, 3)}, True
    several = cfg.ppo_epochs > 1 or cfg.update_batch < cfg.rollout_batch
    if several:  # later optimizer steps are off-policy: freeze pi_old now, on the policy-free prompt
        score_groups(model, kept, cfg, "old_logp")
    if ref_model is not None and cfg.kl_beta:
        score_groups(ref_model, kept, cfg, "ref_logp")
    t1 = time.time()
    model.train()
    upd = update(engine, kept, cfg)
    model.eval()
    row = step_row(step, info, kept, upd, cfg)
    row.update(gen_s=round(t1 - t0, 3), update_s=round(time.time() - t1, 3))
    return row, False


def _empty_update() -> dict:
    return {"tokens": 0.0, "clipped": 0.0, "kl_sum": 0.0, "approx_kl_old_sum": 0.0, "loss": 0.0,
            "grad_norm": 0.0, "updates": 0}


# ----------------------------------------------------------------------------- DeepSpeed engine


class RLEngine:
    """The shared :class:`pipeline.train.engine.Engine` with the surface ``update`` needs.

    DeepSpeed's gradient accumulation is the number of micro-batches per optimizer step (fixed:
    every group has G or 2G responses), so ZeRO-2/3 reduce gradients at the right boundary. The
    loss handed to ``backward`` is already normalized over the whole update batch, so the 1/GAS
    DeepSpeed applies is undone here; ``step`` returns the global gradient norm.
    """

    def __init__(self, model, cfg: RLConfig, total_steps: int, ckpt_dir, fingerprint: dict, seed: int):
        from pipeline.train.engine import Engine, TrainConfig

        per_group = math.ceil(cfg.group_size * (2 if cfg.policy_rollout else 1) / cfg.micro_batch)
        self.gas = cfg.update_batch * per_group
        updates = total_steps * cfg.ppo_epochs * (cfg.rollout_batch // cfg.update_batch)
        tc = TrainConfig(epochs=cfg.epochs, max_steps=updates, lr=cfg.lr, batch_size=1, grad_accum=self.gas,
                         warmup_ratio=0.0, lr_schedule="constant", weight_decay=cfg.weight_decay,
                         max_grad_norm=cfg.grad_clip,
                         deepspeed=cfg.deepspeed, save_every=cfg.save_every, resume=True)
        self.eng = Engine(model, tc, updates, ckpt_dir, fingerprint=fingerprint, seed=seed)
        self.module = self.eng.module
        self.zero_stage = self.eng.zero_stage

    def __call__(self, **kw):
        return self.eng.forward(**kw)

    def backward(self, loss) -> None:
        self.eng.backward(loss * self.gas)
        self.eng.step()  # DeepSpeed only steps the optimizer at the accumulation boundary

    def step(self) -> float:
        norm = self.eng.grad_norm()
        return norm if norm is not None else 0.0


# ----------------------------------------------------------------------------- the stage


def load_items(data_dirs: list[str], cfg: RLConfig, policies: dict):
    """(items, stores, multimodal) from the ``--data`` dirs: items are (data dir, Record); every
    record's policy is resolved up front (a stale record fails before any model is loaded)."""
    from pipeline.data.records import open_dataset
    from pipeline.io import input_error
    from pipeline.policy import resolve_policy

    items, stores, multimodal = [], {}, {}
    for d in data_dirs:
        ds = open_dataset(d, {"auto": None, "on": True, "off": False}[cfg.policy_multimodal])
        path = ds.root / cfg.data_file
        recs = ds.records(cfg.data_file)
        if cfg.max_prompts:
            recs = recs[:cfg.max_prompts]
        stores[d], multimodal[d] = ds.store, ds.multimodal
        for r in recs:
            if not r.policy:
                raise input_error(path, f"record {r.id}.policy", "a policy name (RL needs it for PolicyRollout)", "")
            resolve_policy(r, policies, path)
        items += [(d, r) for r in recs]
    if len(items) < cfg.rollout_batch:
        raise input_error(data_dirs[0], cfg.data_file, f"at least rl.rollout_batch={cfg.rollout_batch} prompts",
                          len(items))
    return items, stores, multimodal


def response_budget_of(data_dirs: list[str], items: list, tokenizer) -> int:
    """The rollout budget from the gold CoTs of the data (``cot.jsonl``; RL's own answer-only records
    have none): long enough that a depth-6 chain is never cut before its ``\\boxed{}``."""
    from pipeline.data.records import read_records
    from pipeline.model.prompts import response_budget

    recs = [r for d in data_dirs if (Path(d) / "cot.jsonl").exists() for r in read_records(Path(d) / "cot.jsonl")]
    return response_budget(tokenizer, recs or [r for _, r in items])


def filter_long(items: list, prompts: PromptCache, cfg: RLConfig) -> tuple[list, int]:
    """Drop prompts (with their policy, under PoRo) longer than max_prompt_len; count them."""
    keep = []
    for it in items:
        n = max(prompts.get(it, wp)["input_ids"].shape[1] for wp in ((False, True) if cfg.policy_rollout else (False,)))
        if n <= cfg.max_prompt_len:
            keep.append(it)
    return keep, len(items) - len(keep)


def configure_train(parser) -> None:
    from pipeline.train.runner import add_common_args

    # --model is the starting checkpoint (the CoT-SFT model) and also the KL reference
    add_common_args(parser, policies=True)


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one (a stop must be collective, or the others hang)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def run_train(args) -> int:
    from pipeline.config import load_base, load_section

    base = load_base(args.params)
    cfg = load_section(RLConfig, "rl", args.params, args.overrides).check(args.params).resolved()
    train_rl(cfg, args.model, args.data, args.policies, args.out, seed=base.seed, threads=base.threads,
             ckpt_dir=args.ckpt_dir, metrics_path=args.metrics, log_path=args.log)
    return 0


def train_rl(cfg: RLConfig, model_path: str, data_dirs: list[str], policies: str, out: str, seed: int = 0,
             threads: int = 1, ckpt_dir: str | None = None, metrics_path: str | None = None,
             log_path: str | None = None, reward_fn: Callable = task_reward) -> dict:
    """Library entry point of the stage (CLI and tests): RL from ``model_path`` into ``out``."""
    from dataclasses import asdict

    from tqdm import tqdm

    from pipeline.io import input_error
    from pipeline.model import load
    from pipeline.policy import load_policies, policies_version
    from pipeline.train.runner import (ckpt_path, export_checkpoint, fingerprint, freeze_vision_if, plain_model,
                                       publish, start)

    cfg = cfg.resolved()
    rank, world = start(threads, seed)
    model, processor = load(model_path, threads=threads)
    ref_model = None
    if cfg.kl_beta:  # the frozen reference is the starting checkpoint itself
        ref_model, _ = load(model_path, threads=threads)
        ref_model.requires_grad_(False)
    freeze_vision_if(model, cfg.freeze_vision, model_path)
    pols = load_policies(policies)
    items, stores, multimodal = load_items(data_dirs, cfg, pols)
    if not cfg.max_response_len:
        cfg = dataclasses.replace(cfg, max_response_len=response_budget_of(data_dirs, items, processor.tokenizer))
        print(f"rl: max_response_len {cfg.max_response_len} (longest gold response of the data + 25 %)")
    prompts = PromptCache(processor, stores, pols, multimodal)
    items, skipped = filter_long(items, prompts, cfg)
    if len(items) < cfg.rollout_batch:
        raise input_error(data_dirs[0], "rl.max_prompt_len", f"at least {cfg.rollout_batch} prompts that fit",
                          f"{len(items)} ({skipped} too long)")
    steps = cfg.epochs * (len(items) // cfg.rollout_batch)
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    # what a resumable checkpoint must match: input model, data, policies, config
    fp = fingerprint(model_path, data_dirs, cfg.data_file, {"policies": policies_version(policies), "rl": asdict(cfg)})
    engine = RLEngine(model, cfg, steps, ckpt_path("rl", out, ckpt_dir), fp, seed)
    stream = PromptStream(len(items), seed * 7 + rank)  # rollout_batch is per rank: each rank its own prompts
    state = engine.eng.load_state() or {}
    rows: list[dict] = list(state.get("rows", []))
    start = int(state.get("step", 0))
    if "stream" in state:
        stream.load(state["stream"])
    stopped, reason, t0 = False, "", time.time()
    bar = tqdm(range(start, steps), desc=f"rl {cfg.algorithm}{'+poro' if cfg.policy_rollout else ''}",
               initial=start, total=steps, disable=rank != 0)
    for step in bar:
        row, stopped = rl_step(engine, ref_model, stream, items, prompts, processor, cfg, step, seed + rank,
                               reward_fn)
        rows.append(row)
        bar.set_postfix(reward=row["reward"], zero_var=row["zero_var_frac"])
        if _any_rank(stopped):
            stopped = True
            reason = (f"DAPO dynamic sampling hit the retry cap ({cfg.max_retries} retries) at step {step}: "
                      f"stopped early after {step} full steps")
            log.warning(reason)
            print(f"rl: {reason}")
            rows[-1]["stopped"] = True
            break
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            engine.eng.save_state({"step": step + 1, "stream": stream.state(), "rows": rows})
    done = len(rows) - (1 if stopped else 0)
    metrics = summarize(rows, cfg, steps, done, stopped, reason, skipped, time.time() - t0)
    metrics.update(resumed_from_step=start, world_size=world, zero_stage=engine.eng.zero_stage, prompts=len(items))
    sd = engine.eng.full_state_dict()
    if rank == 0:
        export_checkpoint(out, plain_model(engine.module, sd, engine.eng.zero_stage), processor, parent=model_path,
                          stage="rl", metrics=metrics, write_log=lambda path: write_log(path, rows),
                          card={"rl": {"algorithm": cfg.algorithm, "policy_rollout": cfg.policy_rollout}})
        publish(out, metrics_path, log_path)
        print(f"rl: {done}/{steps} steps, reward {metrics['reward_first']} -> {metrics['reward_last']}"
              + (" (stopped early)" if stopped else "") + f" -> {out}")
    engine.eng.finish()
    return metrics


def summarize(rows, cfg, planned, done, stopped, reason, skipped, seconds) -> dict:
    def avg(key, part):
        xs = [r[key] for r in part if r.get(key) is not None]
        return round(sum(xs) / len(xs), 6) if xs else None

    k = max(1, min(3, len(rows) // 2))
    last = rows[-k:] if rows else []
    from dataclasses import asdict

    return {"algorithm": cfg.algorithm, "policy_rollout": cfg.policy_rollout, "steps_planned": planned,
            "steps_done": done, "stopped_early": stopped, "stop_reason": reason, "prompts_too_long": skipped,
            "reward_first": avg("reward", rows[:k]), "reward_last": avg("reward", last),
            "reward_free_last": avg("reward_free", last), "reward_policy_last": avg("reward_policy", last),
            "acc_free_last": avg("acc_free", last), "zero_var_frac_mean": avg("zero_var_frac", rows),
            "kl_last": avg("kl", last), "clip_frac_mean": avg("clip_frac", rows),
            "resp_len_last": avg("resp_len", last), "seconds": round(seconds, 1), "config": asdict(cfg)}


def write_log(path: Path, rows: list[dict]) -> None:
    import io

    from pipeline.io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS + ["stopped"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
