"""The training runner every stage shares: from a checkpoint and records to a checkpoint directory.

A supervised stage (VM-CPT ``cpt.py``, CoT/Direct SFT ``sft.py``, the phases of ``train base``)
says only what it trains on and which tokens carry the loss, and calls :func:`run_supervised`::

    examples = load_examples(data_dirs, "cot.jsonl", policies_root="policies")
    metrics = run_supervised("cpt", cfg, model_path, data_dirs, out, examples, "all_but_visual",
                             with_policy=True, lora=False, seed=seed)

which runs: records -> :class:`Example` (policy resolved and rendered once) -> collation through the
one prompt builder -> DeepSpeed engine (``engine.py``) -> resumable loop -> :func:`export_checkpoint`.
The vision phase of ``train base`` (``vision.py``) and RL (``rl.py``) train other objectives with
their own loops but start (:func:`start`), name their resume checkpoints (:func:`ckpt_path`,
:func:`fingerprint`), export (:func:`export_checkpoint`) and publish (:func:`publish`) here.

Every stage's output directory is written atomically and holds the same files: the weights and
processor (``save_pretrained``), ``metrics.json``, ``train_log.csv`` and ``model_card.json`` (the
parent's card plus this stage; ``+ adapter/`` for LoRA). Under ZeRO-3 the weights are gathered
before export and loaded into a fresh model, so a saved LoRA adapter is never the empty partition
(the known LoRA + ZeRO-3 pitfall).

LoRA or full fine-tune (``lora: auto|on|off``, :func:`use_lora`): ``auto`` is LoRA for a pretrained
checkpoint and a full fine-tune for the randomly initialised tiny presets, read from
``model_card.json``, which ``trimpi model init`` writes and every stage carries forward.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipeline.io import atomic_dir, atomic_write_json, input_error, read_json, stable_hash

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    """One training conversation: the record, where its images live, its rendered policy (or None)
    and the assistant response the loss is taken on."""

    record: object
    store: object
    policy: object | None
    response: str


def load_examples(data_dirs: list[str], file: str, direct: bool = False, policies_root: str | None = None
                  ) -> list[Example]:
    """Examples from every data dir; with ``policies_root`` each record carries its rendered policy
    (resolved by name and version: stale data is refused)."""
    from pipeline.data.records import open_dataset
    from pipeline.model.prompts import training_response
    from pipeline.policy import RenderCache, load_policies, resolve_policy

    policies = load_policies(policies_root) if policies_root else {}
    render = RenderCache()
    out: list[Example] = []
    for d in data_dirs:
        ds = open_dataset(d)
        for r in ds.records(file):
            pol = render(resolve_policy(r, policies, ds.root / file), ds.multimodal) if policies_root else None
            if not direct and not r.cot:
                raise input_error(ds.root / file, f"{r.id}.cot", "a CoT (this stage trains on reasoning)", "")
            out.append(Example(r, ds.store, pol, training_response(r, direct=direct)))
    if not out:  # before the model is loaded, naming the files (not `<input>`)
        raise input_error(", ".join(str(Path(d) / file) for d in data_dirs), None, "at least one training record", 0)
    return out


def collate_fn(processor, labels: str, with_policy: bool) -> Callable[[list[Example]], dict]:
    from pipeline.model.masking import encode
    from pipeline.model.prompts import build_messages

    def collate(batch: list[Example]) -> dict:
        convs = [build_messages(e.record, [e.store.open(ref) for ref in e.record.images],
                                e.policy if with_policy else None, e.response) for e in batch]
        return encode(processor, convs, labels=labels)
    return collate


# ----------------------------------------------------------------------------- what the input checkpoint is


def model_card(path: str | os.PathLike) -> dict:
    p = Path(path) / "model_card.json"
    return read_json(p) if p.exists() else {}


def use_lora(mode: str, card: dict) -> bool:
    """``lora: on|off`` as said; ``auto``: LoRA unless the language model started from random weights,
    where LoRA was measured to learn only the answer template (embeddings and head stay random)."""
    from pipeline.model.presets import from_scratch

    if mode in ("on", "off"):
        return mode == "on"
    return not from_scratch(card, "language")


def freeze_vision_if(model, setting: bool | None, model_path: str) -> None:
    """Apply a stage's ``freeze_vision`` (``None`` = auto from the input's model card)."""
    from pipeline.model import vision_tower
    from pipeline.model.presets import freeze_vision

    if freeze_vision(setting, model_card(model_path)):
        vision_tower(model).requires_grad_(False)


# ----------------------------------------------------------------------------- a run


def start(threads: int, seed: int) -> tuple[int, int]:
    """Every trainer's first step: torch threads, a valid (1-rank) distributed job, the seed. (rank, world)."""
    import torch

    from pipeline.model import set_threads
    from pipeline.train.engine import setup_distributed

    set_threads(threads)
    rank, world = setup_distributed()
    torch.manual_seed(seed)
    return rank, world


