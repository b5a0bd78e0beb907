"""``trimpi evaluate``: the evaluation suites on one checkpoint -> metrics JSON + per-example predictions.

Suites (``params.yaml: evaluate.suites``, or ``--suites main,referral``):

* ``main`` — policy-free accuracy on ``test.jsonl`` (what deployment sees): ClevrPolicy exact
  match per policy and per depth; GTAPolicy Tool Acc / Arg Score / Overall.
* ``in_context`` — the same test with the policy put back in the prompt (paper Table 4; for the
  untrained model this is the paper's "In-Context" baseline).
* ``override`` — ``override.jsonl``: the updated policy from ``meta.override_policy`` (a spec
  inside the dataset directory; anything resolving outside it is refused) is put in context
  under the original name and answers are scored against the new labels.
* ``referral`` — exact, judge-free: condition ids cited by the ``main`` responses vs the gold
  path, and the branching-error statistic (see ``metrics.py``). An OpenAI-compatible judge
  (``judge_url``) may add the paper's 0-10 score; it is off by default and never required.
* ``forgetting`` — probe accuracy (``data/generic/test.jsonl``: per ``meta.qtype`` and the text
  set, plus user benchmarks) of ``--baseline-model`` (before) vs this model (after).
* ``efficiency`` — prompt tokens and measured prefill time with the policy vs internalized
  (``efficiency.py``).

Every suite writes ``<preds>/<suite>.jsonl`` (one row per example: prompt kind, raw response,
parsed answer, gold, score) so a failure can be inspected. Each suite has a headline ``score``
(mean of ClevrPolicy accuracy and GTA Overall, whichever exist) for the gate and the report;
``test_sets`` records the content hash of every file scored, so the gate only compares with
production on identical test sets.

Forgetting inputs (probe set, user benchmark JSONL format) are in ``probes.py``; the optional
judge in ``judge.py``; prefill timing in ``efficiency.py``.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import get_dotted
from pipeline.data.records import Dataset, Record, open_dataset, split_records
from pipeline.evaluate import metrics as M
from pipeline.evaluate.probes import probe_rows, probe_sets, dataset_key
from pipeline.io import atomic_write_json, atomic_write_text, file_hash, input_error, write_jsonl

ALL_SUITES = ("main", "in_context", "override", "referral", "forgetting", "efficiency")


@dataclass
class EvalConfig:
    """``params.yaml: evaluate`` — which suites run and how responses are generated."""

    suites: list[str] = field(default_factory=lambda: list(ALL_SUITES))
    """Suites to run (any of main, in_context, override, referral, forgetting, efficiency)."""
    batch_size: int = 32
    """Rows decoded together (greedy: rows in flight, a finished one replaced at once). Predictions do not
    depend on it; 32 took half the CPU of 8 on the default data (benchmarks/bench_evaluate.py)."""
    max_new_tokens: int = 0
    """Response budget; 0 = derived from the data: the longest gold response of the records being
    evaluated + 25 % (``prompts.response_budget``), recorded per suite in ``decoding.max_new_tokens``.
    A fixed number cuts longer CoTs (depth 6) before ``\\boxed{}``, which then score as malformed."""
    do_sample: bool = False
    """Greedy decoding (paper evaluation decoding is unstated; greedy makes runs reproducible)."""
    temperature: float = 1.0
    """Only with do_sample."""
    top_p: float = 1.0
    """Only with do_sample."""
    max_examples: int = 0
    """Per dataset and suite; 0 = all. Use to smoke-test a large checkpoint quickly."""
    multimodal_policy: str = "auto"
    """Policy rendering in context: ``auto`` (as the dataset manifest says), ``text`` or ``multimodal``."""
    benchmarks: list[str] = field(default_factory=list)
    """Extra forgetting benchmarks: JSONL files in the documented format (e.g. MMMU-Pro/MMLU-Pro exports)."""
    efficiency_samples: int = 4
    """Test prompts (per dataset) timed by the efficiency suite."""
    efficiency_repeats: int = 3
    """Timed prefill passes per prompt after one warm-up (the median is kept)."""
    gta_text_scorer: str = "auto"
    """GTA text-argument similarity: ``auto`` (BERTScore if ``gta_bertscore_model`` set, else MiniLM if installed,
    else token F1), ``minilm`` or ``token_f1``. The scorer's name is recorded in the metrics."""
    gta_bertscore_model: str = ""
    """Local encoder directory for BERTScore (empty = not used)."""
    judge_url: str = ""
    """OpenAI-compatible base URL (``http://host:8000/v1``) for the optional 0-10 referral score; empty = off.
    The key, if any, comes from the ``OPENAI_API_KEY`` environment variable, never from params."""
    judge_model: str = ""
    """Model name sent to the judge endpoint."""
    judge_max_examples: int = 50
    """Responses sent to the judge (the exact referral metrics always use all of them)."""


