from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


def _cache_key(ctx, params: dict) -> str | None:
    return stages.prepare_cache_key(config_from_dict(params["config"]))


@task(name="prepare_data", cache_key_fn=_cache_key, persist_result=True)
def prepare_data(config: dict) -> dict:
    """Normalise, split and deduplicate the corpus; cached while the corpus and settings are unchanged."""
    return stages.prepare(config_from_dict(config))
