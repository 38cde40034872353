"""A registered version served as users serve it: `lmpipe serve models:/<name>@champion`, which
execs the real `mlflow models serve --env-manager local` on 127.0.0.1, answering real HTTP requests
in the three payload formats, with per-request params, and a 400 that names the problem for each bad
request while the server keeps answering. And the one line `lmpipe serve` gives instead of a server
when the version's checkpoint artifact is gone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TINY_PARAMS, cli_env, lay_out_tiny_project

pytestmark = pytest.mark.slow
PROMPT = "Dear Agnes,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny project with one registered version, aliased champion: (project dir, model name)."""
    import mlflow

    from lmpipe import stages
    from lmpipe.config import load_config

    root = lay_out_tiny_project(tmp_path_factory.mktemp("serving"))
    (root / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
        cfg = load_config("params.yaml", ["train.steps=10", "tracking.log_checkpoints=false"],
                          env={})
        stages.prepare(cfg)
        stages.build_tokenizer(cfg)
        info = stages.train(cfg)
        reg = stages.register(cfg, info, stages.evaluate(cfg, info))
        mlflow.MlflowClient().set_registered_model_alias(reg["name"], "champion", reg["version"])
    return root, reg["name"]


@pytest.fixture(scope="module")
def server(registered):
    """`lmpipe serve` on a free port, in its own process group; the base URL. Stopped (the whole
    group) even when a test fails."""
    root, name = registered
    port = free_port()
    log = open(root / "serve.log", "w")
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db", PYTHONPATH=str(REPO),
                  OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmpipe", "serve", f"models:/{name}@champion",
                             "--port", str(port)], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, root / "serve.log")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)
        log.close()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the server did not answer /ping in {timeout} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (lmpipe → mlflow → uvicorn), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def post(url: str, body) -> tuple[int, dict | list]:
    """POST /invocations; (status, decoded JSON answer), errors included."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_three_payload_formats_and_the_params(server):
    url, _ = server
    params = {"max_new_tokens": 5}
    for body in ({"dataframe_split": {"columns": ["prompt"], "data": [[PROMPT], ["I have"]]},
                  "params": params},
                 {"dataframe_records": [{"prompt": PROMPT}, {"prompt": "I have"}],
                  "params": params},
                 {"inputs": {"prompt": [PROMPT, "I have"]}, "params": params}):
        status, answer = post(url, body)
        assert status == 200, answer
        out = answer["predictions"]
        # the char tokenizer: one token, one character
        assert [o[:-5] for o in out] == [PROMPT, "I have"] and len(out[0]) == len(PROMPT) + 5
    # without params, the signature's defaults: the registering run's generate section
    status, answer = post(url, {"inputs": {"prompt": [PROMPT]}})
    assert len(answer["predictions"][0]) == len(PROMPT) + TINY_PARAMS["generate"]["max_new_tokens"]

    def sample(**p):
        return post(url, {"dataframe_records": [{"prompt": PROMPT}],
                          "params": {"max_new_tokens": 30, **p}})[1]["predictions"][0]

    # the seed reaches the sampler, and so do temperature and top_k (top_k=1: greedy, seed-blind)
    assert sample(seed=1, temperature=2.0) == sample(seed=1, temperature=2.0)
    assert sample(seed=1, temperature=2.0) != sample(seed=2, temperature=2.0)
    assert sample(seed=1, top_k=1) == sample(seed=2, top_k=1)


@pytest.mark.parametrize("body, needle", [
    ({"dataframe_records": [{"text": PROMPT}]}, "missing inputs ['prompt']"),
    ({"dataframe_split": {"columns": ["text"], "data": [[PROMPT]]}}, "missing inputs ['prompt']"),
    ({"dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": "lots"}},
     "max_new_tokens"),
    ({"dataframe_records": [{"prompt": PROMPT}], "params": {"temperature": [1]}}, "temperature"),
    ('{"dataframe_records": [{"prompt": ', "valid JSON"),
    ({"records": [{"prompt": PROMPT}]}, "dataframe_split"),
    # what only lmpipe can check: predict's MlflowException, every problem of the request at once
    ({"dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": -3, "top_k": -1}},
     "params.max_new_tokens must be a positive integer, got -3; params.top_k must be 0"),
    ({"dataframe_records": [{"prompt": PROMPT}, {"prompt": None}, {"prompt": "Dear €"}]},
     "prompt 1 is missing (null); send a string; prompt 2: text has 1 character(s) unknown to the "
     "char tokenizer"),
])
def test_a_bad_request_gets_a_400_naming_the_problem_and_the_server_goes_on(server, body, needle):
    url, proc = server
    status, answer = post(url, body)
    assert status == 400, answer
    assert needle in answer["message"] and "stack_trace" not in answer, answer
    assert post(url, {"inputs": {"prompt": [PROMPT]}})[0] == 200 and proc.poll() is None


def test_a_param_outside_the_signature_is_dropped_by_mlflow(server):
    """MLflow's scoring server drops params the signature does not declare (a warning in the server
    log) before predict sees them: the request is answered as without it."""
    url, _ = server
    base = {"dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": 4}}
    with_unknown = {**base, "params": {"max_new_tokens": 4, "max_tokens": 99}}
    assert post(url, with_unknown) == post(url, base)


def test_serving_a_version_whose_checkpoint_artifact_was_deleted_says_so(registered, monkeypatch,
                                                                           capsys):
    """Another version of the same run, its checkpoint artifact deleted from the store: one line,
    exit 2, no server started."""
    import mlflow

    from lmpipe import stages
    from lmpipe.cli.main import main
    from lmpipe.config import load_config

    root, name = registered
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
    reg = stages.register(load_config("params.yaml", env={}))
    where = mlflow.MlflowClient().get_model_version_download_uri(name, reg["version"])
    (checkpoint,) = Path(where.removeprefix("file://"), "artifacts").glob("*.pt")
    checkpoint.unlink()
    capsys.readouterr()
    assert main(["serve", reg["uri"], "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"lmpipe: error: {reg['uri']}: "), err
    assert f"{checkpoint.name}) is missing from the artifact store" in err
    assert "register the checkpoint again" in err
    # and a URI that resolves to nothing lists what there is
    assert main(["serve", f"models:/{name}@nightly"]) == 2
    said = "has no alias 'nightly'; it has versions 1, 2 (aliases: challenger → 2, champion → 1)"
    assert said in capsys.readouterr().err
