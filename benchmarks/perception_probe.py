"""Why did the tiny random VLM not learn to see, and what makes it learn? (issue 9)

Measurements, one subcommand each (all single-threaded; results appended as JSON lines to
``--log``, default ``benchmarks/perception_runs.jsonl``; the findings are in PERCEPTION.md):

* ``tokens``   — how many merged image tokens (28x28 px) and ViT patches (14x14 px) a small /
  large object covers, per image size and object scale, after Qwen's ``smart_resize``;
* ``checks``   — the plumbing that could hide small objects: the processor's normalisation and
  resize, the vision tower's window partition, the 3D (mRoPE) position ids of the image tokens,
  and how strongly one small object moves the vision features of its own token vs the others;
* ``features`` — a linear probe on the vision features (mean- and max-pooled merger outputs)
  for "colour c is present", against the same probe on raw pixels: does the tower carry it?
* ``grads``    — gradient norm per module group on existence questions (does the signal reach
  the vision tower, and how large is it compared to the language model's?);
* ``train``    — a short training run with the given settings on freshly sampled generic QA
  (``pipeline.data.generic_qa``, the exact records of the ``train base`` stage), reporting
  forced-choice yes/no accuracy of ``exist``/``exist2`` questions on a fixed held-out set over time;
  ``--turns K`` asks K yes/no questions per image, ``--text-scene`` replaces the image by its object
  list written into the prompt (matching without vision);
* ``dense``    — the vision tower alone on per-token scene-graph labels (``pipeline.train.vision``,
  the ``train base`` vision phase), held-out token accuracy per attribute over time.

The training loop here is a plain torch AdamW loop with the engine's LR schedule (warm-up, cosine
to 10 %) instead of the DeepSpeed engine: same maths, no start-up cost, and per-group learning
rates for the ``--vision-lr-mult`` experiments. Data are sampled on the fly (no epoch repeats), so
a run measures learnability per example seen, not memorisation.

Forced choice = the teacher-forced response prefix ``<think>\\n<question> Yes`` vs ``... No``;
the higher log-likelihood wins. It reads the model's decision without generating the CoT.

    .venv/bin/python benchmarks/perception_probe.py tokens
    .venv/bin/python benchmarks/perception_probe.py train --minutes 3 --mix exist=1 --image-size 128
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import generic_qa as G  # noqa: E402
from pipeline.scenes import ATTRIBUTES, COLOR_RGB, object_radius, make_scene, render_scene  # noqa: E402

LOG = Path(__file__).with_name("perception_runs.jsonl")


def log_result(path: Path, row: dict) -> None:
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


# ----------------------------------------------------------------------------- model


def build(args):
    """(model, processor) of a tiny Qwen2.5-VL with the requested vision/text sizes."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.model.presets import TINY, tiny_config
    from pipeline.model.processor import build_processor
    from pipeline.model.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    dims = dict(TINY[args.preset])
    for k in ("vis_dim", "vis_depth", "vis_heads", "text_hidden", "text_layers"):
        v = getattr(args, k, None)
        if v:
            dims[k] = v
    tok = build_tokenizer(4096, seed=0)
    # the pipeline's processor limits (model_init defaults): 128 px -> 140 px, 5x5 merged tokens
    proc = build_processor(tok, min_pixels=56 * 56, max_pixels=args.max_pixels)
    torch.manual_seed(args.seed)
    cfg = tiny_config(tok, **dims)
    if getattr(args, "full_attention", False):
        cfg.vision_config.fullatt_block_indexes = list(range(dims["vis_depth"]))
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return model, proc, dims


def gen_cfg(args) -> "G.GenerateGenericConfig":
    return G.GenerateGenericConfig(image_size=args.image_size, object_scale=args.object_scale,
                                   min_objects=args.min_objects, max_objects=args.max_objects,
                                   object_scale_max=getattr(args, "scale_max", 0.0))


def sample(rng: random.Random, cfg, mix: dict[str, float], text_scene: bool = False):
    """One (query, cot, answer, image-or-None, qtype, scene-or-None) drawn from the qtype mix.

    ``text_scene``: no image; the scene's object list is written into the query instead (a
    text-only version of the same question, to separate reading the image from matching)."""
    qtype = rng.choices(list(mix), weights=list(mix.values()))[0]
    if qtype == "text":
        _, query, cot, ans = G.text_question(rng)
        return query, cot, ans, None, qtype, None
    # training scenes: per-scene object scale in [object_scale, object_scale_max] (generic_qa's own knob)
    _, scene, query, cot, ans = G.image_example(qtype, rng, cfg, split="train")
    if text_scene:
        return scene_text(scene) + query, cot, ans, None, qtype, scene
    return query, cot, ans, render_scene(scene, object_scale=scene["object_scale"]), qtype, scene


