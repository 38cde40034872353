from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


@task(name="resume_training")
def resume_training(config: dict, checkpoint: str, steps: int | None = None,
                    lr: float | None = None, source: str | None = None,
                    no_optimizer: bool = False, overrides: list[str] | None = None) -> dict:
    """Train on from a checkpoint ('latest', a path or a glob), as `lmpipe resume` does; returns
    the MLflow run id and checkpoint paths."""
    cfg = config_from_dict(config)
    plan = stages.plan_resume(cfg, checkpoint, steps=steps, lr=lr, source=source,
                              no_optimizer=no_optimizer, overrides=overrides or [])
    return stages.resume(cfg, plan, entry="prefect")
