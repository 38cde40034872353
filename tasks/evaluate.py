from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


@task(name="evaluate_model")
def evaluate_model(config: dict, trained: dict) -> dict:
    """Validation loss, perplexity and bits per byte of the final checkpoint."""
    return stages.evaluate(config_from_dict(config), trained)
