"""The A/B flow's own tasks (flows/ab.py): its MLflow parent run, opened and closed, and the
comparison of its children's final checkpoints. Thin wrappers over lmpipe.compare."""
from prefect import task

from lmpipe import compare
from lmpipe.config import config_from_dict


@task(name="open_ab_run")
def open_ab_run(config: dict, names: list[str], params: dict) -> str:
    """The parent run the configurations' training runs join as children; returns its id."""
    return compare.open_ab_run(config_from_dict(config), names, params)


@task(name="compare_runs")
def compare_runs(config: dict, trained: list[dict], names: list[str], parent_run_id: str) -> dict:
    """`lmpipe compare` over the children's final checkpoints, logged into the parent run and
    each child; returns the table (text, as printed) and its JSON."""
    rows, s = compare.compare_ab(config_from_dict(config), trained, names, parent_run_id)
    return {"table": compare.render_table(rows, s), "json": compare.to_json(rows, s)}


@task(name="close_ab_run")
def close_ab_run(config: dict, parent_run_id: str, ok: bool) -> None:
    compare.close_ab_run(config_from_dict(config), parent_run_id, ok)