def ckpt_path(stage: str, out: str, ckpt_dir: str | None) -> Path:
    """Where the resumable checkpoints of the run that writes ``out`` live (default: one dir per output)."""
    return Path(ckpt_dir or f".trimpi/ckpt/{stage}-{stable_hash(str(Path(out).resolve()), 8)}")


def fingerprint(model_path: str, data_dirs: list[str], file: str, extra: dict) -> dict:
    """What a resumable checkpoint must match: the input model, the data file of every dir, ``extra``."""
    from pipeline.io import file_hash

    mp = Path(model_path)
    return {"model": {p.name: p.stat().st_size for p in sorted(mp.iterdir()) if p.is_file()},
            "model_config": file_hash(mp / "config.json"),
            "data": {str(d): file_hash(Path(d) / file) for d in data_dirs}, **extra}


def train_loop(stage: str, cfg, module, items: list, collate: Callable, *, world: int, source: str, fp: dict,
               out: str, seed: int, ckpt_dir: str | None = None, on_step: Callable[[int], None] | None = None,
               lengths: list[int] | None = None):
    """plan -> engine (resumed when its checkpoint has this fingerprint) -> the supervised loop.

    Returns (engine, train log, loop stats, step resumed from)."""
    from pipeline.train.engine import Engine, TrainLog, fit, plan

    per_epoch, total = plan(len(items), cfg, world, source=source)
    ckpt = ckpt_path(stage, out, ckpt_dir)
    eng = Engine(module, cfg, total, ckpt, fingerprint=fp, seed=seed)
    eng.load_state()
    first = eng.global_step
    log = TrainLog(ckpt / "train_log.csv", resume_step=first, enabled=eng.is_main)
    stats = fit(eng, items, collate, log, seed, per_epoch, start_step=first, desc=stage, on_step=on_step,
                lengths=lengths)
    return eng, log, stats, first


