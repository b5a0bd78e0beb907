"""Efficiency suite: prompt tokens and measured prefill time, policy in context vs internalized.

For a few test prompts per dataset (``evaluate.efficiency_samples``) the same record is encoded
twice through the one prompt builder — with its rendered policy in context (what serving needs
without internalization) and without it (after internalization) — and each prompt's **prefill**
(the first forward pass over the whole prompt, the paper's Figure 6 quantity) is timed. The two
encodings are the ones the main and in-context suites already made for these records (the runner
keeps them, ``timed_prompts``); they are made here only when those suites did not run.

* one prompt at a time (batch 1), so padding never inflates either side;
* one untimed warm-up pass per prompt, then the median of ``efficiency_repeats`` timed passes;
* ``logits_to_keep=1`` and ``use_cache=True``, as ``generate`` does for its prefill, so the time
  is not dominated by a full-sequence LM head that serving never computes;
* on CUDA the device is synchronized around each pass.

Prompt tokens count every token of the encoded prompt (text, chat template and visual tokens of
both the input images and any policy images). Reported as absolute means and reduction %.
Timings depend on the machine and its load: the numbers describe this run, and a CPU box shared
with other jobs is noisy (the reduction % is the more stable figure).
"""
from __future__ import annotations

import statistics
import time

from pipeline.evaluate import metrics as M


def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def prefill_seconds(model, batch: dict, repeats: int) -> float:
    """Median wall time of the prompt's first forward pass (after one warm-up)."""
    import torch

    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in batch.items() if k != "labels"}

    def once() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            try:
                model(**inputs, use_cache=True, logits_to_keep=1)
            except TypeError:  # models without logits_to_keep
                model(**inputs, use_cache=True)
        _sync(dev)
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(max(1, repeats)))


def timed_records(ev) -> list:
    """(dataset, record) pairs the suite times: ``efficiency_samples`` per dataset, evenly spaced over
    its test file (ordered by policy, so every policy gets timed)."""
    from pipeline.data.records import split_records

    out = []
    for ds in ev.datasets:
        pool = [r for r in split_records(ds, "test", 0) if r.task in ("clevr", "gta")]
        step = max(1, len(pool) // max(1, ev.cfg.efficiency_samples))
        out += [(ds, r) for r in pool[::step][:ev.cfg.efficiency_samples]]
    return out


def timed_prompts(ev) -> list:
    """(dataset, record, policy or None) of every prompt the suite encodes; the main and in-context
    suites encode the same prompts first, and the runner keeps those encodings for this suite."""
    out = []
    for ds, r in timed_records(ev):
        pol = ev.runner.policies.get(r.policy)
        if pol is not None and not (r.policy_version and r.policy_version != pol.version):
            out += [(ds, r, pol), (ds, r, None)]
    return out


def measure(ev) -> dict | None:
    """Run the suite for an :class:`pipeline.evaluate.suites.Evaluation`; None when nothing to time."""
    runner, cfg = ev.runner, ev.cfg
    rows = []
    for ds, r in timed_records(ev):
        pol = runner.policy_of(r, ds.root / "test.jsonl")
        out = {"id": r.id, "dataset": ds.name, "policy": r.policy}
        for kind, policy in (("with_policy", pol), ("internalized", None)):
            batch = runner.encoded(ds, r, policy)  # made (and kept) by main / in_context when they ran
            out[f"tokens_{kind}"] = int(batch["input_ids"].shape[1])
            out[f"prefill_ms_{kind}"] = round(1000 * prefill_seconds(runner.model, batch, cfg.efficiency_repeats), 3)
        rows.append(out)
    if not rows:
        return None
    ev._write("efficiency", rows)
    out = summarize(rows)
    datasets = sorted({r["dataset"] for r in rows})
    if len(datasets) > 1:  # the paper reports each dataset separately; the top level pools them
        out["by_dataset"] = {d: summarize([r for r in rows if r["dataset"] == d]) for d in datasets}
    out["device"] = str(next(runner.model.parameters()).device)
    return out


def summarize(rows: list[dict]) -> dict:
    t_with = statistics.mean(r["tokens_with_policy"] for r in rows)
    t_int = statistics.mean(r["tokens_internalized"] for r in rows)
    p_with = statistics.mean(r["prefill_ms_with_policy"] for r in rows)
    p_int = statistics.mean(r["prefill_ms_internalized"] for r in rows)
    return {
        "prompt_tokens_with_policy": round(t_with, 1),
        "prompt_tokens_internalized": round(t_int, 1),
        "token_reduction_pct": M.reduction_pct(t_with, t_int),
        "prefill_ms_with_policy": round(p_with, 3),
        "prefill_ms_internalized": round(p_int, 3),
        "prefill_reduction_pct": M.reduction_pct(p_with, p_int),
        "n": len(rows),
    }
