from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


@task(name="train_model")
def train_model(config: dict) -> dict:
    """Train with checkpoints; returns the MLflow run id and checkpoint paths."""
    return stages.train(config_from_dict(config), entry="prefect")
