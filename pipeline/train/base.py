r"""``trimpi train base``: perception pretraining of the tiny presets, before any policy is seen.

The paper starts from Qwen2.5-VL-7B-Instruct, which already sees and follows instructions; our
offline tiny presets start from random weights and, trained on policies directly, learned the
answer format but not the image (issue 9). This stage turns ``models/init`` into a small
instruction-following VLM on the policy-free generic QA of ``trimpi generate generic``
(existence, conjunctions, attributes, counting, object lists, text-only questions), with the
pipeline's prompt builder and response format, and reports held-out accuracy per question type.

Its inputs are ``models/init`` and ``data/generic`` only, never ``policies/``: editing a policy
never re-runs it (``dvc.yaml`` declares exactly those deps).

How it trains (findings and measurements in ``benchmarks/PERCEPTION.md``):

* first the vision tower alone (a phase with ``objective: vision``, :mod:`pipeline.train.vision`):
  every visual token learns the attributes of the object under it from the scene graphs of the
  same generic images. Without it the tower never learned shape, size or material through the
  language model (one answer token per image is too little signal for a random ViT);
* then full fine-tunes with the shared runner of CPT/SFT
  (:func:`pipeline.train.runner.run_supervised`: resumable checkpoints, ``train_log.csv``), loss on
  the response only;
* a **curriculum** of phases, each one ``run_supervised`` call on a subset of question types and,
  optionally, of scenes with at most ``max_objects`` objects (``phases``; params.yaml: object lists
  and attribute questions on 1-2-object scenes first, so the vision-to-word mapping forms before the
  yes/no questions that need it), each phase resumable on its own;
* evaluation by greedy generation on ``test.jsonl`` (the forgetting suite's probe set), exact
  match of the parsed ``\boxed{}`` answer, per ``meta.qtype``, next to each type's majority rate.

Departures from the obvious: real pretrained checkpoints (anything that is not a tiny preset or
``smollm2-vl``, read from ``model_card.json``) are passed through unchanged with ``skipped`` in the
metrics — they already see, and perception pretraining would only cost them. A finished phase is
kept beside the output (``<out>.phases/``) until the whole stage succeeds, so an interrupted
evaluation does not retrain.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.io import atomic_dir, atomic_write_json, input_error, read_json, stable_hash
from pipeline.train.engine import TrainConfig



@dataclass
class Phase:
    """One curriculum phase: what it trains, on which records, for how long, at what lr."""

    qtypes: list[str] = field(default_factory=list)
    """Question types (``meta.qtype``) of train.jsonl used in this phase; empty = all."""
    epochs: float = 1.0
    """Passes over the phase's records."""
    lr: float = 0.0
    """Peak learning rate of the phase (0 = the section's ``lr``)."""
    max_objects: int = 0
    """Only records whose scene has at most this many objects (0 = any; text records always pass):
    an easy-scenes-first curriculum on one dataset."""
    objective: str = "qa"
    """``qa``: the language-model loss on the response (the pipeline's supervised loop); ``vision``: the
    vision tower alone on per-token labels from the scene graphs (:mod:`pipeline.train.vision`)."""
    batch_size: int = 0
    """Micro batch of the phase (0 = the section's ``batch_size``); vision batches are cheap."""
    freeze_vision: bool = False
    """A ``qa`` phase trains the language model only (the tower keeps what a vision phase taught it)."""


@dataclass
class BaseTrainConfig(TrainConfig):
    """``params.yaml: train_base`` — perception pretraining of the tiny presets on generic QA."""

    lr: float = 2e-3
    """Peak learning rate (full fine-tune of a random tiny model)."""
    warmup_ratio: float = 0.05
    """Fraction of each phase's optimizer steps with linear warm-up."""
    save_every: int = 100
    """Checkpoint every N optimizer steps (resume after an interruption)."""
    phases: list[Phase] = field(default_factory=lambda: [
        # the tower alone, per-token scene-graph labels (PERCEPTION.md §8); generic QA phases on top teach
        # counting and object lists but not existence, and the policy stages learn without them
        Phase(objective="vision", epochs=2.0, batch_size=32)])
    """The curriculum, in order; ``epochs`` of the section is ignored when phases are given."""
    data_file: str = "train.jsonl"
    """Records file inside --data."""
    eval_file: str = "test.jsonl"
    """Held-out records: the vision phase's token accuracy is measured on their images, and, when a qa phase
    ran, generated answers are scored per question type (empty = no evaluation)."""
    eval_max_examples: int = 0
    """Score at most this many test records per question type (0 = all)."""
    eval_batch_size: int = 16
    """Conversations per generate call."""
    eval_max_new_tokens: int = 128
    """Response budget of the evaluation (the longest gold CoT, an object list, is ~90 tokens)."""
    skip_pretrained: bool = True
    """Pass real pretrained checkpoints through unchanged (they already see)."""


