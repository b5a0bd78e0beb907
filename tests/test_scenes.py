"""Scene sampler, renderer (attributes visible in pixels), icons, CLEVR v1.0 importer."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.scenes import (ATTRIBUTES, COLOR_RGB, attribute_icon, import_clevr, make_scene, place_objects,
                                  render_scene, sample_scene)
from pipeline.io import InputError

FIXTURE = Path(__file__).parent / "fixtures" / "clevr" / "CLEVR_v1.0"


def one(shape="sphere", color="gray", size="large", material="rubber"):
    return {"shape": shape, "color": color, "size": size, "material": material}


def centred(o, size=128):
    """A scene with one object at the image centre."""
    return {"image_size": [size, size], "objects": [{**o, "pixel_coords": [size // 2, size // 2, 0.5]}]}


def pixels(o):
    return np.asarray(render_scene(centred(o)), dtype=np.int32)


def mask(o):
    """Pixels that differ from the empty floor (object + its shadow)."""
    empty = np.asarray(render_scene({"image_size": [128, 128], "objects": []}), dtype=np.int32)
    return np.abs(pixels(o) - empty).sum(-1) > 30


def test_sampled_scenes_are_clevr_format_and_do_not_overlap():
    rng = random.Random(0)
    for i in range(50):
        sc = sample_scene(rng, 3, 6, image_size=128, object_scale=0.14, index=i)
        objs = sc["objects"]
        assert 3 <= len(objs) <= 6
        for o in objs:
            assert all(o[a] in ATTRIBUTES[a] for a in ATTRIBUTES)
            assert len(o["3d_coords"]) == 3 and len(o["pixel_coords"]) == 3
            assert 0 <= o["pixel_coords"][0] < 128 and 0 <= o["pixel_coords"][1] < 128
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                (xa, ya), (xb, yb) = objs[a]["pixel_coords"][:2], objs[b]["pixel_coords"][:2]
                ra = (1.0 if objs[a]["size"] == "large" else 0.62) * 0.14 * 128
                rb = (1.0 if objs[b]["size"] == "large" else 0.62) * 0.14 * 128
                assert (xa - xb) ** 2 + (ya - yb) ** 2 >= (ra + rb) ** 2  # bodies never overlap
        rel = sc["relationships"]
        for j in rel["left"][0]:
            assert objs[j]["3d_coords"][0] < objs[0]["3d_coords"][0]
        for j in rel["front"][0]:
            assert objs[j]["3d_coords"][1] > objs[0]["3d_coords"][1]


def test_too_many_objects_is_an_input_error():
    with pytest.raises(InputError, match="object_scale"):
        place_objects([one()] * 10, random.Random(0), image_size=64, object_scale=0.3)


def test_render_size_and_determinism():
    sc = sample_scene(random.Random(1), image_size=128)
    a, b = render_scene(sc), render_scene(sc)
    assert a.size == (128, 128) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert render_scene(sc, 64).size == (64, 64)


@pytest.mark.parametrize("color", ATTRIBUTES["color"])
def test_colour_is_visible(color):
    # the front face of a rubber cube carries the exact CLEVR colour
    px = pixels(one("cube", color))
    patch = px[60:72, 52:62].reshape(-1, 3).mean(0)
    assert np.abs(patch - np.array(COLOR_RGB[color])).max() < 12, (color, patch)


def test_size_shape_and_material_are_distinguishable():
    small, large = mask(one(size="small")).sum(), mask(one(size="large")).sum()
    assert 2.0 < large / small < 3.5
    def body(shape):  # the red pixels of a red object: its silhouette without the shadow
        px = pixels(one(shape, "red"))
        return (px[..., 0] - px[..., 1]) > 40

    shapes = {s: body(s) for s in ATTRIBUTES["shape"]}
    for a in shapes:
        for b in shapes:
            if a < b:
                iou = (shapes[a] & shapes[b]).sum() / (shapes[a] | shapes[b]).sum()
                assert iou < 0.85, (a, b, iou)
    for color in ATTRIBUTES["color"]:
        for shape in ATTRIBUTES["shape"]:
            metal = pixels(one(shape, color, material="metal"))
            rubber = pixels(one(shape, color, material="rubber"))
            # metal: a near-white specular spot; rubber: none, and less contrast
            assert (metal.min(-1) > 235).sum() >= 4, (shape, color)
            assert (rubber.min(-1) > 235).sum() <= (metal.min(-1) > 235).sum() // 4, (shape, color)


def test_icons():
    seen = set()
    for attr, values in ATTRIBUTES.items():
        for v in values:
            img = attribute_icon(attr, v)
            assert img.size[0] == img.size[1] >= 28
            seen.add(img.tobytes())
    assert len(seen) == 3 + 8 + 2 + 2 - 3  # the neutral value (large grey rubber sphere) is shared by 4 attributes
    with pytest.raises(InputError):
        attribute_icon("color", "pink")


def test_make_scene_keeps_given_objects():
    objs = [one("cube", "red", "small", "metal"), one("cylinder", "cyan")]
    sc = make_scene(objs, random.Random(0))
    assert [{a: o[a] for a in ATTRIBUTES} for o in sc["objects"]] == objs


def test_clevr_importer_on_fixture():
    scenes = import_clevr(FIXTURE, "val")
    raw = json.loads((FIXTURE / "scenes" / "CLEVR_val_scenes.json").read_text())["scenes"]
    assert len(scenes) == len(raw) == 8
    for sc, r in zip(scenes, raw):
        assert sc["objects"] == r["objects"] and Path(sc["image_path"]).is_file()
        assert Path(sc["image_path"]).name == r["image_filename"]
    assert len(import_clevr(FIXTURE, "train", limit=3)) == 3


def _copy(tmp_path) -> Path:
    root = tmp_path / "CLEVR_v1.0"
    shutil.copytree(FIXTURE, root)
    return root


def _edit(root: Path, fn) -> None:
    p = root / "scenes" / "CLEVR_val_scenes.json"
    data = json.loads(p.read_text())
    fn(data["scenes"])
    p.write_text(json.dumps(data))


def test_clevr_importer_rejects_escaping_paths(tmp_path):
    root = _copy(tmp_path)
    (tmp_path / "secret.png").write_bytes(b"not yours")
    _edit(root, lambda s: s[2].update(image_filename="../../../secret.png"))
    with pytest.raises(InputError, match=r"scenes\[2\]\.image_filename: expected an image path inside the dataset root"):
        import_clevr(root, "val")
    _edit(root, lambda s: s[2].update(image_filename=str(tmp_path / "secret.png")))
    with pytest.raises(InputError, match="inside the dataset root"):
        import_clevr(root, "val")


def test_clevr_importer_rejects_bad_scenes(tmp_path):
    root = _copy(tmp_path)
    _edit(root, lambda s: s[1]["objects"][0].update(color="pink"))
    with pytest.raises(InputError, match=r"scenes\[1\]\.objects\[0\]\.color"):
        import_clevr(root, "val")
    root2 = _copy(tmp_path / "b")
    (root2 / "images" / "val" / "CLEVR_val_000003.png").unlink()
    with pytest.raises(InputError, match=r"scenes\[3\]\.image_filename: expected an existing image"):
        import_clevr(root2, "val")
    with pytest.raises(InputError, match="CLEVR v1.0 scenes file"):
        import_clevr(root2, "test")
