"""CLEVR-like scenes: the attribute ontology and its words, a scene sampler, a fast PIL renderer,
the policy icons, and an importer for real CLEVR v1.0.

This is the scene world both ClevrPolicy (``policy/clevr.py``: conditions, reasoning, icons) and
the data generators (``data/clevr_policy.py``, ``data/generic_qa.py``) stand on; it imports
neither, so the layering is io <- scenes <- policy <- data.

Scenes use CLEVR's own JSON shape (``objects`` with ``shape``/``color``/``size``/``material``,
``3d_coords``, ``pixel_coords``, ``rotation``; ``relationships`` and ``directions``), so a
scene graph from real CLEVR and one sampled here are interchangeable for policies.

Where this departs from CLEVR (on purpose):

* No Blender. Objects are drawn with PIL as a pseudo-3D view (cube = square with a lit top
  and a shaded side; sphere = shaded disc; cylinder = body with an elliptic top), at 2x and
  box-downsampled for anti-aliasing. That keeps rendering at several hundred images/s on
  one core, which a CPU-only pipeline needs.
* No perspective shrinking: a "small" object is small everywhere in the image, so size is
  readable from the image alone (in CLEVR a far large object can look like a near small one).
* Materials are drawn to be told apart by a tiny ViT: metal = strong contrast, a white
  specular spot and a bright rim; rubber = matte, low-contrast shading, no highlight.
* Image size and object size are parameters (``image_size``, ``object_scale``): by default
  a 128 px image (25 merged 28x28 tokens in Qwen2.5-VL) where a large object is ~36 px
  across and a small one ~22 px, i.e. each covers several 14 px patches, which a tiny
  vision tower must be able to see.
* ``rotation`` is sampled and recorded like CLEVR's, but the renderer draws every object
  facing the camera (rotation carries no policy-relevant information).
"""
from __future__ import annotations

import math
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.io import input_error, read_json

# The CLEVR v1.0 vocabulary (properties.json), in the order policies and renderings use.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("cube", "sphere", "cylinder"),
    "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "size": ("small", "large"),
    "material": ("rubber", "metal"),
}
# CLEVR's RGB values for its colours.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SIZE_3D = {"small": 0.35, "large": 0.7}  # CLEVR's object radii in scene units
SMALL_RATIO = 0.62  # small radius / large radius in pixels; CLEVR's 0.5 makes small objects too tiny at 128 px
DIRECTIONS = {"left": [-1.0, 0.0, 0.0], "right": [1.0, 0.0, 0.0], "front": [0.0, 1.0, 0.0], "behind": [0.0, -1.0, 0.0]}


def check_scene_settings(params, sec: str, cfg, min_image: int = 16) -> None:
    """Validate the scene knobs every scene-rendering generator shares (``image_size``,
    ``object_scale``, ``min_objects``, ``max_objects``), naming ``params: <sec>.<field>``."""
    if not 1 <= cfg.min_objects <= cfg.max_objects <= 10:
        raise input_error(params, f"{sec}.min_objects/max_objects", "1 <= min_objects <= max_objects <= 10",
                          (cfg.min_objects, cfg.max_objects))
    if cfg.image_size < min_image or not 0.01 <= cfg.object_scale <= 0.4:
        raise input_error(params, f"{sec}.image_size/object_scale",
                          f"image_size >= {min_image} and 0.01 <= object_scale <= 0.4", (cfg.image_size, cfg.object_scale))


def all_combos() -> list[dict[str, str]]:
    """Every possible object (3 x 8 x 2 x 2 = 96 attribute combinations)."""
    out = [{}]
    for attr, values in ATTRIBUTES.items():
        out = [{**o, attr: v} for o in out for v in values]
    return out


# ----------------------------------------------------------------------------- words

# One wording of objects for every text the model sees: the policies' conditions and gold reasoning
# and the generic QA use the same phrases ("Is there a cyan cube? Yes, a small cyan metal cube ...").
PHRASE_ORDER = ("size", "color", "material", "shape")  # "a small cyan metal cube"
ATTR_NOUN = {"shape": "shape", "color": "colour", "size": "size", "material": "material"}


def _pairs(desc) -> Iterable[tuple[str, str]]:
    return desc.items() if isinstance(desc, Mapping) else desc


