from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


@task(name="generate_text")
def generate_text(config: dict, trained: dict) -> dict:
    """Samples from the final checkpoint."""
    return stages.generate(config_from_dict(config), trained)
