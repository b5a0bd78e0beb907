"""``trimpi`` command line: thin. It parses, calls the library, prints.

Commands are a table from a command path to ``"module:name"``; the module is imported only
when its command runs (``trimpi --help`` imports neither torch nor Prefect). A command
module defines ``configure_<name>(parser)`` and ``run_<name>(args) -> int | None``.

Every command gets ``--params`` (default ``params.yaml``) and repeatable ``--set k=v``
overrides of its own params section. Exit codes (what the flow decides retries on):

* 0 done; 1 a check failed (validation, gate); 2 bad input, printed as
  ``error: <file>: <field>: expected ...`` (also a full disk or an unwritable output: one line
  from :func:`pipeline.io.os_error_line`); never retried, it would fail the same way.
* 75 (``EX_TEMPFAIL``) a transient failure (:class:`pipeline.io.TransientError`: storage
  unreachable after its retry budget, a busy workspace): worth retrying later.
* 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command path -> ("module:name", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("policy", "new"): ("pipeline.policy.cli:new", "sample new ClevrPolicy decision trees into policies/"),
    ("policy", "render"): ("pipeline.policy.cli:render", "print the exact in-context text of a policy"),
    ("policy", "list"): ("pipeline.policy.cli:list", "list policies with their versions (content hashes)"),
    ("policy", "resolve"): ("pipeline.policy.cli:resolve", "GTAPolicy: which versioned tool a profile must call"),
    ("policy", "diff"): ("pipeline.policy.diff:diff", "what changed between two policy revisions, and which labels flip"),
    ("generate", "clevr"): ("pipeline.data.clevr_policy:generate", "build the ClevrPolicy datasets"),
    ("generate", "gta"): ("pipeline.data.gta_policy:generate", "build the GTAPolicy datasets"),
    ("generate", "generic"): ("pipeline.data.generic_qa:generate", "build policy-free perception/text QA data"),
    ("validate",): ("validation.cli:validate", "validate a dataset (great-expectations + re-derived labels)"),
    ("model", "init"): ("pipeline.model.presets:init", "build/load the base model preset into a checkpoint dir"),
    ("train", "base"): ("pipeline.train.base:train", "perception pretraining of the tiny base (policy-free)"),
    ("train", "cpt"): ("pipeline.train.cpt:train", "stage 1: visually-masked continual pretraining"),
    ("train", "sft"): ("pipeline.train.sft:train", "stage 2: CoT SFT (or --direct answer-only baseline)"),
    ("train", "rl"): ("pipeline.train.rl:train", "stage 3: GRPO/DAPO with PolicyRollout"),
    ("evaluate",): ("pipeline.evaluate.suites:evaluate", "run the evaluation suites on a checkpoint"),
    ("gate",): ("pipeline.evaluate.gate:gate", "check evaluation metrics against the gates"),
    ("promote",): ("pipeline.registry:promote", "register a gated model and move the production alias"),
    ("registry", "list"): ("pipeline.registry:list", "list registered model versions"),
    ("registry", "show"): ("pipeline.registry:show", "show one version's card and metrics"),
    ("registry", "rollback"): ("pipeline.registry:rollback", "point production back at an earlier version"),
    ("report",): ("pipeline.evaluate.report:report", "results table across variants and seeds"),
    ("run",): ("flows.cli:run", "the main job: reinternalize the policies end to end (Prefect + DVC)"),
    ("serve",): ("flows.cli:serve", "serve the scheduled reinternalize deployment locally"),
    ("ui",): ("flows.cli:ui", "start a local Prefect server + UI"),
}


def _top_help() -> str:
    lines = ["usage: trimpi <command> [<subcommand>] [options]", "",
             "Internalize policies into a vision-language model (TriMPI).", "", "commands:"]
    for path, (_, h) in COMMANDS.items():
        lines.append(f"  {' '.join(path):<20} {h}")
    lines += ["", "Run `trimpi <command> --help` for a command's options."]
    return "\n".join(lines)


def _find(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            return key, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    found = _find(argv)
    if found is None:
        group = [" ".join(p) for p in COMMANDS if p[0] == argv[0]]
        hint = f" (did you mean: {', '.join(group)})" if group else ""
        print(f"error: unknown command {' '.join(argv[:2])!r}{hint}\n\n{_top_help()}", file=sys.stderr)
        return 2
    path, rest = found
    target, helptext = COMMANDS[path]
    mod_name, name = target.split(":")
    parser = argparse.ArgumentParser(prog="trimpi " + " ".join(path), description=helptext)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of this command's params section (repeatable)")
    from pipeline.io import EX_SOFTWARE, EX_TEMPFAIL, InputError, TransientError, os_error_line

    try:
        mod = importlib.import_module(mod_name)
        getattr(mod, f"configure_{name}")(parser)
        args = parser.parse_args(rest)
        rc = getattr(mod, f"run_{name}")(args)
    except TransientError as e:
        print(f"error: {e} (transient: retry later)", file=sys.stderr)
        return EX_TEMPFAIL
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns a crash into its own exit code
        line = os_error_line(e) if isinstance(e, OSError) else None
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__} (a bug; exit {EX_SOFTWARE})", file=sys.stderr)
        return EX_SOFTWARE
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
