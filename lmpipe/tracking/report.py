"""`lmpipe runs`: an experiment's runs as one table — the params that differ between them, each
metric's last value, and the registered model versions (with their aliases) made from each run."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lmpipe.common.errors import UserError
from lmpipe.tracking import tracking_uri

if TYPE_CHECKING:
    import pandas as pd

SHORT = 8  # characters of a run id shown, and the least --compare takes


def runs_table(experiment: str, compare: list[str] | None = None) -> pd.DataFrame:
    """One row per run of `experiment` (newest first), or of the runs `compare` names (run ids or
    unique prefixes of at least SHORT characters, in that order)."""
    return table(select(experiment, compare))


def select(experiment: str, compare: list[str] | None = None) -> pd.DataFrame:
    """runs_table's runs, as mlflow.search_runs gives them."""
    runs = search(experiment)
    if compare:
        runs = runs.loc[[find_run(runs, wanted, experiment) for wanted in compare]]
    return runs


def compare_url(runs: pd.DataFrame) -> str:
    """The MLflow UI's page comparing these runs: on the tracking server, or on `make ui`'s."""
    import json

    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    ids, experiments = list(runs["run_id"]), list(dict.fromkeys(runs["experiment_id"]))
    return (f"{base}/#/compare-runs?runs={json.dumps(ids, separators=(',', ':'))}"
            f"&experiments={json.dumps(experiments, separators=(',', ':'))}")


def search(experiment: str) -> pd.DataFrame:
    """mlflow.search_runs of the experiment; UserError listing the experiments if there is none."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise UserError(f"no experiment {experiment!r} in {tracking_uri()}; experiments: "
                        f"{', '.join(names) or 'none (run lmpipe run first)'}")
    runs = mlflow.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return runs.reset_index(drop=True)


def find_run(runs: pd.DataFrame, wanted: str, experiment: str) -> int:
    """The row of the run whose id is `wanted`, or starts with it; UserError listing the runs."""
    hits = runs.index[runs["run_id"].str.startswith(wanted)] if len(wanted) >= SHORT else []
    if len(hits) == 1:
        return hits[0]
    have = ", ".join(f"{r.run_id[:SHORT]} ({r['tags.mlflow.runName']})"
                     for _, r in runs.iterrows()) or "none"
    why = "matches several runs" if len(hits) > 1 else "is not a run"
    raise UserError(f"--compare {wanted}: {why} of experiment {experiment!r} (give a run id, or "
                    f"its first {SHORT}+ characters); its runs: {have}")


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs' name, short id and status, the params that differ, the metrics, the versions."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame(columns=["run", "run_id", "status", "version", "aliases"])
    params = [c for c in runs.columns if c.startswith("params.")
              and runs[c].astype(str).nunique() > 1]
    metrics = sorted(c for c in runs.columns if c.startswith("metrics.")
                     and runs[c].notna().any())
    out = pd.DataFrame({"run": runs.get("tags.mlflow.runName"),
                        "run_id": runs["run_id"].str[:SHORT], "status": runs["status"]})
    out = out.join(runs[params + metrics].rename(columns=lambda c: c.split(".", 1)[1]))
    return out.join(versions(list(runs["run_id"])).reindex(runs["run_id"]).set_index(out.index))


def versions(run_ids: list[str]) -> pd.DataFrame:
    """Per run id: the registered versions made from it (name/version) and their aliases."""
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient()
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    found = client.search_model_versions(f"run_id IN ({quoted})") if run_ids else []
    # search results carry no aliases: the registered model has them (alias → version)
    aliases = {name: client.get_registered_model(name).aliases for name in {v.name for v in found}}
    rows: dict[str, dict[str, list[str]]] = {}
    for v in sorted(found, key=lambda v: (v.name, int(v.version))):
        row = rows.setdefault(v.run_id, {"version": [], "aliases": []})
        row["version"].append(f"{v.name}/{v.version}")
        row["aliases"] += [a for a, n in aliases[v.name].items() if str(n) == str(v.version)]
    return pd.DataFrame.from_dict({r: {k: ", ".join(x) for k, x in row.items()}
                                   for r, row in rows.items()},
                                  orient="index", columns=["version", "aliases"])


def render(df: pd.DataFrame) -> str:
    """The table as text: every column, no wrapping, 4 significant digits, blanks for missing."""
    import pandas as pd

    if df.empty:
        return "no runs\n"
    df = df.copy()
    for c in df.select_dtypes("number").columns:
        df[c] = df[c].map(lambda x: "" if pd.isna(x) else f"{x:.4g}")
    with pd.option_context("display.max_columns", None, "display.width", None,
                           "display.max_colwidth", 40):
        return df.fillna("").to_string(index=False) + "\n"
