"""Stage 2, ``trimpi train sft``: CoT SFT (and ``--direct``, the answer-only baseline).

CoT SFT trains (query, images) -> ``<think>CoT</think>\\boxed{answer}`` on ``cot.jsonl``, WITHOUT
the policy in context, with the loss on the response tokens only. ``--direct`` trains
``\\boxed{answer}`` on ``train.jsonl`` (section ``direct_sft``). Several ``--data`` dirs may be
given (clevr + gta); records are pooled. ``policy_share`` keeps a seeded share of the examples'
policies in context (loss still on the response).

``lora: auto|on|off`` — ``auto`` is LoRA (rank 8, language-model projections only, merged into
the weights after training, as in the paper) for a pretrained checkpoint, and full fine-tuning
for the randomly initialised tiny presets (:func:`pipeline.train.runner.use_lora`).

Everything but the choice of data and labels is the shared runner (:mod:`pipeline.train.runner`).

Paper (Table 5) vs tiny CPU defaults: CoT SFT LoRA r8, 5 epochs (GTA 10), lr 1e-4, batch 16x4;
Direct SFT LoRA r8, 2 epochs, lr 1e-4, batch 16x4. Tiny: full FT, lr 1e-3, batch 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.io import input_error
from pipeline.train.engine import TrainConfig
from pipeline.train.runner import LORA_TARGETS, Example


@dataclass
class SFTConfig(TrainConfig):
    """``params.yaml: sft`` — CoT SFT (policy-free, loss on the response)."""

    epochs: float = 5.0
    """Passes over cot.jsonl (paper: 5 for ClevrPolicy, 10 for GTAPolicy)."""
    max_steps: int = 700
    """Tiny default: 700 steps of 8 (1.9 epochs of the 3,000 CoT records); 0 = run all epochs."""
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
    policy_share: float = 0.3
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
    max_steps: int = 300
    """Tiny default: 300 steps of 8 (0.8 epoch of the 3,000 answer-only records)."""
    data_file: str = "train.jsonl"
    """Answer-only records (no CoT)."""
    policy_share: float = 0.0
    """The answer-only baseline never sees a policy."""


def keep_policy(examples: list[Example], share: float, seed: int) -> None:
    """Drop the policy from all but a seeded ``share`` of ``examples`` (in place)."""
    import random

    keep = set(random.Random(f"{seed}/policy_share").sample(range(len(examples)), round(share * len(examples))))
    for i, e in enumerate(examples):
        if i not in keep:
            e.policy = None


def train_sft(cfg: SFTConfig, model: str, data: list[str], out: str, direct: bool = False, seed: int = 0,
              threads: int = 1, ckpt_dir: str | None = None, on_step=None, policies: str = "policies") -> dict:
    """Library entry point of the stage (the CLI and the tests call this)."""
    from pipeline.train.runner import load_examples, model_card, run_supervised, use_lora

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


# ----------------------------------------------------------------------------- CLI


def configure_train(parser) -> None:
    from pipeline.train.runner import add_common_args

    add_common_args(parser, policies=True)
    parser.add_argument("--direct", action="store_true", help="answer-only baseline on train.jsonl (section direct_sft)")


def run_train(args) -> int:
    from pipeline.config import load_base, load_section
    from pipeline.train.runner import publish

    base = load_base(args.params)
    cls, section = (DirectSFTConfig, "direct_sft") if args.direct else (SFTConfig, "sft")
    cfg = load_section(cls, section, args.params, args.overrides)
    train_sft(cfg, args.model, args.data, args.out, direct=args.direct, seed=base.seed,
              threads=base.threads, ckpt_dir=args.ckpt_dir, policies=args.policies)
    publish(args.out, args.metrics, args.log)
    return 0
