"""Regenerate ``reports/results.{md,svg,json}``: the paper's comparison, every method, over seeds and policy depths.

    .venv/bin/python scripts/results.py --depths 2 4 6 --seeds 0 1 2 --jobs 2   # the full sweep (issue 18)
    .venv/bin/python scripts/results.py --depths 2 --seeds 0                     # one unit: every row once
    .venv/bin/python scripts/results.py --depths 4 --seeds 0 --methods cot_sft,trimpi_poro_grpo
    .venv/bin/python scripts/results.py ... --dry-run       # the steps, each marked done / to do
    .venv/bin/python scripts/results.py ... --report-only   # tables from the evaluations finished so far (also while a sweep runs)

**What runs.** A *unit* is one (depth, seed): every method of the table below is trained and
evaluated with the ordinary ``trimpi`` stage commands and the pipeline's ``params.yaml`` (its
``base.seed`` replaced by the unit's seed), so the comparison always uses the current recipe.
Everything is fixed across seeds except training (init of LoRA/optimizer state, batch order,
RL sampling): the base model, the data and the policies.

* Depth 2 uses the pipeline's own ``policies/`` (``policies/clevr``) and ``data/clevr``.
* Depths 4 and 6 sample ``--policy-count`` policies with ``trimpi policy new clevr --depth N
  --count K --seed S`` (S fixed per depth, ``--policy-seed``; recorded in the results) into the
  work dir, then ``trimpi generate clevr`` and ``trimpi validate`` them there with the pipeline's
  ``generate_clevr`` / ``validate`` params.
* The base model (``models/base``) is policy-free and shared by every depth; it is also the
  forgetting suite's "before" model.
* The In-Context row needs no training: it is evaluated once per depth (greedy decoding does not
  depend on the seed; with ``evaluate.do_sample`` it is evaluated per seed).

**Resume.** Each step is skipped when its output exists, and every ``trimpi`` command writes its
output to a temporary sibling renamed into place only once complete (``pipeline/io.py``:
``atomic_dir`` / ``atomic_write_json``), so a step killed halfway leaves no output at the final
path and is simply run again (a trainer also resumes from its last checkpoint). Before a step
runs, stale temporary siblings of its output are removed. The check per step: a model dir holds
``config.json`` and ``model_card.json`` (written inside the renamed dir); an evaluation is a JSON
object with ``suites``; a validation report says ``"success": true``; sampled policies and data
dirs are renamed into place whole. A sweep refuses to resume after the recipe changed (params
sections, base model, depth-2 data: ``recipe.json`` in each dir), since finished steps would mix
two recipes: use a new ``--work`` dir.

**Parallelism.** ``--jobs N`` runs up to N independent steps at once (other units, or independent
branches of one unit: Direct SFT, CoT SFT and VM-CPT all start from the base), each a process with
one torch thread (``OMP_NUM_THREADS=1``; ``base.threads`` is set to 1 when N > 1). Order: seed 0
of every depth first (a complete one-seed picture early), then the next seed.

**Progress and timing.** Each step prints when it starts and ends with its wall time; its output
goes to ``<unit>/logs/<step>.log``; ``<work>/timings.json`` keeps every step's wall time and the
commit it ran on across resumed runs, and the end of the run prints (and the markdown records) the
wall time per unit. A failed step stops its dependents only; the others finish, the run exits 1
and leaves ``reports/results.*`` untouched.

Why a script and not DVC stages: the production graph (``dvc.yaml``) trains one model and gates
it; a full comparison is 10 trainings per unit and belongs to a results run, not to every policy
change. The DVC ``report`` stage writes ``reports/ablations.*`` (the pipeline's own variants);
this script owns ``reports/results.*``.

Methods (paper Table 2 rows + ablations; ``from`` = the checkpoint it starts from):

===================  ==================================  ==========================================
key                  row                                 recipe
===================  ==================================  ==========================================
in_context           In-Context                          base, policy in the prompt (no training)
direct_sft           Direct SFT                          base -> answer-only SFT
cot_sft              CoT SFT                             base -> CoT SFT
cot_sft_grpo         CoT SFT + GRPO                      cot_sft -> GRPO (no PolicyRollout)
cot_sft_dapo         CoT SFT + DAPO                      cot_sft -> DAPO (no PolicyRollout)
cpt_cot_sft          VM-CPT + CoT SFT                    base -> VM-CPT -> CoT SFT
trimpi_grpo          TriMPI w/o PoRo (GRPO)              cpt_cot_sft -> GRPO
trimpi_poro_grpo     TriMPI w/ PoRo-GRPO                 cpt_cot_sft -> GRPO + PolicyRollout
trimpi_poro_dapo     TriMPI w/ PoRo-DAPO                 cpt_cot_sft -> DAPO + PolicyRollout
cot_sft_poro_grpo    CoT SFT + PoRo-GRPO (w/o VM-CPT)    cot_sft -> GRPO + PolicyRollout
===================  ==================================  ==========================================
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/results.py` puts scripts/ first, not the repo
    sys.path.insert(0, str(ROOT))

from pipeline.evaluate import report as R  # noqa: E402
from pipeline.io import atomic_write_json, atomic_write_text, file_hash, stable_hash  # noqa: E402

TRIMPI = [sys.executable, "-m", "pipeline.cli"]
POLL_S = 0.5
"""How often the scheduler looks at its running steps (tests shorten it)."""


@dataclass(frozen=True)
class Method:
    row: str | None      # table row (None: an intermediate checkpoint only)
    kind: str            # none | direct | sft | cpt | rl
    start: str           # the checkpoint it trains from: "base" or another key
    sets: tuple = ()     # `--set` overrides of its stage's params section


METHODS = {
    "in_context": Method(R.IN_CONTEXT, "none", "base"),
    "direct_sft": Method(R.DIRECT, "direct", "base"),
    "cot_sft": Method(R.COT, "sft", "base"),
    "cot_sft_grpo": Method(R.COT_GRPO, "rl", "cot_sft", ("algorithm=grpo", "policy_rollout=false")),
    "cot_sft_dapo": Method(R.COT_DAPO, "rl", "cot_sft", ("algorithm=dapo", "policy_rollout=false")),
    "cpt": Method(None, "cpt", "base"),
    "cpt_cot_sft": Method(R.CPT_COT, "sft", "cpt"),
    "trimpi_grpo": Method(R.TRIMPI_NOPORO, "rl", "cpt_cot_sft", ("algorithm=grpo", "policy_rollout=false")),
    "trimpi_poro_grpo": Method(R.PORO_GRPO, "rl", "cpt_cot_sft", ("algorithm=grpo", "policy_rollout=true")),
    "trimpi_poro_dapo": Method(R.PORO_DAPO, "rl", "cpt_cot_sft", ("algorithm=dapo", "policy_rollout=true")),
    "cot_sft_poro_grpo": Method(R.NOCPT_PORO, "rl", "cot_sft", ("algorithm=grpo", "policy_rollout=true")),
}
ROWS = [k for k, m in METHODS.items() if m.row]

POLICY_SEEDS = {4: 11, 6: 13}
"""`trimpi policy new` seed per depth: the depth-4/6 sets the issue measured CoT SFT on."""
RECIPE_SECTIONS = ("base", "model_init", "cpt", "sft", "direct_sft", "rl", "evaluate")
"""params.yaml sections the training and evaluation steps read (a change invalidates a sweep)."""
DATA_SECTIONS = ("generate_clevr", "validate")
"""... and the ones the depth-4/6 data steps read (with base.seed)."""


# ----------------------------------------------------------------------------- steps


@dataclass
class Step:
    id: str                             # unique, e.g. "depth4/seed0/train cot_sft"
    unit: str                           # timing group: "depth 4 seed 0" or "depth 4" (shared steps)
    cmd: list[str]
    log: Path
    done: Callable[[], bool]
    deps: list[str] = field(default_factory=list)
    order: tuple = ()                   # scheduling priority (smallest first)
    target: bool = False                # an evaluation the table needs (what pulls steps into a run)
    before: Callable[[], None] | None = None   # main process, before launching (clear stale temp output)
    after: Callable[[], None] | None = None    # main process, after exit 0 (move a temp output into place)


def model_done(path: Path) -> bool:
    """A trained checkpoint: trimpi renames the whole dir into place, model card included, only when complete."""
    return (path / "config.json").is_file() and (path / "model_card.json").is_file()


def json_done(path: Path, key: str, value=None) -> bool:
    """An atomically written JSON object that has ``key`` (equal to ``value`` when given)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and key in obj and (value is None or obj[key] == value)