# ----------------------------------------------------------------------------- data


RENDERINGS = {"auto": None, "text": False, "multimodal": True}
"""``evaluate.multimodal_policy`` -> ``open_dataset``'s ``multimodal`` (None: as the manifest says)."""


def open_datasets(paths: list[str], mode: str) -> list[Dataset]:
    if mode not in RENDERINGS:
        raise input_error("params.yaml", "evaluate.multimodal_policy", "auto, text or multimodal", mode)
    return [open_dataset(p, RENDERINGS[mode]) for p in paths]


# ----------------------------------------------------------------------------- generation


class Runner:
    """A loaded model plus the policies; turns records into responses.

    Greedy decoding (the default) goes through :func:`pipeline.model.decode.greedy`: prompts are
    encoded one by one, sorted by length within windows of ``WINDOW``, and decoded with
    ``batch_size`` rows in flight, a finished row replaced at once by the next prompt; prompts that
    carry the same policy share its prefilled prefix. Sampling, or a checkpoint whose generation
    config adds logits processors, uses ``generate`` on length-sorted batches of ``batch_size``.
    Either way each response is what ``generate`` gives for that prompt (tests/test_decode.py).
    """

    WINDOW = 256
    """Prompts encoded (and sorted by length) at a time: bounds the memory held by encoded images
    (~0.5 MB of pixel values per 128-px image)."""

    def __init__(self, model_dir: str, cfg: EvalConfig, policies: dict, threads: int):
        from pipeline.model import load
        from pipeline.policy import RenderCache

        self.model_dir = model_dir
        self.model, self.processor = load(model_dir, threads=threads)
        self.cfg = cfg
        self.policies = policies
        self.render = RenderCache()
        self.budgets: dict[str, int] = {}
        """max_new_tokens used per respond() call (keyed by its description), for the metrics."""
        self._keep: set = set()
        self._encoded: dict = {}

    def policy_of(self, rec: Record, where: str):
        from pipeline.policy import resolve_policy

        return resolve_policy(rec, self.policies, where)

    def conversations(self, ds: Dataset, recs: list[Record], policies: list | None) -> list[list[dict]]:
        from pipeline.model.prompts import build_messages

        out = []
        for i, r in enumerate(recs):
            imgs = [ds.store.open(ref) for ref in r.images]
            rendered = self.render(policies[i], ds.multimodal) if policies and policies[i] is not None else None
            out.append(build_messages(r, imgs, policy=rendered))
        return out

    @staticmethod
    def encoding_key(ds, rec: Record, policy) -> tuple:
        pol = None if policy is None else (policy.name, policy.version, bool(getattr(ds, "multimodal", False)))
        return (str(ds.root), rec.id, pol)

    def keep_encodings(self, keys) -> None:
        """Keep the encodings of these prompts once made (the efficiency suite re-uses them)."""
        self.__dict__.setdefault("_keep", set()).update(keys)  # (test doubles skip __init__)

    def encoded(self, ds: Dataset, rec: Record, policy) -> dict:
        """The generation-ready encoding of one prompt (a batch of one), re-used when it was kept."""
        from pipeline.model.masking import encode

        key = self.encoding_key(ds, rec, policy)
        kept = self.__dict__.setdefault("_encoded", {})
        if key in kept:
            return kept[key]
        conv = self.conversations(ds, [rec], [policy] if policy is not None else None)[0]
        enc = {k: v for k, v in encode(self.processor, [conv], add_generation_prompt=True).items() if v is not None}
        if key in self.__dict__.get("_keep", ()):
            kept[key] = enc
        return enc

    def record_budget(self, recs: list[Record], desc: str) -> int:
        """The response budget of a generation over ``recs`` (the configured cap, else derived from the
        data), recorded under ``desc`` for the metrics' ``decoding`` block, also when the responses
        come from the forgetting cache instead of ``respond``."""
        from pipeline.model.prompts import response_budget

        budget = self.cfg.max_new_tokens or response_budget(self.processor.tokenizer, recs)
        self.__dict__.setdefault("budgets", {})[desc] = budget  # (test doubles skip __init__)
        return budget

    def respond(self, ds: Dataset, recs: list[Record], policies: list | None, desc: str) -> list[str]:
        from tqdm import tqdm

        from pipeline.model.decode import plain_greedy

        budget = self.record_budget(recs, desc)

        bar = tqdm(total=len(recs), desc=desc, unit="ex", file=sys.stderr, mininterval=2)
        try:
            if not self.cfg.do_sample and plain_greedy(self.model):
                return self._respond_greedy(ds, recs, policies, bar, budget)
            return self._respond_generate(ds, recs, policies, bar, budget)
        finally:
            bar.close()

    def _respond_greedy(self, ds, recs, policies, bar, budget: int) -> list[str]:
        from pipeline.io import stable_hash
        from pipeline.model import decode as D

        tok = self.processor.tokenizer
        img_id = D.image_token_id(self.model)

        def prompts():
            for s in range(0, len(recs), self.WINDOW):
                idx = list(range(s, min(len(recs), s + self.WINDOW)))
                encs = {i: self.encoded(ds, recs[i], policies[i] if policies else None) for i in idx}
                shared: dict = {}  # the records of one policy share its prefilled prefix
                groups: dict = {}
                for i in idx:
                    if policies and policies[i] is not None:
                        groups.setdefault(self.encoding_key(ds, recs[i], policies[i])[2], []).append(i)
                for pol, members in groups.items():
                    k = D.shared_prefix_len([encs[i] for i in members], img_id)
                    if k > 0:
                        name = (pol, k, stable_hash(encs[members[0]]["input_ids"][0, :k].tolist()))
                        shared.update({i: (name, k) for i in members})
                for i in sorted(idx, key=lambda i: encs[i]["input_ids"].shape[1]):
                    name, k = shared.get(i, (None, 0))
                    yield D.Prompt(i, encs[i], name, k)

        out = D.greedy(self.model, prompts(), max(1, self.cfg.batch_size), budget,
                       [tok.convert_tokens_to_ids("<|im_end|>")], on_done=lambda key, ids: bar.update(1))
        return self.processor.batch_decode([out[i] for i in range(len(recs))], skip_special_tokens=True)

    def _respond_generate(self, ds, recs, policies, bar, budget: int) -> list[str]:
        from pipeline.model import generate_ids
        from pipeline.model.prefix import left_pad_cat

        encs = [self.encoded(ds, r, policies[i] if policies else None) for i, r in enumerate(recs)]
        # batches of prompts with the same inputs (images or not), each sorted by length: little padding
        order = sorted(range(len(recs)), key=lambda i: (tuple(sorted(encs[i])), encs[i]["input_ids"].shape[1]))
        bs = max(1, self.cfg.batch_size)
        pad = self.processor.tokenizer.pad_token_id or 0
        texts: list = [None] * len(recs)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < bs and set(encs[order[j]]) == set(encs[order[i]]):
                j += 1
            chunk = order[i:j]
            ids = generate_ids(self.model, self.processor, left_pad_cat([encs[k] for k in chunk], pad),
                               budget, self.cfg.do_sample, self.cfg.temperature, self.cfg.top_p)
            for k, t in zip(chunk, self.processor.batch_decode(ids, skip_special_tokens=True)):
                texts[k] = t
            bar.update(len(chunk))
            i = j
        return texts


