"""Lineage: the git commit a run was made from and the DVC md5s of its inputs."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    return commit + ("-dirty" if dirty and commit != "unknown" else "")


def lineage_tags(data_files: dict[str, str | Path]) -> dict[str, str]:
    """The git commit plus, for each input file, the md5 DVC records for it in dvc.lock."""
    from lmpipe.common.fileio import file_md5

    commit = git_commit()
    tags = {"mlflow.source.git.commit": commit, "lmpipe.git_commit": commit}
    for name, path in data_files.items():
        if not Path(path).exists():
            continue
        tags[f"dvc.{name}.md5"] = file_md5(path)
        tags[f"dvc.{name}.path"] = str(path)
    return tags
