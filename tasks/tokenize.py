from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


def _cache_key(ctx, params: dict) -> str | None:
    return stages.tokenizer_cache_key(config_from_dict(params["config"]))


@task(name="build_tokenizer", cache_key_fn=_cache_key, persist_result=True)
def build_tokenizer(config: dict, prepared: dict) -> dict:
    """Build the tokenizer from the prepared splits; cached while they and the settings are unchanged."""
    return stages.build_tokenizer(config_from_dict(config))
