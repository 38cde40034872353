"""A DVC remote (scripts/dvc_remote.py, `make dvc-remote/dvc-push/dvc-pull`) in a temporary git
repo: the data stages' outputs pushed to a directory outside the repo, the cache and outputs
deleted, pulled back, and `dvc repro` then has nothing to run. An unreachable remote is one line,
exit 2, and nothing written."""
from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, REPO, cli_env, lay_out_tiny_project
from servers import free_port

SCRIPT = str(REPO / "scripts" / "dvc_remote.py")
OUTS = ("data/prepared", "data/tokenizer")
ERROR_RE = re.compile(r"^error: DVC remote '([^']+)' \((.+)\) is not reachable: .+; .+\n$")


def run(repo: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=repo, env=cli_env(), capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def remote_cmd(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, SCRIPT, *args, ok=ok)


def dvc_repo(root: Path) -> Path:
    """The tiny project as a clone has it: git, the stages, DVC's committed config; no cache."""
    repo = root / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "lmpipe", "models", ".dvcignore"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    (repo / ".dvc").mkdir()
    for name in ("config", ".gitignore"):  # what `dvc init` made, as committed
        shutil.copy(REPO / ".dvc" / name, repo / ".dvc" / name)
    lay_out_tiny_project(repo)
    run(repo, "git", "init", "-q")
    return repo


def snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every file under the data stages' output directories (not DVC's .gitignore)."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in OUTS for p in sorted((repo / out).rglob("*"))
            if p.is_file() and p.name != ".gitignore"}


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.slow
def test_push_delete_pull_then_repro_is_a_noop(tmp_path):
    repo, remote = dvc_repo(tmp_path), tmp_path / "remote" / "lmpipe"  # outside the repo
    run(repo, str(BIN / "dvc"), "repro", "tokenizer")  # the data stages: prepare, tokenizer
    lock, before = (repo / "dvc.lock").read_text(), snapshot(repo)
    # meta.json and the fingerprint are outputs too: a pull must bring them back
    assert {"data/prepared/meta.json", "data/tokenizer/fingerprint"} <= set(before)

    out = remote_cmd(repo, "add", str(remote)).stdout
    assert "DVC remote 'local'" in out and remote.is_dir()
    assert str(remote) in (repo / ".dvc/config.local").read_text()  # this machine's, git-ignored
    assert "remote" not in (repo / ".dvc/config").read_text()  # the committed config is unchanged
    assert "7 files pushed" in remote_cmd(repo, "push").stdout
    assert tree(remote / "files" / "md5")  # content-addressed files, outside the repo

    shutil.rmtree(repo / ".dvc" / "cache")
    for out in OUTS:
        shutil.rmtree(repo / out)
    assert "7 files fetched" in remote_cmd(repo, "pull").stdout
    assert snapshot(repo) == before

    out = run(repo, str(BIN / "dvc"), "repro", "tokenizer").stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out
    for stage in ("prepare", "tokenizer"):
        assert f"Stage '{stage}' didn't change" in out
    assert (repo / "dvc.lock").read_text() == lock and snapshot(repo) == before


@pytest.mark.slow
def test_an_unreachable_configured_remote_is_one_line_and_writes_nothing(tmp_path):
    repo = dvc_repo(tmp_path)
    blocker = tmp_path / "a-file"  # a regular file where the remote's parent directory should be
    blocker.write_text("not a directory\n")
    bad = blocker / "remote"
    (repo / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = team\n['remote \"team\"']\n    url = {bad}\n"
        f"['remote \"gone\"']\n    url = {tmp_path / 'gone'}\n"
        f"['remote \"web\"']\n    url = http://127.0.0.1:{free_port()}/dvc\n")  # nobody listens
    before = tree(repo), tree(tmp_path)
    for args, name, why in ((["push"], "team", "is a file"), (["pull"], "team", "does not exist"),
                            (["pull", "-r", "gone"], "gone", "does not exist"),
                            (["push", "-r", "web"], "web", "Connection refused")):
        r = remote_cmd(repo, *args, ok=False)
        assert r.returncode == 2 and r.stdout == "", args
        assert ERROR_RE.match(r.stderr) and ERROR_RE.match(r.stderr)[1] == name, r.stderr
        assert why in r.stderr and ("make dvc-remote" in r.stderr or "server is up" in r.stderr)
    assert (tree(repo), tree(tmp_path)) == before  # no cache, no outputs, no remote directory


def test_adding_an_unreachable_remote_is_refused(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    r = remote_cmd(repo, "add", str(tmp_path / "a-file" / "remote"), ok=False)
    assert r.returncode == 2 and ERROR_RE.match(r.stderr) and "Traceback" not in r.stderr
    assert "is a file" in r.stderr and "DVC_REMOTE=" in r.stderr
    url = f"http://127.0.0.1:{free_port()}/dvc"
    r = remote_cmd(repo, "add", url, ok=False)
    assert r.returncode == 2 and ERROR_RE.match(r.stderr)[2] == url
    assert "Connection refused" in r.stderr
    assert tree(repo) == [".dvc"]  # nothing configured


@pytest.mark.skipif(importlib.util.find_spec("dvc_s3") is not None, reason="dvc[s3] is installed")
def test_a_remote_whose_plugin_is_missing_names_the_extra(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    r = remote_cmd(repo, "add", "s3://lmpipe-team/dvc", ok=False)
    assert r.returncode == 2 and ERROR_RE.match(r.stderr)
    assert "'s3' (s3://lmpipe-team/dvc)" in r.stderr and 'pip install "dvc[s3]"' in r.stderr
    assert tree(repo) == [".dvc"]
