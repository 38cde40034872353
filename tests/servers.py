"""Real servers for tests, on 127.0.0.1 and free ports, each stopped by PID (its process group) even
when a test fails. The Prefect stack is `make serve`'s own script (scripts/serve.py): a server,
the lmpipe-local pool, deployments and one worker."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group (zombies count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def children(pid: int) -> list[int]:
    """The PIDs of a process's children (serve.py starts each in a process group of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_groups(pgids) -> None:
    """SIGKILL each process group: the safety net after a polite stop."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    """The first match of `pattern` in the process's log file; fails if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"no line matching {pattern!r} (exit code {proc.poll()}); log tail:\n"
                         f"{tail}")


@dataclass
class PrefectStack:
    """A running `scripts/serve.py`: its API, the environment to reach it, and the PIDs it
    reported (server, worker), each the leader of its process group."""
    proc: subprocess.Popen
    api_url: str
    env: dict[str, str]
    log: Path
    child_pids: list[int] = field(default_factory=list)

    def api(self, method: str, path: str, body: dict | None = None):
        """One call of the REST API; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def prefect(self, *args: str) -> subprocess.Popen:
        """Start the prefect CLI against this server (wide output, so messages are not wrapped);
        .communicate() collects its output."""
        return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), *args],
                                env={**self.env, "COLUMNS": "300"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def stop(self, timeout: float = 60) -> list[int]:
        """Ctrl-C, as a user stops `make serve`; returns the process groups still alive after it,
        which are then killed anyway."""
        groups = {self.proc.pid, *self.child_pids, *children(self.proc.pid)}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        survivors = [g for g in groups if group_alive(g)]
        kill_groups(groups)
        self.proc.wait()
        return survivors


@contextmanager
def prefect_stack(project: Path, home: Path, deploy: list[str], env: dict[str, str],
                  timeout: float = 240):
    """scripts/serve.py run in `project` (prefect.yaml, params.yaml, flows/) with PREFECT_HOME
    `home`, deploying only `deploy` (pipeline/default ...); stopped on exit, by PID."""
    port = free_port()
    env = {**env, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO),
           # the worker asks for new runs every second, not every 10
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = home / "serve.log"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port),
           *[a for name in deploy for a in ("--deploy", name)]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    stack = PrefectStack(proc, env["PREFECT_API_URL"], env, log)
    try:
        ready = wait_for_line(log, r"lmpipe: serving \(server pid (\d+), worker pid (\d+)\)", proc,
                              timeout)
        stack.child_pids = [int(ready.group(1)), int(ready.group(2))]
        yield stack
    finally:
        survivors = stack.stop()
        assert not survivors, f"process groups left running after Ctrl-C: {survivors}"
