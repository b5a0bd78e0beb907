"""``trimpi train rl`` end to end through the shared DeepSpeed engine (one CPU process).

Tiny world: a depth-2 ClevrPolicy dataset (a few dozen images) and a random tiny-xs checkpoint.
A random model never boxes the right case, so the learning tests pass a toy reward (start the
response with '-') through ``train_rl(reward_fn=...)``; everything else is the real stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402
from pipeline.train.rl import train_rl  # noqa: E402
from pipeline.train.rl_config import RLConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dash(record, text):
    return float(text.startswith("-")), 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlworld")
    params = str(ROOT / "params.yaml")
    assert main(["generate", "clevr", "--params", params, "--policies", str(ROOT / "policies/clevr"),
                 "--out", str(d / "data"), "--set", "train_per_policy=8", "--set", "cot_per_policy=4",
                 "--set", "test_per_policy=4", "--set", "override_per_policy=2"]) == 0
    assert main(["model", "init", "--params", params, "--model", "tiny-xs", "--out", str(d / "init")]) == 0
    return d


def cfg(**kw):
    base = dict(group_size=2, max_response_len=4, rollout_batch=2, update_batch=2, micro_batch=4, max_steps=3,
                save_every=1, lr=1e-2)
    base.update(kw)
    return RLConfig(**base)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_stage_writes_model_metrics_and_per_half_log(world, tmp_path):
    out = tmp_path / "rl"
    m = train_rl(cfg(), str(world / "init"), [str(world / "data")], str(ROOT / "policies"), str(out),
                 ckpt_dir=str(tmp_path / "ckpt"), metrics_path=str(tmp_path / "rl.json"), reward_fn=dash)
    assert m["steps_done"] == 3 and not m["stopped_early"] and m["policy_rollout"]
    assert json.loads((tmp_path / "rl.json").read_text())["steps_done"] == 3
    rows = (out / "train_log.csv").read_text().splitlines()
    head = rows[0].split(",")
    for col in ("reward_free", "reward_policy", "zero_var_frac", "kl", "clip_frac", "resp_len"):
        assert col in head
    assert len(rows) == 4
    # the pre-clip gradient norm is measured under ZeRO-0 too (DeepSpeed reports None there)
    assert any(float(r.split(",")[head.index("grad_norm")]) > 0 for r in rows[1:])
    assert not (tmp_path / "ckpt").exists()  # checkpoints are dropped once the model is in place
    before, after = weights(world / "init"), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    card = json.loads((out / "model_card.json").read_text())
    assert card["stages"][-1] == "rl" and card["rl"]["policy_rollout"] is True


def test_dapo_stops_early_at_the_retry_cap_and_says_so(world, tmp_path, capsys):
    m = train_rl(cfg(algorithm="dapo", max_retries=2), str(world / "init"), [str(world / "data")],
                 str(ROOT / "policies"), str(tmp_path / "rl"), ckpt_dir=str(tmp_path / "ckpt"),
                 reward_fn=lambda r, t: (0.0, 0.0))
    assert m["stopped_early"] and m["steps_done"] == 0 and "retry cap (2 retries)" in m["stop_reason"]
    assert "stopped early" in capsys.readouterr().out
    assert (tmp_path / "rl" / "model.safetensors").exists()


def test_resume_after_interruption_matches_uninterrupted_run(world, tmp_path):
    args = (str(world / "init"), [str(world / "data")], str(ROOT / "policies"))
    train_rl(cfg(), *args, str(tmp_path / "full"), ckpt_dir=str(tmp_path / "c1"), reward_fn=dash)
    calls = {"n": 0}

    def dies_in_step_3(record, text):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 4:  # steps 1-2: 2 prompts x 2G=4 responses each
            raise KeyboardInterrupt
        return dash(record, text)

    with pytest.raises(KeyboardInterrupt):
        train_rl(cfg(), *args, str(tmp_path / "resumed"), ckpt_dir=str(tmp_path / "c2"), reward_fn=dies_in_step_3)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "c2" / "latest").exists()
    m = train_rl(cfg(), *args, str(tmp_path / "resumed"), ckpt_dir=str(tmp_path / "c2"), reward_fn=dash)
    assert m["resumed_from_step"] == 2 and m["steps_done"] == 3
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bench_rl_measures_prompt_lengths_with_the_stage_loaders(world):
    """benchmarks/bench_rl.py reads prompts through the stage's own loaders: a signature change there
    must fail here, not in a benchmark run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_rl", ROOT / "benchmarks/bench_rl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = bench.prompt_tokens(world / "init", world / "data", ROOT / "policies")
    assert 0 < n["prompt_tokens_free"] < n["prompt_tokens_policy"], n
