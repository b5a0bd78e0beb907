"""Response budgets follow the data: a depth-6 CoT is evaluated and rolled out without being cut.

A fixed budget tuned for depth 2 (192 new tokens in evaluation, 128 in RL) cut depth-6 chains before
their ``\\boxed{}``: a model that answered correctly scored 5 % with a 6 % format rate. Here a stand-in
for generation emits each record's gold response, truncated at whatever budget it is given, so the
scores say exactly whether the budget fits the data.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main as cli
from pipeline.evaluate import suites as S
from pipeline.model.prompts import response_budget, training_response
from pipeline.data.records import open_dataset, split_records
from pipeline.policy import RenderCache, load_policies

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """One sampled depth-6 policy, a small dataset of it, and the tiny-xs processor."""
    from pipeline.model.presets import build_tiny

    d = tmp_path_factory.mktemp("deep")
    params = d / "params.yaml"
    params.write_text("base: {seed: 0}\ngenerate_clevr: {train_per_policy: 6, cot_per_policy: 6, test_per_policy: 12,"
                      " override_per_policy: 2, override_count: 0}\n")
    assert cli(["policy", "new", "clevr", "--params", str(params), "--depth", "6", "--count", "1", "--seed", "13",
                "--out", str(d / "policies" / "clevr")]) == 0
    assert cli(["generate", "clevr", "--params", str(params), "--policies", str(d / "policies" / "clevr"),
                "--out", str(d / "data")]) == 0
    _, proc = build_tiny("tiny-xs", seed=0)
    return d, proc


class GoldRunner(S.Runner):
    """A runner whose decoder emits each record's gold response, cut at the budget it is handed, as
    real decoding would be: the scores then say exactly whether the budget fits the data."""

    def __init__(self, proc, policies, cfg):
        self.model_dir, self.model, self.processor, self.cfg, self.policies = "gold", None, proc, cfg, policies
        self.render, self.budgets, self.seen = RenderCache(), {}, []

    def _respond_generate(self, ds, recs, policies, bar, budget):
        self.seen.append(budget)
        tok = self.processor.tokenizer
        return [tok.decode(tok(training_response(r), add_special_tokens=False).input_ids[:budget]) for r in recs]

    _respond_greedy = _respond_generate


def _evaluate(deep, max_new_tokens):
    d, proc = deep
    ds = open_dataset(d / "data")
    recs = split_records(ds, "test", 0)
    runner = GoldRunner(proc, load_policies(d / "policies"), S.EvalConfig(max_new_tokens=max_new_tokens))
    ev = S.Evaluation(runner, [ds], runner.cfg, d / f"preds{max_new_tokens}")
    return ev.main(), runner.seen, recs


def test_response_budget_fits_the_longest_gold_response(deep):
    d, proc = deep
    recs = split_records(open_dataset(d / "data"), "test", 0)
    longest = max(len(proc.tokenizer(training_response(r), add_special_tokens=False).input_ids) for r in recs)
    budget = response_budget(proc.tokenizer, recs)
    assert longest > 192  # a depth-6 chain is longer than the old fixed evaluation budget
    assert longest * 1.25 <= budget <= longest * 1.25 + 9


def test_depth6_is_evaluated_without_truncation(deep):
    main, seen, recs = _evaluate(deep, max_new_tokens=0)
    assert main["clevr"]["accuracy"] == 100.0 and main["clevr"]["format_rate"] == 100.0
    assert seen == [response_budget(deep[1].tokenizer, recs)]


def test_a_fixed_depth2_budget_would_cut_depth6_answers(deep):
    main, _, _ = _evaluate(deep, max_new_tokens=192)
    assert main["clevr"]["format_rate"] < 100.0 and main["clevr"]["accuracy"] < 100.0


def test_rl_rollout_budget_comes_from_the_cot_data(deep, tmp_path):
    from pipeline.train.rl import train_rl
    from pipeline.train.rl_config import RLConfig

    d, proc = deep
    assert cli(["model", "init", "--params", str(ROOT / "params.yaml"), "--model", "tiny-xs",
                "--out", str(tmp_path / "init")]) == 0
    cfg = RLConfig(group_size=2, rollout_batch=2, update_batch=2, micro_batch=4, max_steps=1, save_every=0,
                   max_response_len=0, policy_rollout=False, algorithm="dapo", dynamic_sampling=False)
    m = train_rl(cfg, str(tmp_path / "init"), [str(d / "data")], str(d / "policies"), str(tmp_path / "rl"),
                 ckpt_dir=str(tmp_path / "ckpt"), reward_fn=lambda r, t: (0.0, 0.0))
    from pipeline.data.records import read_records

    cot = read_records(d / "data" / "cot.jsonl")
    assert m["config"]["max_response_len"] == response_budget(proc.tokenizer, cot) > 192
