"""Dense scene-graph supervision of the vision tower: the ``vision`` phase of ``trimpi train base``.

Why this exists (measurements in ``benchmarks/PERCEPTION.md`` §8): trained only through the language
model, a random tiny tower never learned shape, material or size, and existence stayed at chance,
because the only supervision reaching the pixels was one answer token per image, and a yes/no
answer does not correlate with any single feature of the image. Real VLMs start from a vision encoder
pretrained on dense labels; we have the densest labels there are, the scene graph of every image.

What it trains: every merged visual token (the 28x28 px unit the language model reads) gets a
multi-hot target from the scene graph: which of the 15 attribute values (3 shapes, 8 colours,
2 sizes, 2 materials) belong to an object that covers the token, "some object covers it", and which
of the 72 value pairs of two attribute types ("cube+rubber") that object has (see ``TARGETS``). A
linear head on the merger output (exactly the embeddings the language model receives) is trained
with the tower by binary cross-entropy and then thrown away: the checkpoint stays a stock
Qwen2.5-VL, and only the vision tower and merger have changed.

Departures from the obvious:

* Coverage, not centre: a token is covered by an object when at least 2 of a 4x4 grid of sample
  points inside it fall in the object's footprint (a disc of 0.9 radius around its centre, nearer
  objects occluding farther ones), so a small object that straddles four tokens labels all four.
* Labels are computed at each scene's own ``object_scale`` (recorded by ``generate generic``), but
  sizes are only learnable when one scale is used throughout: at a per-scene scale a "small" object
  can be larger in pixels than a "large" one elsewhere (PERCEPTION.md §8.1: size 87 % vs 98 %).
* The images are the generic dataset's own (``data/generic``, train split), so the phase adds no
  input to the stage and is versioned with the rest of its data.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.scenes import ATTRIBUTES, object_radius
from pipeline.io import input_error

# One output per attribute value, "an object covers this token", then one per pair of values of two
# attribute types ("cube+rubber"): an existence condition with two properties ("is there a rubber
# cube?") must hold for ONE object, and a token that carries the pair as one linear feature makes that
# a single lookup for the language model instead of an AND it has to learn per condition. Measured:
# CoT SFT missed rubber cubes, large ones included, on 20 % of L2-Fedaru's images without them.
PAIRS = [(a, b) for i, a in enumerate(ATTRIBUTES) for b in list(ATTRIBUTES)[i + 1:]]
TARGETS: list[tuple[str, str]] = ([(a, v) for a, vs in ATTRIBUTES.items() for v in vs] + [("object", "any")]
                                  + [(f"{a}+{b}", f"{va}+{vb}") for a, b in PAIRS
                                     for va in ATTRIBUTES[a] for vb in ATTRIBUTES[b]])
N_SINGLE = sum(len(vs) for vs in ATTRIBUTES.values()) + 1   # attribute values + "object"
SAMPLES = 4        # sample points per token side
MIN_COVER = 2      # of SAMPLES**2 points inside the footprint


def token_targets(scene: dict, grid_h: int, grid_w: int):
    """``[grid_h * grid_w, len(TARGETS)]`` multi-hot targets of one scene, tokens in row-major order."""
    import torch

    size = float(scene.get("image_size", [128])[0])
    scale = float(scene.get("object_scale", 0.14))
    # nearest first (largest y is nearest to the camera): a point belongs to the front object
    objs = sorted(scene["objects"], key=lambda o: -o["pixel_coords"][1])
    discs = []
    for o in objs:
        r = object_radius(o["size"], size, scale)
        discs.append((o["pixel_coords"][0], o["pixel_coords"][1] - 0.1 * r, (0.9 * r) ** 2))
    Y = torch.zeros(grid_h * grid_w, len(TARGETS))
    ch, cw = size / grid_h, size / grid_w
    for r in range(grid_h):
        for c in range(grid_w):
            cover = [0] * len(objs)
            for i in range(SAMPLES):
                for j in range(SAMPLES):
                    px, py = (c + (j + 0.5) / SAMPLES) * cw, (r + (i + 0.5) / SAMPLES) * ch
                    for k, (x, y, rr) in enumerate(discs):
                        if (px - x) ** 2 + (py - y) ** 2 <= rr:
                            cover[k] += 1
                            break
            for k, n in enumerate(cover):
                if n >= MIN_COVER:
                    for t, (attr, value) in enumerate(TARGETS):
                        if attr == "object" or all(objs[k][a] == v for a, v in zip(attr.split("+"),
                                                                                   value.split("+"))):
                            Y[r * grid_w + c, t] = 1.0
    return Y


def _head_module():
    import torch

    class DenseHead(torch.nn.Module):
        """Vision tower + linear head; ``forward`` returns an object with ``.loss`` for the Engine."""

        def __init__(self, visual, dim: int):
            super().__init__()
            self.visual = visual
            self.head = torch.nn.Linear(dim, len(TARGETS))

        def forward(self, pixel_values, image_grid_thw, targets=None):
            from types import SimpleNamespace

            feats = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
            logits = self.head(feats.float())
            loss = None
            if targets is not None:
                # singles and pairs weigh the same: averaged over all 88 outputs, the 72 pairs took 82 %
                # of the gradient and single-attribute accuracy fell (shape 97.0 -> 94.6 %)
                bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits),
                                                                           reduction="none")
                loss = bce[:, :N_SINGLE].mean() + bce[:, N_SINGLE:].mean() if bce.shape[1] > N_SINGLE \
                    else bce.mean()
            return SimpleNamespace(loss=loss, logits=logits)

    return DenseHead


def collate_fn(processor, store):
    """Records -> ``{pixel_values, image_grid_thw, targets}`` (one image per record)."""
    import torch

    def collate(records) -> dict:
        images = [store.open(r.images[0]) for r in records]
        b = processor.image_processor(images=images, return_tensors="pt")
        thw = b["image_grid_thw"]
        m = processor.image_processor.merge_size
        Y = [token_targets(r.meta["scene"], int(g[1]) // m, int(g[2]) // m) for r, g in zip(records, thw)]
        return {"pixel_values": b["pixel_values"], "image_grid_thw": thw, "targets": torch.cat(Y)}

    return collate


def image_records(records, where) -> list:
    """The records that carry one image and its scene graph (text-only ones are skipped)."""
    out = [r for r in records if len(r.images) == 1 and (r.meta or {}).get("scene", {}).get("objects")]
    if not out:
        raise input_error(where, "images/meta.scene", "records with one image and its scene graph")
    return out


def evaluate(dense, collate, records, batch_size: int = 32) -> dict:
    """Held-out token accuracy per attribute (balanced over each value's positives and negatives),
    and image-level existence read off the tokens (max over an image's tokens), in percent."""
    import torch

    counts = torch.zeros(len(TARGETS), 4)  # tp, fp, fn, tn
    exist_hits = exist_n = 0
    dense.eval()
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            b = collate(records[i:i + batch_size])
            P = (dense(b["pixel_values"], b["image_grid_thw"]).logits > 0).float()
            Y = b["targets"]
            counts += torch.stack([(Y * P).sum(0), ((1 - Y) * P).sum(0), (Y * (1 - P)).sum(0),
                                   ((1 - Y) * (1 - P)).sum(0)], 1)
            start = 0
            for g in b["image_grid_thw"]:
                n = int(g.prod()) // 4
                exist_hits += int((P[start:start + n].amax(0) == Y[start:start + n].amax(0)).sum())
                exist_n += len(TARGETS)
                start += n
    dense.train()
    tp, fp, fn, tn = counts.unbind(1)
    bal = 0.5 * (tp / (tp + fn).clamp(min=1) + tn / (tn + fp).clamp(min=1))
    by_attr = {a: round(100 * float(bal[[i for i, (x, _) in enumerate(TARGETS) if x == a]].mean()), 1)
               for a in list(ATTRIBUTES) + ["object"]}
    pairs = [i for i, (x, _) in enumerate(TARGETS) if "+" in x]
    if pairs:
        by_attr["pairs"] = round(100 * float(bal[pairs].mean()), 1)
    return {"token_accuracy": by_attr, "image_existence": round(100 * exist_hits / max(1, exist_n), 1),
            "images": len(records)}


def run_vision(stage: str, cfg, model_path: str, data: str, out: str, records: list, eval_records: list,
               seed: int, threads: int = 1, ckpt_dir: str | None = None, on_step=None) -> dict:
    """Train the vision tower of ``model_path`` on ``records``' scene graphs; write checkpoint ``out``."""
    from pipeline.data.records import ImageStore
    from pipeline.model import load, vision_tower
    from pipeline.train.runner import export_checkpoint, fingerprint, loss_summary, start, train_loop

    _, world = start(threads, seed)
    model, proc = load(model_path, threads=threads, device="cpu")
    dense = _head_module()(vision_tower(model), model.get_input_embeddings().embedding_dim)
    collate = collate_fn(proc, ImageStore(data))
    eng, log, stats, first = train_loop(
        stage, cfg, dense, records, collate, world=world, source=str(Path(data) / cfg.data_file),
        fp=fingerprint(model_path, [data], cfg.data_file, {"stage": stage, "objective": "vision"}),
        out=out, seed=seed, ckpt_dir=ckpt_dir, on_step=on_step)
    sd = eng.full_state_dict()
    dense.load_state_dict(sd)  # dense.visual *is* model's tower: gathered ZeRO-3 weights land in the model too
    metrics = {"stage": stage, "objective": "vision", "examples": len(records), "steps": eng.global_step,
               "resumed_from_step": first, **loss_summary(log), "wall_s": stats["wall_s"], "config": asdict(cfg)}
    if eval_records:
        metrics["eval"] = evaluate(dense.cpu(), collate, eval_records)
    if eng.is_main:
        export_checkpoint(out, model, proc, parent=model_path, stage=stage, metrics=metrics, write_log=log.copy_to)
        ev = metrics.get("eval", {})
        print(f"{stage}: {eng.global_step} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}; "
              f"held-out token accuracy {ev.get('token_accuracy')}, image existence {ev.get('image_existence')}% -> {out}")
    eng.finish()
    return metrics
