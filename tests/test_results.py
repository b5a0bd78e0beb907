"""The results sweep (``scripts/results.py``) and its tables (``trimpi report``): tie rule, orderings,
per-depth aggregation, resume. The fast tests drive the script with a stand-in ``trimpi`` that writes
each stage's outputs instantly; the slow one runs the real stages on tiny-xs."""
from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.cli import main as cli
from pipeline.evaluate import report as R

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def load_script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def c(*values):
    return R.cell(list(values))


# ----------------------------------------------------------------------------- tie rule, ranks


def test_tie_rule_compares_the_difference_with_the_larger_seed_spread():
    assert R.compare(c(60, 62, 64), c(50, 51, 52))["verdict"] == "holds"         # Δ 11 > std 2
    assert R.compare(c(50, 51, 52), c(60, 62, 64))["verdict"] == "does not hold"
    tie = R.compare(c(50, 56, 62), c(50, 51, 52))                                 # Δ 5 <= std 6 of the noisier row
    assert tie == {"verdict": "tie", "diff": 5.0, "spread": 6.0, "n": [3, 3]}
    assert R.compare(c(54, 56, 58), c(50, 52, 54))["verdict"] == "holds"         # Δ 4 > std 2
    assert R.compare(c(53, 54, 55), c(52, 53, 54))["verdict"] == "tie"           # Δ 1 <= 1: a boundary tie
    one = R.compare(c(30), c(20))
    assert one["verdict"] == "holds" and one["note"] == "1 seed"                  # no spread to measure with one seed
    assert R.compare(c(20), c(20))["verdict"] == "tie"
    assert R.compare(c(), c(20))["verdict"] == "n/a"
    assert R.compare(c(50, 52, 54), c(30))["spread"] == 2.0 and "note" not in R.compare(c(50, 52, 54), c(30))


def test_one_seed_accuracies_are_compared_against_their_test_set_sampling_error():
    """A single seed has no seed spread; a few test prompts of difference must not rank two rows."""
    def one(acc, n_test=200):
        return {**c(acc), "n_test": n_test}

    close = R.compare(one(95.5), one(94.5))              # 2 of 200 prompts apart
    assert close["verdict"] == "tie" and close["spread"] == 1.61 and close["note"] == "1 seed"  # the 94.5 row
    assert R.compare(one(68.5), one(10.8))["verdict"] == "holds"
    assert R.compare(one(68.5), one(66.0))["verdict"] == "tie"  # sampling error 3.3 at 68.5 %
    assert R.compare(c(30), c(20))["verdict"] == "holds"  # no test size known: no spread
    assert R.compare(c(60, 62, 64), one(50))["spread"] == 3.54  # the single-seed row is the noisier


def test_rank_counts_rows_clearly_above_and_marks_shared_ranks():
    table = {"primary": R.ACC, "rows": [{"variant": v, "cells": {R.ACC: cell}} for v, cell in
                                        [("a", c(80, 82, 84)), ("b", c(79, 80, 81)), ("c", c(40, 41, 42)), ("d", c())]]}
    R.rank(table)
    assert [(r["rank"], r["rank_shared"]) for r in table["rows"]] == [(1, True), (1, True), (3, False), (None, False)]


# ----------------------------------------------------------------------------- aggregation, orderings, CLI


def metrics_file(path: Path, accs: dict, ic=None, override=None, suite="main") -> str:
    m = {"suites": [suite], suite: {"clevr": {"accuracy": sum(accs.values()) / len(accs), "by_policy": accs}}}
    if ic is not None:
        m["in_context"] = {"score": ic}
    if override is not None:
        m["override"] = {"score": override}
    path.write_text(json.dumps(m))
    return str(path)


