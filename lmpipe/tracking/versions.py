"""A registered version's lineage (tags and a markdown description, shown on its page in the MLflow
UI) and its aliases: `challenger` is always the newest version; the promotion rule
(tracking.promote) decides whether it also becomes `champion`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.common.paths import PREPARED_DIR, TOKENIZER_DIR

CHAMPION, CHALLENGER = "champion", "challenger"
BPB = "lmpipe.eval.bits_per_byte"  # the version's full-evaluation bits per byte
DATA = "lmpipe.data.fingerprint"  # the data it was evaluated on (lmpipe's own hash)
DVC_STAGES = ("prepare", "tokenizer")  # the stages whose outs are a version's data and tokenizer


def version_lineage(run_id: str, checkpoint: Path, step: int, params: dict[str, Any]) -> dict:
    """Where a version comes from, as version tags: its run, checkpoint (step, file, sha256), data
    and tokenizer hashes (dvc.lock's, and lmpipe's own fingerprints), params, git commit, lmpipe."""
    import lmpipe
    from lmpipe.common.fileio import file_sha256
    from lmpipe.tracking.lineage import git_commit

    commit = git_commit()
    tags = {"lmpipe.run_id": run_id, "lmpipe.checkpoint.step": str(step),
            "lmpipe.checkpoint.file": checkpoint.name, "lmpipe.checkpoint.path": str(checkpoint),
            "lmpipe.checkpoint.sha256": file_sha256(checkpoint),
            DATA: _read(PREPARED_DIR / "meta.json", lambda t: json.loads(t)["fingerprint"]),
            "lmpipe.tokenizer.fingerprint": _read(TOKENIZER_DIR / "fingerprint", str.strip),
            "lmpipe.git.commit": commit.removesuffix("-dirty"),
            "lmpipe.git.dirty": str(commit.endswith("-dirty")).lower(),
            "lmpipe.version": lmpipe.__version__,
            "lmpipe.params": json.dumps(params, sort_keys=True, default=str)}
    tags.update({f"lmpipe.dvc.{path}.md5": md5 for path, md5 in dvc_hashes().items()})
    return tags


def _read(path: Path, value) -> str:
    try:
        return value(path.read_text())
    except (OSError, ValueError, KeyError):
        return "unknown"


def dvc_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """{path: md5} of the data and tokenizer stages' outs as dvc.lock records them; {} without a
    dvc.lock, or when a file differs from its record (it was made since, outside DVC)."""
    import yaml

    from lmpipe.common.fileio import file_md5

    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = {o["path"]: o.get("md5") for s in DVC_STAGES for o in stages.get(s, {}).get("outs", [])}
    current = all(Path(p).is_file() and file_md5(p) == md5 for p, md5 in outs.items())
    return outs if outs and current else {}


@dataclass(frozen=True)
class Decision:
    """The promotion rule's verdict on a new version, and the two numbers it compared."""

    promote: bool
    reason: str
    candidate_bpb: float
    champion_bpb: float | None = None
    champion_version: str | None = None

    def tags(self, rule: str) -> dict[str, str]:
        theirs = "none" if self.champion_bpb is None else repr(self.champion_bpb)
        return {"lmpipe.promote.rule": rule,
                "lmpipe.promote.decision": CHAMPION if self.promote else CHALLENGER,
                "lmpipe.promote.reason": self.reason,
                "lmpipe.promote.candidate_bpb": repr(self.candidate_bpb),
                "lmpipe.promote.champion_bpb": theirs,
                "lmpipe.promote.champion_version": self.champion_version or "none"}


