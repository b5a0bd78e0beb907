"""The one training machinery of every trainer (base, cpt, sft, rl): DeepSpeed, checkpoints, logs.

DeepSpeed is the engine everywhere, CPU included, so a laptop run and an 8-GPU run take the same
code path; only the JSON config (``infra/deepspeed/zero{0,2,3}.json``) and the launcher change.

API for a trainer (the RL stage uses exactly this)::

    setup_distributed()                              # before building the model; no-op under a launcher
    eng = Engine(model, cfg, total_steps, ckpt_dir, fingerprint={...}, seed=seed)
    client = eng.load_state()                        # None on a fresh start, else the dict you saved
    out = eng.forward(**batch)                       # moves tensors to the engine device
    eng.backward(out.loss); stepped = eng.step()     # True at a gradient-accumulation boundary
    eng.global_step, eng.lr                          # optimizer steps done, current learning rate
    eng.save_state({"anything": ...})                # every rank calls it; atomic via DS 'latest'
    sd = eng.full_state_dict()                       # full weights on CPU (gathers ZeRO-3 partitions)
    eng.finish()                                     # drop the checkpoints once the output is in place

plus :class:`TrainLog` (``train_log.csv``, continued across resumes) and :func:`fit`, the
supervised loop (epochs, deterministic per-epoch order, rank sharding, periodic checkpoints,
progress bar, metrics) that CPT and SFT share.

Decisions and departures from the obvious:

* Single process without a launcher: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are set
  here (otherwise DeepSpeed looks for mpi4py) and gloo is the CPU backend.
* With one CPU process DeepSpeed still JIT-compiles its shared-memory all-reduce op (~50 s, needs
  g++). No collective crosses a process boundary then, so :func:`setup_distributed` skips that
  build; with several CPU ranks the op is built and cached in ``TORCH_EXTENSIONS_DIR`` (default
  ``.trimpi/torch_extensions``).
* ``"auto"`` values in the JSON configs are filled from the stage config (micro batch, gradient
  accumulation, lr, weight decay, clipping); ``bf16: auto`` means "on iff CUDA supports bf16".
  The optimizer is torch AdamW (``torch_adam: true``: no cpu_adam/fused_adam build).
* The LR schedule (linear warm-up, cosine decay to 10 %) is a torch ``LambdaLR`` handed to
  DeepSpeed, so its state is inside every DeepSpeed checkpoint.
* A checkpoint is only resumed when its fingerprint (stage config, data, input model) matches;
  a stale one is discarded with a message instead of silently mixing two runs.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline.io import atomic_write_json, disk_writes, input_error, read_json, stable_hash

CONFIG_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"


@dataclass
class TrainConfig:
    """Knobs every supervised stage shares (each stage's params section extends these)."""

    epochs: float = 3.0
    """Passes over the training records (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    batch_size: int = 8
    """Micro batch per process (DeepSpeed ``train_micro_batch_size_per_gpu``)."""
    grad_accum: int = 1
    """Gradient accumulation steps; global batch = batch_size x grad_accum x world size."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps with linear warm-up; then ``lr_schedule``."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: ``cosine`` (decay to 10 % of lr, the SFT/CPT default) or ``constant`` (RL)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (DeepSpeed ``gradient_clipping``)."""
    deepspeed: str = "zero0"
    """DeepSpeed config: zero0 | zero2 | zero3 (from infra/deepspeed/) or a path to a JSON file."""
    save_every: int = 25
    """Checkpoint every N optimizer steps for resume (0 = never; a killed run then restarts)."""
    resume: bool = True
    """Resume from the last matching checkpoint when the stage is re-run after an interruption."""
    cpu_bf16: bool = True
    """On a CPU with native bfloat16 (AVX512-BF16 or AMX), run forward and backward under bfloat16 autocast;
    weights, optimizer state and the loss stay fp32. Measured ~1.5x per CoT-SFT step on the 2-core box
    (benchmarks/bench_train.py). Ignored on GPUs (DeepSpeed's ``bf16`` block decides there) and on CPUs
    without native bf16, where autocast would emulate it and be slower."""
    freeze_vision: bool | None = None
    """Keep the vision tower and merger fixed (train the language model only). ``null`` = auto: frozen when
    ``train base`` trained the tower from scratch (tiny presets, smollm2-vl), whose features language-model
    gradients erase (benchmarks/PERCEPTION.md §8); trainable for a pretrained checkpoint (paper: full FT)."""


# ----------------------------------------------------------------------------- distributed


def setup_distributed() -> tuple[int, int]:
    """Make a plain ``python``/``trimpi`` process a valid 1-rank job; returns (rank, world_size)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".trimpi/torch_extensions").resolve()))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - ensure the submodule is loaded before patching it
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    world = int(os.environ["WORLD_SIZE"])
    if world == 1 and not torch.cuda.is_available():
        # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm has a
        # `torch` attribute), hence sys.modules.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), world


