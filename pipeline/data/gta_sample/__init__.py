"""The bundled GTAPolicy sample: real photos from the scikit-image wheel, rendered documents,
and the template dialogs of ``dialogs.yaml`` expanded into concrete dialogs.

Photos are read from ``skimage/data`` located with ``importlib.util.find_spec`` (the package
is not imported and nothing is downloaded), downscaled to ``max_side`` with their hand-made
boxes (``photos.yaml``) rescaled alike. Where a tool needs a document — OCR on a receipt, a
sign or a table, MathOCR on an equation, counting coloured tokens — the image is rendered
with PIL together with the values the tool would return, so every tool output in a history is
true of its image.

A dialog is a plain dict shared with the GTA importer::

    {"id", "query", "images": [{"name": "image/image_3.jpg", "key": ..., "image": PIL}],
     "steps": [{"tool": base tool, "arguments": {...}, "output": str, "instance": {...}, "why": str}]}
"""
from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

from pipeline.io import input_error, load_yaml

HERE = Path(__file__).parent
PHOTOS_YAML = HERE / "photos.yaml"
DIALOGS_YAML = HERE / "dialogs.yaml"
RENDERED = ("receipt", "sign", "math", "table", "dots")


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise input_error("skimage", None, "scikit-image installed (its wheel ships the sample photos)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photos(max_side: int) -> list[dict]:
    from PIL import Image

    root = skimage_data_dir()
    out = []
    for i, p in enumerate(load_yaml(PHOTOS_YAML)):
        path = root / p["file"]
        if not path.exists():
            raise input_error(path, None, "a sample photo shipped by scikit-image")
        img = Image.open(path).convert("RGB")
        s = min(1.0, max_side / max(img.size))
        if s < 1:
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        objs = [dict(o, bbox=[round(v * s) for v in o["bbox"]]) for o in p.get("objects") or []]
        out.append(dict(p, image=img, objects=objs, number=i + 1))
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _canvas(w: int, h: int, bg=(250, 250, 245)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), bg)
    return img, ImageDraw.Draw(img)


def render_receipt(rng: random.Random):
    items = rng.sample(["Bread", "Milk", "Apples", "Coffee", "Cheese", "Eggs", "Rice", "Tea", "Butter"], rng.randint(2, 4))
    prices = [round(rng.uniform(0.5, 12.0), 2) for _ in items]
    img, d = _canvas(320, 90 + 34 * len(items))
    d.text((20, 15), "GROCERY RECEIPT", fill=(20, 20, 20), font=_font(24))
    lines = []
    for k, (it, pr) in enumerate(zip(items, prices)):
        y = 60 + 34 * k
        d.text((20, y), it, fill=(30, 30, 30), font=_font(22))
        d.text((220, y), f"{pr:.2f}", fill=(30, 30, 30), font=_font(22))
        lines.append(f"{it} {pr:.2f}")
    expr = "+".join(f"{p:.2f}" for p in prices)
    return img, {"lines": "GROCERY RECEIPT; " + "; ".join(lines), "expr": expr, "total": f"{sum(prices):.2f}"}


def render_sign(rng: random.Random):
    text = rng.choice(["NO PARKING", "EXIT", "OPEN 9AM - 5PM", "WET FLOOR", "SALE 30% OFF", "PLATFORM 4"])
    bg = rng.choice([(200, 30, 30), (20, 90, 170), (20, 120, 60)])
    img, d = _canvas(360, 140, bg)
    d.rectangle((8, 8, 351, 131), outline=(255, 255, 255), width=4)
    d.text((180, 70), text, fill=(255, 255, 255), font=_font(34), anchor="mm")
    return img, {"sign_text": text}


def render_math(rng: random.Random):
    x = rng.randint(-9, 12)
    a = rng.choice([2, 3, 4, 5, 7])
    b = rng.randint(1, 20)
    c = a * x + b
    img, d = _canvas(360, 120, (255, 255, 255))
    d.text((180, 60), f"{a}x + {b} = {c}", fill=(0, 0, 0), font=_font(40), anchor="mm")
    cmd = (f"from sympy import symbols, Eq, solve\ndef solution():\n    x = symbols('x')\n"
           f"    return solve(Eq({a}*x + {b}, {c}), x)")
    return img, {"latex": f"{a}x + {b} = {c}", "solve_cmd": cmd, "solution": f"[{x}]"}


def render_table(rng: random.Random):
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"][: rng.randint(3, 5)]
    vals = [rng.randint(10, 99) for _ in months]
    img, d = _canvas(120 + 70 * len(months), 110, (255, 255, 255))
    for r, (label, row) in enumerate([("Month", months), ("Sales", [str(v) for v in vals])]):
        y = 15 + 45 * r
        d.text((10, y + 8), label, fill=(0, 0, 0), font=_font(22))
        for k, cell in enumerate(row):
            x = 110 + 70 * k
            d.rectangle((x, y, x + 68, y + 42), outline=(0, 0, 0), width=2)
            d.text((x + 34, y + 21), cell, fill=(0, 0, 0), font=_font(22), anchor="mm")
    text = "Month " + " ".join(months) + "; Sales " + " ".join(map(str, vals))
    cmd = (f"import matplotlib.pyplot as plt\ndef solution():\n    fig = plt.figure()\n"
           f"    plt.bar({months!r}, {vals!r})\n    return fig")
    return img, {"table_text": text, "plot_cmd": cmd}


COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30)}


def render_dots(rng: random.Random):
    """Coloured tokens on a grid (never overlapping), so the count is exact."""
    target = rng.choice(sorted(COLORS))
    n = rng.randint(2, 9)
    others = rng.randint(2, 7)
    cells = rng.sample([(i, j) for i in range(6) for j in range(4)], n + others)
    img, d = _canvas(360, 240, (235, 235, 235))
    for k, (i, j) in enumerate(cells):
        col = target if k < n else rng.choice([c for c in COLORS if c != target])
        x, y = 30 + 60 * i + rng.randint(-6, 6), 30 + 60 * j + rng.randint(-6, 6)
        d.ellipse((x - 20, y - 20, x + 20, y + 20), fill=COLORS[col], outline=(0, 0, 0))
    price = rng.choice([2, 3, 5, 10])
    return img, {"color": target, "n": str(n), "price": str(price), "worth": str(n * price)}


RENDERERS = {"receipt": render_receipt, "sign": render_sign, "math": render_math, "table": render_table,
             "dots": render_dots}


def _fmt(value, env: dict, where: str):
    if isinstance(value, str):
        try:
            return string.Formatter().vformat(value, (), env)
        except (KeyError, IndexError, ValueError) as e:
            raise input_error(DIALOGS_YAML, where, "placeholders defined for this template", str(e)) from None
    if isinstance(value, dict):
        return {k: _fmt(v, env, f"{where}.{k}") for k, v in value.items()}
    return value


class SampleDialogs:
    """Expands the templates: ``next(i)`` gives dialog ``i`` (template ``i mod T``, shuffled per round)."""

    def __init__(self, rng: random.Random, max_side: int = 512):
        self.rng = rng
        self.photos = load_photos(max_side)
        self.templates = load_yaml(DIALOGS_YAML)
        self.order: list[dict] = []
        self.rendered = 0

    def templates_for(self, tool: str) -> list[dict]:
        return [t for t in self.templates if any(s["tool"] == tool for s in t["steps"])]

    def _photo_vars(self, p: dict, rng: random.Random) -> dict:
        v = {"desc": p["description"], "keywords": p.get("keywords", "")}
        if p["objects"]:
            o = rng.choice(p["objects"])
            x1, y1, x2, y2 = o["bbox"]
            v.update(obj=o["name"], bbox=f"({x1}, {y1}, {x2}, {y2})", attr=o["attribute"], value=o["value"])
        if p.get("count"):
            v.update(count_obj=p["count"]["object"], count=str(p["count"]["n"]))
        for k in ("fact", "open"):
            if p.get(k):
                v.update({f"{k}_q": p[k]["q"], f"{k}_query": p[k]["query"], f"{k}_answer": p[k]["answer"]})
        return v

    def make(self, template: dict, dialog_id: str) -> dict:
        rng = self.rng
        env, images, used = {}, [], set()
        for slot, kind in enumerate(template["images"]):
            if kind == "photo":
                pool = [p for p in self.photos if p["key"] not in used and all(p.get(n) for n in template.get("needs", []))]
                p = rng.choice(pool)
                used.add(p["key"])
                name = f"image/image_{p['number']}.jpg"
                images.append({"name": name, "key": f"photo:{p['key']}", "image": p["image"]})
                vars_ = self._photo_vars(p, rng)
            elif kind in RENDERERS:
                img, vars_ = RENDERERS[kind](rng)
                self.rendered += 1
                name = f"image/image_{100 + self.rendered}.png"
                images.append({"name": name, "key": f"render:{self.rendered}", "image": img})
            else:
                raise input_error(DIALOGS_YAML, f"{template['id']}.images[{slot}]", "photo or one of " + ", ".join(RENDERERS), kind)
            vars_["img"] = name
            suffix = "" if slot == 0 else str(slot + 1)
            env.update({k + suffix: v for k, v in vars_.items()})
        for k, options in (template.get("choices") or {}).items():
            pick = rng.choice(options)
            if k == "pos":
                env.update(pos_code=pick[0], pos_name=pick[1])
            else:
                env[k] = pick
        where = template["id"]
        steps = [{"tool": s["tool"], "arguments": _fmt(s.get("arguments") or {}, env, f"{where}.steps[{i}].arguments"),
                  "output": _fmt(s.get("output", ""), env, f"{where}.steps[{i}].output"),
                  "instance": dict(s.get("instance") or {}), "why": _fmt(s.get("why", ""), env, f"{where}.steps[{i}].why")}
                 for i, s in enumerate(template["steps"])]
        return {"id": dialog_id, "template": template["id"], "query": _fmt(rng.choice(template["query"]), env, f"{where}.query"),
                "images": images, "steps": steps}

    def next(self, dialog_id: str) -> dict:
        if not self.order:
            self.order = list(self.templates)
            self.rng.shuffle(self.order)
        return self.make(self.order.pop(), dialog_id)
