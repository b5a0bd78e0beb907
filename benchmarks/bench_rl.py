"""Step time of GRPO (2G samples per prompt, no policy) vs PolicyRollout-GRPO (G + G with the
policy in context) at equal rollouts per prompt, on the tiny preset, one CPU thread.

The ratio is the cost of the policy prefix: the PoRo half generates after a much longer prompt
(policy text), while every update forward in both runs uses the short policy-free prompt.

    .venv/bin/python benchmarks/bench_rl.py [--preset tiny] [--g 4] [--steps 4] [--resp 32]

Prints one JSON line per variant and the ratio; timings exclude the first (warm-up) step.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--g", type=int, default=4, help="G: PoRo samples G+G, plain GRPO 2G")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resp", type=int, default=32, help="max response tokens")
    ap.add_argument("--prompts", type=int, default=4, help="rollout batch (prompts per step)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.cli import main as cli
    from pipeline.train.rl import train_rl
    from pipeline.train.rl_config import RLConfig

    params = str(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="bench_rl.") as tmp:
        t = Path(tmp)
        cli(["generate", "clevr", "--params", params, "--policies", str(ROOT / "policies/clevr"),
             "--out", str(t / "data"), "--set", "train_per_policy=16", "--set", "cot_per_policy=4",
             "--set", "test_per_policy=2", "--set", "override_per_policy=2"])
        cli(["model", "init", "--params", params, "--model", a.preset, "--out", str(t / "init")])
        results = {}
        for name, poro, g in (("grpo_2G", False, 2 * a.g), ("poro_grpo_G+G", True, a.g)):
            cfg = RLConfig(policy_rollout=poro, group_size=g, max_response_len=a.resp, rollout_batch=a.prompts,
                           update_batch=a.prompts, generation_batch=a.prompts, micro_batch=2 * a.g,
                           max_steps=a.steps + 1, save_every=0, kl_beta=0.0)
            log = t / f"{name}.csv"
            train_rl(cfg, str(t / "init"), [str(t / "data")], str(ROOT / "policies"), str(t / name),
                     ckpt_dir=str(t / f"ckpt-{name}"), log_path=str(log),
                     reward_fn=lambda rec, text: (float(text.startswith("-")), 0.0))
            rows = list(csv.DictReader(open(log)))[1:]
            gen = sum(float(r["gen_s"]) for r in rows) / len(rows)
            upd = sum(float(r["update_s"]) for r in rows) / len(rows)
            results[name] = {"variant": name, "preset": a.preset, "samples_per_prompt": 2 * a.g,
                             "prompts_per_step": a.prompts, "resp_len": float(rows[-1]["resp_len"]),
                             "gen_s": round(gen, 3), "update_s": round(upd, 3), "step_s": round(gen + upd, 3)}
            print(json.dumps(results[name]), flush=True)
        ratio = results["poro_grpo_G+G"]["step_s"] / results["grpo_2G"]["step_s"]
        gen_ratio = results["poro_grpo_G+G"]["gen_s"] / results["grpo_2G"]["gen_s"]
        print(json.dumps({"poro_over_grpo_step_time": round(ratio, 3), "poro_over_grpo_gen_time": round(gen_ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
