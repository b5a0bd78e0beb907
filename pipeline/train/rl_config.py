"""``params.yaml: rl`` — the knobs of stage 3 (GRPO / DAPO with PolicyRollout).

Defaults are tiny so RL on the embedded default finishes in a few minutes on one CPU core;
the paper's value (TriMPI, Appendix B / Table 5-6, see ../shared/reference/paper-notes.md §6)
is written beside each field. Algorithm-dependent knobs (clip range, KL weight, loss
aggregation, dynamic sampling) default to ``None``/``"auto"`` and are resolved by
:meth:`RLConfig.resolved` from ``algorithm``, so switching ``algorithm: dapo`` gives the
paper's DAPO without touching anything else, and any of them can still be pinned by hand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

# Paper values per algorithm (paper-notes §6.3): GRPO clips 0.2/0.3 with a reference KL
# of 0.01; DAPO clips 0.2/0.28 ("clip-higher"), drops the reference KL, averages the loss
# over tokens and filters zero-variance groups (dynamic sampling).
ALGO_DEFAULTS = {
    "grpo": dict(clip_low=0.2, clip_high=0.3, kl_beta=0.01, loss_agg="seq_mean_token_mean", dynamic_sampling=False),
    "dapo": dict(clip_low=0.2, clip_high=0.28, kl_beta=0.0, loss_agg="token_mean", dynamic_sampling=True),
}


@dataclass
class RLConfig:
    """Stage 3: RL on the answer-only set, starting from the CoT-SFT checkpoint."""

    algorithm: Literal["grpo", "dapo"] = "grpo"
    """``grpo`` (clipped ratio + KL to the frozen start checkpoint) or ``dapo`` (clip-higher, no KL,
    token-level loss, dynamic sampling). Paper: both, per table row."""
    policy_rollout: bool = True
    """PolicyRollout (PoRo): per prompt also sample ``group_size`` responses WITH the policy in context;
    advantages over all of them; every log-prob/ratio/KL/gradient on the policy-free prompt. Paper: TriMPI rows."""
    group_size: int = 4
    """G: responses sampled per prompt without the policy (PoRo adds G more with it, 2G in total).
    Paper: not given (EasyR1 default n=5). Compare plain GRPO at 2G with PoRo at G+G for equal compute."""

    clip_low: float | None = None
    """epsilon_low of the clipped ratio; ``null`` = algorithm default (0.2 for both)."""
    clip_high: float | None = None
    """epsilon_high; ``null`` = algorithm default (GRPO 0.3, DAPO 0.28)."""
    kl_beta: float | None = None
    """Weight of the k3 KL estimate to the frozen reference (the starting checkpoint); ``null`` = GRPO 0.01,
    DAPO 0 (no reference model is loaded at 0)."""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean"] = "auto"
    """How per-token losses become one number: ``token_mean`` over every response token of the update batch
    (DAPO), or mean over tokens per response then over responses (GRPO paper). ``auto`` picks by algorithm."""
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards are all equal and sample new prompts until the batch is full;
    ``null`` = on for DAPO, off for GRPO."""
    max_retries: int = 20
    """Dynamic sampling: extra generation rounds allowed per step; when exhausted the run stops early and
    says so (logs + metrics.json). Paper: 20."""

    w_acc: float = 0.9
    """Reward weight of accuracy (ClevrPolicy: exact match of the boxed answer; GTAPolicy: 0.5 tool + 0.5 args).
    Paper: not given (EasyR1 default 0.9)."""
    w_fmt: float = 0.1
    """Reward weight of format (``<think>...</think>`` then ``\\boxed{...}``). Paper: not given (EasyR1 0.1)."""

    temperature: float = 1.0
    """Sampling temperature; log-probs in the loss use the same temperature. Paper: not given (EasyR1 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling. Paper: not given (EasyR1 0.99)."""
    max_prompt_len: int = 2048
    """Prompts (the policy-aware one included) longer than this many tokens are skipped and counted."""
    max_response_len: int = 0
    """Max new tokens per response; 0 = derived from the data: the longest gold CoT response of the
    ``--data`` dirs' ``cot.jsonl`` + 25 % (``prompts.response_budget``; depth 2 ~120, depth 6 ~330 on the
    tiny tokenizer), recorded in metrics.json. A response cut before ``\\boxed{}`` scores 0 accuracy.
    Paper: not given (EasyR1 2048)."""

    rollout_batch: int = 4
    """Prompts per RL step (each gives G or 2G responses). Paper: 384 ClevrPolicy, 256 GTAPolicy."""
    update_batch: int = 4
    """Prompts per optimizer step; rollout_batch/update_batch optimizer steps per RL step (the later ones are
    off-policy, hence the clipped ratio). Paper: 'update BS 4 x 8'."""
    micro_batch: int = 8
    """Responses per forward/backward (gradient accumulation inside an update batch); a micro-batch never
    spans two prompts, so each prompt's images are encoded once per micro-batch."""
    generation_batch: int = 4
    """Prompts per ``generate`` call (each expands to its G or 2G samples inside one call)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch. Paper: not given (EasyR1 1)."""
    epochs: int = 1
    """Passes over the training prompts; steps = epochs * floor(prompts / rollout_batch). Paper: 2 ClevrPolicy,
    50 GTAPolicy (104 and 50 steps)."""
    max_steps: int = 20
    """Cap on RL steps (0 = no cap, use ``epochs``). Tiny default keeps the embedded run to minutes."""
    lr: float = 2e-5
    """Peak AdamW learning rate. Paper: 1e-6 (full fine-tune of 7B); the tiny model needs more, and at 1e-4
    single steps of 4 prompts swung its accuracy."""
    weight_decay: float = 0.0
    """AdamW weight decay. Paper: not given (EasyR1 1e-2)."""
    freeze_vision: bool | None = None
    """Keep the vision tower and merger fixed (update the language model only); ``null`` = auto, as in CPT
    and SFT: frozen when ``train base`` trained the tower from scratch (tiny presets), trainable otherwise."""
    grad_clip: float = 1.0
    """Max global gradient norm. Paper: not given (EasyR1 1.0)."""

    policy_multimodal: Literal["auto", "on", "off"] = "auto"
    """Render policies with their images (ClevrPolicy-M): ``auto`` reads the dataset manifest's ``multimodal``."""
    data_file: str = "train.jsonl"
    """Records file inside each ``--data`` dir (answer-only train set)."""
    max_prompts: int = 0
    """Use only the first N training prompts (0 = all); for smoke runs."""
    save_every: int = 4
    """RL steps between resumable checkpoints (0 = only the final model)."""
    deepspeed: str = "zero0"
    """DeepSpeed config: zero0 | zero2 | zero3 (``infra/deepspeed/``) or a JSON path; zero0 on one CPU process.
    The learning rate is constant (no warm-up, no decay), as in EasyR1/verl."""

    def resolved(self) -> "RLConfig":
        """A copy with every algorithm-dependent ``None``/``auto`` replaced by the paper value."""
        d = ALGO_DEFAULTS[self.algorithm]
        out = dataclasses.replace(self)
        for k in ("clip_low", "clip_high", "kl_beta", "dynamic_sampling"):
            if getattr(out, k) is None:
                setattr(out, k, d[k])
        if out.loss_agg == "auto":
            out.loss_agg = d["loss_agg"]
        return out

    def check(self, where: str = "params.yaml") -> "RLConfig":
        """Refuse values the loop cannot honour, naming the field (InputError)."""
        from pipeline.io import input_error

        positive = ("group_size", "rollout_batch", "update_batch", "micro_batch", "generation_batch", "ppo_epochs",
                    "epochs", "max_prompt_len")
        for k in positive:
            if getattr(self, k) < 1:
                raise input_error(where, f"rl.{k}", "an integer >= 1", getattr(self, k))
        if self.max_response_len < 0:
            raise input_error(where, "rl.max_response_len", "0 (derived from the data) or a positive token count",
                              self.max_response_len)
        if self.rollout_batch % self.update_batch:
            raise input_error(where, "rl.update_batch", f"a divisor of rl.rollout_batch ({self.rollout_batch})",
                              self.update_batch)
        for k in ("clip_low", "clip_high"):
            v = getattr(self, k)
            if v is not None and not 0 <= v < 1:
                raise input_error(where, f"rl.{k}", "a number in [0, 1)", v)
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise input_error(where, "rl.temperature/top_p", "temperature > 0 and 0 < top_p <= 1",
                              (self.temperature, self.top_p))
        return self
