"""Training throughput of VM-CPT and CoT SFT on the tiny preset (tokens/s through the real stages).

Runs the actual stage code (DeepSpeed engine, prompt builder, masking, processor) for a few steps
on a ClevrPolicy set: ``--data`` if given, else a small set generated into a temp dir from the
repo's policies. Tokens are real (non-padding) tokens, visual tokens included; the first step is
a warm-up and is excluded. One torch thread (``base.threads``).

    .venv/bin/python benchmarks/bench_train.py [--preset tiny] [--steps 12] [--data data/clevr]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data", default=None)
    ap.add_argument("--deepspeed", default="zero0")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from pipeline.cli import main as cli
    from pipeline.train.cpt import CPTConfig, train_cpt
    from pipeline.train.sft import SFTConfig, train_sft

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        params = tmp / "params.yaml"
        params.write_text(f"base: {{seed: 0, model: {a.preset}, threads: 1}}\n"
                          "generate_clevr: {train_per_policy: 40, cot_per_policy: 40, test_per_policy: 2,"
                          " override_per_policy: 0, override_count: 0}\n")
        data = a.data or str(tmp / "data")
        if not a.data:
            assert cli(["generate", "clevr", "--params", str(params), "--policies", str(REPO / "policies/clevr"),
                        "--out", data]) == 0
        assert cli(["model", "init", "--params", str(params), "--out", str(tmp / "init")]) == 0
        common = dict(epochs=100.0, max_steps=a.steps, batch_size=a.batch, save_every=0, deepspeed=a.deepspeed)
        results = []
        for stage in ("cpt", "sft"):
            out = tmp / stage
            if stage == "cpt":
                m = train_cpt(CPTConfig(**common), str(tmp / "init"), [data], str(REPO / "policies"), str(out))
            else:
                m = train_sft(SFTConfig(**common, lora="off"), str(tmp / "cpt"), [data], str(out))
            rows = list(csv.DictReader(open(out / "train_log.csv")))
            # exclude step 1 (warm-up: allocator, first processor call)
            tok = int(rows[-1]["tokens"]) - int(rows[0]["tokens"])
            sec = float(rows[-1]["elapsed_s"]) - float(rows[0]["elapsed_s"])
            r = {"stage": stage, "preset": a.preset, "deepspeed": a.deepspeed, "batch": a.batch,
                 "steps_timed": len(rows) - 1, "tokens_per_step": round(tok / max(1, len(rows) - 1)),
                 "s_per_step": round(sec / max(1, len(rows) - 1), 3), "tokens_per_s": round(tok / max(sec, 1e-9), 1),
                 "examples_per_min": round(60 * a.batch * (len(rows) - 1) / max(sec, 1e-9), 1),
                 "params": m["total_params"]}
            results.append(r)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
