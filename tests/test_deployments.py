"""prefect.yaml's deployments, run the way a user runs them: `make serve`'s script starts a real
Prefect server and worker on 127.0.0.1 in a temporary project, and `prefect deployment run`
triggers the flows. The MLflow store is the project's own SQLite file, as `lmpipe run` makes it."""
from __future__ import annotations

import importlib
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, lay_out_tiny_project
from servers import prefect_stack

DEPLOYMENTS = {"lmpipe-pipeline/default": "flows/pipeline.py:pipeline",
               "lmpipe-resume/default": "flows/resume.py:resume",
               "lmpipe-generate/default": "flows/generate.py:generate",
               "lmpipe-ab/default": "flows/ab.py:ab_test"}


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_declares_each_flow_on_the_local_pool():
    spec = _prefect_yaml()
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": "{{ $LMPIPE_PROJECT_DIR }}"}}]
    declared = {}
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] == "lmpipe-local" and d["enforce_parameter_schema"]
        path, func = d["entrypoint"].split(":")
        if not (REPO / path).exists():  # flows/ab.py comes with the A/B flow
            continue
        fn = getattr(importlib.import_module(path[:-3].replace("/", ".")), func)
        declared[f"{fn.name}/{d['name']}"] = d["entrypoint"]
        assert set(d.get("parameters", {})) <= set(fn.parameters.properties), d["entrypoint"]
    assert declared == {k: v for k, v in DEPLOYMENTS.items() if (REPO / v.split(":")[0]).exists()}
    nightly = spec["deployments"][0]["schedules"]
    assert [s["active"] for s in nightly] == [False] and nightly[0]["cron"]


def test_serve_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--port",
                              str(port)], capture_output=True, text=True, env=cli_env())
    assert out.returncode == 2
    assert out.stderr == (f"serve: error: port {port} on 127.0.0.1 is in use; pick another with "
                          "'make serve SERVE_PORT=N' (or --port N)\n")