def loss_summary(log) -> dict:
    """First logged loss and the mean of the last five (the metrics every supervised run reports)."""
    losses = [float(r["loss"]) for r in log.rows]
    return {"first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None}


def run_supervised(stage: str, cfg, model_path: str, data_dirs: list[str], out: str,
                   examples: list[Example], labels: str, with_policy: bool, lora: bool, seed: int,
                   threads: int = 1, ckpt_dir: str | None = None, file: str = "",
                   on_step: Callable[[int], None] | None = None) -> dict:
    """Train ``examples`` from ``model_path`` and write the checkpoint dir ``out``; returns metrics."""
    import torch

    from pipeline.model import load

    rank, world = start(threads, seed)
    # CPU first, every rank: DeepSpeed moves each rank's copy to its own device (loading straight
    # to "cuda" would put all ranks on GPU 0). bf16 on GPU boxes halves host memory per rank.
    model, proc = load(model_path, threads=threads, device="cpu",
                       dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    peft_cfg = None
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, peft_cfg)
    freeze_vision_if(model, cfg.freeze_vision, model_path)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    # Batches of one kind only: a policy-in-context example is ~2.5x longer than a policy-free one and
    # would pad its whole batch. Two buckets, not a length sort: CoT length follows the decision path,
    # and batches sorted by it would each hold one or two cases.
    kinds = [int(with_policy and e.policy is not None) for e in examples]
    eng, log, stats, first = train_loop(
        stage, cfg, model, examples, collate_fn(proc, labels, with_policy), world=world,
        source=", ".join(str(Path(d) / file) for d in data_dirs),
        fp=fingerprint(model_path, data_dirs, file, {"stage": stage, "labels": labels, "lora": lora}),
        out=out, seed=seed, ckpt_dir=ckpt_dir, on_step=on_step, lengths=kinds if len(set(kinds)) > 1 else None)
    sd = eng.full_state_dict()
    metrics = {"stage": stage, "examples": len(examples), "steps": eng.global_step, "epochs": cfg.epochs,
               "resumed_from_step": first, **loss_summary(log),
               "tokens_per_s": stats["tokens_per_s"], "wall_s": stats["wall_s"], "tokens": stats["tokens"],
               "trainable_params": n_train, "total_params": n_total, "lora": lora, "labels": labels,
               "deepspeed": cfg.deepspeed, "zero_stage": eng.zero_stage, "world_size": world,
               "config": asdict(cfg)}
    if eng.is_main:
        export_checkpoint(out, plain_model(eng.module, sd, eng.zero_stage, peft_cfg), proc, parent=model_path,
                          stage=stage, metrics=metrics, write_log=log.copy_to, lora=lora)
        print(f"{stage}: {eng.global_step} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, "
              f"{stats['tokens_per_s']:.0f} tok/s -> {out}")
    eng.finish()
    return metrics


# ----------------------------------------------------------------------------- export and publishing


def plain_model(module, state_dict: dict, zero_stage: int, peft_cfg=None):
    """The model to save. Under ZeRO-3 the engine's module holds empty partitions: the gathered
    ``state_dict`` goes into a freshly built model (wrapped in the same LoRA config, if any)."""
    if zero_stage != 3:
        return module
    from transformers import AutoModelForImageTextToText

    export = AutoModelForImageTextToText.from_config((module.get_base_model() if peft_cfg else module).config)
    if peft_cfg is not None:
        from peft import get_peft_model

        export = get_peft_model(export, peft_cfg)
    export.load_state_dict(state_dict)
    return export


def export_checkpoint(out: str, model, processor, *, parent: str, stage: str, metrics: dict,
                      write_log: Callable[[Path], None], card: dict | None = None, lora: bool = False) -> None:
    """Write the stage's output directory ``out`` atomically: weights + processor, ``train_log.csv``
    (``write_log(path)``), ``metrics.json`` and ``model_card.json`` (the parent's card, this stage
    appended, ``card`` merged in). A LoRA model also saves its adapter alone, then is merged."""
    from pipeline.model import save

    full_card = model_card(parent)
    full_card.update(stages=full_card.get("stages", []) + [stage], parent=str(parent), **(card or {}))
    with atomic_dir(out) as tmp:
        if lora:
            from pipeline.io import disk_writes

            with disk_writes(tmp / "adapter"):
                model.save_pretrained(str(tmp / "adapter"))  # the adapter alone, for inspection
            model = model.merge_and_unload()
        save(model, processor, tmp)
        write_log(tmp / "train_log.csv")
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "model_card.json", full_card)


def publish(out: str, metrics: str | None, log: str | None) -> None:
    """Copy the stage's metrics/log next to the other DVC metrics (a file inside an output dir
    cannot be declared as a separate DVC metric). The one way every training stage publishes."""
    from pipeline.io import atomic_write_bytes

    if os.environ.get("RANK", "0") != "0":
        return
    for src, dst in (("metrics.json", metrics), ("train_log.csv", log)):
        if dst:
            atomic_write_bytes(dst, (Path(out) / src).read_bytes())


# ----------------------------------------------------------------------------- CLI


def add_common_args(parser, policies: bool = False, several: bool = True, log: bool = True) -> None:
    """The options every ``trimpi train`` command shares: input checkpoint, data, output, resume, publishing.
    ``several``: ``--data`` may be repeated (records are pooled); ``log``: the stage writes a train log."""
    parser.add_argument("--model", required=True, help="input checkpoint dir (e.g. models/cpt)")
    if several:
        parser.add_argument("--data", action="append", required=True, help="dataset dir; repeat for several")
    else:
        parser.add_argument("--data", required=True, help="dataset dir")
    if policies:
        parser.add_argument("--policies", default="policies", help="policy specs root (default: policies)")
    parser.add_argument("--out", required=True, help="output checkpoint dir (written atomically)")
    parser.add_argument("--ckpt-dir", default=None, help="resume checkpoints (default: .trimpi/ckpt/<stage>-<hash>)")
    parser.add_argument("--metrics", default=None, help="also write metrics.json here (DVC metrics outside --out)")
    if log:
        parser.add_argument("--log", default=None, help="also write train_log.csv here (DVC plot outside --out)")