def sweep(tmp_path) -> list:
    """Two depths with different policies; per depth, each method's policy-free accuracy over 3 seeds."""
    groups = []
    rows = {  # method: (depth-2 means, depth-4 means) per seed
        R.IN_CONTEXT: ([30], [10]),
        R.DIRECT: ([40, 41, 42], [20, 30, 40]),
        R.COT: ([60, 61, 62], [25, 26, 27]),
        R.COT_GRPO: ([70, 71, 72], [26, 27, 28]),
        R.PORO_GRPO: ([90, 91, 92], [20, 21, 22]),
    }
    for di, (depth, names) in enumerate(((2, ["L2-A.x", "L2-B"]), (4, ["L4-C", "L4-D"]))):
        variants = []
        for name, per in rows.items():
            files = []
            for s, acc in enumerate(per[di]):
                accs = {names[0]: acc - 2, names[1]: acc + 2}
                suite = "in_context" if name == R.IN_CONTEXT else "main"
                files.append(metrics_file(tmp_path / f"d{depth}-{name.replace('/', '_')}-{s}.json", accs,
                                          override=None if name == R.IN_CONTEXT else acc - 5, suite=suite))
            variants.append((name, files, "in_context" if name == R.IN_CONTEXT else "main"))
        groups.append((f"Depth {depth}", variants))
    return groups


def test_per_depth_tables_and_the_paper_orderings(tmp_path):
    res = R.build(sweep(tmp_path))
    d2, d4 = res["tables"]
    assert d2["label"] == "Depth 2" and d4["label"] == "Depth 4"
    assert d2["columns"][:3] == ["Acc L2-A.x", "Acc L2-B", R.ACC]        # per-policy columns of that depth only
    assert d4["columns"][:3] == ["Acc L4-C", "Acc L4-D", R.ACC]
    cot4 = next(r for r in d4["rows"] if r["variant"] == R.COT)
    assert cot4["cells"]["Acc L4-C"] == {"mean": 24.0, "std": 1.0, "min": 23.0, "max": 25.0, "n": 3,
                                         "values": [23.0, 24.0, 25.0]}
    assert cot4["cells"][R.ACC]["mean"] == 26.0 and cot4["seeds"] == 3
    ic2 = next(r for r in d2["rows"] if r["variant"] == R.IN_CONTEXT)
    assert ic2["cells"][R.ACC]["mean"] == 30.0 and ic2["seeds"] == 1       # read from the in_context suite
    verdicts = {(o["comparison"], label): v["verdict"] for o in res["orderings"] for label, v in o["by_group"].items()}
    assert verdicts[(f"{R.PORO_GRPO} > {R.COT_GRPO}", "Depth 2")] == "holds"
    assert verdicts[(f"{R.PORO_GRPO} > {R.COT_GRPO}", "Depth 4")] == "does not hold"   # 21 vs 27, spreads 1
    assert verdicts[(f"{R.COT_GRPO} > {R.COT}", "Depth 4")] == "tie"                   # 27 vs 26, spreads 1
    assert verdicts[(f"{R.COT} > {R.DIRECT}", "Depth 4")] == "tie"                     # 26 vs 30, Direct std 10
    assert verdicts[(f"{R.PORO_GRPO} (override) >= {R.IN_CONTEXT}", "Depth 2")] == "holds"  # 86 vs 30
    assert not any("DAPO" in o["comparison"] or R.TRIMPI_NOPORO in o["comparison"]  # claims without rows: omitted
                   for o in res["orderings"])
    md = R.markdown(res)
    assert "## Depth 2" in md and "## Depth 4" in md and "## The paper's orderings at this scale" in md
    assert f"| 1 | {R.PORO_GRPO} | 3 | 89.0 ± 1.0 | 93.0 ± 1.0 | 91.0 ± 1.0 |" in md
    assert f"| 1= | {R.DIRECT} | 3 |" in md and f"| 1= | {R.COT_GRPO} | 3 |" in md   # depth 4: all within Direct's spread
    for line in md.splitlines():
        if line.startswith("| TriMPI > CoT SFT + RL"):
            assert line.count("|") == 5                                                # verdicts never break the table


