"""MLflow on PostgreSQL: `make mlflow-server DB=postgres`'s script (scripts/mlflow_server.py) makes
a PostgreSQL cluster in the project from the binaries on PATH and runs `mlflow server` over it. A
tiny pipeline registers a version through that server, a second process loads it by version, and
the runs and the version are rows in PostgreSQL. Bad input (ports in use, no binaries) is one line.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_env, lay_out_tiny_project
from servers import free_port, group_alive, kill_groups, wait_for_line

SCRIPT = REPO / "scripts" / "mlflow_server.py"
NAME = "lmpipe-gpt-corpus"  # the tiny project's registered model (model type, corpus file)
PG_MISSING = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
needs_postgres = pytest.mark.skipif(
    bool(PG_MISSING), reason=f"no PostgreSQL server binaries on PATH ({', '.join(PG_MISSING)} "
                             "missing): apt-get install postgresql, or brew install postgresql@15")

# prepare → tokenizer → train → evaluate → register in one process, as the Prefect flow runs them.
# It starts with the server: the imports, prepare and tokenizer overlap the server's start-up
# (~15 s of MLflow's migrations on a new database); training waits for GET /health.
PIPELINE = """
import json, os, time, urllib.request
import mlflow, torch
from lmpipe import stages
from lmpipe.config import load_config
cfg = load_config("params.yaml", ["train.steps=10"])
stages.prepare(cfg)
stages.build_tokenizer(cfg)
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/health", timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.25)
info = stages.train(cfg)
result = stages.register(cfg, info, stages.evaluate(cfg, info))
print(json.dumps({"run_id": info["run_id"], **result}))
"""


@dataclass
class Server:
    proc: subprocess.Popen
    project: Path
    log: Path
    url: str
    taken_pg_port: int  # the --pg-port asked for, held by the test: the server must use another
    registered: dict  # what PIPELINE printed: run_id, name, version, ...


def _client_env(url: str) -> dict[str, str]:
    """lmpipe's environment, pointed at the tracking server."""
    return cli_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=url)


def _start(project: Path, *args: str) -> subprocess.Popen:
    log = project / "server.log"
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=project, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=cli_env(PYTHONPATH=str(REPO)))


def _postmaster(project: Path) -> int | None:
    pidfile = project / "mlflow-server" / "postgres" / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


def _stop(proc: subprocess.Popen, project: Path) -> list[int]:
    """Ctrl-C, as a user stops `make mlflow-server`; returns what was still alive after it (the
    script's group, PostgreSQL's postmaster, a session leader of its own), then kills that."""
    postmaster = _postmaster(project)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    survivors = [g for g in (proc.pid, postmaster) if g is not None and group_alive(g)]
    kill_groups(survivors)
    proc.wait()
    return survivors


@pytest.fixture(scope="module")
def pg_server():
    """The script's PostgreSQL + MLflow on free ports, in a tiny project, asked for a PostgreSQL
    port that is in use, and PIPELINE run against it. Stopped by Ctrl-C, then by PID, even when
    a test fails."""
    # Not under pytest's mode-700 temp folder: as root, the script runs PostgreSQL as user
    # postgres (it refuses root), which must be able to enter the project.
    root = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
    root.chmod(0o755)
    project = lay_out_tiny_project(root)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mlflow_port = free_port()
        proc = _start(project, "--db", "postgres", "--port", str(mlflow_port), "--pg-port",
                      str(port))
        url, pipeline = f"http://127.0.0.1:{mlflow_port}", None
        try:
            with open(project / "pipeline.out", "w") as out, \
                    open(project / "pipeline.err", "w") as err:
                pipeline = subprocess.Popen([sys.executable, "-c", PIPELINE], cwd=project,
                                            env=_client_env(url), stdout=out, stderr=err)
            wait_for_line(project / "server.log", rf"mlflow-server: serving {url} ", proc, 120)
            code = pipeline.wait(timeout=180)
            assert code == 0, (project / "pipeline.err").read_text()[-3000:]
            registered = json.loads((project / "pipeline.out").read_text().splitlines()[-1])
            yield Server(proc, project, project / "server.log", url, port, registered)
        finally:
            if pipeline is not None and pipeline.poll() is None:
                pipeline.kill()
                pipeline.wait()
            survivors = _stop(proc, project)
            shutil.rmtree(root, ignore_errors=True)
            assert not survivors, f"left running after Ctrl-C: {survivors}"


@pytest.mark.slow
@needs_postgres
def test_a_version_registered_through_postgres_loads_in_a_second_process(pg_server):
    import psycopg2

    result = pg_server.registered
    assert (result["name"], str(result["version"])) == (NAME, "1")

    sample = subprocess.run(
        [sys.executable, "-m", "lmpipe", "generate", "--checkpoint", f"models:/{NAME}/1",
         "--prompt", "Dear Agnes,", "--max-new-tokens", "8"],
        cwd=pg_server.project, env=_client_env(pg_server.url), capture_output=True, text=True,
        timeout=120)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "Dear Agnes," in sample.stdout

    # The rows are in PostgreSQL (password from the script's pgpass), the files in its artifacts/.
    server_dir = pg_server.project / "mlflow-server"
    port = int((server_dir / "postgres" / "postmaster.pid").read_text().split("\n")[3])
    with psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="mlflow",
                          passfile=str(server_dir / "pgpass")) as db, db.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (result["run_id"],))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT version FROM model_versions WHERE name = %s", (NAME,))
        assert cur.fetchall() == [(1,)]
    assert list((server_dir / "artifacts").rglob("MLmodel")), "no model files in artifacts/"


@pytest.mark.slow
@needs_postgres
def test_a_postgres_port_in_use_is_one_line_and_another_port_is_used(pg_server):
    lines = [ln for ln in pg_server.log.read_text().splitlines() if "is in use" in ln]
    assert len(lines) == 1, lines
    used = int(lines[0].split("using ")[1].split()[0])
    assert lines[0] == (f"mlflow-server: PostgreSQL port {pg_server.taken_pg_port} on 127.0.0.1 "
                        f"is in use; using {used} instead (choose one with PGPORT=N)")
    assert f"postgresql+psycopg2://mlflow@127.0.0.1:{used}/mlflow" in pg_server.log.read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", used)) == 0  # PostgreSQL listens there


# --- bad input, refused before anything is written -----------------------------------------------

def _refused(project: Path, path: str, *args: str) -> str:
    """The script's stderr, after checking: exit code 2, one line, nothing written."""
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=project, text=True,
                          capture_output=True, timeout=60, env=cli_env(PATH=path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
    assert not (project / "mlflow-server").exists()
    return done.stderr


def test_an_mlflow_port_in_use_is_refused_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _refused(tmp_path, os.environ["PATH"], "--port", str(port))
    assert err == (f"mlflow-server: error: port {port} on 127.0.0.1 is in use; pick another with "
                   "'make mlflow-server PORT=N' (or --port N)\n")


def test_no_postgres_binaries_is_one_line_saying_what_to_install(tmp_path):
    err = _refused(tmp_path, str(tmp_path), "--db", "postgres", "--port", str(free_port()))
    assert "initdb, pg_ctl, postgres on PATH" in err and "apt-get install postgresql" in err
    assert "brew install postgresql@15" in err
