"""The policy-change check against a real (local) registry, and the DVC stage order/classification."""
from __future__ import annotations

import json

import pytest

from flows import change, runner

PARAMS = """base: {seed: 0}
generate_clevr: {per_policy: 8}
rl: {algorithm: grpo}
registry: {root: registry, model: tst}
"""


def _promote(root, params_text):
    """Promote a dummy model whose card records the workspace's current policies and params."""
    from pipeline.registry import build_card

    model = root / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    reg = change.registry_for(root, root / "params.yaml")
    card = build_card(str(root / "params.yaml"), str(root / "policies"), [], str(model))
    return reg.promote(model, {"main": {"score": 50.0}}, {"passed": True, "checks": []}, card)


def test_change_check_follows_policies_and_data_params_only(dvc_repo):
    root = dvc_repo("stages: {}\n", PARAMS)
    watch = ["base.seed", "generate_clevr"]

    def chk():
        from pipeline.config import read_params

        return change.check(root, read_params(root / "params.yaml"), root / "params.yaml", watch)

    first = chk()
    assert first.changed and first.production is None and "no production" in first.reason
    _promote(root, PARAMS)
    same = chk()
    assert not same.changed and same.production["version"] == "v1", same.reason
    assert same.production["metrics"]["main"]["score"] == 50.0

    # a training knob is not a policy change
    (root / "params.yaml").write_text(PARAMS.replace("grpo", "dapo"))
    assert not chk().changed
    # a data param is
    (root / "params.yaml").write_text(PARAMS.replace("per_policy: 8", "per_policy: 9"))
    r = chk()
    assert r.changed and "generate_clevr" in r.reason
    (root / "params.yaml").write_text(PARAMS)
    # editing one policy's tree is; re-formatting it (a comment) is not
    pol = root / "policies" / "clevr" / "L1-Tistu.yaml"
    pol.write_text("# reviewed\n" + pol.read_text())
    assert not chk().changed
    pol.write_text(pol.read_text().replace("value: cube", "value: sphere"))
    r = chk()
    assert r.changed and "policies changed since production v1" in r.reason


def test_stage_order_is_topological_with_declaration_order_on_ties(dvc_repo):
    root = dvc_repo("""stages:
  report: {cmd: "true", deps: [b.txt, c.txt]}
  b: {cmd: "true", deps: [a.txt], outs: [b.txt]}
  c: {cmd: "true", deps: [a.txt], outs: [c.txt]}
  a: {cmd: "true", outs: [a.txt]}
  lone: {cmd: "true"}
""")
    assert runner.stage_order(root) == ["a", "b", "c", "report", "lone"]
    assert runner.stage_order(root, ["report", "a"]) == ["a", "report"]
    from pipeline.io import InputError

    with pytest.raises(InputError, match="nope"):
        runner.stage_order(root, ["nope"])
    (root / "dvc.yaml").write_text("stages:\n")
    assert runner.stage_order(root) == []


@pytest.mark.parametrize("code,tail,transient", [
    (255, ["ERROR: failed to reproduce 'validate': failed to run: trimpi validate, exited with 1"], False),
    (255, ["ERROR: failed to reproduce 'x': failed to run: trimpi x, exited with 2"], False),
    (255, ["ERROR: failed to reproduce 'x': failed to run: x, exited with 75"], True),
    (255, ["ERROR: failed to reproduce 'x': failed to run: trimpi x, exited with 70"], False),  # a crash
    (255, ["ERROR: failed to reproduce 'x': failed to run: x, exited with -9"], True),
    # the exit code decides (issue 16 item 3): storage unreachable exits 75, whatever the text says
    (255, ["promote: s3://b/p: put failed after 5 attempts (last error: EndpointConnectionError)",
           "ERROR: failed to reproduce 'promote': failed to run: trimpi promote, exited with 75"], True),
    (255, ["error: s3://b/p: put failed after 5 attempts (last error: EndpointConnectionError)",
           "ERROR: failed to reproduce 'promote': failed to run: trimpi promote, exited with 2"], False),
    (255, ["ERROR: 'dvc.yaml' does not exist"], False),
    (1, ["ERROR: failed to push data to the cloud - Connection refused"], True),
])
def test_failure_classification(code, tail, transient):
    assert runner.classify(code, tail)[0] is transient


