"""``trimpi train base``: curriculum phases on the engine, resume after interruption, metrics per qtype."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.train.base import BaseTrainConfig, Phase, train_base

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base")
    params = root / "params.yaml"
    params.write_text(
        "base: {seed: 0, model: tiny-xs, threads: 1}\n"
        "model_init: {vocab_size: 1024, max_pixels: 12544}\n"
        "generate_generic:\n"
        "  train: {exist: 6, exist2: 4, objects: 6, text: 4}\n"
        "  test_per_qtype: 2\n"
        "  image_size: 64\n"
        "  min_objects: 1\n"
        "  max_objects: 3\n")
    assert main(["generate", "generic", "--params", str(params), "--out", str(root / "data")]) == 0
    assert main(["model", "init", "--params", str(params), "--out", str(root / "init")]) == 0
    return root


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _cfg(**kw):
    phases = [Phase(["objects"], 2.0), Phase([], 1.0, 3e-3)]
    return BaseTrainConfig(**{"batch_size": 2, "lr": 5e-3, "warmup_ratio": 0.0, "save_every": 2, "max_steps": 4,
                              "phases": phases, "eval_max_new_tokens": 12, "eval_batch_size": 8, **kw})


class Killed(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(setup):
    full = train_base(_cfg(), str(setup / "init"), str(setup / "data"), str(setup / "full"),
                      ckpt_dir=str(setup / "ck_full"))
    calls = []

    def kill_in_phase_1(step):
        calls.append(step)
        if len(calls) == 7:  # phase 0 ran steps 1-4; die at step 3 of phase 1 (after its step-2 checkpoint)
            raise Killed

    with pytest.raises(Killed):
        train_base(_cfg(), str(setup / "init"), str(setup / "data"), str(setup / "res"),
                   ckpt_dir=str(setup / "ck_res"), on_step=kill_in_phase_1)
    assert not (setup / "res").exists()                      # no half-written output
    assert len(list((setup / "res.phases").glob("phase0-*/model.safetensors"))) == 1   # phase 0 kept
    assert (setup / "ck_res" / "phase1" / "latest").read_text().strip() == "step-0000002"

    calls.clear()
    res = train_base(_cfg(), str(setup / "init"), str(setup / "data"), str(setup / "res"),
                     ckpt_dir=str(setup / "ck_res"), on_step=calls.append)
    assert calls == [3, 4]                                   # phase 0 reused, phase 1 resumed at step 2
    a, b = _state(setup / "full"), _state(setup / "res")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [p["steps"] for p in res["phases"]] == [4, 4] == [p["steps"] for p in full["phases"]]
    assert not (setup / "res.phases").exists() and not (setup / "res" / "adapter").exists()
    # every parameter moved, vision tower included (full fine-tune)
    init = _state(setup / "init")
    assert [k for k in init if torch.equal(init[k], a[k])] == []


def test_metrics_report_accuracy_per_question_type(setup):
    m = json.loads((setup / "full" / "metrics.json").read_text())
    ev = m["eval"]
    assert set(ev["accuracy"]) == {"exist", "exist2", "attribute", "count", "objects", "text"}
    assert ev["n"] == {q: 2 for q in ev["accuracy"]}
    assert all(0 <= v <= 100 for v in [*ev["accuracy"].values(), *ev["majority"].values()])
    assert m["phases"][0]["qtypes"] == ["objects"] and m["phases"][1]["qtypes"] == "all"
    card = json.loads((setup / "full" / "model_card.json").read_text())
    assert card["stages"] == ["base"] and card["preset"] == "tiny-xs"
    log = (setup / "full" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("phase,step") and [r.split(",")[1] for r in log[1:]] == [str(i) for i in range(1, 9)]


def test_pretrained_checkpoint_passes_through(tmp_path, setup):
    src = tmp_path / "real"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model_card.json").write_text(json.dumps({"preset": "qwen2.5-vl-7b"}))
    m = train_base(_cfg(), str(src), str(setup / "data"), str(tmp_path / "out"))
    assert m["skipped"] and (tmp_path / "out" / "config.json").read_text() == "{}"


def test_dvc_stage_never_depends_on_policies():
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_base"]
    deps = [str(d) for d in stage["deps"]]
    assert "models/init" in deps and "data/generic" in deps
    assert not any(d.startswith("policies") for d in deps)
    assert "train_base" in stage["params"]


def test_phase_max_objects_keeps_only_easy_scenes(setup):
    from pipeline.train.base import _phase_examples, n_objects

    data = str(setup / "data")
    every = _phase_examples(data, _cfg(), Phase([], 1.0))
    easy = _phase_examples(data, _cfg(), Phase([], 1.0, max_objects=1))
    assert {n_objects(e.record) for e in every if e.record.task == "generic"} > {1}
    assert easy and all(n_objects(e.record) <= 1 for e in easy)
    assert {e.record.id for e in easy} == {e.record.id for e in every if n_objects(e.record) <= 1}
    assert any(e.record.task == "text" for e in easy)  # text records have no scene and always pass


def test_token_targets_follow_the_scene_graph():
    from pipeline.scenes import ATTRIBUTES
    from pipeline.train.vision import TARGETS, token_targets

    def obj(x, y, **attrs):
        return {"shape": "cube", "color": "red", "size": "large", "material": "metal",
                "pixel_coords": [x, y, 0.0], **attrs}

    # 128 px, 4x4 tokens of 32 px; large radius 0.14 * 128 = 17.9 px
    scene = {"image_size": [128, 128], "object_scale": 0.14,
             "objects": [obj(16, 18), obj(80, 80, color="blue", shape="sphere", size="small")]}
    Y = token_targets(scene, 4, 4)
    assert Y.shape == (16, len(TARGETS))
    col = {t: i for i, t in enumerate(TARGETS)}
    covered = {i for i in range(16) if Y[i, col[("object", "any")]]}
    assert 0 in covered and 15 not in covered and 3 not in covered
    assert Y[0, col[("color", "red")]] == 1 and Y[0, col[("color", "blue")]] == 0
    blue = {i for i in range(16) if Y[i, col[("color", "blue")]]}
    assert blue and blue <= {5, 6, 9, 10} and all(Y[i, col[("size", "small")]] for i in blue)
    # exactly one value per attribute on a covered token with a single object over it
    for a, vs in ATTRIBUTES.items():
        assert sum(Y[0, col[(a, v)]] for v in vs) == 1
    # pairs belong to ONE object: the red cube and the blue sphere make no "red sphere" token
    assert Y[0, col[("shape+color", "cube+red")]] == 1 and Y[0, col[("shape+material", "cube+metal")]] == 1
    assert all(Y[i, col[("shape+color", "sphere+blue")]] for i in blue)
    assert Y[:, col[("shape+color", "sphere+red")]].sum() == 0 and Y[:, col[("shape+color", "cube+blue")]].sum() == 0
    # the nearer object (larger y) occludes the farther one where they overlap
    front = {"image_size": [128, 128], "object_scale": 0.3,
             "objects": [obj(64, 60, color="green"), obj(64, 70, color="yellow")]}
    Yf = token_targets(front, 2, 2)
    assert Yf[:, col[("color", "yellow")]].sum() >= Yf[:, col[("color", "green")]].sum()


def test_vision_phase_trains_only_the_vision_tower(setup):
    """A `vision` phase changes every vision-tower weight and no language-model weight, and reports
    held-out token accuracy per attribute; a later `qa` phase starts from its output."""
    cfg = _cfg(phases=[Phase([], 1.0, 5e-3, objective="vision", batch_size=4), Phase(["objects"], 1.0)])
    m = train_base(cfg, str(setup / "init"), str(setup / "data"), str(setup / "vis"), ckpt_dir=str(setup / "ck_vis"))
    ph = m["phases"][0]
    assert ph["objective"] == "vision" and ph["steps"] == 4
    assert set(ph["eval"]["token_accuracy"]) == {"shape", "color", "size", "material", "object", "pairs"}
    assert ph["eval"]["images"] == 10 and 0 <= ph["eval"]["image_existence"] <= 100  # test.jsonl's image records
    init, out = _state(setup / "init"), _state(setup / "vis")
    assert out.keys() == init.keys()  # the head was thrown away: a stock checkpoint
    # phase 1 (qa) moved everything again, so compare phase 0 alone through a one-phase run
    cfg1 = _cfg(phases=[Phase([], 1.0, 5e-3, objective="vision", batch_size=4)], eval_file="")
    train_base(cfg1, str(setup / "init"), str(setup / "data"), str(setup / "vis1"))
    v = _state(setup / "vis1")
    vision = [k for k in init if ".visual." in f".{k}"]
    assert vision and [k for k in vision if torch.equal(init[k], v[k])] == []
    assert [k for k in init if k not in vision and not torch.equal(init[k], v[k])] == []


def test_bad_phase_objective_names_the_field(setup):
    from pipeline.io import InputError

    with pytest.raises(InputError, match=r"phases\[0\]\.objective"):
        train_base(_cfg(phases=[Phase([], 1.0, objective="pixels")]), str(setup / "init"), str(setup / "data"),
                   str(setup / "bad"))


def test_caption_hits_score_each_listed_object_against_the_scene():
    from pipeline.train.base import caption_hits

    def o(x, **a):
        return {"pixel_coords": [x, 5, 0.0], **a}

    scene = {"objects": [o(50, shape="sphere", color="blue", size="large", material="rubber"),
                         o(10, shape="cube", color="red", size="small", material="metal")]}
    text = "<think>From left to right: a small red metal cube, a large blue metal sphere.</think>\\boxed{2}"
    assert caption_hits(text, scene) == {"size": [1, 1], "color": [1, 1], "material": [1, 0], "shape": [1, 1]}
    assert caption_hits("From left to right: a small red metal cube.", scene)["shape"] == [1, 0]  # missing = miss


def test_freeze_vision_phase_trains_the_language_model_only(setup):
    cfg = _cfg(phases=[Phase(["objects"], 1.0, freeze_vision=True)], eval_file="")
    train_base(cfg, str(setup / "init"), str(setup / "data"), str(setup / "frozen"))
    init, out = _state(setup / "init"), _state(setup / "frozen")
    vision = [k for k in init if ".visual." in f".{k}"]
    assert vision and all(torch.equal(init[k], out[k]) for k in vision)
    assert [k for k in init if k not in vision and torch.equal(init[k], out[k])] == []
