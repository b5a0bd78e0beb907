"""Evaluation suites: scoring of crafted responses per suite, override/stale checks, forgetting, and one
real end-to-end run of `trimpi evaluate` on a tiny-xs checkpoint (generation + efficiency)."""
import json
import types
from pathlib import Path

import pytest

from pipeline.cli import main as cli
from pipeline.evaluate import suites as S
from pipeline.evaluate.metrics import cited_conditions, gold_path_ids
from pipeline.io import InputError
from pipeline.data.records import open_dataset
from pipeline.policy import RenderCache, load_policies, load_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clevr_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    params = d / "params.yaml"
    params.write_text("base: {seed: 0}\ngenerate_clevr: {train_per_policy: 4, cot_per_policy: 2, test_per_policy: 8,"
                      " override_per_policy: 8, override_count: 1}\n")
    assert cli(["generate", "clevr", "--params", str(params), "--policies", str(ROOT / "policies/clevr"),
                "--out", str(d / "clevr")]) == 0
    return d / "clevr"


class FakeRunner(S.Runner):
    """A 'model' with a known behaviour: with a policy in context it follows THAT policy exactly; without
    one it answers from ``internalized`` (a policy-name -> policy map) on every ``skill``-th record and
    otherwise emits a fixed wrong/malformed response."""

    def __init__(self, policies, internalized=None, skill=2, cfg=None):
        self.model_dir, self.cfg, self.policies, self.render = "fake", cfg or S.EvalConfig(), policies, RenderCache()
        self.budgets = {}
        self.internalized = internalized if internalized is not None else policies
        self.skill = skill
        self.seen_policies = []

    def respond(self, ds, recs, policies, desc):
        out = []
        for i, r in enumerate(recs):
            pol = policies[i] if policies else None
            self.seen_policies.append(pol)
            if pol is None:
                if i % self.skill:
                    out.append(["\\boxed{Case 999}", "<think>no box here", ""][i % 3])
                    continue
                pol = self.internalized[r.policy]
            case, _ = pol.evaluate(r.meta["scene"])
            out.append(f"<think>\n{pol.reasoning(r.meta['scene'])}\n</think>\n\\boxed{{{case}}}")
        return out


def _eval(tmp_path, clevr_data, runner, **cfg):
    runner.cfg = S.EvalConfig(**cfg)
    return S.Evaluation(runner, [open_dataset(clevr_data)], runner.cfg, tmp_path / "preds")


def test_main_in_context_override_referral_on_crafted_responses(tmp_path, clevr_data):
    pols = load_policies(ROOT / "policies")
    runner = FakeRunner(pols, skill=2)
    ev = _eval(tmp_path, clevr_data, runner)
    main = ev.main()
    rows = [json.loads(x) for x in (tmp_path / "preds/main.jsonl").read_text().splitlines()]
    assert len(rows) == main["clevr"]["n"] == 16
    # labels re-derived: the fake answers every even-indexed record (per batch of 8) by the policy
    expected = 100 * sum(r["pred"] == r["gold"] for r in rows) / len(rows)
    assert main["clevr"]["accuracy"] == pytest.approx(expected, abs=0.01) and 40 <= expected <= 60
    assert main["score"] == main["clevr"]["accuracy"]
    assert set(main["clevr"]["by_policy"]) == {"L2-Fedaru", "L2-Rodola"} and list(main["clevr"]["by_depth"]) == ["2"]
    assert any(r["pred"] is None and not r["format_ok"] for r in rows)  # malformed outputs are scored, not fatal

    assert ev.in_context()["clevr"]["accuracy"] == 100.0  # a perfect policy follower with the policy in context

    over = ev.override()
    assert over["clevr"]["accuracy"] == 100.0 and over["clevr"]["n"] == 8
    # what went into context was the UPDATED spec published under the original name
    shown = [p for p in runner.seen_policies[-8:]]
    orig = pols[shown[0].name]
    assert all(p.name == orig.name and p.version != orig.version for p in shown)
    ignoring = FakeRunner(pols, skill=1)
    ignoring.respond = lambda ds, recs, policies, desc: FakeRunner.respond(ignoring, ds, recs, None, desc)
    stale_knowledge = _eval(tmp_path / "b", clevr_data, ignoring).override()["clevr"]["accuracy"]
    assert stale_knowledge < 100.0  # answering from the internalized OLD policy fails the override set

    ref = ev.referral()
    refrows = [json.loads(x) for x in (tmp_path / "preds/referral.jsonl").read_text().splitlines()]
    # correct responses cite exactly the gold path (gold CoT) -> precision 100; the rest cite nothing
    assert ref["precision"] == 100.0 and ref["nonexistent_ids"] == 0.0
    cited_share = sum(len(r["cited"]) for r in refrows) / sum(len(r["gold_path"]) for r in refrows)
    assert ref["recall"] == pytest.approx(100 * cited_share, abs=0.01) and 0 < ref["recall"] < 100
    assert ref["branching_error"] > 0 and ref["n"] == 16
    perfect = _eval(tmp_path / "c", clevr_data, FakeRunner(pols, skill=1)).referral()
    assert (perfect["precision"], perfect["recall"], perfect["exact_path"], perfect["branching_error"]) == (100, 100, 100, 0)


