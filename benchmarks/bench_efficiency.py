"""Prompt-token and prefill-time reduction from internalization (policy in context vs not).

For each policy set the same test records (query + image) are encoded twice by the pipeline's
own efficiency suite (``pipeline/evaluate/efficiency.py``, run as ``trimpi evaluate --suites
efficiency``): once with the rendered policy in the prompt, once without (what an internalized
model is served). Nothing is re-implemented here; this script only builds the inputs in a temp
dir and tabulates the suite's metrics.

Policy sets (all on one freshly initialised ``--preset`` checkpoint, one torch thread):

* the committed defaults: ``policies/clevr`` rendered as text (ClevrPolicy-T) and with policy
  images (ClevrPolicy-M), and ``policies/gta`` (GTAPolicy, text only);
* a depth-6 ClevrPolicy sampled with ``trimpi policy new clevr --depth 6`` into the temp dir
  (the paper's default complexity), again -T and -M.

Where it departs from ``trimpi evaluate``'s defaults: every test record of the small generated
set is timed (``efficiency_samples`` = the test set size) because the suite takes the first N
records of ``test.jsonl``, which are ordered by policy; timing only 4 would cover one policy.

    .venv/bin/python benchmarks/bench_efficiency.py [--preset tiny] [--per-policy 4] [--repeats 5]

Prints one JSON line per set, then a markdown table. Token counts are exact; milliseconds
describe this machine and its load (the reduction % is the stabler figure).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cli(argv: list[str]) -> None:
    from pipeline.cli import main as cli

    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"bench_efficiency: `trimpi {' '.join(argv)}` exited {rc}")


def _gen_clevr(params: str, policies: Path, out: Path, per_policy: int, multimodal: bool) -> int:
    # train/cot are required non-empty by the builder; keep them minimal, no override suite
    _cli(["generate", "clevr", "--params", params, "--policies", str(policies), "--out", str(out),
          "--set", "train_per_policy=2", "--set", "cot_per_policy=1", "--set", f"test_per_policy={per_policy}",
          "--set", "override_per_policy=0", "--set", "override_count=0",
          "--set", f"multimodal={'true' if multimodal else 'false'}"])
    return per_policy * len(list(policies.glob("*.yaml")))


def _gen_gta(params: str, policies: Path, out: Path, dialogs: int) -> int:
    _cli(["generate", "gta", "--params", params, "--policies", str(policies), "--out", str(out),
          "--set", "train_dialogs=2", "--set", f"test_dialogs={dialogs}", "--set", "cover_every_rule=false"])
    return sum(1 for _ in open(out / "test.jsonl"))


def _efficiency(params: str, model: Path, data: Path, policies: Path, n: int, repeats: int, tmp: Path) -> dict:
    out = tmp / f"eff_{data.name}.json"
    _cli(["evaluate", "--params", params, "--model", str(model), "--data", str(data), "--policies", str(policies),
          "--suites", "efficiency", "--out", str(out), "--preds", str(tmp / f"preds_{data.name}"),
          "--plots", str(tmp / f"plots_{data.name}"),
          "--set", f"efficiency_samples={n}", "--set", f"efficiency_repeats={repeats}"])
    return json.loads(out.read_text())["efficiency"]


def table(rows: list[dict]) -> str:
    head = ("| policy set | prompts | tokens with policy | tokens internalized | token reduction | "
            "prefill ms with policy | prefill ms internalized | prefill reduction |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        e = r["efficiency"]
        lines.append(f"| {r['set']} | {e['n']} | {e['prompt_tokens_with_policy']:g} | {e['prompt_tokens_internalized']:g} "
                     f"| {e['token_reduction_pct']:.1f} % | {e['prefill_ms_with_policy']:.2f} "
                     f"| {e['prefill_ms_internalized']:.2f} | {e['prefill_reduction_pct']:.1f} % |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--preset", default="tiny", help="base.model preset of the fresh checkpoint (tiny, smollm2-vl, ...)")
    ap.add_argument("--per-policy", type=int, default=4, help="ClevrPolicy test prompts per policy")
    ap.add_argument("--gta-dialogs", type=int, default=6, help="GTAPolicy test dialogs (1-2 prompts each)")
    ap.add_argument("--depth", type=int, default=6, help="depth of the sampled deep ClevrPolicy")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill passes per prompt (median kept)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    print("command: .venv/bin/python benchmarks/bench_efficiency.py " + shlex.join(sys.argv[1:]), flush=True)

    import torch

    torch.set_num_threads(1)
    from pipeline.policy import load_policies

    with tempfile.TemporaryDirectory(prefix="bench_eff_") as t:
        tmp = Path(t)
        deep = tmp / "policies_deep"
        _cli(["policy", "new", "clevr", "--params", a.params, "--depth", str(a.depth), "--seed", "0",
              "--out", str(deep / "clevr")])
        model = tmp / "init"
        _cli(["model", "init", "--params", a.params, "--model", a.preset, "--out", str(model)])

        clevr, gta = REPO / "policies/clevr", REPO / "policies/gta"
        depths = sorted({p.depth for p in load_policies(clevr).values()})
        d_txt = "/".join(map(str, depths))
        sets = [  # (label, dataset dir, policies root for evaluate, builder)
            (f"ClevrPolicy-T, policies/clevr (depth {d_txt})", tmp / "clevr_t", REPO / "policies",
             lambda out: _gen_clevr(a.params, clevr, out, a.per_policy, False)),
            (f"ClevrPolicy-M, policies/clevr (depth {d_txt})", tmp / "clevr_m", REPO / "policies",
             lambda out: _gen_clevr(a.params, clevr, out, a.per_policy, True)),
            ("GTAPolicy, policies/gta", tmp / "gta", REPO / "policies",
             lambda out: _gen_gta(a.params, gta, out, a.gta_dialogs)),
            (f"ClevrPolicy-T, sampled depth {a.depth}", tmp / "deep_t", deep,
             lambda out: _gen_clevr(a.params, deep / "clevr", out, a.per_policy, False)),
            (f"ClevrPolicy-M, sampled depth {a.depth}", tmp / "deep_m", deep,
             lambda out: _gen_clevr(a.params, deep / "clevr", out, a.per_policy, True)),
        ]
        rows = []
        for label, data, pol_root, build in sets:
            n = build(data)
            eff = _efficiency(a.params, model, data, pol_root, n, a.repeats, tmp)
            row = {"set": label, "preset": a.preset, "repeats": a.repeats, "efficiency": eff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(table(rows))
    print("\npaper (Qwen2.5-VL-7B, Figure 6): up to 93.9 % fewer prompt tokens, up to 85.7 % less prefill time")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
