"""Gate: thresholds, skipped-vs-required checks, regression against a fake incumbent in the registry."""
import json
import types

from pipeline.evaluate.gate import GateConfig, evaluate_gate, run_gate
from pipeline.registry import Registry
from pipeline.storage import LocalStorage

SETS = {"clevr/test.jsonl": "h1"}


def _m(main, override=None, drop=None, sets=SETS):
    m = {"main": {"score": main}, "test_sets": dict(sets)}
    if override is not None:
        m["override"] = {"score": override}
    if drop is not None:
        m["forgetting"] = {"drop": drop}
    return m


def _by_name(v):
    return {c["name"].split(":")[-1].strip(): c for c in v["checks"]}


def test_thresholds_each_check_reports_value_and_threshold():
    cfg = GateConfig(min_main_accuracy=40, min_override_accuracy=20, max_forgetting_drop=5)
    ok = evaluate_gate(_m(45, 25, 3.0), cfg, None, None)
    assert ok["passed"]
    c = _by_name(ok)
    assert (c["main accuracy"]["value"], c["main accuracy"]["threshold"], c["main accuracy"]["op"]) == (45, 40, ">=")
    assert c["forgetting drop"]["status"] == "pass"
    assert c["no regression vs production"]["status"] == "skipped"
    assert "no production" in c["no regression vs production"]["note"]
    for bad, failing in ((_m(39.99, 25, 3), "main accuracy"), (_m(45, 19, 3), "override accuracy"),
                         (_m(45, 25, 5.01), "forgetting drop")):
        v = evaluate_gate(bad, cfg, None, None)
        assert not v["passed"] and [n for n, x in _by_name(v).items() if x["status"] == "fail"] == [failing]


def test_missing_metrics_skip_unless_required_and_main_is_always_required():
    v = evaluate_gate(_m(45), GateConfig(min_main_accuracy=40), None, None)
    assert v["passed"] and _by_name(v)["forgetting drop"]["status"] == "skipped"
    assert not evaluate_gate(_m(45), GateConfig(min_main_accuracy=40, require_all=True), None, None)["passed"]
    assert not evaluate_gate({"override": {"score": 90}}, GateConfig(min_main_accuracy=0), None, None)["passed"]


def test_regression_vs_incumbent_on_same_and_different_test_sets():
    cfg = GateConfig(min_main_accuracy=10, max_regression=2.0)
    worse = evaluate_gate(_m(60, 50), cfg, _m(65, 50), "v3")
    reg = [c for c in worse["checks"] if "main.score" in c["name"] and "regression" in c["name"]][0]
    assert not worse["passed"] and reg["value"] == 5 and reg["threshold"] == 2.0 and "v3" in reg["name"]
    assert evaluate_gate(_m(64, 50), cfg, _m(65, 50), "v3")["passed"]  # 1 point lost: within budget
    assert evaluate_gate(_m(80, 60), cfg, _m(65, 50), "v3")["passed"]  # improvements never fail
    other = evaluate_gate(_m(10, 0, sets={"clevr/test.jsonl": "h2"}), cfg, _m(65, 50), "v3")
    notes = [c["note"] for c in other["checks"] if "regression" in c["name"]]
    assert other["passed"] and all("different test sets" in n for n in notes)


def test_gate_cli_reads_production_from_registry_and_exits_1(tmp_path, capsys):
    root = tmp_path / "registry"
    model = tmp_path / "prod"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    Registry(LocalStorage(root), "m").promote(model, _m(70, 40), {"passed": True, "checks": []}, {})
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  root: {root}\n  model: m\ngate:\n  min_main_accuracy: 30\n  max_regression: 3\n")
    metrics = tmp_path / "eval.json"
    metrics.write_text(json.dumps(_m(60, 40)))
    out = tmp_path / "gate.json"
    args = types.SimpleNamespace(params=str(params), overrides=[], metrics=str(metrics), out=str(out))
    assert run_gate(args) == 1
    verdict = json.loads(out.read_text())
    assert verdict["passed"] is False and verdict["production"] == "v1"
    printed = capsys.readouterr().out
    assert "gate: FAILED" in printed and "[   fail] no regression vs production v1: main.score: 10 <= 3.0" in printed
    args.overrides = ["max_regression=15"]
    assert run_gate(args) == 0 and json.loads(out.read_text())["passed"] is True