def cpu_has_bf16() -> bool:
    """Native bfloat16 matrix units on this CPU (AVX512-BF16 or AMX)."""
    import torch

    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def keep_labelled_logits(labels) -> dict:
    """``labels`` and ``logits_to_keep`` that compute the LM head only where a label is predicted.

    The vocabulary projection is a third of a tiny model's compute, and CoT SFT labels only the
    response, which left padding puts at the end of every row. Logits of the last ``k`` positions and
    the last ``k`` labels give exactly the full loss when ``k`` reaches one position before the
    earliest labelled token (that position predicts it): HF's loss shifts labels within what it gets.
    """
    valid = labels != -100
    rows = valid.any(1)
    if not bool(rows.any()):
        return {}
    first = int(valid.float().argmax(1)[rows].min())
    k = labels.shape[1] - first + 1
    return {"labels": labels[:, -k:], "logits_to_keep": k} if k < labels.shape[1] else {}


def ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with every ``"auto"`` resolved from ``cfg``."""
    import torch

    name = cfg.deepspeed
    path = CONFIG_DIR / f"{name}.json" if name in ("zero0", "zero1", "zero2", "zero3") else Path(name)
    if not path.is_file():
        raise input_error(path, "deepspeed", "zero0|zero2|zero3 or an existing DeepSpeed JSON file", name)
    ds = read_json(path)
    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    fill = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size, "gradient_clipping": cfg.max_grad_norm}

    def resolve(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                r = resolve(v, k)
                if r is not _DROP:
                    out[k] = r
            return out
        if node != "auto":
            return node
        if key in fill:
            return fill[key]
        if key == "lr":
            return cfg.lr
        if key == "weight_decay":
            return cfg.weight_decay
        if key == "enabled":  # bf16/fp16 blocks; fp16 is resolved below
            return bf16
        return _DROP  # any other "auto" (bucket sizes...): DeepSpeed's default

    ds = resolve(ds)
    if isinstance(ds.get("fp16"), dict):
        ds["fp16"]["enabled"] = False
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


_DROP = object()


def lr_lambda(total_steps: int, warmup_ratio: float, floor: float = 0.1,
              schedule: str = "cosine") -> Callable[[int], float]:
    warm = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule: expected cosine or constant, got {schedule!r}")

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        t = (step - warm) / max(1, total_steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# ----------------------------------------------------------------------------- engine


class Engine:
    """A DeepSpeed engine around ``model`` plus resumable checkpoints in ``ckpt_dir``."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, ckpt_dir: str | os.PathLike,
                 fingerprint: dict | None = None, seed: int = 0):
        import deepspeed
        import torch

        self.rank, self.world_size = setup_distributed()
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.ckpt_dir = Path(ckpt_dir)
        self.fingerprint = stable_hash({"fp": fingerprint or {}, "cfg": asdict(cfg), "total": self.total_steps,
                                        "world": self.world_size, "seed": seed})
        self.ds_config = ds_config(cfg, self.world_size)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self._grad_norm: float | None = None  # ZeRO-0 only: see grad_norm()
        params = [p for p in model.parameters() if p.requires_grad]
        f = lr_lambda(self.total_steps, cfg.warmup_ratio, schedule=cfg.lr_schedule)
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=self.ds_config, lr_scheduler=sched)
        self.engine.train()
        self.cpu_bf16 = bool(cfg.cpu_bf16 and str(self.device).startswith("cpu") and cpu_has_bf16())
        import inspect

        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    # -- training
    @property
    def module(self):
        return self.engine.module

    @property
    def device(self):
        return self.engine.device

    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def forward(self, **batch):
        import torch

        dtype = next((p.dtype for p in self.engine.module.parameters() if p.is_floating_point()), None)
        moved = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if k == "pixel_values" and dtype is not None:
                    v = v.to(dtype)
            moved[k] = v
        if "labels" in moved and self._logits_to_keep:
            moved.update(keep_labelled_logits(moved["labels"]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            return self.engine(**moved)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Optimizer step at a gradient-accumulation boundary; returns whether one happened."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and not self.zero_stage:
            self._grad_norm = self._local_grad_norm()
        self.engine.step()
        return boundary

    def grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) of the last optimizer step. ZeRO-1/2/3 optimizers
        report it to DeepSpeed; under ZeRO-0 DeepSpeed clips fp32 gradients and drops the norm
        (``get_global_grad_norm()`` stays None), so :meth:`step` measures it just before stepping."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return None if norm is None else float(norm)

    def _local_grad_norm(self) -> float:
        import torch

        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    # -- checkpoints
    def save_state(self, client_state: dict | None = None) -> None:
        """Checkpoint model, optimizer, LR schedule, RNG and ``client_state`` (all ranks call this)."""
        import torch

        state = {"client": client_state or {}, "fingerprint": self.fingerprint,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        tag = f"step-{self.global_step:07d}"
        if self.is_main:
            # Before DeepSpeed commits 'latest': a kill between the two writes must not make the
            # next run discard a complete checkpoint as "from a different run".
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.ckpt_dir / "fingerprint.json", {"fingerprint": self.fingerprint})
        try:
            with disk_writes(self.ckpt_dir / tag):
                self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state)
        except OSError:
            # DeepSpeed commits 'latest' only after the tag is whole, so the previous checkpoint
            # still resumes; the partial tag only takes the space a retry needs.
            if self.is_main:
                shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            raise
        if self.is_main:
            for old in self.ckpt_dir.glob("step-*"):  # DS writes 'latest' after the tag: older tags can go
                if old.name != tag and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)

    def load_state(self) -> dict | None:
        """Restore the last checkpoint if it belongs to this exact run; returns its client state."""
        import torch

        if not self.cfg.resume or not (self.ckpt_dir / "latest").exists():
            return None
        try:
            saved = json.loads((self.ckpt_dir / "fingerprint.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            saved = None
        if saved != self.fingerprint:
            if self.is_main:
                print(f"checkpoint {self.ckpt_dir} is from a different run (config/data/model changed): starting fresh")
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            return None
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            return None
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(rng["python"])
        if self.is_main:
            print(f"resumed from {path} (step {self.global_step})")
        return state.get("client", {})

    def finish(self) -> None:
        """Remove the checkpoints (call after the stage's output is safely in place)."""
        if self.is_main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)

    # -- export
    def full_state_dict(self) -> dict:
        """Every weight, complete and on CPU (ZeRO-3 partitions are gathered first)."""
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- logs


class TrainLog:
    """``train_log.csv`` rows, kept in the checkpoint dir so a resumed run continues the curve."""

    FIELDS = ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"]

    def __init__(self, path: str | os.PathLike, fields: list[str] | None = None, resume_step: int = 0,
                 enabled: bool = True):
        self.path = Path(path)
        self.fields = fields or self.FIELDS
        self.enabled = enabled  # False on ranks other than 0: one writer per file
        self.rows: list[dict] = []
        if resume_step and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        if enabled:
            self._rewrite()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)

    def append(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in self.fields}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def copy_to(self, out: str | os.PathLike) -> None:
        shutil.copyfile(self.path, out)