def check_config(cfg: BaseTrainConfig, params) -> None:
    if not cfg.phases:
        raise input_error(params, "train_base.phases", "at least one phase", cfg.phases)
    for i, ph in enumerate(cfg.phases):
        if ph.objective not in ("qa", "vision"):
            raise input_error(params, f"train_base.phases[{i}].objective", "qa or vision", ph.objective)
        if ph.batch_size < 0:
            raise input_error(params, f"train_base.phases[{i}].batch_size", "0 (section's) or a positive size",
                              ph.batch_size)
        if ph.max_objects < 0:
            raise input_error(params, f"train_base.phases[{i}].max_objects", "0 (any) or a positive count",
                              ph.max_objects)
        if ph.epochs <= 0:
            raise input_error(params, f"train_base.phases[{i}].epochs", "a positive number", ph.epochs)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike, cfg: BaseTrainConfig,
             threads: int = 1) -> dict:
    """Greedy generation on the test records: accuracy and majority rate per question type (percent)."""
    from tqdm import tqdm

    from pipeline.data.records import ImageStore, read_records
    from pipeline.evaluate.metrics import exact_match
    from pipeline.model import generate, load
    from pipeline.model.prompts import format_ok, parse_answer, policy_free

    recs = read_records(Path(data_dir) / cfg.eval_file)
    if cfg.eval_max_examples:
        kept: Counter = Counter()
        recs = [r for r in recs if (kept.update([r.meta.get("qtype", r.task)]) or
                                    kept[r.meta.get("qtype", r.task)] <= cfg.eval_max_examples)]
    store = ImageStore(data_dir)
    model, proc = load(model_dir, threads=threads)
    hits: dict[str, list[int]] = {}
    caption: dict[str, list[int]] = {}
    fmt: list[int] = []
    golds: dict[str, Counter] = {}
    for i in tqdm(range(0, len(recs), cfg.eval_batch_size), desc="evaluate base", unit="batch", file=sys.stderr):
        chunk = recs[i:i + cfg.eval_batch_size]
        convs = [policy_free(r, [store.open(ref) for ref in r.images]) for r in chunk]
        texts = generate(model, proc, convs, max_new_tokens=cfg.eval_max_new_tokens)
        for r, t in zip(chunk, texts):
            q = r.meta.get("qtype", r.task)
            hits.setdefault(q, []).append(int(exact_match(parse_answer(t), r.answer)))
            if q == "objects":
                for attr, ok in caption_hits(t, r.meta["scene"]).items():
                    caption.setdefault(attr, []).extend(ok)
            golds.setdefault(q, Counter())[r.answer.strip().lower()] += 1
            fmt.append(int(format_ok(t)))
    acc = {q: round(100 * sum(v) / len(v), 1) for q, v in hits.items()}
    majority = {q: round(100 * c.most_common(1)[0][1] / sum(c.values()), 1) for q, c in golds.items()}
    n = sum(len(v) for v in hits.values())
    return {"accuracy": acc, "majority": majority, "n": {q: len(v) for q, v in hits.items()},
            "overall": round(100 * sum(sum(v) for v in hits.values()) / max(1, n), 1),
            "caption_attributes": {a: round(100 * sum(v) / len(v), 1) for a, v in caption.items() if v},
            "format_ok": round(100 * sum(fmt) / max(1, len(fmt)), 1)}


def caption_hits(text: str, scene: dict) -> dict[str, list[int]]:
    """Per attribute, 1/0 for each object of a generated left-to-right object list that names the
    gold object's value at the same position (the first-order reading skill, apart from counting).

    Objects missing from the list count as misses; extra ones are ignored."""
    import re

    from pipeline.data.generic_qa import _left_to_right
    from pipeline.scenes import ATTRIBUTES, PHRASE_ORDER

    alt = {a: "|".join(ATTRIBUTES[a]) for a in PHRASE_ORDER}
    pat = re.compile(r"\ban? " + " ".join(f"({alt[a]})" for a in PHRASE_ORDER) + r"\b")
    said = pat.findall(text)
    out: dict[str, list[int]] = {a: [] for a in PHRASE_ORDER}
    for i, gold in enumerate(_left_to_right(scene["objects"])):
        for j, a in enumerate(PHRASE_ORDER):
            out[a].append(int(i < len(said) and said[i][j] == gold[a]))
    return out