def describe(desc, article: bool = True) -> str:
    """An object description, as a mapping ``{"color": "cyan", "shape": "cube"}`` or as
    ``(attr, value)`` pairs, -> "a cyan cube"; nothing -> "an object"."""
    d = dict(_pairs(desc))
    words = [d[a] for a in PHRASE_ORDER[:-1] if a in d] + [d.get("shape", "object")]
    text = " ".join(words)
    if not article:
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def plural(desc) -> str:
    """"red cubes", "large objects", "spheres"."""
    return describe(desc, article=False) + "s"


def holds(obj: dict, desc) -> bool:
    """``obj`` has every attribute value of ``desc`` (a mapping or ``(attr, value)`` pairs)."""
    return all(obj.get(a) == v for a, v in _pairs(desc))


# ----------------------------------------------------------------------------- sampling


def object_radius(size: str, image_size: int, object_scale: float) -> float:
    large = object_scale * image_size
    return large if size == "large" else large * SMALL_RATIO


def place_objects(objs: list[dict[str, str]], rng: random.Random, image_size: int = 128,
                  object_scale: float = 0.14, margin: float = 1.5, tries: int = 200) -> list[dict[str, Any]]:
    """Give attribute dicts non-overlapping positions and return CLEVR-format objects.

    Overlap is judged on each object's drawn footprint (a cube's lit top and a cylinder's
    elliptic top stick out above the base radius, hence the 1.12 factor). Rejection
    sampling with restarts; impossible settings (too many / too big objects for the
    image) raise an InputError instead of looping forever.
    """
    foot = [1.12 * object_radius(o["size"], image_size, object_scale) for o in objs]
    # larger objects first: they are the hard ones to fit
    order = sorted(range(len(objs)), key=lambda i: -foot[i])
    for _restart in range(50):
        pos: dict[int, tuple[float, float]] = {}
        ok = True
        for i in order:
            r = foot[i]
            for _ in range(tries):
                x = rng.uniform(r, image_size - r)
                y = rng.uniform(r, image_size - r)
                if all((x - px) ** 2 + (y - py) ** 2 >= (r + foot[j] + margin) ** 2 for j, (px, py) in pos.items()):
                    pos[i] = (x, y)
                    break
            else:
                ok = False
                break
        if ok:
            break
    else:
        raise input_error("params.yaml", "generate_clevr.object_scale",
                          f"objects that fit: {len(objs)} objects at scale {object_scale} do not fit "
                          f"without overlap in {image_size} px", object_scale)
    out = []
    for i, o in enumerate(objs):
        x, y = pos[i]
        # Scene units like CLEVR's (-3..3 on the ground plane, z = radius); y grows towards the camera.
        out.append({
            "shape": o["shape"], "color": o["color"], "size": o["size"], "material": o["material"],
            "3d_coords": [round(6 * x / image_size - 3, 4), round(6 * y / image_size - 3, 4), SIZE_3D[o["size"]]],
            "pixel_coords": [int(round(x)), int(round(y)), round(1.0 - y / image_size, 4)],
            "rotation": round(rng.uniform(0, 360), 2),
        })
    return out


def relationships(objects: list[dict]) -> dict[str, list[list[int]]]:
    """CLEVR's ``relationships``: ``rel[d][i]`` = indices of objects that are ``d`` of object i."""
    rel: dict[str, list[list[int]]] = {d: [] for d in DIRECTIONS}
    for i, a in enumerate(objects):
        ax, ay = a["3d_coords"][:2]
        for d, (dx, dy, _) in DIRECTIONS.items():
            rel[d].append([j for j, b in enumerate(objects)
                           if j != i and (b["3d_coords"][0] - ax) * dx + (b["3d_coords"][1] - ay) * dy > 1e-6])
    return rel


def make_scene(objs: list[dict[str, str]], rng: random.Random, image_size: int = 128,
               object_scale: float = 0.14, index: int = 0, split: str = "synthetic") -> dict[str, Any]:
    """A CLEVR-format scene holding exactly the given objects (attribute dicts), placed at random."""
    objects = place_objects(objs, rng, image_size, object_scale)
    return {"split": split, "image_index": index, "image_filename": f"{split}_{index:06d}.png",
            "image_size": [image_size, image_size], "objects": objects,
            "relationships": relationships(objects), "directions": DIRECTIONS}


def sample_scene(rng: random.Random, min_objects: int = 3, max_objects: int = 6, image_size: int = 128,
                 object_scale: float = 0.14, index: int = 0, split: str = "synthetic") -> dict[str, Any]:
    """A random scene: ``min_objects..max_objects`` objects with uniform CLEVR attributes."""
    n = rng.randint(min_objects, max_objects)
    objs = [{a: rng.choice(v) for a, v in ATTRIBUTES.items()} for _ in range(n)]
    return make_scene(objs, rng, image_size, object_scale, index, split)