# ----------------------------------------------------------------------------- scoring


def score_rows(recs: list[Record], responses: list[str], policies: dict, kind: str, sim=None) -> list[dict]:
    """Per-example prediction rows (the JSONL written for every suite); ``sim`` = GTA text scorer."""
    from pipeline.model.prompts import format_ok, parse_answer

    if sim is None and any(r.task == "gta" for r in recs):
        from pipeline.evaluate.gta_scoring import text_similarity

        sim = text_similarity(prefer="token_f1")
    rows = []
    for r, text in zip(recs, responses):
        pred = parse_answer(text)
        row = {"id": r.id, "task": r.task, "policy": r.policy, "prompt": kind, "depth": r.meta.get("depth"),
               "qtype": r.meta.get("qtype"), "response": text, "pred": pred, "gold": r.answer,
               "format_ok": format_ok(text)}
        if r.task == "gta":
            from pipeline.evaluate.gta_scoring import parse_tool_call, score_call

            gold = parse_tool_call(r.answer)
            pol = policies.get(r.policy)
            schema = pol.tool_schema(gold["name"]) if gold and hasattr(pol, "tool_schema") else None
            # strict: only the boxed answer counts, like the exact match of ClevrPolicy
            s = score_call(pred, r.answer, schema, sim)
            row.update(tool_acc=s["tool"], arg_score=s["args"], overall=s["overall"], parsed=s["parsed"],
                       scorer=sim.name if sim else None, correct=s["overall"] == 1.0)
        else:
            row["correct"] = M.exact_match(pred, r.answer)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Suite metrics from prediction rows: per task, plus the headline ``score``."""
    out: dict[str, Any] = {}
    clevr = [r for r in rows if r["task"] == "clevr"]
    gta = [r for r in rows if r["task"] == "gta"]
    if clevr:
        out["clevr"] = {"accuracy": M.accuracy(r["correct"] for r in clevr), "n": len(clevr),
                        "format_rate": M.accuracy(r["format_ok"] for r in clevr),
                        "answered": M.accuracy(r["pred"] is not None for r in clevr),
                        "by_policy": M.grouped_accuracy(clevr, "policy"),
                        "by_depth": M.grouped_accuracy(clevr, "depth")}
    if gta:
        out["gta"] = {"tool_acc": M.mean([100.0 * r["tool_acc"] for r in gta]),
                      "arg_score": M.mean([100.0 * r["arg_score"] for r in gta]),
                      "n": len(gta), "format_rate": M.accuracy(r["format_ok"] for r in gta),
                      "scorer": gta[0].get("scorer")}
        out["gta"]["overall"] = M.mean([out["gta"]["tool_acc"], out["gta"]["arg_score"]])
    out["score"] = M.mean([out.get("clevr", {}).get("accuracy"), out.get("gta", {}).get("overall")])
    return out


# ----------------------------------------------------------------------------- suites


class Evaluation:
    """Runs the selected suites for one model over several datasets; collects metrics and rows."""

    def __init__(self, runner: Runner, datasets: list[Dataset], cfg: EvalConfig, preds_dir: Path):
        self.runner, self.datasets, self.cfg, self.preds = runner, datasets, cfg, preds_dir
        self.metrics: dict[str, Any] = {"model": runner.model_dir, "suites": [], "test_sets": {},
                                        "decoding": {"do_sample": cfg.do_sample, "max_new_tokens": runner.budgets}}
        self._main_rows: list[dict] | None = None
        self._main_recs: list[Record] = []
        self._sim = None
        self.probes_dir: Path | None = None
        self.cache_dir: str | None = None
        """Forgetting-suite response cache (``cache.py``); None = off."""
        if "efficiency" in cfg.suites and hasattr(runner, "keep_encodings"):
            from pipeline.evaluate.efficiency import timed_prompts

            # the efficiency suite times prompts main / in_context encode anyway: keep those encodings
            runner.keep_encodings(runner.encoding_key(ds, r, pol) for ds, r, pol in timed_prompts(self))

    def score(self, recs: list[Record], texts: list[str], kind: str) -> list[dict]:
        if self._sim is None and any(r.task == "gta" for r in recs):
            from pipeline.evaluate.gta_scoring import text_similarity

            self._sim = text_similarity(self.cfg.gta_bertscore_model or None, self.cfg.gta_text_scorer)
        return score_rows(recs, texts, self.runner.policies, kind, self._sim)

    def _records(self, split: str) -> list[tuple[Dataset, list[Record]]]:
        out = []
        for ds in self.datasets:
            recs = [r for r in split_records(ds, split, self.cfg.max_examples) if r.task in ("clevr", "gta")]
            if recs:
                self.metrics["test_sets"][dataset_key(ds.root / f"{split}.jsonl")] = file_hash(ds.root / f"{split}.jsonl")
                out.append((ds, recs))
        return out

    def _write(self, suite: str, rows: list[dict]) -> None:
        write_jsonl(self.preds / f"{suite}.jsonl", rows)

    def run_main(self) -> list[dict]:
        if self._main_rows is None:
            rows = []
            for ds, recs in self._records("test"):
                for r in recs:
                    self.runner.policy_of(r, ds.root / "test.jsonl")  # stale data fails before generating
                texts = self.runner.respond(ds, recs, None, f"main {ds.name}")
                rows += self.score(recs, texts, "policy-free")
                self._main_recs += recs
            self._main_rows = rows
            self._write("main", rows)
        return self._main_rows

    def main(self) -> dict:
        return summarize(self.run_main())

    def in_context(self) -> dict:
        rows = []
        for ds, recs in self._records("test"):
            pols = [self.runner.policy_of(r, ds.root / "test.jsonl") for r in recs]
            rows += self.score(recs, self.runner.respond(ds, recs, pols, f"in_context {ds.name}"), "policy-in-context")
        self._write("in_context", rows)
        return summarize(rows)

    def override(self) -> dict | None:
        from pipeline.policy import load_policy, resolve_policy

        rows, found, loaded = [], False, {}
        for ds, recs in self._records("override"):
            found = True
            pols = []
            for r in recs:
                ref = r.meta.get("override_policy")
                if not ref:
                    raise input_error(ds.root / "override.jsonl", f"{r.id}.meta.override_policy",
                                      "the path of the updated policy spec")
                # the generators write override_policies/<name>.yaml; a tampered record must not
                # make evaluation read a spec from elsewhere (absolute, '..', a symlink out)
                p = (ds.root / ref).resolve()
                if not p.is_relative_to(Path(ds.root).resolve()):
                    raise input_error(ds.root / "override.jsonl", f"{r.id}.meta.override_policy",
                                      "a spec path inside the dataset directory", ref)
                pol = loaded[p] = loaded[p] if p in loaded else load_policy(p)
                if pol.name != r.policy:
                    raise input_error(p, "name", f"the original policy name {r.policy!r} (published under it)", pol.name)
                pols.append(resolve_policy(r, {pol.name: pol}, ds.root / "override.jsonl"))
            rows += self.score(recs, self.runner.respond(ds, recs, pols, f"override {ds.name}"), "override-in-context")
        if not found:
            print("evaluate: override suite skipped: no override.jsonl in the datasets", file=sys.stderr)
            return None
        self._write("override", rows)
        return summarize(rows)

    def referral(self) -> dict | None:
        rows = [r for r in self.run_main() if r["task"] == "clevr"]
        if not rows:
            print("evaluate: referral suite skipped: no ClevrPolicy test records", file=sys.stderr)
            return None
        by_id = {r.id: r for r in self._main_recs}
        out_rows, examples, known, model_d, gold_d = [], [], [], [], []
        for row in rows:
            rec = by_id[row["id"]]
            cited = M.cited_conditions(row["response"])
            gold_path = M.gold_path_ids(rec.meta.get("gold_path"))
            # the synthesized gold CoT is the paper's reference distribution; the gold path when none is stored
            gold_cited = M.cited_conditions(rec.cot) if rec.cot else gold_path
            pol = self.runner.policies.get(rec.policy)
            ids = list(getattr(pol, "nodes", {}) or []) or None
            examples.append((cited, gold_path))
            known.append(ids)
            model_d.append((rec.policy, cited))
            gold_d.append((rec.policy, gold_cited))
            out_rows.append({"id": rec.id, "policy": rec.policy, "cited": cited, "gold_path": gold_path,
                             "gold_cited": gold_cited, "correct": row["correct"]})
        res = M.referral_scores(examples, known)
        res["branching_error"] = M.branching_error(model_d, gold_d)
        res["n"] = len(rows)
        if self.cfg.judge_url:
            from pipeline.evaluate.judge import judge_referral

            res["judge"] = judge_referral(self.cfg, [(by_id[r["id"]], r["response"]) for r in rows], self.runner)
        self._write("referral", out_rows)
        return res

    def forgetting(self, baseline_factory=None, baseline_dir: str | None = None) -> dict | None:
        """Probe accuracy of the baseline (before) and this model (after); drop = before - after.

        The headline ``drop`` is the mean of the probe set's drop and each benchmark's drop, so a
        large user benchmark does not drown the probe set (inputs and scoring: ``probes.py``).
        With ``cache_dir`` set, greedy responses are looked up by content hash first
        (``cache.py``): the baseline's are generated once for every evaluation that probes it, and
        it is not even loaded when they are cached (``baseline_dir`` names it without loading).
        """
        sets = probe_sets(self.probes_dir, self.cfg)
        if not sets:
            print("evaluate: forgetting suite skipped: no probe set (" + str(self.probes_dir) + "/test.jsonl) "
                  "and no evaluate.benchmarks", file=sys.stderr)
            return None
        from pipeline.evaluate.cache import cached_responses

        loaded: dict = {"after": self.runner}

        def runner_for(when: str):
            if when not in loaded:  # the baseline is loaded only when a response is not in the cache
                loaded[when] = baseline_factory()
            return loaded[when]

        if baseline_factory is None:
            print("evaluate: forgetting: no --baseline-model, reporting 'after' only (no drop)", file=sys.stderr)
        elif baseline_dir is None or not self.cache_dir:
            runner_for("before")
        base_name = baseline_dir or (loaded["before"].model_dir if "before" in loaded else None)
        out: dict[str, Any] = {"baseline_model": base_name if baseline_factory else None, "sets": {}}
        rows_all = []
        for name, src, recs in sets:
            self.metrics["test_sets"][name] = src.hash
            res = {}
            for when, model_dir in (("before", base_name), ("after", self.runner.model_dir)):
                if when == "before" and baseline_factory is None:
                    continue
                desc = f"forgetting {name} ({when})"
                if self.cache_dir and model_dir is not None:
                    texts, hit = cached_responses(self.cache_dir, model_dir, self.cfg, src, recs,
                                                  lambda: runner_for(when).respond(src, recs, None, desc))
                    if hit:
                        print(f"evaluate: {desc}: {len(recs)} responses of {model_dir} from the cache "
                              f"({self.cache_dir})", file=sys.stderr)
                        if when == "after":  # the metrics record the budget as if generated
                            self.runner.record_budget(recs, desc)
                else:
                    texts = runner_for(when).respond(src, recs, None, desc)
                rows = probe_rows(recs, texts, when, name)
                rows_all += rows
                res[when] = {"accuracy": M.accuracy(r["correct"] for r in rows), "n": len(rows),
                             "by_qtype": M.grouped_accuracy(rows, "qtype")}
            res["drop"] = M.drop(res.get("before", {}).get("accuracy"), res["after"]["accuracy"])
            if "before" in res:
                res["drop_by_qtype"] = {k: M.drop(v, res["after"]["by_qtype"].get(k))
                                        for k, v in res["before"]["by_qtype"].items()}
            out["sets"][name] = res
        out["after"] = M.mean(s["after"]["accuracy"] for s in out["sets"].values())
        out["before"] = M.mean(s.get("before", {}).get("accuracy") for s in out["sets"].values())
        out["drop"] = M.mean(s["drop"] for s in out["sets"].values())
        self._write("forgetting", rows_all)
        return out

    def efficiency(self) -> dict | None:
        from pipeline.evaluate.efficiency import measure

        return measure(self)


# ----------------------------------------------------------------------------- CLI


def configure_evaluate(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir to evaluate (e.g. models/rl)")
    p.add_argument("--data", action="append", required=True, help="dataset dir (repeatable: data/clevr, data/gta)")
    p.add_argument("--probes", default="data/generic", help="policy-free probe set for the forgetting suite")
    p.add_argument("--policies", default="policies", help="policy specs (names referenced by the records)")
    p.add_argument("--baseline-model", default=None, help="the model the run started from (forgetting 'before')")
    p.add_argument("--suites", default=None, help="comma-separated subset of " + ",".join(ALL_SUITES))
    p.add_argument("--out", default="metrics/eval.json", help="metrics JSON (flat enough for `dvc metrics show`)")
    p.add_argument("--preds", default="reports/preds/rl", help="directory for per-example predictions (JSONL)")
    p.add_argument("--plots", default=None, help="directory for plot data CSVs (default: <preds>/plots)")
    p.add_argument("--cache-dir", default=".trimpi/cache",
                   help="content-keyed cache of forgetting-suite responses (pipeline/evaluate/cache.py); '' = off")


def run_evaluate(args) -> int:
    from pipeline.config import load_base, load_section
    from pipeline.policy import load_policies

    cfg = load_section(EvalConfig, "evaluate", args.params, args.overrides)
    if args.suites:
        cfg = dataclasses.replace(cfg, suites=[s.strip() for s in args.suites.split(",") if s.strip()])
    bad = [s for s in cfg.suites if s not in ALL_SUITES]
    if bad:
        raise input_error("--suites" if args.suites else args.params, "evaluate.suites", "any of " + ", ".join(ALL_SUITES), bad[0])
    base = load_base(args.params)
    import torch

    torch.manual_seed(base.seed)
    policies = load_policies(args.policies)
    datasets = open_datasets(args.data, cfg.multimodal_policy)
    preds = Path(args.preds)
    preds.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.model, cfg, policies, base.threads)
    ev = Evaluation(runner, datasets, cfg, preds)
    ev.probes_dir = Path(args.probes) if args.probes else None
    ev.cache_dir = args.cache_dir or None
    ev.metrics["variant"] = preds.name
    for suite in [s for s in ALL_SUITES if s in cfg.suites]:
        if suite == "forgetting":
            res = ev.forgetting((lambda: Runner(args.baseline_model, cfg, policies, base.threads))
                                if args.baseline_model else None, baseline_dir=args.baseline_model)
        else:
            res = getattr(ev, suite)()
        if res is not None:
            ev.metrics[suite] = res
            ev.metrics["suites"].append(suite)
    write_plots(ev.metrics, Path(args.plots) if args.plots else preds / "plots")
    atomic_write_json(args.out, ev.metrics)
    print_summary(ev.metrics, args.out)
    return 0


def write_plots(metrics: dict, out: Path) -> None:
    """Plot data: accuracy per depth and per policy for each suite (CSV, DVC ``plots``)."""
    out.mkdir(parents=True, exist_ok=True)
    for what in ("by_depth", "by_policy"):
        lines = [f"suite,{what[3:]},accuracy"]
        for suite in ("main", "in_context", "override"):
            for k, v in (metrics.get(suite, {}).get("clevr", {}).get(what) or {}).items():
                lines.append(f"{suite},{k},{'' if v is None else v}")
        atomic_write_text(out / f"{what[3:]}.csv", "\n".join(lines) + "\n")


def print_summary(metrics: dict, out: str) -> None:
    keys = ["main.score", "main.clevr.accuracy", "main.gta.overall", "in_context.score", "override.score",
            "referral.precision", "referral.recall", "referral.branching_error", "forgetting.drop",
            "efficiency.token_reduction_pct", "efficiency.prefill_reduction_pct"]
    print(f"evaluate: {metrics['model']} -> {out}")
    for k in keys:
        v = get_dotted(metrics, k)
        if v is not None:
            print(f"  {k:<34} {v}")
