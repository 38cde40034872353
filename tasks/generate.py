from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


@task(name="generate_text")
def generate_text(config: dict, trained: dict) -> dict:
    """Samples from the final checkpoint."""
    return stages.generate(config_from_dict(config), trained)


@task(name="sample_checkpoint")
def sample_checkpoint(config: dict, checkpoint: str, **settings) -> dict:
    """Text from any checkpoint, as `lmpipe generate` makes it; settings: prompt, max_new_tokens,
    temperature, top_k, seed (None: the generate section's)."""
    return stages.sample(config_from_dict(config), checkpoint, **settings)
