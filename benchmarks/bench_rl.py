"""Step time of GRPO (2G samples per prompt, no policy) vs PolicyRollout-GRPO (G + G with the
policy in context) at equal rollouts per prompt, on the tiny preset, one CPU thread.

The ratio is the cost of the policy prefix: the PoRo half generates after a much longer prompt
(policy text), while every update forward in both runs uses the short policy-free prompt. Each
prompt is prefilled once and its cache shared by its samples (``pipeline/model/prefix.py``), so
what remains is one prefill of the policy prompt per prompt and attention over its cache.

    .venv/bin/python benchmarks/bench_rl.py [--preset tiny] [--g 4] [--resp 128] [--depth 6] [--rounds 3] [--steps 2]

By default the data come from the repository's policies (``policies/clevr``: two depth-2 trees);
``--depth D`` samples one depth-D tree instead (``trimpi policy new clevr --depth D``; depth 6
gives a ~1,800-token policy-aware prompt).

Side by side on a shared, noisy machine: ``--rounds`` rounds each run both variants for one
warm-up step plus ``--steps`` timed steps, in ABBA order, from the same checkpoint and prompts.
Prints the prompt lengths, one JSON line per variant (medians over all timed steps) and the
ratio of medians, plus the ratio within each round (paired) and its median. ``--clock cpu`` (the
default) times the phases in process CPU seconds, which other jobs on the machine barely move;
``--clock wall`` in wall seconds (on an idle machine the two agree with one torch thread).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompt_tokens(model_dir: Path, data: Path, policies: Path) -> dict:
    """Mean prompt length (tokens, images included) without / with the policy, over the train prompts."""
    from pipeline.model.processor import load_processor
    from pipeline.policy import load_policies
    from pipeline.train.rl import PromptCache, load_items
    from pipeline.train.rl_config import RLConfig

    pols = load_policies(policies)
    items, stores, mm = load_items([str(data)], RLConfig(), pols)
    cache = PromptCache(load_processor(model_dir), stores, pols, mm)
    n = {wp: [cache.get(it, wp)["input_ids"].shape[1] for it in items] for wp in (False, True)}
    return {"prompt_tokens_free": round(sum(n[False]) / len(items), 1),
            "prompt_tokens_policy": round(sum(n[True]) / len(items), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--g", type=int, default=4, help="G: PoRo samples G+G, plain GRPO 2G")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running both variants (ABBA order)")
    ap.add_argument("--resp", type=int, default=32, help="max response tokens")
    ap.add_argument("--prompts", type=int, default=4, help="rollout batch (prompts per step)")
    ap.add_argument("--depth", type=int, default=0, help="sample one policy of this depth (0: policies/clevr)")
    ap.add_argument("--policy-seed", type=int, default=0, help="seed of the sampled policy (--depth)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="time the phases in process CPU seconds (robust on a shared machine) or wall seconds")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.cli import main as cli
    from pipeline.train import rl
    from pipeline.train.rl import train_rl
    from pipeline.train.rl_config import RLConfig

    if a.clock == "cpu":
        # rl_step logs gen_s / update_s from time.time(); read the process CPU clock instead: with one
        # torch thread it counts the work done, not the time other jobs held the core
        rl.time = SimpleNamespace(time=time.process_time)

    params = str(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="bench_rl.") as tmp:
        t = Path(tmp)
        policies = ROOT / "policies"
        if a.depth:
            policies = t / "policies"
            cli(["policy", "new", "clevr", "--params", params, "--depth", str(a.depth), "--count", "1",
                 "--seed", str(a.policy_seed), "--out", str(policies / "clevr")])
        cli(["generate", "clevr", "--params", params, "--policies", str(policies / "clevr"),
             "--out", str(t / "data"), "--set", "train_per_policy=16", "--set", "cot_per_policy=4",
             "--set", "test_per_policy=2", "--set", "override_per_policy=2"])
        cli(["model", "init", "--params", params, "--model", a.preset, "--out", str(t / "init")])
        results = {"prompt_tokens": prompt_tokens(t / "init", t / "data", policies)}
        print(json.dumps(results["prompt_tokens"]), flush=True)
        variants = {"grpo_2G": (False, 2 * a.g), "poro_grpo_G+G": (True, a.g)}
        steps: dict = {name: [] for name in variants}
        paired = []
        for rnd in range(a.rounds):
            # ABBA order: a load that drifts during the run weighs on both variants alike
            order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
            this = {}
            for name in order:
                poro, g = variants[name]
                cfg = RLConfig(policy_rollout=poro, group_size=g, max_response_len=a.resp, rollout_batch=a.prompts,
                               update_batch=a.prompts, generation_batch=a.prompts, micro_batch=2 * a.g,
                               max_steps=a.steps + 1, save_every=0, kl_beta=0.0)
                log = t / f"{name}-{rnd}.csv"
                train_rl(cfg, str(t / "init"), [str(t / "data")], str(policies), str(t / f"{name}-{rnd}"),
                         ckpt_dir=str(t / f"ckpt-{name}-{rnd}"), log_path=str(log),
                         reward_fn=lambda rec, text: (float(text.startswith("-")), 0.0))
                rows = list(csv.DictReader(open(log)))[1:]  # the first step warms up
                steps[name] += rows
                this[name] = statistics.median(float(r["gen_s"]) + float(r["update_s"]) for r in rows)
            paired.append(this["poro_grpo_G+G"] / this["grpo_2G"])
        for name, rows in steps.items():
            gen = statistics.median(float(r["gen_s"]) for r in rows)
            upd = statistics.median(float(r["update_s"]) for r in rows)
            step = statistics.median(float(r["gen_s"]) + float(r["update_s"]) for r in rows)
            results[name] = {"variant": name, "clock": a.clock, "preset": a.preset, "depth": a.depth or 2,
                             "samples_per_prompt": 2 * a.g,
                             "prompts_per_step": a.prompts, "resp_len": round(statistics.mean(
                                 float(r["resp_len"]) for r in rows), 1), "timed_steps": len(rows),
                             "gen_s": round(gen, 3), "update_s": round(upd, 3), "step_s": round(step, 3)}
            print(json.dumps(results[name]), flush=True)
        p, g = results["poro_grpo_G+G"], results["grpo_2G"]
        print(json.dumps({"poro_over_grpo_step_time": round(p["step_s"] / g["step_s"], 3),
                          "poro_over_grpo_gen_time": round(p["gen_s"] / g["gen_s"], 3),
                          "paired_round_ratios": [round(x, 3) for x in paired],
                          "paired_median": round(statistics.median(paired), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
