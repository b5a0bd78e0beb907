"""Optional LLM judge for policy referral (the paper's 0-10 score), over any OpenAI-compatible endpoint.

Off by default (``evaluate.judge_url`` empty) and never required: the exact, judge-free referral
metrics are always computed. A failing judge is counted in ``referral.judge.errors``, never fatal.
The API key, if the endpoint needs one, comes from ``OPENAI_API_KEY`` in the environment only.
"""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.request

from pipeline.evaluate import metrics as M

JUDGE_PROMPT = (
    "You grade how faithfully a response follows and cites a policy. Policy:\n{policy}\n\n"
    "Gold answer: {gold}\n\nResponse:\n{response}\n\n"
    "Score 0-10: 10 = reasons exactly along the policy's relevant conditions and cites them correctly; "
    "0 = ignores or contradicts the policy. Reply with the number only.")


def judge_referral(cfg, items: list, runner) -> dict:
    """The paper's 0-10 referral score from an OpenAI-compatible endpoint; failures are counted, never fatal."""
    url = cfg.judge_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
    scores, errors = [], 0
    for rec, response in items[:cfg.judge_max_examples]:
        pol = runner.policies.get(rec.policy)
        prompt = JUDGE_PROMPT.format(policy=pol.render().text if pol else "(unknown)", gold=rec.answer,
                                     response=response)
        body = json.dumps({"model": cfg.judge_model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=60) as resp:
                content = json.loads(resp.read())["choices"][0]["message"]["content"]
            m = re.search(r"\b(10|[0-9])(?:\.\d+)?\b", content)
            if not m:
                raise ValueError(f"no 0-10 score in {content[:80]!r}")
            scores.append(float(m.group(0)))
        except Exception as e:  # noqa: BLE001 - the judge is optional: count and go on
            errors += 1
            if errors == 1:
                print(f"evaluate: judge {cfg.judge_url} failed ({type(e).__name__}: {e}); continuing", file=sys.stderr)
    return {"score": M.mean(scores), "n": len(scores), "errors": errors, "model": cfg.judge_model}