# --- the real stack ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """A tiny project served by scripts/serve.py (server, pool, the pipeline, generate and resume
    deployments, one worker), with no MLFLOW_TRACKING_URI: the flows use the project's store."""
    project = lay_out_tiny_project(tmp_path_factory.mktemp("deployed"))
    (project / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    (project / "flows").symlink_to(REPO / "flows")
    env = {k: v for k, v in cli_env(OMP_NUM_THREADS="1").items() if k != "MLFLOW_TRACKING_URI"}
    with prefect_stack(project, tmp_path_factory.mktemp("prefect-home"),
                       ["pipeline/default", "generate/default", "resume/default"], env) as stack:
        stack.project = project
        yield stack


class Ran:
    """A finished `prefect deployment run`: exit code, output, the flow run's id."""

    def __init__(self, proc, timeout: float = 600):
        out, err = proc.communicate(timeout=timeout)
        self.returncode, self.output = proc.returncode, out + err
        found = re.search(r"UUID: ([0-9a-f-]{36})", out)
        self.flow_run_id = found and found.group(1)


def _start(stack, deployment: str, *params: str, watch: bool = True):
    """Start `prefect deployment run` with --param NAME=VALUE each (Ran(...) waits for it)."""
    args = ["deployment", "run", deployment, *[a for p in params for a in ("--param", p)]]
    return stack.prefect(*args, *(["--watch"] if watch else []))


def _task_runs(stack, flow_run_id: str) -> int:
    return stack.api("POST", "/task_runs/count", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def _mlflow(project: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as db:
        return db.execute(sql, args).fetchall()


@pytest.fixture(scope="session")
def runs(deployed) -> dict[str, Ran]:
    """The pipeline with tiny overrides, and beside it (the worker runs both at once) one with a
    misspelt key."""
    started = {"pipeline": _start(deployed, "lmpipe-pipeline/default",
                                  'overrides=["train.steps=10", "checkpoint.interval=5"]'),
               "bad override": _start(deployed, "lmpipe-pipeline/default",
                                      'overrides=["train.stepz=3"]')}
    return {what: Ran(proc) for what, proc in started.items()}


@pytest.mark.slow
def test_pipeline_deployment_run_logs_a_run_and_registers_a_version(deployed, runs):
    ran = runs["pipeline"]
    assert ran.returncode == 0, ran.output
    assert "Flow run finished successfully in 'Completed'" in ran.output
    flow_run = deployed.api("GET", f"/flow_runs/{ran.flow_run_id}")
    assert flow_run["parameters"]["overrides"] == ["train.steps=10", "checkpoint.interval=5"]
    assert _task_runs(deployed, ran.flow_run_id) == 7  # the six stages and publish_report
    # the override reached training, and the run and its version are in the project's store
    (run_id,) = _mlflow(deployed.project, "SELECT run_uuid FROM runs WHERE status='FINISHED'")[0]
    steps = _mlflow(deployed.project, "SELECT max(step) FROM metrics WHERE run_uuid=?", run_id)
    assert steps[0][0] == 10
    versions = _mlflow(deployed.project, "SELECT name, version FROM model_versions WHERE run_id=?",
                       run_id)
    assert versions == [("lmpipe-gpt-corpus", 1)]
    saved = sorted(p.name for p in (deployed.project / "checkpoints").glob("*.pt"))
    assert ["_step0005_" in saved[0], "_step0010_" in saved[1]] == [True, True]


@pytest.fixture(scope="session")
def from_checkpoints(deployed, runs) -> dict[str, Ran]:
    """After the pipeline, side by side: generate from its step-10 checkpoint, and resume it for
    5 more steps."""
    assert runs["pipeline"].returncode == 0, runs["pipeline"].output
    started = {"generate": _start(deployed, "lmpipe-generate/default",
                                  "checkpoint=checkpoints/*_step0010_*.pt", "prompt=Dear",
                                  "max_new_tokens=12", "seed=3"),
               "resume": _start(deployed, "lmpipe-resume/default", "steps=5")}
    return {what: Ran(proc) for what, proc in started.items()}


@pytest.mark.slow
def test_generate_deployment_samples_a_checkpoint(deployed, from_checkpoints):
    ran = from_checkpoints["generate"]
    assert ran.returncode == 0, ran.output
    logs = deployed.api("POST", "/logs/filter",
                        {"logs": {"flow_run_id": {"any_": [ran.flow_run_id]}}})
    said = [log["message"] for log in logs if ", step 10:\nDear" in log["message"]]
    assert len(said) == 1 and len(said[0].split("\n", 1)[1]) > len("Dear")


@pytest.mark.slow
def test_unknown_deployment_parameter_is_refused_before_a_run(deployed):
    before = deployed.api("POST", "/flow_runs/count", {})
    ran = Ran(_start(deployed, "lmpipe-pipeline/default", "stepz=3", watch=False))
    assert ran.returncode == 1
    assert ("The following parameters were specified but not found on the deployment: 'stepz'"
            in ran.output)
    assert deployed.api("POST", "/flow_runs/count", {}) == before


@pytest.mark.slow
def test_bad_override_fails_the_run_with_lmpipes_one_line(deployed, runs):
    ran = runs["bad override"]
    assert ran.returncode == 1
    assert "Flow run finished in state 'Failed'" in ran.output
    state = deployed.api("GET", f"/flow_runs/{ran.flow_run_id}")["state"]
    assert state["type"] == "FAILED"
    assert state["message"].startswith("lmpipe: error: -S: unknown key 'train.stepz'; keys in "
                                       "train: steps,")
    assert "\n" not in state["message"]
    only = {"flow_run_id": {"any_": [ran.flow_run_id]}}
    logs = deployed.api("POST", "/logs/filter", {"logs": {**only, "level": {"ge_": 40}}})
    assert state["message"] in [log["message"] for log in logs]
    # refused before any stage began: no task ran, so nothing was written
    assert _task_runs(deployed, ran.flow_run_id) == 0


@pytest.mark.slow
def test_resume_deployment_trains_on_from_the_latest_checkpoint(deployed, from_checkpoints):
    ran = from_checkpoints["resume"]
    assert ran.returncode == 0, ran.output
    assert len(list((deployed.project / "checkpoints").glob("*_step0015_*.pt"))) == 1
    steps = _mlflow(deployed.project, "SELECT max(step) FROM metrics")
    assert steps[0][0] == 15