# ----------------------------------------------------------------------------- rendering

SS = 2  # supersampling factor


def _shade(rgb, f: float) -> tuple[int, int, int]:
    """Scale towards black (f < 1) or white (f > 1)."""
    if f <= 1:
        return tuple(int(c * f) for c in rgb)
    t = f - 1
    return tuple(int(c + (255 - c) * t) for c in rgb)


@lru_cache(maxsize=8)
def _background(w: int, h: int):
    """CLEVR-like grey floor: a soft vertical gradient (cached; each render copies it)."""
    from PIL import Image

    col = Image.linear_gradient("L").resize((1, h))  # 0 at the top -> 255 at the bottom
    col = col.point(lambda v: 150 + v * 40 // 255)
    return Image.merge("RGB", [col, col, col]).resize((w, h))


def _draw_object(d, o: dict, x: float, y: float, r: float) -> None:
    """Draw one object centred at (x, y) with base radius r on an ImageDraw (already supersampled)."""
    base = COLOR_RGB[o["color"]]
    metal = o["material"] == "metal"
    # metal: deep shadows and bright lights; rubber: gentle shading
    dark, light = (0.45, 1.35) if metal else (0.75, 1.1)
    shape = o["shape"]
    if shape == "sphere":
        d.ellipse([x - r, y - r, x + r, y + r], fill=_shade(base, dark))
        for k, f in ((0.85, 1.0), (0.6, 0.5 * (1.0 + light))):
            rr = r * k
            cx, cy = x - (r - rr) * 0.5, y - (r - rr) * 0.5
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_shade(base, f if k < 0.8 else 1.0))
        top = (x - 0.35 * r, y - 0.35 * r)
    elif shape == "cube":
        s = 0.8 * r  # half side of the front face
        e = 0.45 * r  # depth offset of the top/side faces
        front = [x - s, y - s + e * 0.5, x + s - e, y + s]
        d.polygon([(front[0], front[1]), (front[0] + e, front[1] - e), (front[2] + e, front[1] - e),
                   (front[2], front[1])], fill=_shade(base, light))
        d.polygon([(front[2], front[1]), (front[2] + e, front[1] - e), (front[2] + e, front[3] - e),
                   (front[2], front[3])], fill=_shade(base, dark))
        d.rectangle(front, fill=base)
        top = (front[0] + 0.45 * (front[2] - front[0]), front[1] - 0.5 * e)
    else:  # cylinder
        w = 0.78 * r
        eh = 0.32 * r  # half height of the end ellipses
        y0, y1 = y - 0.8 * r, y + 0.8 * r
        d.ellipse([x - w, y1 - eh, x + w, y1 + eh], fill=_shade(base, dark))
        d.rectangle([x - w, y0, x + w, y1], fill=base)
        d.rectangle([x + 0.35 * w, y0, x + w, y1], fill=_shade(base, 0.5 * (1 + dark)))
        d.ellipse([x - w, y0 - eh, x + w, y0 + eh], fill=_shade(base, light))
        top = (x - 0.3 * w, y0)
    if metal:
        # specular spot + a bright rim: the cue a small vision tower can pick up
        sr = max(1.5 * SS, 0.2 * r)
        d.ellipse([top[0] - sr, top[1] - sr * 0.7, top[0] + sr, top[1] + sr * 0.7], fill=(250, 250, 250))
        if shape == "sphere":
            d.arc([x - r, y - r, x + r, y + r], 20, 110, fill=_shade(base, 1.6), width=max(1, int(0.12 * r)))


def render_scene(scene: dict, image_size: int | None = None, object_scale: float = 0.14):
    """Render a (synthetic) scene to an RGB PIL image of ``image_size`` (default: the scene's own size).

    Objects are drawn far-to-near (by ``pixel_coords`` y) with a soft ground shadow each.
    """
    from PIL import ImageDraw

    size = image_size or int(scene.get("image_size", [128])[0])
    W = size * SS
    img = _background(W, W).copy()
    d = ImageDraw.Draw(img)
    scale = size / float(scene.get("image_size", [size])[0])
    objs = sorted(scene["objects"], key=lambda o: o["pixel_coords"][1])
    drawn = []
    for o in objs:
        x, y = o["pixel_coords"][0] * scale * SS, o["pixel_coords"][1] * scale * SS
        r = object_radius(o["size"], size, object_scale) * SS
        drawn.append((o, x, y, r))
        d.ellipse([x - 0.9 * r, y + 0.45 * r, x + 1.1 * r, y + 1.0 * r], fill=(118, 118, 118))
    for o, x, y, r in drawn:
        _draw_object(d, o, x, y, r)
    return img.reduce(SS)


