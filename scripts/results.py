"""Every method of the paper's main table, over several seeds: ``reports/runs/results.md``.

    .venv/bin/python scripts/results.py --seeds 0 1 2            # all methods, 3 seeds
    .venv/bin/python scripts/results.py --seeds 0 --methods cot_sft,trimpi_poro_grpo

It reuses what the DVC pipeline already built — the validated dataset (``data/clevr``) and the
base model (``models/base``, or ``models/init`` if the perception stage was not run) — and for
each seed trains every method with the ordinary ``trimpi`` stage commands into
``reports/runs/seed<N>/``, evaluates each with ``trimpi evaluate``, then aggregates with
``trimpi report`` (mean ± sample std over seeds). Data and base are fixed across seeds; the
seed changes training (init of LoRA/optimizer state, batch order, RL sampling).

Why a script and not DVC stages: the production graph (``dvc.yaml``) trains one model and
gates it; a full comparison is ~9 extra trainings per seed and belongs to a results run, not
to every policy change. Its table is written beside its runs (``--work``), never to
``reports/results.md``, which belongs to the ``report`` stage (one seed, ``params.yaml: ablations``). Each step is skipped when its output already exists, so an interrupted
run continues where it stopped.

Methods (paper Table 2 rows; ``from`` = the checkpoint it starts from):

===================  =========================  ===========================================
key                  row                         recipe
===================  =========================  ===========================================
in_context           In-Context                  base model, policy in the prompt (no training)
direct_sft           Direct SFT                  base -> answer-only SFT
cot_sft              CoT SFT                     base -> CoT SFT
cot_sft_grpo         CoT SFT + GRPO              cot_sft -> GRPO (no PolicyRollout)
cot_sft_dapo         CoT SFT + DAPO              cot_sft -> DAPO (no PolicyRollout)
cpt_cot_sft          VM-CPT + CoT SFT            base -> VM-CPT -> CoT SFT
trimpi_grpo          TriMPI w/o PoRo (GRPO)      cpt_cot_sft -> GRPO
trimpi_poro_grpo     TriMPI w/ PoRo-GRPO         cpt_cot_sft -> GRPO + PolicyRollout
trimpi_poro_dapo     TriMPI w/ PoRo-DAPO         cpt_cot_sft -> DAPO + PolicyRollout
===================  =========================  ===========================================
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRIMPI = [sys.executable, "-m", "pipeline.cli"]

# key: (row name, kind, start checkpoint key or "base", extra --set overrides)
METHODS = {
    "in_context": ("In-Context", "none", "base", []),
    "direct_sft": ("Direct SFT", "direct", "base", []),
    "cot_sft": ("CoT SFT", "sft", "base", []),
    "cot_sft_grpo": ("CoT SFT + GRPO", "rl", "cot_sft", ["algorithm=grpo", "policy_rollout=false"]),
    "cot_sft_dapo": ("CoT SFT + DAPO", "rl", "cot_sft", ["algorithm=dapo", "policy_rollout=false"]),
    "cpt": (None, "cpt", "base", []),  # intermediate: not a row of its own
    "cpt_cot_sft": ("VM-CPT + CoT SFT", "sft", "cpt", []),
    "trimpi_grpo": ("TriMPI w/o PoRo (GRPO)", "rl", "cpt_cot_sft", ["algorithm=grpo", "policy_rollout=false"]),
    "trimpi_poro_grpo": ("TriMPI w/ PoRo-GRPO", "rl", "cpt_cot_sft", ["algorithm=grpo", "policy_rollout=true"]),
    "trimpi_poro_dapo": ("TriMPI w/ PoRo-DAPO", "rl", "cpt_cot_sft", ["algorithm=dapo", "policy_rollout=true"]),
}


def run(cmd: list[str], log: Path) -> None:
    t = time.time()
    print("$ " + " ".join(cmd[2:] if cmd[:2] == TRIMPI[:2] else cmd), flush=True)
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  -> rc {rc} in {time.time() - t:.0f} s (log: {log})", flush=True)
    if rc != 0:
        sys.exit(f"step failed (rc {rc}); see {log}")


def needed(keys: list[str]) -> list[str]:
    """The requested methods plus every checkpoint they start from, in training order."""
    out: list[str] = []

    def add(k: str) -> None:
        if k == "base" or k in out:
            return
        add(METHODS[k][2])
        out.append(k)
    for k in keys:
        add(k)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(k for k, v in METHODS.items() if v[0]))
    p.add_argument("--data", default="data/clevr")
    p.add_argument("--base", default="models/base", help="start checkpoint (default models/base, else models/init)")
    p.add_argument("--policies", default="policies")
    p.add_argument("--work", default="reports/runs")
    p.add_argument("--out", default=None, help="the table (default: <work>/results.md)")
    a = p.parse_args()

    a.out = a.out or f"{a.work}/results.md"
    keys = [k.strip() for k in a.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        sys.exit(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    base = a.base if (ROOT / a.base).exists() else "models/init"
    for need in (a.data, base):
        if not (ROOT / need).exists():
            sys.exit(f"{need} is missing: run `dvc repro validate_clevr train_base` first")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    files: dict[str, list[str]] = {k: [] for k in keys}
    for seed in a.seeds:
        w = ROOT / a.work / f"seed{seed}"
        w.mkdir(parents=True, exist_ok=True)
        pf = w / "params.yaml"  # the pipeline's params with this seed: every stage reads base.seed
        pf.write_text(yaml.safe_dump({**params, "base": {**params["base"], "seed": seed}}, sort_keys=False))
        ck = {"base": base}
        log = w / "log.txt"
        for k in needed(keys):
            _, kind, start, sets = METHODS[k]
            out = w / k
            ck[k] = str(out.relative_to(ROOT)) if kind != "none" else ck["base"]
            if kind == "none" or out.exists():
                continue
            common = ["--params", str(pf), "--model", ck[start], "--data", a.data, "--out", str(out)]
            if kind == "cpt":
                run(TRIMPI + ["train", "cpt", *common, "--policies", a.policies], log)
            elif kind in ("sft", "direct"):
                run(TRIMPI + ["train", "sft", *(["--direct"] if kind == "direct" else []), *common], log)
            else:
                extra = [x for s in sets for x in ("--set", s)]
                run(TRIMPI + ["train", "rl", *common, "--policies", a.policies, *extra], log)
        for k in keys:
            ev = w / f"eval_{k}.json"
            if not ev.exists():
                suites = ["--suites", "in_context,efficiency"] if k == "in_context" else []
                run(TRIMPI + ["evaluate", "--params", str(pf), "--model", ck[k], "--data", a.data,
                              "--policies", a.policies, "--baseline-model", base, "--out", str(ev),
                              "--preds", str(w / "preds" / k), *suites], log)
            files[k].append(str(ev.relative_to(ROOT)))
    variants = []
    for k in keys:
        name = METHODS[k][0]
        variants += ["--variant", f"{name}={','.join(files[k])}" + ("@in_context" if k == "in_context" else "")]
    run(TRIMPI + ["report", *variants, "--out", a.out], ROOT / a.work / "report_log.txt")
    print((ROOT / a.out).read_text())


if __name__ == "__main__":
    main()