def test_stale_data_and_bad_override_are_input_errors(tmp_path, clevr_data):
    import shutil

    d = tmp_path / "clevr"
    shutil.copytree(clevr_data, d)
    lines = (d / "test.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["policy_version"] = "000000000000"
    (d / "test.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    runner = FakeRunner(load_policies(ROOT / "policies"))
    runner.cfg = S.EvalConfig()
    ev = S.Evaluation(runner, [open_dataset(d)], runner.cfg, tmp_path / "p")
    with pytest.raises(InputError, match=rf"test.jsonl: {rec['id']}.policy_version: .*stale"):
        ev.main()
    o = json.loads((d / "override.jsonl").read_text().splitlines()[0])
    o["meta"]["override_policy"] = "override_policies/missing.yaml"
    (d / "override.jsonl").write_text(json.dumps(o) + "\n")
    with pytest.raises(InputError, match="missing.yaml"):
        ev.override()


def test_gta_rows_scored_with_tool_and_args(tmp_path):
    from pipeline.data.records import Record

    pols = {"GTAPolicy": load_policy(ROOT / "policies/gta/gtapolicy.yaml")}
    gold = '{"name": "OCR_v2", "arguments": {"image": "image/image_1.jpg"}}'
    rec = Record(id="g1", task="gta", split="test", query="q", answer=gold, policy="GTAPolicy")
    texts = ["<think>x</think>\n\\boxed{" + gold + "}",
             '<think>x</think>\n\\boxed{{"name": "OCR_v1", "arguments": {"image": "image/image_1.jpg"}}}',
             "<think>x</think>\\boxed{not json", ""]
    rows = S.score_rows([rec] * 4, texts, pols, "policy-free")
    assert [(r["tool_acc"], r["arg_score"], r["correct"]) for r in rows] == [
        (1.0, 1.0, True), (0.0, 1.0, False), (0.0, 0.0, False), (0.0, 0.0, False)]
    s = S.summarize(rows)
    assert s["gta"]["tool_acc"] == 25.0 and s["gta"]["arg_score"] == 50.0 and s["gta"]["overall"] == 37.5
    assert s["score"] == 37.5 and s["gta"]["scorer"] == "token_f1"


def test_forgetting_on_user_benchmark_before_vs_after(tmp_path, clevr_data):
    from PIL import Image

    bench = tmp_path / "bench"
    (bench / "img").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(bench / "img/a.png")
    rows = [{"id": f"q{i}", "question": "Colour?", "answer": "A", "images": ["img/a.png"], "choices": ["red", "blue"]}
            for i in range(4)]
    (bench / "colours.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    class Answers(FakeRunner):
        def __init__(self, answers, name):
            super().__init__({})
            self.answers, self.model_dir = answers, name

        def respond(self, ds, recs, policies, desc):
            assert all(ds.store.open(ref).size == (32, 32) for r in recs for ref in r.images)
            assert "A. red\nB. blue" in recs[0].query
            return self.answers[:len(recs)]

    after = Answers(["\\boxed{A}", "\\boxed{red}", "B", "no idea\n"], "after")  # the last two: wrong, unboxed
    ev = _eval(tmp_path, clevr_data, after, benchmarks=[str(bench / "colours.jsonl")])
    ev.probes_dir = tmp_path / "no-probes"
    res = ev.forgetting(lambda: Answers(["(A)", "A", "\\boxed{A}", "red"], "before"))
    b = res["sets"]["benchmark/colours.jsonl"]
    assert (b["before"]["accuracy"], b["after"]["accuracy"], b["drop"]) == (100.0, 50.0, 50.0)
    assert res["drop"] == 50.0 and res["baseline_model"] == "before"
    assert ev.metrics["test_sets"]["benchmark/colours.jsonl"]

    (bench / "bad.jsonl").write_text(json.dumps({**rows[0], "images": ["../../etc/passwd"]}) + "\n")
    ev2 = _eval(tmp_path / "x", clevr_data, after, benchmarks=[str(bench / "bad.jsonl")])
    ev2.probes_dir = None
    with pytest.raises(InputError, match="inside the benchmark folder"):
        ev2.forgetting(None)
    ev3 = _eval(tmp_path / "y", clevr_data, after)
    ev3.probes_dir = tmp_path / "no-probes"
    assert ev3.forgetting(lambda: pytest.fail("baseline must not load without probes")) is None


def test_referral_gold_cot_citations_match_gold_path(clevr_data):
    # the data's gold CoT cites exactly its gold path: the reference distribution is consistent
    for line in (clevr_data / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert cited_conditions(r["cot"]) == gold_path_ids(r["meta"]["gold_path"])


def test_evaluate_cli_end_to_end_on_tiny_model(tmp_path, clevr_data, monkeypatch):
    from pipeline.model import masking, save
    from pipeline.model.presets import build_tiny

    encoded = []
    real_encode = masking.encode
    monkeypatch.setattr(masking, "encode", lambda proc, convs, *a, **k: encoded.append(len(convs))
                        or real_encode(proc, convs, *a, **k))

    model, proc = build_tiny("tiny-xs", seed=0)
    save(model, proc, tmp_path / "init")
    params = tmp_path / "params.yaml"
    params.write_text("base: {seed: 0, threads: 1}\nevaluate: {max_new_tokens: 4, max_examples: 2, batch_size: 2,"
                      " efficiency_samples: 1, efficiency_repeats: 1}\n")
    out = tmp_path / "eval.json"
    rc = cli(["evaluate", "--params", str(params), "--model", str(tmp_path / "init"), "--data", str(clevr_data),
              "--policies", str(ROOT / "policies"), "--suites", "main,in_context,efficiency", "--out", str(out),
              "--preds", str(tmp_path / "preds/init")])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["suites"] == ["main", "in_context", "efficiency"] and m["main"]["clevr"]["n"] == 2
    assert set(m["test_sets"]) == {"clevr/test.jsonl"}
    e = m["efficiency"]
    assert e["prompt_tokens_with_policy"] > e["prompt_tokens_internalized"] > 0 and e["token_reduction_pct"] > 0
    assert e["prefill_ms_with_policy"] > 0 and e["prefill_ms_internalized"] > 0
    # each prompt encoded once: the efficiency suite times the encodings main / in_context made
    assert encoded == [1] * 4
    assert len((tmp_path / "preds/init/main.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "preds/init/plots/depth.csv").read_text().startswith("suite,depth,accuracy\nmain,2,")
    assert cli(["evaluate", "--params", str(params), "--model", str(tmp_path / "init"), "--data", str(clevr_data),
                "--suites", "main,bogus"]) == 2


def test_report_table_seeds_in_context_rows_and_svg(tmp_path):
    import xml.etree.ElementTree as ET

    from pipeline.evaluate.report import run_report

    def write(name, main, ic, override=None):
        m = {"main": {"score": main, "clevr": {"accuracy": main}}, "in_context": {"score": ic, "clevr": {"accuracy": ic}}}
        if override is not None:
            m["override"] = {"score": override}
        (tmp_path / name).write_text(json.dumps(m))
        return str(tmp_path / name)

    init = write("init.json", 2.0, 13.15)
    rl = [write("rl0.json", 60.0, 70.0, 50.0), write("rl1.json", 70.0, 72.0, 54.0)]
    args = types.SimpleNamespace(variant=[f"In-Context={init}@in_context", f"TriMPI={','.join(rl)}"],
                                 out=str(tmp_path / "results.md"), svg=None, json=None)
    assert run_report(args) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| Rank | Method | n | Acc mean | In-context | Override |" in md  # columns without data are dropped
    assert "| 2 | In-Context † | 1 | 13.2 | 13.2 | – |" in md  # accuracy read with the policy in context
    assert "| 1 | TriMPI | 2 | 65.0 ± 7.1 | 71.0 ± 1.4 | 52.0 ± 2.8 |" in md
    root = ET.fromstring((tmp_path / "results.svg").read_text())
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == 2  # one bar per row (one group): its accuracy, with a dot per seed
    assert len(list(root.iter("{http://www.w3.org/2000/svg}circle"))) == 3
    with pytest.raises(InputError, match="NAME=metrics.json"):
        run_report(types.SimpleNamespace(variant=["nonsense"], out=str(tmp_path / "x.md"), svg=None, json=None))


def test_optional_judge_scores_and_survives_failures(monkeypatch):
    import http.server
    import threading

    from pipeline.data.records import Record
    from pipeline.evaluate.judge import judge_referral

    replies = iter(["Score: 7", "10", "I cannot grade this", None])
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            reply = next(replies)
            if reply is None:
                self.send_response(500)
                self.end_headers()
                return
            data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "k-123")
        pols = load_policies(ROOT / "policies/clevr")
        name = sorted(pols)[0]
        rec = Record(id="r", task="clevr", split="test", query="q", answer="Case 1", policy=name)
        cfg = S.EvalConfig(judge_url=f"http://127.0.0.1:{srv.server_port}/v1", judge_model="m", judge_max_examples=4)
        res = judge_referral(cfg, [(rec, "resp")] * 5, FakeRunner(pols))
    finally:
        srv.shutdown()
    assert res == {"score": 8.5, "n": 2, "errors": 2, "model": "m"}  # only 4 sent; unparsable + HTTP 500 counted
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k-123" and body["model"] == "m"
    assert f"Policy: {name}" in body["messages"][0]["content"] and "Gold answer: Case 1" in body["messages"][0]["content"]


@pytest.fixture(scope="module")
def probe_world(tmp_path_factory):
    """A tiny probe set (data/generic layout) and two tiny-xs checkpoints: a baseline and a changed model."""
    torch = pytest.importorskip("torch")
    from pipeline.model import save
    from pipeline.model.presets import build_tiny

    d = tmp_path_factory.mktemp("forget")
    params = d / "params.yaml"
    params.write_text("base: {seed: 0, threads: 1}\ngenerate_generic:\n  train: {exist: 1, text: 1}\n  test_per_qtype: 2\n"
                      "evaluate: {max_new_tokens: 6, batch_size: 2}\n")
    assert cli(["generate", "generic", "--params", str(params), "--out", str(d / "generic")]) == 0
    model, proc = build_tiny("tiny-xs", seed=0)
    save(model, proc, d / "base")
    with torch.no_grad():  # "training" changed the weights: other responses
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    save(model, proc, d / "rl")
    (d / "rl" / "metrics.json").write_text("{}")  # run artifacts beside the weights do not count
    return d


def test_forgetting_cache_same_figures_and_baseline_generated_once(probe_world, clevr_data, monkeypatch, capsys):
    """Issue 17: the forgetting figures are the same with and without the response cache; a second
    evaluation probing the same baseline generates (and loads) nothing for it; a changed checkpoint
    or decoding setting misses the cache."""
    d = probe_world
    loaded, responded = [], []
    real_init, real_respond = S.Runner.__init__, S.Runner.respond

    def init(self, model_dir, *a, **k):
        loaded.append(Path(model_dir).name)
        real_init(self, model_dir, *a, **k)

    def respond(self, ds, recs, policies, desc):
        responded.append((Path(self.model_dir).name, desc.split("(")[-1].rstrip(")")))
        return real_respond(self, ds, recs, policies, desc)

    monkeypatch.setattr(S.Runner, "__init__", init)
    monkeypatch.setattr(S.Runner, "respond", respond)

    def run(tag, cache, *extra):
        loaded.clear(), responded.clear()
        out = d / f"eval_{tag}.json"
        assert cli(["evaluate", "--params", str(d / "params.yaml"), "--model", str(d / "rl"), "--data", str(clevr_data),
                    "--probes", str(d / "generic"), "--baseline-model", str(d / "base"), "--suites", "forgetting",
                    "--out", str(out), "--preds", str(d / f"preds_{tag}"), "--cache-dir", cache, *extra]) == 0
        m = json.loads(out.read_text())
        rows = (d / f"preds_{tag}" / "forgetting.jsonl").read_text()
        return m["forgetting"], rows, m["decoding"]  # decoding: the budgets, recorded on a cache hit too

    plain = run("plain", "")
    assert responded == [("base", "before"), ("rl", "after")]
    cache = str(d / "cache")
    cold = run("cold", cache)
    assert responded == [("base", "before"), ("rl", "after")] and len(list((d / "cache/forgetting").glob("*.json"))) == 2
    warm = run("warm", cache)
    assert responded == [] and loaded == ["rl"]  # the baseline was not even loaded
    assert plain == cold == warm  # same figures and the same per-example rows
    assert "from the cache" in capsys.readouterr().err
    assert plain[0]["sets"]["generic/test.jsonl"]["before"]["n"] == 12

    # evaluating the baseline itself: both passes come from the cache
    loaded.clear(), responded.clear()
    assert cli(["evaluate", "--params", str(d / "params.yaml"), "--model", str(d / "base"), "--data", str(clevr_data),
                "--probes", str(d / "generic"), "--baseline-model", str(d / "base"), "--suites", "forgetting",
                "--out", str(d / "eval_base.json"), "--preds", str(d / "preds_base"), "--cache-dir", cache]) == 0
    assert responded == []
    # another decoding budget, or other weights, is another key
    run("longer", cache, "--set", "max_new_tokens=7")
    assert responded == [("base", "before"), ("rl", "after")]
    import shutil

    shutil.copytree(d / "rl", d / "rl2")
    from safetensors.torch import load_file, save_file

    w = load_file(str(d / "rl2" / "model.safetensors"))
    key = next(k for k in w if w[k].dim() == 2)
    w[key] = w[key] * 1.01
    save_file(w, str(d / "rl2" / "model.safetensors"), metadata={"format": "pt"})
    loaded.clear(), responded.clear()
    assert cli(["evaluate", "--params", str(d / "params.yaml"), "--model", str(d / "rl2"), "--data", str(clevr_data),
                "--probes", str(d / "generic"), "--baseline-model", str(d / "base"), "--suites", "forgetting",
                "--out", str(d / "eval_rl2.json"), "--preds", str(d / "preds_rl2"), "--cache-dir", cache]) == 0
    assert responded == [("rl2", "after")]