def attribute_icon(attr: str, value: str, image_size: int = 128, object_scale: float = 0.14):
    """A small image that stands for one attribute value in a multimodal (-M) policy.

    It is a crop-like render of a single object drawn exactly as in scenes, varying only the
    attribute shown (others neutral: a large grey rubber sphere). For ``size`` the canvas has
    the same pixel scale as a scene, so "small" is judged against a fixed frame, as in a crop.
    """
    from PIL import ImageDraw

    if attr not in ATTRIBUTES or value not in ATTRIBUTES[attr]:
        raise input_error(None, "attribute", f"a CLEVR attribute/value from {ATTRIBUTES}", f"{attr}={value}")
    o = {"shape": "sphere", "color": "gray", "size": "large", "material": "rubber", attr: value}
    r_large = object_radius("large", image_size, object_scale)
    side = int(math.ceil(2.9 * r_large))
    W = side * SS
    img = _background(W, W).copy()
    d = ImageDraw.Draw(img)
    r = object_radius(o["size"], image_size, object_scale) * SS
    _draw_object(d, o, W / 2, W / 2 + 0.1 * r, r)
    return img.reduce(SS)


# ----------------------------------------------------------------------------- CLEVR v1.0 import


def _check_object(obj: Any, path: Path, where: str) -> None:
    if not isinstance(obj, dict):
        raise input_error(path, where, "an object mapping", type(obj).__name__)
    for attr, values in ATTRIBUTES.items():
        if obj.get(attr) not in values:
            raise input_error(path, f"{where}.{attr}", "one of " + ", ".join(values), obj.get(attr))


def import_clevr(root: str | os.PathLike, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Read ``<root>/scenes/CLEVR_<split>_scenes.json`` and pair each scene with its image.

    ``root`` is the ``CLEVR_v1.0`` directory. Each returned scene is CLEVR's own dict plus
    ``image_path`` (absolute). An ``image_filename`` that would resolve outside ``root``
    (``../``, absolute paths, symlinks out) is refused: a scene file must not make the
    builder read arbitrary files. Missing images and unknown attribute values are errors
    naming the file and the scene.
    """
    root = Path(root)
    path = root / "scenes" / f"CLEVR_{split}_scenes.json"
    if not path.is_file():
        raise input_error(path, None, "a CLEVR v1.0 scenes file (is clevr_root the CLEVR_v1.0 directory?)")
    data = read_json(path, finite=True)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        raise input_error(path, "scenes", "a list of scenes", type(scenes).__name__)
    real_root = root.resolve()
    img_dir = root / "images" / split
    out = []
    for i, sc in enumerate(scenes[: limit if limit is not None else None]):
        where = f"scenes[{i}]"
        if not isinstance(sc, dict) or not isinstance(sc.get("image_filename"), str):
            raise input_error(path, f"{where}.image_filename", "a file name")
        objs = sc.get("objects")
        if not isinstance(objs, list) or not objs:
            raise input_error(path, f"{where}.objects", "a non-empty list of objects", objs)
        for j, o in enumerate(objs):
            _check_object(o, path, f"{where}.objects[{j}]")
        img = (img_dir / sc["image_filename"]).resolve()
        if not img.is_relative_to(real_root):
            raise input_error(path, f"{where}.image_filename", "an image path inside the dataset root", sc["image_filename"])
        if not img.is_file():
            raise input_error(path, f"{where}.image_filename", f"an existing image under {img_dir}", sc["image_filename"])
        if not _looks_like_image(img):
            raise input_error(path, f"{where}.image_filename", "an image file (PNG/JPEG)", sc["image_filename"])
        out.append({**sc, "image_path": str(img)})
    return out


def _looks_like_image(path: Path) -> bool:
    """PIL recognizes the file's header. Cheap (a few bytes, no decoding), so a whole CLEVR split
    can be checked at import; :func:`read_clevr_image` decodes the images actually used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def read_clevr_image(scene: dict) -> bytes:
    """The bytes of an imported scene's image, decoded once to prove they are an image."""
    import io

    from PIL import Image

    path = Path(scene["image_path"])
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
        raise input_error(path, "image_filename", "a decodable image (PNG/JPEG)",
                          f"{type(e).__name__}: {e}") from None
    return data