def test_report_cli_groups_svg_and_json(tmp_path):
    groups = sweep(tmp_path)
    argv = ["report", "--out", str(tmp_path / "out" / "results.md")]
    for label, variants in groups:
        argv += ["--group", label]
        for name, files, suite in variants:
            argv += ["--variant", f"{name}={','.join(files)}" + ("@in_context" if suite == "in_context" else "")]
    assert cli(argv) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.index("## Depth 2") < md.index("## Depth 4") < md.index("orderings")
    root = ET.fromstring((tmp_path / "out" / "results.svg").read_text())
    bars = [e for e in root.iter(f"{SVG}rect") if e.find(f"{SVG}title") is not None]
    assert len(bars) == 10                                                   # 5 methods x 2 depths
    assert len(list(root.iter(f"{SVG}circle"))) == 2 * (1 + 3 * 4)           # one dot per seed
    assert len([e for e in root.iter(f"{SVG}line") if e.get("stroke") == "black"]) == 8  # min-max of multi-seed rows
    js = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [t["label"] for t in js["tables"]] == ["Depth 2", "Depth 4"] and js["orderings"]
    # no --group: one unlabelled table (the DVC report stage)
    assert cli(["report", "--variant", f"X={groups[0][1][1][1][0]}", "--out", str(tmp_path / "one.md")]) == 0
    assert "## Depth" not in (tmp_path / "one.md").read_text()
    assert cli(["report", "--group", "Depth 2", "--out", str(tmp_path / "x.md")]) == 2      # a group without rows
    assert cli(["report", "--variant", "nonsense", "--out", str(tmp_path / "x.md")]) == 2


# ----------------------------------------------------------------------------- the script, with a stand-in trimpi

FAKE_TRIMPI = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
opt = lambda k, d=None: argv[argv.index(k) + 1] if k in argv else d
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(argv[:2]) + " " + (opt("--out") or "") + "\n")
out = Path(opt("--out") or opt("--report"))
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in str(out):
    sys.exit(1)
if os.environ.get("FAKE_SLEEP") and argv[0] == "train":
    import time
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if argv[:2] == ["policy", "new"]:
    out.mkdir(parents=True)
    for i in range(int(opt("--count"))):
        (out / f"L{opt('--depth')}-P{i}.yaml").write_text("kind: clevr\n")
elif argv[0] == "generate":
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text("{}")
elif argv[0] == "validate":
    out.write_text(json.dumps({"success": True}))
elif argv[0] == "train":
    out.mkdir(parents=True, exist_ok=True)  # the real writers replace the dir whole
    (out / "config.json").write_text("{}")
    (out / "model_card.json").write_text("{}")
elif argv[0] == "evaluate":
    # accuracy by method, + the seed (read from the unit's params) so rows have a spread
    import yaml
    seed = yaml.safe_load(open(opt("--params")))["base"]["seed"]
    key = out.stem.replace("eval_", "")
    acc = {"in_context": 20, "direct_sft": 30, "cot_sft": 50, "trimpi_poro_grpo": 80}.get(key, 40) + 2 * seed
    names = sorted(p.stem for p in Path(opt("--policies")).glob("clevr/*.yaml"))
    suite = "in_context" if key == "in_context" else "main"
    m = {"suites": [suite], suite: {"clevr": {"accuracy": acc, "by_policy": {n: acc for n in names}}}}
    out.write_text(json.dumps(m))
