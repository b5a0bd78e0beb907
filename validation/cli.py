"""``trimpi validate --task clevr|gta``: run a dataset's validator, print and write the report.

Each task module exposes ``validate(data_dir, policies_dir) -> list[CheckResult]``
(``validation.clevr`` also takes the ``params.yaml: validate`` thresholds). A failed
validation exits 1 after writing the JSON report, so ``dvc repro`` stops there and the
report (a DVC metric) says why.
"""
from __future__ import annotations

TASKS = ("clevr", "gta")


def configure_validate(parser) -> None:
    parser.add_argument("--task", choices=TASKS, required=True, help="which dataset kind to validate")
    parser.add_argument("--data", required=True, help="dataset directory (e.g. data/clevr)")
    parser.add_argument("--policies", required=True, help="policies directory the labels must follow")
    parser.add_argument("--report", default=None, help="write the JSON report here (e.g. metrics/validate_clevr.json)")


def run_validate(args) -> int:
    import time

    from validation.expectations import format_report, write_report

    t = time.perf_counter()
    # plain imports, not importlib: what a stage runs stays visible to tests/test_dvc_deps.py
    if args.task == "clevr":
        from pipeline.config import load_section
        from validation.clevr import ValidateConfig, validate

        cfg = load_section(ValidateConfig, "validate", args.params, args.overrides)
        results = validate(args.data, args.policies, config=cfg)
    else:
        from validation.gta import validate

        results = validate(args.data, args.policies)
    print(format_report(results))
    extra = {"task": args.task, "data": str(args.data), "policies": str(args.policies)}
    ok = write_report(args.report, results, extra) if args.report else all(r.success for r in results)
    print(f"({time.perf_counter() - t:.1f} s{'; report: ' + args.report if args.report else ''})")
    return 0 if ok else 1