def decide(rule: str, bpb: float, data: str, champion) -> Decision:
    """tracking.promote's verdict on a version with eval bits per byte `bpb` on data fingerprint
    `data`, against `champion` (the current champion's ModelVersion, or None)."""
    if champion is None:
        return Decision(rule != "never", f"tracking.promote={rule}: no champion yet", bpb)
    tags, v = champion.tags, champion.version
    theirs = float(tags[BPB]) if BPB in tags else None
    comparable = theirs is not None and tags.get(DATA) == data != "unknown"
    if theirs is None:
        compare = f"champion v{v} has no recorded {BPB}"
    elif not comparable:
        compare = (f"champion v{v} was evaluated on other data (fingerprint "
                   f"{tags.get(DATA, 'unknown')[:12]}, this version's {data[:12]})")
    else:
        compare = (f"eval bits per byte {bpb:.4f} {'beats' if bpb < theirs else 'does not beat'} "
                   f"champion v{v}'s {theirs:.4f} on the same data")
    if rule == "auto" and not comparable:
        compare += ": not comparable; promote by hand, or register with tracking.promote=always"
    promote = {"always": True, "never": False}.get(rule, comparable and bpb < theirs)
    return Decision(promote, f"tracking.promote={rule}: {compare}", bpb, theirs, v)


def current_champion(client, name: str):
    """The version holding alias champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def describe(lineage: dict[str, str], metrics: dict[str, float], decision: Decision,
             request: str, uri: str) -> str:
    """The version's description: markdown the version page renders (decision, lineage, metrics,
    a sample request to the version `uri` served, params)."""
    t = lineage
    dirty = "yes" if t["lmpipe.git.dirty"] == "true" else "no"
    rows = [("training run", f"`{t['lmpipe.run_id']}`"),
            ("checkpoint", f"`{t['lmpipe.checkpoint.file']}` (step {t['lmpipe.checkpoint.step']})"),
            ("checkpoint sha256", f"`{t['lmpipe.checkpoint.sha256']}`"),
            ("data fingerprint", f"`{t[DATA]}`"),
            ("tokenizer fingerprint", f"`{t['lmpipe.tokenizer.fingerprint']}`")]
    rows += [(f"dvc.lock md5 of {k[len('lmpipe.dvc.'):-len('.md5')]}", f"`{v}`")
             for k, v in t.items() if k.startswith("lmpipe.dvc.")]
    rows += [("git commit", f"`{t['lmpipe.git.commit']}`, uncommitted changes: {dirty}"),
             ("lmpipe", t["lmpipe.version"])]
    rows += [(f"eval {k}", f"{v:.6g}") for k, v in metrics.items()]
    verdict = "promoted to **champion**" if decision.promote else "stays **challenger**"
    params = json.loads(t["lmpipe.params"])
    return "\n".join(
        [f"**Promotion:** {verdict} — {decision.reason}.", "", "**Lineage**", "",
         "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
         f"**Sample request** (`POST /invocations` of `mlflow models serve -m {uri} "
         "--env-manager local`)", "", "```json", request, "```", "",
         "**Params**", "", "| param | value |", "|---|---|",
         *(f"| {k} | {_code(v)} |" for k, v in params.items()), ""])


def _code(value: Any) -> str:
    """A param value as inline code; "" for the empty string (an empty span shows as ``)."""
    return f"`{value}`" if value != "" else '`""`'


def annotate(name: str, version: str, lineage: dict[str, str], metrics: dict[str, float],
             rule: str, request: str) -> dict:
    """Tag and describe a new version (`request`: a sample request body), alias it challenger,
    and champion when the rule says so. Returns its aliases and the decision."""
    from mlflow import MlflowClient

    client = MlflowClient()
    bpb = float(metrics["bits_per_byte"])
    decision = decide(rule, bpb, lineage[DATA], current_champion(client, name))
    # full precision: the next version's promotion compares with these
    tags = {**lineage, **{f"lmpipe.eval.{k}": repr(v) for k, v in metrics.items()},
            **decision.tags(rule)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, describe(lineage, metrics, decision, request,
                                                        f"models:/{name}/{version}"))
    client.set_registered_model_alias(name, CHALLENGER, version)  # always the newest version
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    aliases = [CHALLENGER, CHAMPION] if decision.promote else [CHALLENGER]
    return {"aliases": aliases, "decision": decision.reason,
            "promoted": decision.promote, "candidate_bpb": bpb,
            "champion_bpb": decision.champion_bpb}