'''


@pytest.fixture
def world(tmp_path, monkeypatch):
    fake = tmp_path / "fake_trimpi.py"
    fake.write_text(FAKE_TRIMPI)
    mod = load_script()
    monkeypatch.setattr(mod, "TRIMPI", [sys.executable, str(fake)])
    monkeypatch.setattr(mod, "POLL_S", 0.01)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    (tmp_path / "params.yaml").write_text("base: {seed: 7, model: tiny-xs, threads: 1}\nrl: {max_steps: 1}\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "policies" / "clevr").mkdir(parents=True)
    for n in ("L2-A", "L2-B"):
        (tmp_path / "policies" / "clevr" / f"{n}.yaml").write_text("kind: clevr\n")
    args = ["--params", str(tmp_path / "params.yaml"), "--base", str(tmp_path / "base"), "--data",
            str(tmp_path / "data"), "--policies", str(tmp_path / "policies"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out" / "results.md"), "--depths", "2", "4", "--seeds", "0", "1",
            "--methods", "in_context,cot_sft,trimpi_poro_grpo", "--jobs", "2"]

    def calls() -> list[str]:
        log = tmp_path / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        log.write_text("")
        return lines
    return mod, args, tmp_path, calls


def test_sweep_runs_every_step_once_then_resumes_only_what_is_missing(world, capsys):
    mod, args, tmp, calls = world
    assert mod.main(args) == 0
    first = calls()
    # depth 4: policies, data, validation; In-Context once per depth; per unit: cot_sft, cpt, cpt_cot_sft,
    # trimpi_poro_grpo trained and 2 evaluated -> 3 + 2 + 4 units x 6
    assert len(first) == 3 + 2 + 4 * 6 and len(set(first)) == len(first)
    assert any(c.startswith("policy new") for c in first)
    policies = sorted(p.name for p in (tmp / "work/depth4/policies/clevr").iterdir())
    assert policies == ["L4-P0.yaml", "L4-P1.yaml"] and not (tmp / "work/depth4/.policies.tmp").exists()
    params = __import__("yaml").safe_load((tmp / "work/depth4/seed1/params.yaml").read_text())
    assert params["base"]["seed"] == 1 and params["rl"] == {"max_steps": 1}     # the pipeline's params, seed replaced
    md = (tmp / "out/results.md").read_text()
    assert "## Depth 2" in md and "## Depth 4" in md and "Acc L4-P0" in md and "Acc L2-A" in md
    assert "--seed 11" in md and "--jobs 2" in md and "## Wall time per unit" in md
    assert f"| 1 | {R.PORO_GRPO} | 2 | 81.0 ± 1.4 |" in md                           # 80 + 2*seed over seeds 0, 1
    js = json.loads((tmp / "out/results.json").read_text())
    assert js["provenance"]["policy_new_seeds"] == {"4": 11} and len(js["tables"]) == 2
    assert {u["unit"] for u in js["provenance"]["wall_time"]} >= {"depth 2 seed 0", "depth 4 seed 1", "depth 4"}

    # a second run has nothing to do
    assert mod.main(args) == 0 and calls() == []
    # resume: a missing evaluation is rerun without retraining; a model dir an interrupted writer left
    # (temp sibling, or a dir without its model card) is not taken as finished
    (tmp / "work/depth4/seed1/eval_cot_sft.json").unlink()
    (tmp / "work/depth2/seed0/trimpi_poro_grpo/model_card.json").unlink()
    (tmp / "work/depth2/seed0/eval_trimpi_poro_grpo.json").unlink()
    stale = tmp / "work/depth2/seed0/.trimpi_poro_grpo.abc123.tmp"
    stale.mkdir()
    assert mod.main(args) == 0
    again = sorted(calls())
    w = tmp / "work"
    assert again == sorted([f"evaluate --params {w}/depth4/seed1/eval_cot_sft.json",
                            f"train rl {w}/depth2/seed0/trimpi_poro_grpo",
                            f"evaluate --params {w}/depth2/seed0/eval_trimpi_poro_grpo.json"])
    assert not stale.exists()


def test_a_failed_step_blocks_its_dependents_only_and_keeps_the_old_report(world, monkeypatch, capsys):
    mod, args, tmp, calls = world
    monkeypatch.setenv("FAKE_FAIL", "depth4/seed0/cpt")
    assert mod.main(args) == 1
    ran = calls()
    assert not any("depth4/seed0/cpt_cot_sft" in c or "depth4/seed0/eval_trimpi" in c for c in ran)  # blocked
    assert any("depth4/seed1/trimpi_poro_grpo" in c for c in ran)                  # the other unit went on
    assert not (tmp / "out/results.md").exists()
    err = capsys.readouterr()
    assert "depth4/seed0/train cpt: FAILED (exit 1)" in err.out and "run the same command to resume" in err.err
    # the tables so far: a missing seed shows as n=1, the rest is listed as not measured yet
    assert mod.main(args + ["--report-only"]) == 0 and calls() == []
    md = (tmp / "out/results.md").read_text()
    assert "Not measured yet (1): depth 4:" in md and "eval_trimpi_poro_grpo.json" in md
    assert f"| {R.PORO_GRPO} | 1 | 82.0 |" in md.split("## Depth 4")[1]           # seed 1 only
    assert "--report-only" not in md                                               # the command that regenerates it all
    monkeypatch.delenv("FAKE_FAIL")
    assert mod.main(args) == 0 and len(calls()) == 4                              # cpt, cpt_cot_sft, rl, eval


def test_a_changed_recipe_is_refused_not_mixed(world):
    mod, args, tmp, calls = world
    one = args[:args.index("--depths")] + ["--depths", "2", "--seeds", "0", "--methods", "cot_sft"]
    assert mod.main(one) == 0
    (tmp / "params.yaml").write_text("base: {seed: 7, model: tiny-xs, threads: 1}\nrl: {max_steps: 2}\n")
    with pytest.raises(SystemExit, match="recipe.json: params: expected the recipe this sweep started with"):
        mod.main(one)
    assert "max_steps: 1" in (tmp / "work/depth2/seed0/params.yaml").read_text()  # still what the outputs were made with
    # base.threads is speed, not recipe
    (tmp / "params.yaml").write_text("base: {seed: 7, model: tiny-xs, threads: 2}\nrl: {max_steps: 1}\n")
    assert mod.main(one) == 0


def test_sigterm_stops_running_steps_and_a_survivor_blocks_the_next_sweep(world):
    import os
    import signal
    import subprocess
    import time

    mod, args, tmp, calls = world
    one = args[:args.index("--depths")] + ["--depths", "2", "--seeds", "0", "--methods", "cot_sft"]
    driver = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_results as t; "
              f"m = t.load_script(); m.TRIMPI = [sys.executable, {str(tmp / 'fake_trimpi.py')!r}]; m.POLL_S = 0.05; "
              f"sys.exit(m.main({one!r}))")
    env = {**os.environ, "FAKE_SLEEP": "600", "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    running = tmp / "work" / "running.json"
    deadline = time.monotonic() + 120
    while not (running.exists() and json.loads(running.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    (step,) = json.loads(running.read_text()).values()                           # train cot_sft, asleep
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=120) != 0 and "interrupted" in sweep.stderr.read()
    with pytest.raises(ProcessLookupError):
        os.killpg(step["pgid"], 0)                                                 # the step was stopped with it
    assert json.loads(running.read_text()) == {} and not (tmp / "work/depth2/seed0/cot_sft").exists()

    # a step that outlived its sweep (SIGKILLed runner) is named instead of trained twice
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        from pipeline.lock import _start_time

        running.write_text(json.dumps({"depth2/seed0/train cot_sft": {"pgid": orphan.pid, "start": _start_time(orphan.pid)}}))
        with pytest.raises(SystemExit, match=f"still running from an earlier sweep .*kill -- -{orphan.pid}"):
            mod.main(one)
    finally:
        orphan.kill()
        orphan.wait()
    assert mod.main(one) == 0                                                      # gone: the sweep goes on


def test_dry_run_lists_steps_and_touches_nothing(world, capsys):
    mod, args, tmp, calls = world
    assert mod.main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to run  depth4/policies  $ trimpi policy new clevr" in out
    assert "29 step(s) to run of 29" in out and not (tmp / "work").exists() and calls() == []


# ----------------------------------------------------------------------------- the real stages, tiny


@pytest.mark.slow
def test_tiny_sweep_with_the_real_stages(tmp_path):
    """Depths 2 and 4, one seed, two methods, every stage the real `trimpi` command on tiny-xs (~4 min on 2 cores)."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "base: {seed: 0, model: tiny-xs, threads: 1}\nmodel_init: {vocab_size: 1024, max_pixels: 12544}\n"
        "generate_clevr: {train_per_policy: 8, cot_per_policy: 4, test_per_policy: 2, override_per_policy: 2,"
        " override_count: 1, image_size: 64}\n"
        "cpt: {max_steps: 1, batch_size: 2, save_every: 0}\nsft: {max_steps: 1, batch_size: 2, save_every: 0}\n"
        "rl: {max_steps: 1, group_size: 2, rollout_batch: 2, update_batch: 2, micro_batch: 4, generation_batch: 2,"
        " max_response_len: 8, save_every: 0}\n"
        "evaluate: {suites: [main, in_context, override, referral, efficiency], batch_size: 4, max_new_tokens: 8,"
        " max_examples: 2, efficiency_samples: 1, efficiency_repeats: 1}\n")
    assert cli(["generate", "clevr", "--params", str(params), "--policies", str(ROOT / "policies/clevr"),
                "--out", str(tmp_path / "clevr")]) == 0
    assert cli(["model", "init", "--params", str(params), "--out", str(tmp_path / "base")]) == 0
    mod = load_script()
    args = ["--params", str(params), "--base", str(tmp_path / "base"), "--data", str(tmp_path / "clevr"),
            "--probes", str(tmp_path / "no-probes"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out/results.md"), "--depths", "2", "4", "--seeds", "0",
            "--methods", "cot_sft,trimpi_poro_grpo", "--jobs", "2"]
    assert mod.main(args) == 0
    md = (tmp_path / "out/results.md").read_text()
    assert "## Depth 2" in md and "## Depth 4" in md and f"| {R.PORO_GRPO} | 1 |" in md
    assert "TriMPI > CoT SFT + RL" not in md  # its baseline rows were not requested
    for d in (2, 4):
        m = json.loads((tmp_path / f"work/depth{d}/seed0/eval_trimpi_poro_grpo.json").read_text())
        assert m["main"]["clevr"]["by_depth"] == {str(d): m["main"]["clevr"]["accuracy"]}
        assert json.loads((tmp_path / f"work/depth{d}/seed0/trimpi_poro_grpo/model_card.json").read_text())["stages"] \
            == ["cpt", "sft", "rl"]
    assert json.loads((tmp_path / "work/depth4/validate_clevr.json").read_text())["success"] is True
    assert mod.main(args) == 0  # resumed: nothing left to run
    assert len(json.loads((tmp_path / "work/timings.json").read_text())) == 3 + 2 * 6


def test_report_only_works_beside_a_running_sweep_and_a_second_sweep_is_refused(world):
    import subprocess
    import sys

    mod, args, tmp, calls = world
    assert mod.main(args) == 0
    (tmp / "out/results.md").unlink()
    hold = ("import sys, time; from pipeline.lock import WorkspaceLock; "
            "WorkspaceLock(sys.argv[1], command='the running sweep').acquire(); print('held', flush=True); time.sleep(120)")
    sweep = subprocess.Popen([sys.executable, "-c", hold, str(tmp / "work")], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert sweep.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="in use by .*the running sweep.*`--report-only` works beside it"):
            mod.main(args)
        calls()
        assert mod.main(args + ["--report-only"]) == 0 and calls() == []      # reads, trains nothing
        assert (tmp / "out/results.md").exists()
    finally:
        sweep.kill()
        sweep.wait()


def test_the_report_commit_ignores_only_the_report_files(monkeypatch):
    mod = load_script()
    status = {"rev-parse": "abc123", "status": ""}
    monkeypatch.setattr(mod, "git", lambda *a: status[a[0]])
    status["status"] = " M reports/results.md\0 M reports/results.svg\0"   # the first entry's X is a space
    assert mod.commit() == "abc123"
    status["status"] = " M reports/results.md\0M  scripts/results.py\0"
    assert mod.commit() == "abc123+uncommitted"
