"""`trimpi run/serve` plumbing that needs no Prefect server: prefect.yaml, the lock refusal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import load_deployment, schedules_of
from pipeline.io import InputError

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_is_a_valid_deployment_with_per_schedule_parameters():
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    dep = spec.deployments[0]
    assert dep.entrypoint == "flows/reinternalize.py:reinternalize"
    from flows.reinternalize import reinternalize  # the entrypoint resolves to the flow

    assert reinternalize.name == "reinternalize"
    crons = schedules_of(load_deployment(REPO / "prefect.yaml"))
    assert {(c.cron, tuple(sorted(c.parameters.items()))) for c in crons} == {
        ("0 2 * * *", (("force", False),)), ("0 4 * * 0", (("force", True),))}
    with pytest.raises(InputError, match="reinternalize-nightly"):
        load_deployment(REPO / "prefect.yaml", "no-such-deployment")


def test_trimpi_run_refuses_while_another_run_holds_the_workspace(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; from pipeline.lock import WorkspaceLock\n"
                               "with WorkspaceLock(sys.argv[1], command='nightly run'):\n"
                               " print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([str(Path(sys.executable).parent / "trimpi"), "run", "--workspace", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 75
        assert f"pid {holder.pid}" in r.stderr and "nightly run" in r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_stage_table_prints_each_stage_time_and_the_total():
    from flows.runner import stage_table

    stages = [{"stage": "cpt", "status": "ran", "seconds": 300.5}, {"stage": "sft", "status": "unchanged",
                                                                    "seconds": 1.5},
              {"stage": "gate", "status": "FAILED"}]
    assert stage_table(stages) == ["| stage | status | seconds |", "|---|---|---|", "| cpt | ran | 300.5 |",
                                   "| sft | unchanged | 1.5 |", "| gate | FAILED | - |", "| total | | 302 |"]
    assert stage_table([]) == []