# ----------------------------------------------------------------------------- stage


def n_objects(record) -> int:
    """Objects in a generic record's scene graph (0 for text-only records)."""
    return len(((record.meta or {}).get("scene") or {}).get("objects") or [])


def _phase_examples(data: str, cfg: BaseTrainConfig, phase: Phase):
    from pipeline.train.runner import load_examples

    examples = load_examples([data], cfg.data_file)
    if phase.qtypes:
        examples = [e for e in examples if e.record.meta.get("qtype", e.record.task) in phase.qtypes]
    if phase.max_objects:
        examples = [e for e in examples if n_objects(e.record) <= phase.max_objects]
    if not examples:
        raise input_error(Path(data) / cfg.data_file, "meta.qtype/meta.scene",
                          f"records of the phase's types {phase.qtypes or 'all'} with at most "
                          f"{phase.max_objects or 'any number of'} objects")
    return examples


def train_base(cfg: BaseTrainConfig, model: str, data: str, out: str, seed: int = 0, threads: int = 1,
               ckpt_dir: str | None = None, on_step=None, params="params.yaml") -> dict:
    """Library entry point of the stage (the CLI and the tests call this); returns the metrics."""
    from pipeline.model.presets import from_scratch
    from pipeline.train.runner import model_card, run_supervised

    check_config(cfg, params)
    if not (Path(model) / "config.json").exists():
        raise input_error(model, "--model", "a checkpoint dir with config.json (e.g. models/init)")
    if not (Path(data) / cfg.data_file).exists():
        raise input_error(Path(data) / cfg.data_file, "--data", "a generic QA dataset (trimpi generate generic)")
    card = model_card(model)
    if cfg.skip_pretrained and not from_scratch(card, "vision"):
        return _pass_through(model, out, card)

    # Each phase writes a checkpoint dir under <out>.phases/, keyed by everything that determines it
    # (input model, data, phase, config): a finished phase is reused, an interrupted one resumes.
    work = Path(f"{out}.phases")
    prev, phase_metrics = model, []
    for i, ph in enumerate(cfg.phases):
        key = stable_hash({"in": _dir_key(prev), "data": _dir_key(data, cfg.data_file), "phase": asdict(ph),
                           "cfg": asdict(cfg), "seed": seed}, 10)
        pdir = work / f"phase{i}-{key}"
        if (pdir / "metrics.json").exists():
            print(f"train base: phase {i} ({ph.qtypes or 'all'}) already done -> {pdir}")
            phase_metrics.append(read_json(pdir / "metrics.json"))
        else:
            pcfg = BaseTrainConfig(**{**asdict(cfg), "phases": cfg.phases})
            pcfg.epochs, pcfg.lr = ph.epochs, ph.lr or cfg.lr
            pcfg.batch_size = ph.batch_size or cfg.batch_size
            pcfg.freeze_vision = ph.freeze_vision  # the phase decides: a vision phase trains the tower
            pcfg.phases = cfg.phases
            examples = _phase_examples(data, cfg, ph)
            ck = str(Path(ckpt_dir) / f"phase{i}") if ckpt_dir else None
            print(f"train base: phase {i} ({ph.objective}): {len(examples)} records of {ph.qtypes or 'all types'}, "
                  f"{ph.epochs} epochs, lr {pcfg.lr}")
            if ph.objective == "vision":
                from pipeline.data.records import read_records
                from pipeline.train.vision import image_records, run_vision

                held_out = image_records(read_records(Path(data) / cfg.eval_file), Path(data) / cfg.eval_file) \
                    if cfg.eval_file else []
                m = run_vision(f"base-phase{i}", pcfg, str(prev), data, str(pdir),
                               image_records([e.record for e in examples], Path(data) / cfg.data_file), held_out,
                               seed=seed + i, threads=threads, ckpt_dir=ck, on_step=on_step)
            else:
                m = run_supervised(f"base-phase{i}", pcfg, str(prev), [data], str(pdir), examples, "response",
                                   with_policy=False, lora=False, seed=seed + i, threads=threads,
                                   ckpt_dir=ck, file=cfg.data_file, on_step=on_step)
            phase_metrics.append(m)
        prev = pdir

    metrics = {"stage": "base", "preset": card.get("preset"), "seed": seed, "skipped": False,
               "phases": [{"objective": ph.objective, "qtypes": ph.qtypes or "all", "steps": m.get("steps"),
                           "examples": m.get("examples"), "final_loss": m.get("final_loss"),
                           "wall_s": m.get("wall_s"), **({"eval": m["eval"]} if "eval" in m else {})}
                          for ph, m in zip(cfg.phases, phase_metrics)],
               "steps": sum(m.get("steps", 0) for m in phase_metrics),
               "train_wall_s": round(sum(m.get("wall_s", 0) or 0 for m in phase_metrics), 1),
               "config": asdict(cfg)}
    # Generated answers only mean something once a qa phase has trained the language model; a vision-only
    # base is scored by its phase's held-out token accuracy (metrics.phases[i].eval) instead.
    if cfg.eval_file and any(ph.objective == "qa" for ph in cfg.phases):
        metrics["eval"] = evaluate(prev, data, cfg, threads)
        print("train base: held-out accuracy " + ", ".join(
            f"{q} {a}% (majority {metrics['eval']['majority'][q]}%)" for q, a in metrics["eval"]["accuracy"].items()))
    with atomic_dir(out) as tmp:
        _copy_files(prev, tmp)
        logs = [Path(work) / p.name / "train_log.csv" for p in sorted(work.iterdir())] if work.exists() else []
        _concat_logs([p for p in logs if p.exists()], tmp / "train_log.csv")
        card = model_card(prev)
        card["stages"] = [s for s in card.get("stages", []) if not s.startswith("base-phase")] + ["base"]
        card["parent"] = str(model)
        atomic_write_json(tmp / "model_card.json", card)
        atomic_write_json(tmp / "metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def _dir_key(path, file: str | None = None) -> dict:
    """Cheap identity of a checkpoint or dataset dir: file names and sizes (+ one file's content hash)."""
    from pipeline.io import file_hash

    p = Path(path)
    key = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file() and f.name != "metrics.json"}
    if file:
        key["hash"] = file_hash(p / file)
    elif (p / "config.json").exists():
        key["config"] = file_hash(p / "config.json")
    return key


