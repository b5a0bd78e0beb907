"""Wall time of ``trimpi evaluate`` with and without the forgetting-suite response cache, and a check
that every figure and every per-example prediction is the same in each mode.

    .venv/bin/python benchmarks/bench_evaluate.py [--model models/rl] [--baseline models/base]
        [--data data/clevr] [--probes data/generic] [--modes uncached,cold,baseline-cached,warm]

Modes (each a fresh ``trimpi evaluate`` process, one torch thread, as DVC runs it):

* ``uncached`` — ``--cache-dir ''``: every suite generates, the baseline's probe answers included.
* ``cold`` — an empty cache: the same work, and the cache is filled.
* ``baseline-cached`` — the cache holds only the baseline's entry: what every evaluation stage of a
  run but the first does (they all probe the same baseline; this model is new to the cache).
* ``warm`` — everything cached (re-evaluating an unchanged model).

Prints one JSON line per mode (wall seconds; CPU seconds of the process, i.e. the time it would take
on one free core, which other jobs on a shared machine barely move; load average before/after)
and whether the metrics
(prefill timings excluded: they are measurements) and predictions match across modes. Run it on
the default data after ``dvc repro evaluate`` (or any checkpoint/data pair).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def figures(metrics: dict) -> dict:
    """The metrics without measured times (efficiency prefill) and run bookkeeping."""
    m = json.loads(json.dumps(metrics))
    for section in [m.get("efficiency", {})] + list(m.get("efficiency", {}).get("by_dataset", {}).values()):
        for k in [k for k in section if "prefill" in k]:
            section.pop(k)
    m.pop("variant", None)
    return m


def predictions(preds: Path) -> dict:
    out = {}
    for f in sorted(preds.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[f.name] = [{k: v for k, v in r.items() if "prefill" not in k} for r in rows]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/rl")
    ap.add_argument("--baseline", default="models/base")
    ap.add_argument("--data", default="data/clevr")
    ap.add_argument("--probes", default="data/generic")
    ap.add_argument("--policies", default="policies")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--modes", default="uncached,cold,baseline-cached,warm")
    ap.add_argument("--set", action="append", default=[], help="evaluate section override, e.g. batch_size=16")
    ap.add_argument("--keep", default=None, help="copy each mode's metrics and predictions here (to compare)")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    trimpi = [sys.executable, "-m", "pipeline.cli"]
    results, seen = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_eval.") as tmp:
        t = Path(tmp)
        cache = t / "cache"
        for mode in a.modes.split(","):
            if mode == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            elif mode == "baseline-cached":
                # keep only the entries written for the baseline (its model_dir is recorded in each entry)
                for f in (cache / "forgetting").glob("*.json"):
                    if json.loads(f.read_text()).get("model_dir") != a.baseline:
                        f.unlink()
            cmd = trimpi + ["evaluate", "--params", a.params, "--model", a.model, "--data", a.data,
                            "--probes", a.probes, "--policies", a.policies, "--baseline-model", a.baseline,
                            "--out", str(t / f"{mode}.json"), "--preds", str(t / mode / "rl"),
                            "--cache-dir", "" if mode == "uncached" else str(cache)]
            for s in a.set:
                cmd += ["--set", s]
            load0 = os.getloadavg()[0]
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            results[mode] = {"mode": mode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                             "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
            seen[mode] = (figures(json.loads((t / f"{mode}.json").read_text())), predictions(t / mode / "rl"))
            print(json.dumps(results[mode]), flush=True)
        if a.keep:
            for mode in seen:
                shutil.copytree(t / mode, Path(a.keep) / mode, dirs_exist_ok=True)
                shutil.copy(t / f"{mode}.json", Path(a.keep) / f"{mode}.json")
        first = next(iter(seen))
        print(json.dumps({"same_figures": all(v[0] == seen[first][0] for v in seen.values()),
                          "same_predictions": all(v[1] == seen[first][1] for v in seen.values()),
                          "model": a.model, "baseline": a.baseline, "sets": a.set}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