# ----------------------------------------------------------------------------- supervised loop


def plan(n_examples: int, cfg: TrainConfig, world_size: int, source: str | None = None) -> tuple[int, int]:
    """(micro-batches per epoch per rank, total optimizer steps); ``source`` names the data in errors."""
    if n_examples <= 0:
        raise input_error(source, None if source else "data", "at least one training record", 0)
    per_epoch = math.ceil(n_examples / (cfg.batch_size * world_size))
    total = math.ceil(cfg.epochs * per_epoch / cfg.grad_accum)
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps) if cfg.epochs > 0 else cfg.max_steps
    return per_epoch, max(1, total)


GROUP_WINDOW = 64
"""Length grouping sorts within windows of this many global batches (HF's LengthGroupedSampler idea)."""


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch: int = 1) -> list[int]:
    """A seeded permutation of ``range(n)`` for one epoch.

    With ``lengths`` (a size class per example), examples of one class share a batch: the shuffled order is
    cut into windows of ``GROUP_WINDOW * batch`` examples, each window is stably sorted by class and its
    batches are shuffled again. Padding to the longest sequence of a batch otherwise makes a batch with one
    policy-in-context example (~430 tokens) cost as much as eight of them (SFT with ``policy_share``)."""
    rng = random.Random(f"{seed}/epoch/{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None or batch <= 1:
        return order
    out: list[int] = []
    w = GROUP_WINDOW * batch
    for s in range(0, n, w):
        win = sorted(order[s:s + w], key=lambda i: lengths[i])
        batches = [win[k:k + batch] for k in range(0, len(win), batch)]
        rng.shuffle(batches)
        out += [i for b in batches for i in b]
    return out


def micro_batch(n: int, seed: int, micro: int, per_epoch: int, batch_size: int, rank: int, world: int,
                lengths: list[int] | None = None) -> list[int]:
    """Indices of global micro-batch ``micro`` for ``rank``: deterministic, so a resume skips exactly."""
    epoch, j = divmod(micro, per_epoch)
    order = epoch_order(n, seed, epoch, lengths, batch_size * world)
    start = (j * world + rank) * batch_size
    return [order[(start + i) % n] for i in range(batch_size)]  # wrap: every rank gets a full batch


def fit(engine: Engine, examples: list, collate: Callable[[list], dict], log: TrainLog, seed: int,
        per_epoch: int, start_step: int = 0, desc: str = "train", on_step: Callable[[int], None] | None = None,
        client_state: Callable[[], dict] | None = None, lengths: list[int] | None = None) -> dict:
    """Supervised loop shared by CPT and SFT; returns throughput/loss stats of this invocation.

    ``lengths`` (a size estimate per example) groups examples of similar length into batches."""
    from tqdm import tqdm

    cfg = engine.cfg
    n = len(examples)
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    micro = start_step * cfg.grad_accum
    bar = tqdm(total=engine.total_steps, initial=start_step, desc=desc, unit="step", disable=not engine.is_main,
               dynamic_ncols=True)
    acc_loss, acc_n = 0.0, 0
    while engine.global_step < engine.total_steps:
        idx = micro_batch(n, seed, micro, per_epoch, cfg.batch_size, engine.rank, engine.world_size, lengths)
        batch = collate([examples[i] for i in idx])
        # tokens of a text batch; image patches of a vision-only batch (train base's vision phase)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["image_grid_thw"].prod(-1).sum())
        out = engine.forward(**batch)
        engine.backward(out.loss)
        acc_loss += float(out.loss.detach())
        acc_n += 1
        micro += 1
        if not engine.step():
            continue
        step = engine.global_step
        loss = acc_loss / acc_n
        acc_loss, acc_n = 0.0, 0
        losses.append(loss)
        el = time.perf_counter() - t0
        log.append({"step": step, "epoch": round(micro / per_epoch, 4), "loss": round(loss, 6),
                    "lr": f"{engine.lr:.3e}", "tokens": tokens, "tokens_per_s": round(tokens / max(el, 1e-9), 1),
                    "elapsed_s": round(el, 2)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < engine.total_steps:
            engine.save_state(client_state() if client_state else {})
        if on_step is not None:
            on_step(step)
    bar.close()
    wall = time.perf_counter() - t0
    return {"steps_run": len(losses), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / max(wall, 1e-9), 1), "losses": losses}