def _concat_logs(paths: list[Path], out: Path) -> None:
    """One train_log.csv over all phases (steps renumbered to run on across phases)."""
    import csv

    rows, fields, offset = [], None, 0
    for i, p in enumerate(paths):
        with open(p, newline="") as f:
            r = list(csv.DictReader(f))
        if r:
            fields = ["phase"] + list(r[0].keys())
            for row in r:
                rows.append({"phase": i, **row, "step": int(row["step"]) + offset})
            offset = rows[-1]["step"]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or ["phase", "step", "loss"])
        w.writeheader()
        w.writerows(rows)


def _copy_files(src, dst: Path) -> None:
    """The files of checkpoint dir ``src`` (weights, processor, card) into ``dst``."""
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _pass_through(model: str, out: str, card: dict) -> dict:
    metrics = {"stage": "base", "preset": card.get("preset"), "skipped": True,
               "reason": "pretrained checkpoint: it already perceives images (train_base.skip_pretrained)"}
    with atomic_dir(out) as tmp:
        _copy_files(model, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
    print(f"train base: {card.get('preset') or model} is pretrained, passed through -> {out}")
    return metrics


# ----------------------------------------------------------------------------- CLI


def configure_train(parser) -> None:
    from pipeline.train.runner import add_common_args

    # one generic QA dataset (data/generic); the phases' logs are concatenated inside --out
    add_common_args(parser, several=False, log=False)


def run_train(args) -> int:
    from pipeline.config import load_base, load_section

    from pipeline.train.runner import publish

    base = load_base(args.params)
    cfg = load_section(BaseTrainConfig, "train_base", args.params, args.overrides)
    train_base(cfg, args.model, args.data, args.out, seed=base.seed, threads=base.threads,
               ckpt_dir=args.ckpt_dir, params=args.params)
    publish(args.out, args.metrics, None)
    return 0
