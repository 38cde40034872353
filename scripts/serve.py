"""`make serve`: a Prefect server on 127.0.0.1, the `lmpipe-local` work pool, the deployments of
prefect.yaml and one worker, all run from the project directory (the current one). Ctrl-C (or
SIGTERM) stops everything it started.

    python scripts/serve.py [--port 4200] [--deploy lmpipe-pipeline/default ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POOL = "lmpipe-local"
READY = "lmpipe: serving"  # the first line printed once everything runs (tests wait for it)
EXAMPLE = ("prefect deployment run 'lmpipe-pipeline/default' "
           "--param overrides='[\"train.steps=200\"]' --watch")


class Stop(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: one path stops everything."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prefect = _prefect()
    if _port_taken(args.port):
        print(f"serve: error: port {args.port} on 127.0.0.1 is in use; pick another with "
              f"'make serve SERVE_PORT=N' (or --port N)", file=sys.stderr)
        return 2
    env = child_env(args.port)
    # SIGINT too: a shell that starts this in the background has it ignored (Python then leaves it)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    started: list[subprocess.Popen] = []
    try:
        started.append(_start([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                               str(args.port)], env))
        wait_healthy(env["PREFECT_API_URL"], started[0], args.timeout)
        ensure_pool(prefect, env)
        deploy(prefect, env, args.deploy)
        started.append(_start([prefect, "worker", "start", "--pool", POOL], env))
        print(banner(args.port, started), flush=True)
        _wait_any(started)
        print("serve: error: a process exited; stopping the rest", file=sys.stderr)
        return 1
    except Stop:
        print("serve: stopping", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        for proc in reversed(started):  # the worker first, then the server
            stop_group(proc, terms=2 if proc is not started[0] else 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--deploy", action="append", default=[], metavar="FLOW/DEPLOYMENT",
                   help="deploy only these, named as `prefect deploy --name` takes them: the "
                        "flow's function, e.g. pipeline/default (repeatable; default: all)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server")
    return p


def _prefect() -> str:
    """The prefect beside this Python (the project's venv), else the one on PATH."""
    here = Path(sys.executable).parent / "prefect"
    return str(here) if here.exists() else (shutil.which("prefect") or "prefect")


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def child_env(port: int) -> dict[str, str]:
    """The environment of every child: the API on 127.0.0.1:port, no prompts, offline, and the
    project directory the deployments' pull step moves to."""
    from lmpipe.common.env import apply_offline_defaults

    apply_offline_defaults()
    env = dict(os.environ)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env["PREFECT_CLI_PROMPT"] = "false"
    env["LMPIPE_PROJECT_DIR"] = os.getcwd()
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # its own process group: Ctrl-C reaches this script only, which then stops each child in order
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _raise_stop(signum, frame) -> None:
    raise Stop()


def wait_healthy(api_url: str, server: subprocess.Popen, timeout: float,
                 what: str = "the Prefect server") -> None:
    """Wait until GET /health answers (a fresh database takes ~17 s to migrate: Prefect's, or
    MLflow's, for scripts/mlflow_server.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited (code {server.returncode}); its output is above")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not answer at {api_url} within {timeout:.0f} s")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RuntimeError(f"{what} failed: {' '.join(cmd[1:])} (its output is above)")


def ensure_pool(prefect: str, env: dict[str, str]) -> None:
    """Create the process work pool unless it exists (its settings, if changed, are kept)."""
    found = subprocess.run([prefect, "work-pool", "inspect", POOL], env=env,
                           capture_output=True).returncode == 0
    if not found:
        _run([prefect, "work-pool", "create", POOL, "--type", "process"], env, "creating the pool")


def deploy(prefect: str, env: dict[str, str], names: list[str]) -> None:
    """Deploy prefect.yaml's deployments: the ones named, or all."""
    which = [a for n in names for a in ("--name", n)] or ["--all"]
    _run([prefect, "--no-prompt", "deploy", *which], env, "deploying")


def banner(port: int, started: list[subprocess.Popen]) -> str:
    pids = ", ".join(f"{what} pid {p.pid}" for what, p in zip(("server", "worker"), started,
                                                             strict=True))
    return "\n".join([
        f"{READY} ({pids}); Ctrl-C stops it all",
        f"  Prefect UI:  http://127.0.0.1:{port}",
        "  run a deployment from another shell:",
        f"    export PREFECT_API_URL=http://127.0.0.1:{port}/api",
        f"    {EXAMPLE}",
    ])


def _wait_any(procs: list[subprocess.Popen]) -> None:
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen, terms: int = 1, grace: float = 10) -> None:
    """SIGTERM the process group `terms` times (the worker only stops on the second), then
    SIGKILL what is left after `grace` seconds."""
    for i in range(terms):
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace if i == terms - 1 else 2)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(proc, signal.SIGKILL)  # the group's other members (flow runs, uvicorn), if any
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
