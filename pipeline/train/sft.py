"""Stage 2, ``trimpi train sft``: CoT SFT (and ``--direct``, the answer-only baseline).

CoT SFT trains (query, images) -> ``<think>CoT</think>\\boxed{answer}`` on ``cot.jsonl``, WITHOUT
the policy in context, with the loss on the response tokens only. ``--direct`` trains
``\\boxed{answer}`` on ``train.jsonl`` (section ``direct_sft``). Several ``--data`` dirs may be
given (clevr + gta); records are pooled.

``lora: auto|on|off`` — ``auto`` is LoRA (rank 8, language-model projections only, merged into
the weights after training, as in the paper) for a pretrained checkpoint, and full fine-tuning
for the randomly initialised tiny presets, where LoRA was measured to learn only the answer
template (their embeddings and head stay random). The decision reads ``model_card.json``, which
``trimpi model init`` writes and every stage carries forward.

This module also holds :func:`run_supervised`, the stage runner that VM-CPT (``cpt.py``) shares:
records -> DeepSpeed engine -> resumable loop -> atomic output directory with the merged
checkpoint, ``metrics.json``, ``train_log.csv`` and ``model_card.json`` (+ ``adapter/`` for LoRA).
Under ZeRO-3 the weights are gathered before export and loaded into a fresh model, so a saved
LoRA adapter is never the empty partition (the known LoRA + ZeRO-3 pitfall).

Paper (Table 5) vs tiny CPU defaults: CoT SFT LoRA r8, 5 epochs (GTA 10), lr 1e-4, batch 16x4;
Direct SFT LoRA r8, 2 epochs, lr 1e-4, batch 16x4. Tiny: full FT, lr 1e-3, batch 8.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from pipeline.io import atomic_dir, atomic_write_json, input_error, read_json, stable_hash
from pipeline.train.engine import TrainConfig

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class SFTConfig(TrainConfig):
    """``params.yaml: sft`` — CoT SFT (policy-free, loss on the response)."""

    epochs: float = 5.0
    """Passes over cot.jsonl (paper: 5 for ClevrPolicy, 10 for GTAPolicy)."""
    lr: float = 1e-3
    """Peak learning rate (paper, LoRA on 7B: 1e-4; tiny full fine-tune: 1e-3)."""
    lora: Literal["auto", "on", "off"] = "auto"
    """auto = LoRA for pretrained checkpoints, full fine-tune for the random tiny presets."""
    lora_r: int = 8
    """LoRA rank (paper: 8)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (paper: not given; 2 x rank)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input (paper: not given)."""
    lora_targets: str = LORA_TARGETS
    """Regex of module names that get adapters: the language model's projections only
    (Qwen2.5-VL's vision MLP also has gate/up/down_proj)."""
    data_file: str = "cot.jsonl"
    """Records file inside each --data dir."""
    policy_share: float = 0.0
    """Fraction of the examples (a fixed, seeded subset) that keep their policy in context, loss still on
    the response only. 0 = the paper's policy-free CoT SFT. On the random tiny presets a full fine-tune on
    policy-free prompts erases what VM-CPT taught about reading a policy in context (in-context 46 % ->
    0 %, format 0 %), which the override suite and PolicyRollout's policy-aware samples need; a share of
    policy-in-context examples keeps it (measured in README "Measured")."""


@dataclass
class DirectSFTConfig(SFTConfig):
    """``params.yaml: direct_sft`` — the answer-only baseline (``\\boxed{answer}``)."""

    epochs: float = 2.0
    """Passes over train.jsonl (paper: 2 for ClevrPolicy on 20K, 10 for GTAPolicy)."""
    data_file: str = "train.jsonl"
    """Answer-only records (no CoT)."""


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
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


# ----------------------------------------------------------------------------- runner


def model_card(path: str | os.PathLike) -> dict:
    p = Path(path) / "model_card.json"
    return read_json(p) if p.exists() else {}


def use_lora(mode: str, card: dict) -> bool:
    from pipeline.model.presets import random_language_model

    if mode in ("on", "off"):
        return mode == "on"
    return not random_language_model(card)


def _fingerprint(model_path: str, data_dirs: list[str], file: str, extra: dict) -> dict:
    from pipeline.io import file_hash

    mp = Path(model_path)
    return {"model": {p.name: p.stat().st_size for p in sorted(mp.iterdir()) if p.is_file()},
            "model_config": file_hash(mp / "config.json"),
            "data": {str(d): file_hash(Path(d) / file) for d in data_dirs}, **extra}


def run_supervised(stage: str, cfg: TrainConfig, model_path: str, data_dirs: list[str], out: str,
                   examples: list[Example], labels: str, with_policy: bool, lora: bool, seed: int,
                   threads: int = 1, ckpt_dir: str | None = None, file: str = "",
                   on_step: Callable[[int], None] | None = None) -> dict:
    """Train ``examples`` from ``model_path`` and write the checkpoint dir ``out``; returns metrics."""
    import torch

    from pipeline.model import load, save, set_threads, vision_tower
    from pipeline.train.engine import Engine, TrainLog, fit, plan, setup_distributed

    set_threads(threads)
    rank, world = setup_distributed()
    torch.manual_seed(seed)
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
    from pipeline.model.presets import freeze_vision

    if freeze_vision(cfg.freeze_vision, model_card(model_path)):
        vision_tower(model).requires_grad_(False)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    per_epoch, total = plan(len(examples), cfg, world, source=", ".join(str(Path(d) / file) for d in data_dirs))
    ckpt = Path(ckpt_dir or f".trimpi/ckpt/{stage}-{stable_hash(str(Path(out).resolve()), 8)}")
    fp = _fingerprint(model_path, data_dirs, file, {"stage": stage, "labels": labels, "lora": lora})
    eng = Engine(model, cfg, total, ckpt, fingerprint=fp, seed=seed)
    eng.load_state()
    start = eng.global_step
    log = TrainLog(ckpt / "train_log.csv", resume_step=start, enabled=eng.is_main)
    # Batches of one kind only: a policy-in-context example is ~2.5x longer than a policy-free one and
    # would pad its whole batch. Two buckets, not a length sort: CoT length follows the decision path,
    # and batches sorted by it would each hold one or two cases.
    kinds = [int(with_policy and e.policy is not None) for e in examples]
    lengths = kinds if len(set(kinds)) > 1 else None
    stats = fit(eng, examples, collate_fn(proc, labels, with_policy), log, seed, per_epoch, start_step=start,
                desc=stage, on_step=on_step, lengths=lengths)
    sd = eng.full_state_dict()
    losses = [float(r["loss"]) for r in log.rows]
    metrics = {"stage": stage, "examples": len(examples), "steps": eng.global_step, "epochs": cfg.epochs,
               "resumed_from_step": start, "first_loss": losses[0] if losses else None,
               "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
               "tokens_per_s": stats["tokens_per_s"], "wall_s": stats["wall_s"], "tokens": stats["tokens"],
               "trainable_params": n_train, "total_params": n_total, "lora": lora, "labels": labels,
               "deepspeed": cfg.deepspeed, "zero_stage": eng.zero_stage, "world_size": world,
               "config": asdict(cfg)}
    if eng.is_main:
        export = eng.module
        if eng.zero_stage == 3:  # partitions were gathered into sd: rebuild a plain model around them
            from transformers import AutoModelForImageTextToText

            base_cfg = (export.get_base_model() if lora else export).config
            export = AutoModelForImageTextToText.from_config(base_cfg)
            if lora:
                from peft import get_peft_model

                export = get_peft_model(export, peft_cfg)
            export.load_state_dict(sd)
        card = model_card(model_path)
        card.update(stages=card.get("stages", []) + [stage], parent=str(model_path))
        with atomic_dir(out) as tmp:
            if lora:
                from pipeline.io import disk_writes

                with disk_writes(tmp / "adapter"):
                    export.save_pretrained(str(tmp / "adapter"))  # the adapter alone, for inspection
                export = export.merge_and_unload()
            save(export, proc, tmp)
            log.copy_to(tmp / "train_log.csv")
            atomic_write_json(tmp / "metrics.json", metrics)
            atomic_write_json(tmp / "model_card.json", card)
        print(f"{stage}: {eng.global_step} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, "
              f"{stats['tokens_per_s']:.0f} tok/s -> {out}")
    eng.finish()
    return metrics


# ----------------------------------------------------------------------------- CLI


def add_common_args(parser, policies: bool = False) -> None:
    parser.add_argument("--model", required=True, help="input checkpoint dir (e.g. models/cpt)")
    parser.add_argument("--data", action="append", required=True, help="dataset dir; repeat for several")
    if policies:
        parser.add_argument("--policies", default="policies", help="policy specs root (default: policies)")
    parser.add_argument("--out", required=True, help="output checkpoint dir (written atomically)")
    parser.add_argument("--ckpt-dir", default=None, help="resume checkpoints (default: .trimpi/ckpt/<stage>-<hash>)")
    parser.add_argument("--metrics", default=None, help="also write metrics.json here (DVC metrics outside --out)")
    parser.add_argument("--log", default=None, help="also write train_log.csv here (DVC plot outside --out)")


def publish(out: str, metrics: str | None, log: str | None) -> None:
    """Copy the stage's metrics/log next to the other DVC metrics (a file inside an output dir
    cannot be declared as a separate DVC metric)."""
    from pipeline.io import atomic_write_bytes

    if os.environ.get("RANK", "0") != "0":
        return
    for src, dst in (("metrics.json", metrics), ("train_log.csv", log)):
        if dst:
            atomic_write_bytes(dst, (Path(out) / src).read_bytes())


def configure_train(parser) -> None:
    add_common_args(parser, policies=True)
    parser.add_argument("--direct", action="store_true", help="answer-only baseline on train.jsonl (section direct_sft)")


def run_train(args) -> int:
    from pipeline.config import load_base, load_section

    base = load_base(args.params)
    cls, section = (DirectSFTConfig, "direct_sft") if args.direct else (SFTConfig, "sft")
    cfg = load_section(cls, section, args.params, args.overrides)
    train_sft(cfg, args.model, args.data, args.out, direct=args.direct, seed=base.seed,
              threads=base.threads, ckpt_dir=args.ckpt_dir, policies=args.policies)
    publish(args.out, args.metrics, args.log)
    return 0


def train_sft(cfg: SFTConfig, model: str, data: list[str], out: str, direct: bool = False, seed: int = 0,
              threads: int = 1, ckpt_dir: str | None = None, on_step=None, policies: str = "policies") -> dict:
    """Library entry point of the stage (the CLI and the tests call this)."""
    from pipeline.model import load  # noqa: F401 - fail early on a bad --model

    if not (Path(model) / "config.json").exists():
        raise input_error(model, "--model", "a checkpoint dir with config.json (e.g. models/cpt)")
    if not 0.0 <= cfg.policy_share <= 1.0:
        raise input_error("params.yaml", f"{'direct_sft' if direct else 'sft'}.policy_share", "a fraction in [0, 1]",
                          cfg.policy_share)
    examples = load_examples(data, cfg.data_file, direct=direct,
                             policies_root=policies if cfg.policy_share > 0 else None)
    keep_policy(examples, cfg.policy_share, seed)
    lora = use_lora(cfg.lora, model_card(model))
    return run_supervised("direct_sft" if direct else "sft", cfg, model, data, out, examples, "response",
                          with_policy=cfg.policy_share > 0, lora=lora, seed=seed, threads=threads,
                          ckpt_dir=ckpt_dir, file=cfg.data_file, on_step=on_step)


def keep_policy(examples: list[Example], share: float, seed: int) -> None:
    """Drop the policy from all but a seeded ``share`` of ``examples`` (in place)."""
    import random

    keep = set(random.Random(f"{seed}/policy_share").sample(range(len(examples)), round(share * len(examples))))
    for i, e in enumerate(examples):
        if i not in keep:
            e.policy = None