def test_streamed_subprocess_lines_progress_and_timeout(tmp_path):
    seen = []
    script = ("import sys,time\nprint('a', flush=True)\n"
              "for i in range(3): sys.stdout.write(f'\\rbar {i}'); sys.stdout.flush()\n"
              "print()\nprint('b')\nsys.exit(3)")
    code, tail = runner.run_streamed(["python3", "-c", script], tmp_path, seen.append, progress_every=3600)
    assert code == 3 and seen[0] == "a" and seen[-1] == "b"
    assert sum(s.startswith("bar") for s in seen) <= 2  # redraws throttled, not one line each
    with pytest.raises(runner.StageTimeout) as e:
        runner.run_streamed(["python3", "-c", "import time; print('start', flush=True); time.sleep(60)"],
                            tmp_path, seen.append, timeout=1.5)
    assert not e.value.transient and "timed out after 1.5 s" in str(e.value)


def test_stage_metrics_reads_declared_metrics_and_checkpoint_metrics(dvc_repo):
    root = dvc_repo("""stages:
  train: {cmd: "true", outs: [models/x], metrics: [{metrics/t.json: {cache: false}}]}
""")
    (root / "models" / "x").mkdir(parents=True)
    (root / "models" / "x" / "metrics.json").write_text(json.dumps({"loss": 0.25}))
    (root / "metrics").mkdir()
    (root / "metrics" / "t.json").write_text(json.dumps({"acc": 1}))
    assert runner.stage_metrics(root, "train") == {"metrics/t.json": {"acc": 1}, "models/x/metrics.json": {"loss": 0.25}}


def test_a_failed_stage_blocks_only_its_dependents():
    from flows.runner import downstream

    graph = {"generate": set(), "validate": {"generate"}, "train": {"validate"}, "evaluate": {"train"},
             "gate": {"evaluate"}, "promote": {"gate"}, "report": {"evaluate"}, "base": {"generate"}}
    assert downstream(graph, "gate") == {"promote"}
    assert downstream(graph, "validate") == {"train", "evaluate", "gate", "promote", "report"}
    assert downstream(graph, "promote") == set()


def test_production_policies_come_from_the_card_or_from_git_at_its_revision(dvc_repo):
    """The flow's policy diff needs production's policy texts: new cards keep them, old ones point at git."""
    import os
    import subprocess

    from pipeline.policy import load_policies

    root = dvc_repo("stages: {}\n", PARAMS)
    genv = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "policies"], cwd=root, check=True, env=genv)
    subprocess.run(["git", "commit", "-qm", "p"], cwd=root, check=True, env=genv)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    (pol,) = load_policies(root / "policies").values()
    entry = {"name": pol.name, "version": pol.version, "path": "policies/clevr/L1-Tistu.yaml"}
    pol_file = root / "policies" / "clevr" / "L1-Tistu.yaml"
    pol_file.write_text(pol_file.read_text().replace("value: cube", "value: sphere"))  # the working tree moved on

    def recovered(card):
        got, missing = change.production_policies({"version": "v1", "card": card}, root)
        return {n: p.version for n, p in got.items()}, missing

    with_spec = {"policies": [{**entry, "spec": pol.spec}], "git": {"revision": "unknown"}}
    assert recovered(with_spec) == ({pol.name: pol.version}, [])
    old_card = {"policies": [entry], "git": {"revision": rev}}  # promoted before cards kept the spec
    assert recovered(old_card) == ({pol.name: pol.version}, [])
    assert recovered({"policies": [entry], "git": {"revision": "unknown"}}) == ({}, [pol.name])
    tampered = {"policies": [{**entry, "version": "not-this-one"}], "git": {"revision": rev}}
    assert recovered(tampered) == ({}, [pol.name])  # a text that does not hash to the card's version is not used