def clear_stale(path: Path) -> Callable[[], None]:
    """Remove what a killed writer left beside ``path`` (``pipeline/io.py``: ``.<name>.*.tmp`` while writing,
    ``.<name>.old-<pid>`` while replacing): the step is about to write it again."""
    def run() -> None:
        for p in [*path.parent.glob(f".{path.name}.*.tmp*"), *path.parent.glob(f".{path.name}.old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return run


def rel(p: Path | str) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def fingerprint_model(path: Path) -> dict:
    """Cheap identity of a checkpoint dir (file sizes + config hash, like the trainers' resume fingerprint)."""
    return {"files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
            "config": file_hash(path / "config.json")}


def fingerprint_data(path: Path) -> dict:
    return {f: file_hash(path / f) for f in ("manifest.json", "train.jsonl", "cot.jsonl", "test.jsonl")
            if (path / f).exists()}


def check_recipe(d: Path, recipe: dict, write: bool = True) -> None:
    """Refuse to mix recipes in one work dir: ``d/recipe.json`` must match ``recipe`` (written the first time)."""
    f = d / "recipe.json"
    if f.exists():
        old = json.loads(f.read_text())
        diff = sorted({*old, *recipe} - {k for k in recipe if old.get(k) == recipe[k]})
        if diff:
            sys.exit(f"error: {rel(f)}: {', '.join(diff)}: expected the recipe this sweep started with, got a changed "
                     f"one (params.yaml, base model or data): its finished steps would mix two recipes; use a new "
                     f"--work dir (or delete {rel(d)} to redo it)")
    elif write:
        atomic_write_json(f, recipe)  # creates the dir


def sub_params(params: dict, names) -> dict:
    return {k: params.get(k) for k in names}


def needed(keys: list[str]) -> list[str]:
    """The requested methods plus every checkpoint they start from, in training order."""
    out: list[str] = []

    def add(k: str) -> None:
        if k == "base" or k in out:
            return
        add(METHODS[k].start)
        out.append(k)
    for k in keys:
        add(k)
    return out


@dataclass
class Depth:
    depth: int
    dir: Path              # work/depth<N>: shared steps of the depth, and its units
    policies: Path         # policies root passed to every stage (--policies)
    data: Path
    params: Path           # the pipeline's params (base.threads adjusted): data steps, In-Context
    prep: list[str]        # step ids every unit of this depth waits for (data validated)
    source: str            # where its policies come from, for the report


def plan(a, params: dict, keys: list[str], write: bool = True) -> tuple[list[Step], list[Depth]]:
    """Every step of the sweep, done or not (``write=False``: touch nothing, for --dry-run/--report-only)."""
    work, base, probes = a.work, a.base, a.probes
    threads = 1 if a.jobs > 1 else int(params.get("base", {}).get("threads", 1) or 1)
    pipe = {**params, "base": {**params.get("base", {}), "threads": threads}}
    base_fp = fingerprint_model(base)
    sampling = bool(params.get("evaluate", {}).get("do_sample"))
    steps: list[Step] = []
    depths: list[Depth] = []
    for di, d in enumerate(a.depths):
        dd = work / f"depth{d}"
        dparams = dd / "params.yaml"
        if d == 2:
            dep = Depth(d, dd, a.policies, a.data, dparams, [], f"`{rel(a.policies)}` (the pipeline's, {rel(a.data)})")
            data_recipe = fingerprint_data(a.data)
        else:
            seed, count = a.policy_seed[d], a.policy_count
            pol, data = dd / "policies", dd / "clevr"
            tmp = dd / ".policies.tmp"
            src = f"`trimpi policy new clevr --depth {d} --count {count} --seed {seed}`"
            dep = Depth(d, dd, pol, data, dparams, [f"depth{d}/validate"], src)
            data_recipe = {"policy_new": {"depth": d, "count": count, "seed": seed},
                           "params": sub_params(params, DATA_SECTIONS), "base_seed": params["base"]["seed"]}
            order = (-1, di)
            logs = dd / "logs"

            def _clear_tmp(tmp=tmp):
                shutil.rmtree(tmp, ignore_errors=True)

            def _publish(tmp=tmp, pol=pol):
                os.replace(tmp, pol)
            steps += [
                # into a temp root renamed whole afterwards: an interrupted `policy new` (one file per
                # policy) never looks finished; the temp root's parent holds no other policies, so the
                # sampled names depend on (depth, seed) only
                Step(f"depth{d}/policies", f"depth {d}", TRIMPI + ["policy", "new", "clevr", "--params", str(dparams),
                     "--depth", str(d), "--count", str(count), "--seed", str(seed), "--out", str(tmp / "clevr")],
                     logs / "policies.log", lambda pol=pol: pol.is_dir(), [], order, before=_clear_tmp, after=_publish),
                Step(f"depth{d}/generate", f"depth {d}", TRIMPI + ["generate", "clevr", "--params", str(dparams),
                     "--policies", str(pol / "clevr"), "--out", str(data)], logs / "generate.log",
                     lambda data=data: (data / "manifest.json").is_file(), [f"depth{d}/policies"], order,
                     before=clear_stale(data)),
                Step(f"depth{d}/validate", f"depth {d}", TRIMPI + ["validate", "--params", str(dparams), "--task", "clevr",
                     "--data", str(data), "--policies", str(pol / "clevr"), "--report", str(dd / "validate_clevr.json")],
                     logs / "validate.log", lambda dd=dd: json_done(dd / "validate_clevr.json", "success", True),
                     [f"depth{d}/generate"], order, before=clear_stale(dd / "validate_clevr.json")),
            ]
        depths.append(dep)
        # what the depth's own steps (data, In-Context evaluation) were made with; checked before any
        # file of the dir is rewritten, so a refused sweep leaves the old params next to the old outputs
        check_recipe(dd, {"data": data_recipe, "evaluate": params.get("evaluate"), "base": base_fp,
                          "base_seed": params["base"]["seed"]}, write)
        if write:
            atomic_write_text(dparams, yaml.safe_dump(pipe, sort_keys=False))

        def evaluate(unit: str, uid: str, pf: Path, model: str, out: Path, key: str, deps: list[str],
                     order: tuple) -> Step:
            suites = ["--suites", "in_context,efficiency"] if key == "in_context" else []
            return Step(f"{uid}/eval {key}", unit, TRIMPI + [
                "evaluate", "--params", str(pf), "--model", model, "--data", str(dep.data), "--policies",
                str(dep.policies), "--probes", str(probes), "--baseline-model", str(base), "--out", str(out),
                "--preds", str(out.parent / "preds" / key), *suites],
                out.parent / "logs" / f"eval_{key}.log", lambda out=out: json_done(out, "suites"), deps, order,
                target=True, before=clear_stale(out))

        if "in_context" in keys and not sampling:
            steps.append(evaluate(f"depth {d}", f"depth{d}", dparams, str(base), dd / "eval_in_context.json",
                                  "in_context", dep.prep, (-1, di, 1)))
        for si, s in enumerate(a.seeds):
            ud, uid, unit = dd / f"seed{s}", f"depth{d}/seed{s}", f"depth {d} seed {s}"
            pf = ud / "params.yaml"
            recipe = {"params": sub_params({**params, "base": {**params["base"], "seed": s}}, RECIPE_SECTIONS),
                      "base": base_fp, "data": data_recipe}
            recipe["params"]["base"].pop("threads", None)  # how fast, not what: --jobs may change it
            check_recipe(ud, recipe, write)
            if write:  # the pipeline's params with this seed: every stage reads base.seed
                atomic_write_text(pf, yaml.safe_dump({**pipe, "base": {**pipe["base"], "seed": s}}, sort_keys=False))
            ck = {"base": str(base)}
            for k in needed(keys):
                m = METHODS[k]
                if m.kind == "none":
                    continue
                out = ud / k
                ck[k] = str(out)
                deps = list(dep.prep) + ([] if m.start == "base" else [f"{uid}/train {m.start}"])
                common = ["--params", str(pf), "--model", ck[m.start], "--data", str(dep.data), "--out", str(out),
                          "--policies", str(dep.policies)]
                if m.kind == "cpt":
                    cmd = TRIMPI + ["train", "cpt", *common]
                elif m.kind in ("sft", "direct"):
                    cmd = TRIMPI + ["train", "sft", *(["--direct"] if m.kind == "direct" else []), *common]
                else:
                    cmd = TRIMPI + ["train", "rl", *common, *[x for v in m.sets for x in ("--set", v)]]
                steps.append(Step(f"{uid}/train {k}", unit, cmd, ud / "logs" / f"train_{k}.log",
                                  lambda out=out: model_done(out), deps, (si, di, list(METHODS).index(k), 0),
                                  before=clear_stale(out)))
            for k in keys:
                if k == "in_context" and not sampling:
                    continue
                deps = list(dep.prep) + ([] if k == "in_context" else [f"{uid}/train {k}"])
                steps.append(evaluate(unit, uid, pf, ck.get(k, str(base)), ud / f"eval_{k}.json", k, deps,
                                      (si, di, list(METHODS).index(k), 1)))
    return steps, depths


# ----------------------------------------------------------------------------- running


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # -z: NUL-separated "XY path" entries (git() strips the output, eating a leading space of X)
    dirty = [e for e in git("status", "--porcelain", "-z", "--untracked-files=no").split("\0")
             if e.strip() and not e.strip().split(" ", 1)[-1].startswith("reports/results.")]
    return head + ("+uncommitted" if dirty else "")


def minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def to_run(steps: list[Step]) -> list[Step]:
    """The unfinished steps the unfinished targets need (a finished step is never re-run)."""
    by_id = {s.id: s for s in steps}
    want: set[str] = set()

    def need(sid: str) -> None:
        s = by_id[sid]
        if sid in want or s.done():
            return
        want.add(sid)
        for d in s.deps:
            need(d)
    for s in steps:
        if s.target:
            need(s.id)
    return sorted((by_id[i] for i in want), key=lambda s: s.order)


def display(cmd: list[str]) -> str:
    shown = ["trimpi", *cmd[len(TRIMPI):]] if cmd[:len(TRIMPI)] == TRIMPI else cmd
    return " ".join(shlex.quote(rel(c) if "/" in c and Path(c).is_absolute() else c) for c in shown)


def live_steps(path: Path) -> dict[str, dict]:
    """Steps an earlier sweep started that are still running (its runner was SIGKILLed): id -> entry."""
    from pipeline.lock import _start_time

    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {sid: e for sid, e in entries.items() if _start_time(e["pgid"]) == e.get("start")}


def execute(steps: list[Step], jobs: int, timings_path: Path, env: dict | None = None) -> list[str]:
    """Run what :func:`to_run` selects, ``jobs`` at a time in dependency order; returns the failed/blocked ids.

    Each step runs in its own process group, recorded in ``running.json`` next to the timings while it
    runs: Ctrl-C or SIGTERM stops every running step (their outputs are atomic, a trainer resumes
    from its checkpoint), and a later sweep refuses to start beside a step that outlived a SIGKILLed one.
    """
    from pipeline.lock import _start_time

    running_path = timings_path.with_name("running.json")
    orphans = live_steps(running_path)
    if orphans:
        sys.exit("error: " + "; ".join(f"{sid} is still running from an earlier sweep (process group {e['pgid']}: "
                                       f"stop it with `kill -- -{e['pgid']}` or wait for it)" for sid, e in orphans.items()))
    todo = to_run(steps)
    pending = {s.id: s for s in todo}
    total, n = len(todo), 0
    running: dict[subprocess.Popen, tuple[Step, float, object]] = {}
    bad: dict[str, str] = {}
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    head = commit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    print(f"results: {total} step(s) to run, {len(steps) - total} already done or not needed, {jobs} at a time",
          flush=True)

    def record() -> None:
        atomic_write_json(running_path, {st.id: {"pgid": p.pid, "start": _start_time(p.pid), "log": str(st.log)}
                                         for p, (st, _, _) in running.items()})

    def stop(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            for s in list(pending.values()):  # a failed dependency blocks its dependents, transitively
                hit = next((d for d in s.deps if d in bad), None)
                if hit:
                    bad[s.id] = f"not run: {hit} failed"
                    del pending[s.id]
                    print(f"[-/{total}] {s.id}: not run ({hit} failed)", flush=True)
            busy = {st.id for st, _, _ in running.values()}
            ready = [s for s in pending.values() if not any(d in pending or d in busy for d in s.deps)]
            for s in sorted(ready, key=lambda s: s.order)[:max(0, jobs - len(running))]:
                del pending[s.id]
                n += 1
                if s.before:
                    s.before()
                s.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(s.log, "a")
                log.write(f"\n==== {datetime.datetime.now().isoformat(timespec='seconds')} {display(s.cmd)}\n")
                log.flush()
                p = subprocess.Popen(s.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)
                running[p] = (s, time.time(), log)
                record()
                print(f"[{n}/{total}] {s.id}: started  $ {display(s.cmd)}", flush=True)
            for p in [p for p in running if p.poll() is not None]:
                s, t0, log = running.pop(p)
                log.close()
                record()
                dt = time.time() - t0
                if p.returncode == 0 and s.after:
                    s.after()
                if p.returncode == 0 and s.done():
                    timings[s.id] = {"unit": s.unit, "wall_s": round(dt, 1), "commit": head,
                                     "finished": datetime.datetime.now().isoformat(timespec="seconds")}
                    atomic_write_json(timings_path, timings)
                    print(f"  {s.id}: done in {minutes(dt)}", flush=True)
                else:
                    why = f"exit {p.returncode}" if p.returncode else "exit 0 but its output is missing"
                    bad[s.id] = why
                    tail = s.log.read_text(errors="replace").strip().splitlines()[-6:]
                    print(f"  {s.id}: FAILED ({why}) after {minutes(dt)}; log {rel(s.log)}:\n    "
                          + "\n    ".join(tail), flush=True)
            if running:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        # steps run in their own sessions (a terminal's Ctrl-C reaches only this process): stop them here.
        # Their outputs are written atomically and trainers resume from their last checkpoint.
        for p in running:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in running:
            p.wait()
        running.clear()
        record()
        sys.exit("interrupted: its running steps were stopped; run the same command again to resume "
                 "(finished steps are kept)")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return list(bad)


def unit_times(steps: list[Step], timings: dict) -> list[tuple[str, float, int, int, str]]:
    """(unit, wall s of its timed steps, timed steps, steps, slowest step) per unit, in plan order."""
    units: dict[str, list[Step]] = {}
    for s in steps:
        units.setdefault(s.unit, []).append(s)
    out = []
    for u, ss in units.items():
        timed = [(timings[s.id]["wall_s"], s.id.rsplit("/", 1)[-1]) for s in ss if s.id in timings]
        slow = max(timed)[1] + f" ({minutes(max(timed)[0])})" if timed else "–"
        out.append((u, sum(t for t, _ in timed), len(timed), len(ss), slow))
    return out


def times_markdown(rows) -> str:
    lines = ["## Wall time per unit", "",
             "One process per step, one torch thread each (CPU-minutes = wall minutes); steps done in earlier "
             "runs keep the time they took then (`timings.json` in the work dir).", "",
             "| Unit | wall time | steps timed | slowest step |", "|---|---|---|---|"]
    lines += [f"| {u} | {minutes(t)} | {k}/{n} | {slow} |" for u, t, k, n, slow in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def write_report(a, steps: list[Step], depths: list[Depth], keys: list[str], timings: dict, argv: list[str]) -> bool:
    # In-Context was evaluated per seed only when decoding samples (plan())
    sampling = any(s.id.endswith("/eval in_context") and "/seed" in s.id for s in steps)
    groups, missing = [], []
    for dep in depths:
        variants = []
        for k in keys:
            if k == "in_context" and not sampling:
                files = [dep.dir / "eval_in_context.json"]
            else:
                files = [dep.dir / f"seed{s}" / f"eval_{k}.json" for s in a.seeds]
            have = [rel(f) for f in files if json_done(f, "suites")]
            missing += [f"depth {dep.depth}: {rel(f)}" for f in files if not json_done(f, "suites")]
            if have:
                variants.append((METHODS[k].row, have, "in_context" if k == "in_context" else "main"))
        if variants:
            groups.append((f"Depth {dep.depth}", variants))
    if not groups:
        print("results: no finished evaluation to report yet")
        return False
    result = R.build(groups)
    policies = "; ".join(f"depth {d.depth}: {d.source}" + (
        f" -> {', '.join(sorted(p.stem for p in (d.policies / 'clevr').glob('*.yaml')))}" if d.policies.is_dir() else "")
        for d in depths)
    ran_at = sorted({t["commit"] for k, t in timings.items() if any(s.id == k for s in steps)})
    notes = [f"Regenerate: `{' '.join(shlex.quote(x) for x in argv)}` (resumes; `--jobs N` runs N steps at once). "
             f"Report written at commit `{commit()}`" + (f"; its steps ran at {', '.join(f'`{c}`' for c in ran_at)}"
                                                          if ran_at else "") + ".",
             f"Recipe: the pipeline's `params.yaml` with `base.seed` = the seed; base model `{rel(a.base)}` "
             f"(policy-free, shared by every depth). Policies: {policies}."]
    if missing:
        notes.append("Not measured yet (" + str(len(missing)) + "): " + ", ".join(missing[:12])
                     + (" ..." if len(missing) > 12 else ""))
    rows = unit_times(steps, timings)
    provenance = {"command": argv, "commit": commit(), "steps_ran_at": ran_at, "base": rel(a.base),
                  "seeds": a.seeds, "depths": a.depths,
                  "policies": {str(d.depth): {"source": d.source, "root": rel(d.policies)} for d in depths},
                  "policy_new_seeds": {str(d): a.policy_seed[d] for d in a.depths if d != 2},
                  "policy_count": a.policy_count, "missing": missing,
                  "wall_time": [{"unit": u, "wall_s": t, "steps_timed": k, "steps": n} for u, t, k, n, _ in rows]}
    out, svg, js = R.write(result, a.out, title="Results: the paper's comparison at our scale", notes=notes,
                           appendix=[times_markdown(rows)], extra={"provenance": provenance})
    print(R.markdown(result, "Results", notes, [times_markdown(rows)]))
    print(f"results: {rel(out)}, {rel(svg)}, {rel(js)}")
    return True


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2], help="ClevrPolicy depths (paper: 2 4 6)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(ROWS), help="comma-separated row keys (default: every row)")
    p.add_argument("--jobs", type=int, default=1, help="steps run at once, one core / torch thread each")
    p.add_argument("--params", default="params.yaml", help="the pipeline's params (the recipe)")
    p.add_argument("--data", default="data/clevr", help="depth-2 dataset (the pipeline's)")
    p.add_argument("--policies", default="policies", help="depth-2 policies root (the pipeline's)")
    p.add_argument("--base", default="models/base", help="policy-free base model every method starts from")
    p.add_argument("--probes", default="data/generic", help="forgetting-suite probe set")
    p.add_argument("--policy-seed", action="append", default=[], metavar="DEPTH=SEED",
                   help="`trimpi policy new` seed of a depth (default: " + ", ".join(f"{d}={s}" for d, s in POLICY_SEEDS.items()) + ")")
    p.add_argument("--policy-count", type=int, default=2, help="policies sampled per depth > 2")
    p.add_argument("--work", default="reports/runs", help="checkpoints, evaluations, logs (git-ignored)")
    p.add_argument("--out", default="reports/results.md", help="markdown (.svg and .json next to it)")
    p.add_argument("--dry-run", action="store_true", help="list the steps (done / to run) and exit")
    p.add_argument("--report-only", action="store_true", help="write the tables from the finished evaluations only")
    a = p.parse_args(argv)
    seeds = dict(POLICY_SEEDS)
    for spec in a.policy_seed:
        d, _, s = spec.partition("=")
        if not (d.strip().isdigit() and s.strip().lstrip("-").isdigit()):
            p.error(f"--policy-seed: expected DEPTH=SEED (e.g. 4=11), got {spec!r}")
        seeds[int(d)] = int(s)
    a.policy_seed = seeds
    for d in a.depths:
        if d != 2 and d not in seeds:
            p.error(f"--depths {d}: no policy seed for it; add --policy-seed {d}=SEED")
        if d < 1:
            p.error(f"--depths: expected positive depths, got {d}")
    if a.jobs < 1 or a.policy_count < 1:
        p.error("--jobs and --policy-count: expected at least 1")
    for name in ("params", "data", "policies", "base", "probes", "work", "out"):
        setattr(a, name, (ROOT / getattr(a, name)).resolve())
    return a


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(raw)
    keys = [k.strip() for k in a.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS or not METHODS[k].row]
    if unknown or not keys:
        sys.exit(f"error: --methods: {unknown[0] if unknown else '(empty)'}: expected any of {', '.join(ROWS)}")
    keys = [k for k in ROWS if k in keys]  # table order
    from pipeline.io import InputError, load_yaml

    try:
        params = load_yaml(a.params)
    except InputError as e:
        sys.exit(f"error: {e}")
    checks = [(a.params, "the pipeline's params"), (a.base / "config.json", "`dvc repro train_base` (models/base)")]
    if 2 in a.depths:
        checks += [(a.data / "manifest.json", "`dvc repro validate_clevr` (data/clevr)"), (a.policies, "policies/")]
    for path, how in checks:
        if not path.exists():
            sys.exit(f"error: {rel(path)}: expected it to exist: run {how} first")
    budgets = {"evaluate.max_new_tokens": params.get("evaluate", {}).get("max_new_tokens"),
               "rl.max_response_len": params.get("rl", {}).get("max_response_len")}
    fixed = {k: v for k, v in budgets.items() if v}
    if fixed and max(a.depths) > 2:
        print(f"warning: {rel(a.params)}: {', '.join(f'{k}: {v}' for k, v in fixed.items())} is a fixed response "
              f"budget: depth-{max(a.depths)} CoTs may be cut before \\boxed{{}} (0 derives it from the data)",
              file=sys.stderr)
    timings_path = a.work / "timings.json"
    if a.dry_run:
        steps, _ = plan(a, params, keys, write=False)
        todo = {s.id for s in to_run(steps)}
        for s in sorted(steps, key=lambda s: s.order):
            print(f"{'to run' if s.id in todo else 'done  ' if s.done() else 'unused'}  {s.id}  $ {display(s.cmd)}")
        print(f"{len(todo)} step(s) to run of {len(steps)}")
        return 0
    if a.report_only:  # reads finished evaluations only: no lock, so it works beside a running sweep
        steps, depths = plan(a, params, keys, write=False)
        return finish(a, raw, steps, depths, keys, timings_path, [])
    from pipeline.lock import LockBusy, WorkspaceLock

    try:  # a second sweep on the same work dir would train the same outputs twice
        with WorkspaceLock(a.work, timeout=0, command="scripts/results.py " + " ".join(raw)):
            steps, depths = plan(a, params, keys)
            return finish(a, raw, steps, depths, keys, timings_path, execute(steps, a.jobs, timings_path))
    except LockBusy as e:
        sys.exit(f"error: {str(e).split('; wait for it')[0]}; wait for that sweep to finish (`--report-only` "
                 f"works beside it)")


def finish(a, raw: list[str], steps: list[Step], depths: list[Depth], keys: list[str], timings_path: Path,
           bad: list[str]) -> int:
    """Per-unit times, then the report (unless a step failed: the committed report stays as it was)."""
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    print("\nwall time per unit (one core per step):")
    for u, t, k, n, slow in unit_times(steps, timings):
        print(f"  {u:<20} {minutes(t):>10}  ({k}/{n} steps timed; slowest: {slow})")
    if bad:
        print(f"\nresults: {len(bad)} step(s) failed or blocked: {', '.join(bad)}\nresults: {rel(a.out)} "
              f"left unchanged; fix the cause and run the same command to resume", file=sys.stderr)
        return 1
    # the command that regenerates everything (--report-only only re-aggregates)
    display_argv = ["python", "scripts/results.py", *[x for x in raw if x != "--report-only"]]
    return 0 if write_report(a, steps, depths, keys, timings, display_argv) else 1

if __name__ == "__main__":
    sys.exit(main())
