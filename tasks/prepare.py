from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


def _cache_key(ctx, params: dict) -> str:
    return stages.prepare_fingerprint(config_from_dict(params["config"]))


@task(name="prepare_data", cache_key_fn=_cache_key, persist_result=True)
def prepare_data(config: dict) -> dict:
    """Normalise, split and deduplicate the corpus; cached by the corpus bytes and the settings."""
    return stages.prepare(config_from_dict(config))


def prepare_data_cached(config: dict) -> dict:
    """prepare_data, served from the cache only while data/prepared still holds that result."""
    current = stages.prepared_is_current(config_from_dict(config))
    return prepare_data.with_options(refresh_cache=not current)(config)
