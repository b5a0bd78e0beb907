"""Announce what a reinternalize run did: a refused gate, a failed stage, a promotion.

A team that leaves the schedule running must hear about the three outcomes that need a
person — the gate refused a candidate, a stage failed, a new model went to production —
without opening the UI. The flow builds one :class:`Event` per outcome (it knows the run,
the stage, the gate's failed checks and the policy diff) and hands it to **Prefect
notification blocks**, configured in ``params.yaml: notify``:

* ``webhooks`` — plain URLs, sent through Prefect's ``CustomWebhookNotificationBlock`` as a
  JSON POST: ``text`` (subject + body, what Slack/Mattermost-style hooks display) plus the
  structured fields (``event``, ``run``, ``stage``, ``failed_checks``, ``production``, ...).
* ``blocks`` — saved Prefect notification blocks by ``<block-type-slug>/<name>`` (Slack,
  Teams, e-mail, a custom webhook with secret headers...), created once in the UI or with
  ``prefect block create``. Secret URLs and tokens stay in Prefect's block store.

Decisions: why in the flow and not a server-side automation — an automation sees only the
flow-run state, not which gate checks failed or what the policy edit moved, and needs a
server (``trimpi run`` may run ephemeral). Messages never carry credentials: stage output
lines are passed through :func:`redact` (values of secret-named environment variables,
``user:pass@`` in URLs, ``token=...`` pairs), and target URLs are logged as scheme://host
only. A delivery that fails is a warning in the run's log; it never fails the run.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

EVENTS = ("gate_refused", "stage_failed", "promoted", "completed", "skipped")


@dataclass
class NotifyConfig:
    """``params.yaml: notify`` — who hears about a reinternalize run, and about what."""

    events: list = field(default_factory=lambda: ["gate_refused", "stage_failed", "promoted"])
    """Outcomes announced: ``gate_refused``, ``stage_failed``, ``promoted`` (also possible: ``completed``, ``skipped``)."""
    webhooks: list = field(default_factory=list)
    """URLs that get a JSON POST per event (``text`` + structured fields). Only URLs that are not secrets themselves."""
    blocks: list = field(default_factory=list)
    """Saved Prefect notification blocks, ``<block-type-slug>/<name>`` (e.g. ``slack-webhook/trimpi-alerts``)."""
    timeout_s: float = 10.0
    """Per-delivery timeout; a failed delivery is a warning in the run log, never a failed run."""


@dataclass
class Event:
    """One announcement: what happened, in which run and stage, with a readable text and structured fields."""

    kind: str
    subject: str
    body: str
    fields: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- redaction

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|API_KEY|PRIVATE", re.I)
_PAIR = re.compile(r"(?i)\b([\w.-]*(?:secret|token|password|passwd|api[_-]?key|access[_-]?key)[\w.-]*)(\s*[=:]\s*)"
                   r"(\"[^\"]*\"|'[^']*'|[^\s,;]+)")


def redact(text: str) -> str:
    """``text`` without credentials: secret env values, URL user-info, ``name=value`` pairs with secret-like names."""
    for k, v in os.environ.items():
        if _SECRET_NAME.search(k) and v and len(v) >= 6:
            text = text.replace(v, "***")
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    return _PAIR.sub(lambda m: m.group(1) + m.group(2) + "***", text)


def where(url: str) -> str:
    """A delivery target for logs: scheme and host only (a webhook's path is often its secret)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or '?'}" + (f":{u.port}" if u.port else "")


# ----------------------------------------------------------------------------- delivery


def _static(obj):
    """Structured fields go into the block's JSON template: keep ``{{`` from reading as a placeholder."""
    if isinstance(obj, str):
        return obj.replace("{{", "{ {").replace("}}", "} }")
    if isinstance(obj, dict):
        return {str(k): _static(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_static(v) for v in obj]
    return obj


def deliver(events: list[Event], cfg: NotifyConfig, warn: Callable[[str], None],
            info: Callable[[str], None] = lambda m: None) -> int:
    """Send every event whose kind is enabled to every target; returns how many deliveries succeeded."""
    wanted = [e for e in events if e.kind in cfg.events]
    if not wanted or not (cfg.webhooks or cfg.blocks):
        return 0
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    sent = 0
    for ev in wanted:
        targets = []
        for url in cfg.webhooks:
            payload = {"text": "{{subject}}\n\n{{body}}", **_static({"event": ev.kind, **ev.fields})}
            targets.append((where(str(url)), lambda url=url, payload=payload: CustomWebhookNotificationBlock(
                name="trimpi", url=str(url), json_data=payload, timeout=cfg.timeout_s)))
        for slug in cfg.blocks:
            targets.append((f"block {slug}", lambda slug=slug: _load_block(str(slug))))
        for label, make in targets:
            try:
                make().notify(body=ev.body, subject=ev.subject)
                sent += 1
                info(f"notified {label}: {ev.kind}")
            except Exception as e:  # noqa: BLE001 - an unreachable receiver must not fail the run
                warn(f"notification {ev.kind} to {label} failed: {redact(type(e).__name__ + ': ' + str(e))[:300]}")
    return sent


def _load_block(slug: str):
    from prefect.blocks.core import Block

    blk = Block.load(slug)
    if not hasattr(blk, "notify"):
        raise TypeError(f"block {slug} is not a notification block")
    return blk


# ----------------------------------------------------------------------------- building the messages


def _check_line(c: dict) -> str:
    val = "-" if c.get("value") is None else c.get("value")
    metric = f" ({c['metric']})" if c.get("metric") and c.get("metric") not in str(c.get("name")) else ""
    note = f"; {c['note']}" if c.get("note") else ""
    return f"{c.get('name')}{metric}: {val}, needs {c.get('op')} {c.get('threshold')}{note}"


def _output_lines(tail: list[str]) -> list[str]:
    """What the stage printed: DVC's echo of the command (``> cmd``) and the command in its error line dropped."""
    out = []
    for line in tail:
        if line.startswith("> "):
            continue
        out.append(re.sub(r"(failed to reproduce '[^']*'): failed to run: .*(, exited with -?\d+)$", r"\1\2", line))
    return out


def build_events(*, run: dict, status: str, reason: str, stages: list[dict], failures: dict[str, Exception],
                 gate_stage: str | None, gate: dict | None, promoted: dict | None, production_before: str | None,
                 diff_lines: list[str], notes: list[str]) -> list[Event]:
    """The events of one finished run. ``run``: ``{"name", "id", "deployment", "url", "workspace"}``.

    ``failures`` maps a failed stage (or ``dvc-push``/``flow``) to its exception; ``gate_stage`` is
    the stage that writes the gate verdict (the one whose failure means "refused").
    """
    head = (f"Run {run.get('name')} of reinternalize" + (f" (deployment {run['deployment']})"
                                                         if run.get("deployment") else " (manual run)")
            + f" in {run.get('workspace')}")
    why = f"Why it ran: {reason}."
    tail = ([f"Policy changes: {'; '.join(diff_lines)}"] if diff_lines else []) + \
        ([f"Open: {run['url']}"] if run.get("url") else [])
    prod_txt = f"production stays {production_before}" if production_before else "nothing is in production yet"
    base = {"run": run.get("name"), "flow_run_id": run.get("id"), "deployment": run.get("deployment"),
            "ui_url": run.get("url"), "status": status}
    events: list[Event] = []
    not_run = [s["stage"] for s in stages if str(s.get("status", "")).startswith("not run")]
    for stage, exc in failures.items():
        if stage == gate_stage and gate is not None and not gate.get("passed"):
            failed = [c for c in gate.get("checks", []) if not c.get("passed")]
            body = "\n".join([head, f"Stage `{stage}` refused the candidate model; {prod_txt}.",
                              "Failed gate checks:", *[f"- {_check_line(c)}" for c in failed], why, *tail])
            events.append(Event("gate_refused", f"trimpi: gate refused the model in run {run.get('name')}", body,
                                {**base, "stage": stage, "failed_checks": [
                                    {k: c.get(k) for k in ("name", "metric", "value", "op", "threshold", "note")}
                                    for c in failed], "production": production_before}))
            continue
        kind = "transient, retried" if getattr(exc, "transient", False) else "not retried"
        first = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        last = [redact(x) for x in _output_lines(getattr(exc, "tail", None) or [])[-3:]]
        body = "\n".join([head, f"Stage `{stage}` FAILED ({kind}): {first}",
                          *(["Last output lines:", *[f"  {x}" for x in last]] if last else []),
                          *([f"Not run (need the failed stage): {', '.join(not_run)}"] if not_run else []),
                          f"Consequence: {prod_txt}.", why, *notes[:3], *tail])
        events.append(Event("stage_failed", f"trimpi: stage {stage} failed in run {run.get('name')}", body,
                            {**base, "stage": stage, "error": first, "not_run": not_run,
                             "production": production_before}))
    if promoted and promoted.get("changed"):
        checks = (gate or {}).get("checks", [])
        body = "\n".join([head, f"Production is now {promoted.get('version')} (was {production_before or 'none'}): "
                                f"{redact(str(promoted.get('url')))}",
                          "Gate passed: " + ("; ".join(_check_line(c) for c in checks if c.get("status") == "pass")
                                             or "no checks recorded"), why, *tail])
        events.append(Event("promoted", f"trimpi: {promoted.get('version')} promoted to production in run "
                                        f"{run.get('name')}", body,
                            {**base, "stage": promoted.get("stage"), "production": promoted.get("version"),
                             "previous": production_before}))
    if status in ("completed", "skipped"):
        events.append(Event(status, f"trimpi: run {run.get('name')} {status}", "\n".join([head, why, *tail]),
                            {**base, "stage": None}))
    return events