def scene_text(scene: dict) -> str:
    return "Objects: " + G.answer_for({"qtype": "objects", "desc": {}}, scene)[1] + "\n"


def extra_turns(rng: random.Random, scene: dict, k: int, fmt: str) -> list[dict]:
    """k more yes/no questions about the same scene (each answer a coin flip where the scene allows),
    as user/assistant turns: k decisions per image instead of one."""
    msgs = []
    for _ in range(k):
        want = rng.random() < 0.5
        for _try in range(60):
            qt = rng.choice(["exist", "exist2"])
            q = {"qtype": qt, "desc": G._random_desc(rng, 1 if qt == "exist" else 2)}
            ans, cot = G.answer_for(q, scene)
            if (ans == "yes") == want:
                break
        msgs += [{"role": "user", "content": [{"type": "text", "text": G.question_text(q)}]},
                 {"role": "assistant", "content": [{"type": "text", "text": response(cot, ans, fmt)}]}]
    return msgs


def conversation(query, image, response=None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": query}]
    msgs = [{"role": "user", "content": content}]
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return msgs


def response(cot: str, answer: str, fmt: str) -> str:
    from pipeline.model.prompts import format_response

    return format_response(cot if fmt == "cot" else "", answer)


# ----------------------------------------------------------------------------- evaluation


def eval_set(cfg, n: int, seed: int = 12345, text_scene: bool = False) -> list[tuple]:
    """A fixed held-out set: n exist + n exist2 questions, balanced yes/no by construction."""
    out = []
    for qtype in ("exist", "exist2"):
        rng = random.Random(f"eval/{seed}/{qtype}")
        for _ in range(n):
            _, scene, query, cot, ans = G.image_example(qtype, rng, cfg, split="test")
            if text_scene:
                out.append((scene_text(scene) + query, cot, ans, None, qtype))
            else:
                out.append((query, cot, ans, render_scene(scene, object_scale=cfg.object_scale), qtype))
    return out


def caption_set(cfg, n: int, seed: int = 54321) -> list[tuple]:
    rng = random.Random(f"eval/{seed}/objects")
    out = []
    for _ in range(n):
        _, scene, query, cot, ans = G.image_example("objects", rng, cfg, split="test")
        out.append((query, cot, ans, render_scene(scene, object_scale=cfg.object_scale), "objects"))
    return out


def attribute_token_accuracy(model, proc, items, bs: int = 16) -> dict[str, float]:
    """Teacher-forced argmax accuracy on the attribute words of the ``objects`` captions, per attribute.

    Chance is about 1/8 for colour, 1/3 for shape, 1/2 for size and material; it reads how much
    of the scene the model perceives without any yes/no shortcut.
    """
    import torch

    from pipeline.model.masking import encode

    tok = proc.tokenizer
    word_ids = {a: {tok.convert_tokens_to_ids(tok.tokenize(" " + v))[0]: v for v in vals
                    if len(tok.tokenize(" " + v)) == 1} for a, vals in ATTRIBUTES.items()}
    hits: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            convs = [conversation(q, img, response(cot, ans, "cot")) for (q, cot, ans, img, _) in chunk]
            b = encode(proc, convs, labels="response")
            lab = b.pop("labels")
            pred = model(**b).logits[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            for a, ids in word_ids.items():
                m = torch.isin(tgt, torch.tensor(list(ids)))
                hits[a] += (pred[m] == tgt[m]).long().tolist()
    model.train()
    return {f"cap_{a}": round(100 * sum(v) / max(1, len(v)), 1) for a, v in hits.items()}


def attribute_set(cfg, n: int, seed: int = 999) -> list[tuple]:
    rng = random.Random(f"eval/{seed}/attribute")
    out = []
    for _ in range(n):
        q, scene, query, cot, ans = G.image_example("attribute", rng, cfg, split="test")
        out.append((query, q["target"], ans, render_scene(scene, object_scale=cfg.object_scale), "attribute"))
    return out


def attribute_choice(model, proc, items, bs: int = 8) -> dict[str, float]:
    """Answer-format forced choice among the asked attribute's values: argmax log p(\\boxed{value})."""
    import torch

    from pipeline.model.masking import encode

    hits = []
    model.eval()
    with torch.no_grad():
        for q, target, ans, img, _ in items:
            vals = ATTRIBUTES[target]
            convs = [conversation(q, img, "\\boxed{" + v + "}") for v in vals]
            b = encode(proc, convs, labels="response")
            lab = b.pop("labels")
            lp = torch.log_softmax(model(**b).logits[:, :-1].float(), -1)
            tgt = lab[:, 1:]
            score = (lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)).sum(-1)
            hits.append((target, int(vals[int(score.argmax())] == ans)))
    model.train()
    out = {"attribute": round(100 * sum(h for _, h in hits) / len(hits), 1)}
    for a in ATTRIBUTES:  # per asked attribute: chance 1/3 shape, 1/8 colour, 1/2 size and material
        v = [h for t, h in hits if t == a]
        out[f"attr_{a}"] = round(100 * sum(v) / max(1, len(v)), 1)
    return out


def forced_choice(model, proc, items, fmt: str, bs: int = 16) -> dict[str, float]:
    """Accuracy per qtype: is log p(gold yes/no prefix) > log p(the other)?"""
    import torch

    from pipeline.model.masking import encode

    def prefix(query, yes: bool):
        word = "Yes" if yes else "No"
        return f"<think>\n{query} {word}" if fmt == "cot" else "\\boxed{" + word.lower() + "}"

    model.eval()
    correct: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            convs = [conversation(q, img, prefix(q, yes)) for (q, _, _, img, _) in chunk for yes in (True, False)]
            b = encode(proc, convs, labels="response")
            lab = b.pop("labels")
            logits = model(**b).logits[:, :-1]
            tgt = lab[:, 1:]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            # the two prefixes differ only at the decision word and after it (<|im_end|> is shared)
            score = (lp * (tgt != -100)).sum(-1).view(-1, 2)
            for (q, _, ans, _, qt), s in zip(chunk, score):
                pred = "yes" if s[0] > s[1] else "no"
                correct.setdefault(qt, []).append(int(pred == ans))
    model.train()
    return {k: round(100 * sum(v) / len(v), 1) for k, v in correct.items()}


# ----------------------------------------------------------------------------- train


def param_groups(model, lr: float, vision_mult: float):
    vis = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    rest = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    return [{"params": vis, "lr": lr * vision_mult}, {"params": rest, "lr": lr}]


def cmd_train(args) -> None:
    import torch

    from pipeline.model.masking import encode
    from pipeline.train.engine import lr_lambda

    if args.init:
        from pipeline.model import load

        model, proc = load(args.init)
        dims = {"init": args.init}
    else:
        model, proc, dims = build(args)
    cfg = gen_cfg(args)
    ecfg = G.GenerateGenericConfig(**vars(cfg))  # eval scenes are split "test": always at object_scale
    ecfg.min_objects, ecfg.max_objects = args.eval_min_objects or cfg.min_objects, args.eval_max_objects or cfg.max_objects
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    items = eval_set(ecfg, args.eval_n, text_scene=args.text_scene)
    caps = caption_set(ecfg, args.eval_n // 2)
    attrs = attribute_set(ecfg, args.eval_n // 2)

    def evaluate():
        extra = attribute_token_accuracy(model, proc, caps) if args.format == "cot" else \
            attribute_choice(model, proc, attrs)
        return {**forced_choice(model, proc, items, args.format), **extra}
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.vision_lr_mult), lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    for g in opt.param_groups:
        g["peak"] = g["lr"]
    rng = random.Random(f"train/{args.seed}")
    model.train()
    t0 = time.perf_counter()
    curve, losses, step, seen, eval_s = [], [], 0, 0, 0.0
    next_eval = args.eval_every
    while True:
        el = time.perf_counter() - t0 - eval_s  # training time only: evaluation is not budgeted
        # progress in [0, 1]: by steps, or by wall time (the budget of the issue is wall time)
        frac = step / args.steps if args.steps else el / (args.minutes * 60)
        if frac >= 1:
            break
        # the engine's schedule (linear warm-up, cosine to 10 %) as a function of progress
        f = lr_lambda(1000, args.warmup)(int(1000 * frac))
        for g in opt.param_groups:
            g["lr"] = g["peak"] * f
        batch = [sample(rng, cfg, mix, args.text_scene) for _ in range(args.batch_size)]
        convs = [conversation(q, img, response(cot, ans, args.format)) +
                 (extra_turns(rng, sc, args.turns - 1, args.format) if args.turns > 1 and qt in ("exist", "exist2") else [])
                 for q, cot, ans, img, qt, sc in batch]
        b = encode(proc, convs, labels="response")
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(batch)
        losses.append(float(loss))
        if time.perf_counter() - t0 - eval_s >= next_eval * 60:
            te = time.perf_counter()
            train_min = round((te - t0 - eval_s) / 60, 2)
            acc = evaluate()
            eval_s += time.perf_counter() - te
            curve.append({"min": train_min, "step": step, "seen": seen,
                          "loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), **acc})
            print(curve[-1], flush=True)
            next_eval += args.eval_every
    wall = time.perf_counter() - t0 - eval_s
    acc = evaluate()
    row = {"cmd": "train", "preset": args.preset, "dims": dims, "image_size": args.image_size,
           "object_scale": args.object_scale, "objects": [args.min_objects, args.max_objects], "mix": mix,
           "format": args.format, "lr": args.lr, "vision_lr_mult": args.vision_lr_mult, "batch": args.batch_size,
           "steps": step, "seen": seen, "wall_min": round(wall / 60, 2), "ex_per_min": round(seen / (wall / 60)),
           "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4), "acc": acc, "curve": curve,
           "note": args.note, "full_attention": args.full_attention, "scale_max": args.scale_max,
           "init": args.init, "eval_objects": [ecfg.min_objects, ecfg.max_objects], "turns": args.turns,
           "text_scene": args.text_scene}
    log_result(Path(args.log), row)
    if args.save:
        model.save_pretrained(args.save)
        proc.save_pretrained(args.save)


# ----------------------------------------------------------------------------- dense (vision tower alone)


def cmd_dense(args) -> None:
    """The vision tower alone on per-token scene-graph labels (pipeline.train.vision), scenes rendered on
    the fly at a per-scene scale in [object-scale, scale-max]; held-out scenes at object-scale."""
    import torch

    from pipeline.scenes import sample_scene
    from pipeline.model import vision_tower
    from pipeline.train import vision as V

    model, proc, dims = build(args)
    dense = V._head_module()(vision_tower(model), model.get_input_embeddings().embedding_dim)
    ip, m = proc.image_processor, proc.image_processor.merge_size

    def scenes(rng, n, lo, hi):
        out = []
        while len(out) < n:
            s = rng.uniform(lo, hi)
            try:
                sc = sample_scene(rng, args.min_objects, args.max_objects, args.image_size, s)
            except Exception:  # too many large objects for the image: draw again
                continue
            sc["object_scale"] = s
            out.append((sc, render_scene(sc, object_scale=s)))
        return out

    def collate(items):
        b = ip(images=[im for _, im in items], return_tensors="pt")
        thw = b["image_grid_thw"]
        Y = torch.cat([V.token_targets(sc, int(g[1]) // m, int(g[2]) // m) for (sc, _), g in zip(items, thw)])
        return {"pixel_values": b["pixel_values"], "image_grid_thw": thw, "targets": Y}

    held_out = scenes(random.Random("dense/eval"), 200, args.object_scale, args.object_scale)
    opt = torch.optim.AdamW(dense.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(f"dense/{args.seed}")
    curve, step, t0, eval_s, next_eval = [], 0, time.perf_counter(), 0.0, 0.0
    from pipeline.train.engine import lr_lambda

    while True:
        el = time.perf_counter() - t0 - eval_s
        if el >= next_eval * 60 or el >= args.minutes * 60:
            te = time.perf_counter()
            curve.append({"min": round(el / 60, 2), "step": step, **V.evaluate(dense, collate, held_out)})
            print(curve[-1], flush=True)
            eval_s += time.perf_counter() - te
            next_eval += args.eval_every
        if el >= args.minutes * 60:
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_lambda(1000, args.warmup)(int(1000 * el / (args.minutes * 60)))
        loss = dense(**collate(scenes(rng, args.batch_size, args.object_scale,
                                      args.scale_max or args.object_scale))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
        opt.step()
        step += 1
    log_result(Path(args.log), {"cmd": "dense", "preset": args.preset, "dims": dims, "lr": args.lr,
                                "batch": args.batch_size, "objects": [args.min_objects, args.max_objects],
                                "object_scale": args.object_scale, "scale_max": args.scale_max, "steps": step,
                                "final": curve[-1], "curve": curve, "note": args.note})
    if args.save:
        from pipeline.model import save

        save(model, proc, args.save)


# ----------------------------------------------------------------------------- square (harness check)

PURE = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (240, 220, 20),
        "black": (0, 0, 0), "orange": (250, 140, 0), "purple": (140, 40, 180), "cyan": (0, 200, 220)}


def square_example(rng: random.Random, args):
    """The recipe's task (§7), with knobs that move it towards ours one step at a time.

    ``--colors pure|clevr`` (recipe's 8 saturated colours | CLEVR's 8), ``--background white|floor``
    (the scene renderer's shaded grey floor), ``--shape square|clevr`` (flat square | a random CLEVR
    object drawn by the scene renderer), ``--size-frac lo,hi`` (side / image side; recipe 0.25-0.5).
    Returns (PIL image, query, colour word).
    """
    from PIL import Image, ImageDraw

    from pipeline.scenes import SS, _background, _draw_object

    size = args.image_size
    palette = PURE if args.colors == "pure" else COLOR_RGB
    c = rng.choice(list(palette))
    lo, hi = (float(v) for v in args.size_frac.split(","))
    s = rng.randint(int(size * lo), int(size * hi))
    x, y = rng.randint(0, size - s), rng.randint(0, size - s)
    if args.background == "white":
        img = Image.new("RGB", (size * SS, size * SS), (255, 255, 255))
    else:
        img = _background(size * SS, size * SS).copy()
    d = ImageDraw.Draw(img)
    if args.shape == "square":
        d.rectangle([x * SS, y * SS, (x + s) * SS, (y + s) * SS], fill=palette[c])
        noun = "square"
    else:
        o = {"shape": rng.choice(ATTRIBUTES["shape"]), "color": c, "size": "large",
             "material": rng.choice(ATTRIBUTES["material"])}
        _draw_object(d, o, (x + s / 2) * SS, (y + s / 2) * SS, s / 2 * SS)
        noun = "object"
    return img.reduce(SS), f"What color is the {noun}?", c


def square_response(c: str, noun: str, fmt: str) -> str:
    from pipeline.model.prompts import format_response

    return f"The {noun} is {c}." if fmt == "sentence" else format_response("", c)


def cmd_square(args) -> None:
    """Train the square-colour task with the recipe's plain loop (``--harness plain``) or the
    pipeline's own path (``--harness engine``: Record -> prompts.build_messages -> masking.encode
    -> DeepSpeed Engine with its warm-up + cosine schedule), same steps and lr; generation accuracy."""
    import torch

    from pipeline.data.records import Record
    from pipeline.model import generate
    from pipeline.model.masking import encode
    from pipeline.model.prompts import build_messages, parse_answer

    model, proc, dims = build(args)
    rng = random.Random(f"square/{args.seed}")
    test_rng = random.Random("square/test")
    train_frac = args.size_frac
    args.size_frac = args.eval_size_frac or train_frac  # held-out objects may be smaller than the training ones
    tests = [square_example(test_rng, args) for _ in range(args.eval_n)]
    args.size_frac = train_frac
    noun = "square" if args.shape == "square" else "object"

    def convs_of(items, with_response=True):
        out = []
        for img, q, c in items:
            resp = square_response(c, noun, args.response) if with_response else None
            if args.harness == "engine":
                rec = Record(id="sq", task="generic", split="train", query=q, answer=c, images=["x"])
                out.append(build_messages(rec, [img], None, resp))
            else:
                out.append(conversation(q, img, resp))
        return out

    def accuracy():
        texts = generate(model, proc, convs_of(tests, False), max_new_tokens=12, batch_size=32)
        if args.response == "sentence":
            hits = [t.strip() == square_response(c, noun, "sentence") for (_, _, c), t in zip(tests, texts)]
        else:
            hits = [parse_answer(t) == c for (_, _, c), t in zip(tests, texts)]
        return round(100 * sum(hits) / len(hits), 1), texts[:3]

    if args.harness == "engine":
        from pipeline.train.engine import Engine, TrainConfig

        cfg = TrainConfig(lr=args.lr, batch_size=8, warmup_ratio=0.1, max_grad_norm=1.0, save_every=0, resume=False)
        eng = Engine(model, cfg, args.steps, f"/tmp/square-ckpt-{os.getpid()}", seed=args.seed)
        fwd, bwd = (lambda b: eng.forward(**b).loss), eng.backward
        step_fn = eng.step
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
        fwd = lambda b: model(**b).loss  # noqa: E731

        def bwd(loss):
            loss.backward()

        def step_fn():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    model.train()
    t0 = time.perf_counter()
    curve, losses = [], []
    for step in range(args.steps):
        b = encode(proc, convs_of([square_example(rng, args) for _ in range(8)]), labels="response")
        loss = fwd(b)
        bwd(loss)
        step_fn()
        losses.append(float(loss))
        if (step + 1) % args.eval_every_steps == 0 or step + 1 == args.steps:
            acc, samples = accuracy()
            curve.append({"step": step + 1, "min": round((time.perf_counter() - t0) / 60, 2),
                          "loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "acc": acc})
            print(curve[-1], samples, flush=True)
    row = {"cmd": "square", "harness": args.harness, "preset": args.preset, "dims": dims, "lr": args.lr,
           "steps": args.steps, "seen": 8 * args.steps, "image_size": args.image_size, "colors": args.colors,
           "background": args.background, "shape": args.shape, "size_frac": args.size_frac,
           "eval_size_frac": args.eval_size_frac or args.size_frac,
           "response": args.response, "acc": curve[-1]["acc"], "curve": curve, "note": args.note}
    log_result(Path(args.log), row)


# ----------------------------------------------------------------------------- diagnostics


def smart_hw(size: int) -> int:
    """Side after Qwen's smart_resize for a square image (rounded to a multiple of 28)."""
    return max(28, round(size / 28) * 28)


def cmd_tokens(args) -> None:
    """Merged tokens / patches an object's bounding box overlaps (any overlap counts)."""
    rows = []
    for size in (112, 128, 168, 224):
        side = smart_hw(size)
        k = side / size
        for scale in (0.10, 0.14, 0.18):
            row = {"image": size, "resized": side, "tokens": (side // 28) ** 2, "object_scale": scale}
            for name in ("small", "large"):
                r = object_radius(name, size, scale) * k  # drawn radius in resized pixels
                d = 2 * r
                # expected number of 28 px cells a d x d box overlaps at a random offset: (1 + d/28)^2
                row[f"{name}_px"] = round(d, 1)
                row[f"{name}_tokens"] = round((1 + d / 28) ** 2, 1)
                row[f"{name}_token_share"] = round(min(1.0, (d / 28) ** 2), 2)  # object area / one token
                row[f"{name}_patches_full"] = max(0, int(d // 14) - 1) ** 2  # 14 px patches it covers fully
            rows.append(row)
    for r in rows:
        print(r)
    log_result(Path(args.log), {"cmd": "tokens", "rows": rows})


def _scenes(n: int, cfg, seed: int = 7):
    from pipeline.scenes import sample_scene

    rng = random.Random(f"probe/{seed}")
    out = []
    for i in range(n):
        sc = sample_scene(rng, cfg.min_objects, cfg.max_objects, cfg.image_size, cfg.object_scale, i)
        out.append((sc, render_scene(sc, object_scale=cfg.object_scale)))
    return out


def vision_features(model, proc, images, stage: str = "merger"):
    """Per-image [tokens x dim] features at ``stage``: patch_embed | blocks | merger."""
    import torch

    ip = proc.image_processor
    feats = []
    vis = model.model.visual
    with torch.no_grad():
        for img in images:
            b = ip(images=[img], return_tensors="pt")
            pv, thw = b["pixel_values"], b["image_grid_thw"]
            if stage == "patch_embed":
                feats.append(vis.patch_embed(pv))
            elif stage == "blocks":
                feats.append(vis(pv, grid_thw=thw).last_hidden_state)
            else:
                feats.append(vis(pv, grid_thw=thw).pooler_output)
    return feats


def linear_probe(X, Y, train_frac: float = 0.7, l2: float = 1e-2):
    """Per-label held-out accuracy of a ridge classifier (closed form, standardised features)."""
    import torch

    n = X.shape[0]
    k = int(n * train_frac)
    mu, sd = X[:k].mean(0), X[:k].std(0) + 1e-6
    Xs = torch.cat([(X - mu) / sd, torch.ones(n, 1)], 1)
    A = Xs[:k].T @ Xs[:k] + l2 * k * torch.eye(Xs.shape[1])
    W = torch.linalg.solve(A, Xs[:k].T @ (2 * Y[:k] - 1))
    pred = (Xs[k:] @ W) > 0
    return ((pred == Y[k:].bool()).float().mean(0) * 100).tolist()


def cmd_features(args) -> None:
    """Linear probe for 'colour c present' on pooled vision features (random init or --model)."""
    import torch

    if args.model:
        from pipeline.model import load

        model, proc = load(args.model)
    else:
        model, proc, _ = build(args)
    cfg = gen_cfg(args)
    data = _scenes(args.n, cfg)
    colors = ATTRIBUTES["color"]
    Y = torch.tensor([[float(any(o["color"] == c for o in sc["objects"])) for c in colors] for sc, _ in data])
    res = {"majority": round(float(torch.maximum(Y.mean(0), 1 - Y.mean(0)).mean() * 100), 1)}
    for stage in ("patch_embed", "blocks", "merger"):
        feats = vision_features(model, proc, [im for _, im in data], stage)
        for pool in ("mean", "max"):
            X = torch.stack([f.mean(0) if pool == "mean" else f.max(0).values for f in feats])
            acc = linear_probe(X, Y)
            res[f"{stage}/{pool}"] = round(sum(acc) / len(acc), 1)
    # pixel baseline: a 4x4x4 colour histogram of the image (what a perfect colour detector would see)
    import numpy as np

    H = []
    for _, im in data:
        a = (np.asarray(im) // 64).reshape(-1, 3)
        H.append(np.bincount(a[:, 0] * 16 + a[:, 1] * 4 + a[:, 2], minlength=64) > 0)
    acc = linear_probe(torch.tensor(np.array(H), dtype=torch.float32), Y)
    res["pixel_histogram"] = round(sum(acc) / len(acc), 1)
    log_result(Path(args.log), {"cmd": "features", "model": args.model or f"{args.preset} (random init)",
                                "image_size": args.image_size, "object_scale": args.object_scale, "n": args.n,
                                "balanced_acc_mean_over_colours": res, "note": args.note})


def cmd_grads(args) -> None:
    """Gradient norm per module group, averaged over a few batches of existence questions."""
    from pipeline.model.masking import encode

    if args.model:
        from pipeline.model import load

        model, proc = load(args.model)
    else:
        model, proc, _ = build(args)
    model.train()
    cfg = gen_cfg(args)
    rng = random.Random("grads")
    groups: dict[str, float] = {}
    pnorm: dict[str, float] = {}

    def group(n: str) -> str:
        n = n.replace("model.", "", 1)
        parts = n.split(".")
        if parts[0] == "visual":
            return "visual." + (".".join(parts[1:3]) if parts[1] == "blocks" else parts[1])
        if parts[0] == "language_model":
            return "lm." + (".".join(parts[1:3]) if parts[1] == "layers" else parts[1])
        return parts[0]
    for _ in range(args.batches):
        batch = [sample(rng, cfg, {"exist": 1.0}) for _ in range(8)]
        convs = [conversation(q, img, response(cot, ans, "cot")) for q, cot, ans, img, _ in batch]
        model(**encode(proc, convs, labels="response")).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = group(n)
            groups[g] = groups.get(g, 0.0) + float(p.grad.norm() ** 2) / args.batches ** 2
            pnorm[g] = pnorm.get(g, 0.0) + float(p.norm() ** 2)
    rows = {g: {"grad": round(math.sqrt(v), 5), "param": round(math.sqrt(pnorm[g]), 3),
                "ratio": float(f"{math.sqrt(v) / max(math.sqrt(pnorm[g]), 1e-12):.2e}")} for g, v in groups.items()}
    for g, r in rows.items():
        print(f"{g:<28} {r}")
    log_result(Path(args.log), {"cmd": "grads", "model": args.model or f"{args.preset} (random init)",
                                "rows": rows, "note": args.note})


def cmd_checks(args) -> None:
    """Normalisation, resize, window partition, image position ids, small-object sensitivity."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    model, proc, dims = build(args)
    cfg = gen_cfg(args)
    ip = proc.image_processor
    out: dict = {"image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}
    sc, img = _scenes(1, cfg)[0]
    b = ip(images=[img], return_tensors="pt")
    thw = b["image_grid_thw"][0].tolist()
    out["grid_thw"] = thw
    out["resized_px"] = [thw[1] * 14, thw[2] * 14]
    pv = b["pixel_values"]
    out["pixel_range"] = [round(float(pv.min()), 2), round(float(pv.max()), 2)]
    # colour separability after normalisation: min distance between two object colours' normalised RGB
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    rgb = {c: (torch.tensor(v) / 255 - mean) / std for c, v in COLOR_RGB.items()}
    names = list(rgb)
    d = min(float((rgb[a] - rgb[c]).norm()) for i, a in enumerate(names) for c in names[i + 1:])
    out["min_colour_distance_normalised"] = round(d, 3)
    win, cu = get_vision_window_index(b["image_grid_thw"], spatial_merge_size=2, window_size=112, patch_size=14)
    out["windows"] = len(cu) - 1
    out["window_sizes_patches"] = torch.diff(torch.as_tensor(cu)).tolist()
    out["fullatt_block_indexes"] = list(model.config.vision_config.fullatt_block_indexes)
    # mRoPE position ids of the image tokens: (t, h, w) must walk the 2D grid
    from pipeline.model.masking import encode

    enc = encode(proc, [conversation("Is there a cube?", img)], add_generation_prompt=True)
    pos, _ = model.model.get_rope_index(enc["input_ids"], enc.get("mm_token_type_ids"), enc["image_grid_thw"],
                                        attention_mask=enc["attention_mask"]) if _rope_takes_mm(model) else \
        model.model.get_rope_index(enc["input_ids"], enc["image_grid_thw"], None, attention_mask=enc["attention_mask"])
    img_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mask = enc["input_ids"][0] == img_id
    p = pos[:, 0, mask]
    out["image_token_positions_hw"] = {"h": sorted(set(p[1].tolist())), "w": sorted(set(p[2].tolist())),
                                       "t_unique": sorted(set(p[0].tolist()))}
    # sensitivity: one small object added to an empty floor, how much does each merged token move?
    empty = make_scene([], random.Random(0), cfg.image_size, cfg.object_scale)
    one = {"split": "x", "image_size": [cfg.image_size] * 2, "objects": [
        {"shape": "sphere", "color": "red", "size": "small", "material": "rubber",
         "pixel_coords": [cfg.image_size // 2 - 10, cfg.image_size // 2 - 10, 0.5]}]}
    f0, f1 = vision_features(model, proc, [render_scene(empty, object_scale=cfg.object_scale),
                                           render_scene(one, object_scale=cfg.object_scale)])
    delta = (f1 - f0).norm(dim=-1)
    out["small_object_feature_change"] = {"max_token": round(float(delta.max()), 4),
                                          "median_token": round(float(delta.median()), 4),
                                          "feature_norm": round(float(f0.norm(dim=-1).mean()), 4)}
    emb = model.model.language_model.embed_tokens.weight.detach()
    out["text_embedding_norm"] = round(float(emb.norm(dim=-1).mean()), 4)
    for k, v in out.items():
        print(f"{k}: {v}")
    log_result(Path(args.log), {"cmd": "checks", "image_size": cfg.image_size, "dims": dims, **out})


def _rope_takes_mm(model) -> bool:
    import inspect

    return "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--preset", default="tiny", choices=["tiny", "tiny-xs"])
        sp.add_argument("--vis-dim", type=int, default=0)
        sp.add_argument("--vis-depth", type=int, default=0)
        sp.add_argument("--vis-heads", type=int, default=0)
        sp.add_argument("--text-hidden", type=int, default=0)
        sp.add_argument("--text-layers", type=int, default=0)
        sp.add_argument("--full-attention", action="store_true", help="every vision block attends globally")
        sp.add_argument("--image-size", type=int, default=128)
        sp.add_argument("--max-pixels", type=int, default=224 * 224)
        sp.add_argument("--object-scale", type=float, default=0.14)
        sp.add_argument("--min-objects", type=int, default=3)
        sp.add_argument("--max-objects", type=int, default=6)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--log", default=str(LOG))
        sp.add_argument("--note", default="")

    t = sub.add_parser("train")
    common(t)
    t.add_argument("--minutes", type=float, default=3.0)
    t.add_argument("--steps", type=int, default=0, help="fixed step count instead of a time budget")
    t.add_argument("--mix", default="exist=1", help="qtype weights, e.g. exist=1,exist2=1,attribute=0.5")
    t.add_argument("--format", choices=["cot", "answer"], default="cot")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--vision-lr-mult", type=float, default=1.0)
    t.add_argument("--warmup", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--eval-n", type=int, default=96)
    t.add_argument("--eval-every", type=float, default=1.0, help="minutes between evaluations")
    t.add_argument("--save", default="")
    t.add_argument("--init", default="", help="start from this checkpoint (a previous --save): curricula")
    t.add_argument("--scale-max", type=float, default=0.0,
                   help="training scenes draw their object scale in [object-scale, scale-max]")
    t.add_argument("--turns", type=int, default=1, help="yes/no questions per image (multi-turn), exist/exist2")
    t.add_argument("--text-scene", action="store_true",
                   help="no image: the object list is written into the query (text-only matching)")
    t.add_argument("--eval-min-objects", type=int, default=0)
    t.add_argument("--eval-max-objects", type=int, default=0)
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("dense", help="the vision tower alone on per-token scene-graph labels (§8)")
    common(d)
    d.add_argument("--minutes", type=float, default=3.0)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--warmup", type=float, default=0.03)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--scale-max", type=float, default=0.0, help="0 = every scene at --object-scale")
    d.add_argument("--eval-every", type=float, default=0.75, help="minutes between evaluations")
    d.add_argument("--save", default="")
    d.set_defaults(fn=cmd_dense, min_objects=1)

    q = sub.add_parser("square", help="harness check: the recipe's square-colour task")
    common(q)
    q.add_argument("--harness", choices=["plain", "engine"], default="plain")
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--colors", choices=["pure", "clevr"], default="pure")
    q.add_argument("--background", choices=["white", "floor"], default="white")
    q.add_argument("--shape", choices=["square", "clevr"], default="square")
    q.add_argument("--size-frac", default="0.25,0.5", help="square side / image side, lo,hi")
    q.add_argument("--eval-size-frac", default="", help="size range of the held-out squares (default: --size-frac)")
    q.add_argument("--response", choices=["sentence", "boxed"], default="sentence")
    q.add_argument("--eval-n", type=int, default=64)
    q.add_argument("--eval-every-steps", type=int, default=200)
    q.set_defaults(fn=cmd_square)

    for name, fn in (("tokens", cmd_tokens), ("checks", cmd_checks), ("features", cmd_features),
                     ("grads", cmd_grads)):
        sp = sub.add_parser(name)
        common(sp)
        sp.add_argument("--model", default="", help="a checkpoint dir instead of a random-init preset")
        sp.add_argument("--n", type=int, default=600, help="features: images")
        sp.add_argument("--batches", type=int, default=4, help="grads: batches averaged")
        sp.set_defaults(fn=fn)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
