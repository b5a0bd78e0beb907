"""Stage 1, ``trimpi train cpt``: visually-masked continual pretraining (VM-CPT).

Each training sequence is the CoT record WITH its policy in context, rendered by the one prompt
builder: policy text (+ policy images for ClevrPolicy-M) + input images + query, then the
assistant turn ``<think>CoT</think>\\boxed{answer}``. Labels are ``all_but_visual``: next-token
loss on every token except the visual ones (image pads and vision markers of policy and input
images), so the model learns the policy text itself, not only the answers. Full fine-tune.

The record's policy is looked up by name under ``--policies`` and must have the version the
record was labelled with (else the data is stale: regenerate it). Whether the multimodal
rendering is used comes from the dataset's ``manifest.json`` (``multimodal``).

Paper (Table 5) vs tiny CPU default: 5 epochs, lr 1e-5, batch 16x8 (ClevrPolicy) / 8x8 (GTA)
on 8 H100s; tiny: 3 epochs, lr 1e-3, batch 8, one core. Everything but the choice of data and
labels is the shared runner (:func:`pipeline.train.runner.run_supervised`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.io import input_error
from pipeline.train.engine import TrainConfig


@dataclass
class CPTConfig(TrainConfig):
    """``params.yaml: cpt`` — VM-CPT (policy in context, loss on all non-visual tokens, full FT)."""

    epochs: float = 3.0
    """Passes over cot.jsonl (paper: 5)."""
    max_steps: int = 300
    """Tiny default: 300 steps of 8 (0.8 epoch of the 3,000 CoT records); 0 = run all epochs."""
    lr: float = 1e-3
    """Peak learning rate (paper, 7B: 1e-5; tiny random model: 1e-3)."""
    data_file: str = "cot.jsonl"
    """Records file inside each --data dir (the CoT subset: policy + images + query + CoT + answer)."""


def configure_train(parser) -> None:
    from pipeline.train.runner import add_common_args

    add_common_args(parser, policies=True)


def run_train(args) -> int:
    from pipeline.config import load_base, load_section
    from pipeline.train.runner import publish

    base = load_base(args.params)
    cfg = load_section(CPTConfig, "cpt", args.params, args.overrides)
    train_cpt(cfg, args.model, args.data, args.policies, args.out, seed=base.seed, threads=base.threads,
              ckpt_dir=args.ckpt_dir)
    publish(args.out, args.metrics, args.log)
    return 0


def train_cpt(cfg: CPTConfig, model: str, data: list[str], policies: str, out: str, seed: int = 0,
              threads: int = 1, ckpt_dir: str | None = None, on_step=None) -> dict:
    """Library entry point of the stage (the CLI and the tests call this)."""
    from pipeline.train.runner import load_examples, run_supervised

    if not (Path(model) / "config.json").exists():
        raise input_error(model, "--model", "a checkpoint dir with config.json (e.g. models/init)")
    if not Path(policies).is_dir():
        raise input_error(policies, "--policies", "the policy specs directory")
    examples = load_examples(data, cfg.data_file, policies_root=policies)
    return run_supervised("cpt", cfg, model, data, out, examples, "all_but_visual", with_policy=True,
                          lora=False, seed=seed, threads=threads, ckpt_dir=ckpt_dir, file=cfg.data_file,
                          on_step=on_step)
