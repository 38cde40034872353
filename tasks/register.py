from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


# no retries: a retry after a half-done registration would add a version
@task(name="register_model")
def register_model(config: dict, trained: dict, metrics: dict) -> dict:
    """Register the final checkpoint as a pyfunc model version in the MLflow registry; `metrics`
    (the evaluation's) decide its promotion to champion."""
    return stages.register(config_from_dict(config), trained, metrics)
