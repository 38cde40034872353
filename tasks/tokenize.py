from prefect import task

from lmpipe import stages
from lmpipe.config import config_from_dict


def _cache_key(ctx, params: dict) -> str:
    return stages.tokenizer_fingerprint(config_from_dict(params["config"]))


@task(name="build_tokenizer", cache_key_fn=_cache_key, persist_result=True)
def build_tokenizer(config: dict) -> dict:
    """Build the tokenizer from the prepared splits; cached by them and the settings."""
    return stages.build_tokenizer(config_from_dict(config))


def build_tokenizer_cached(config: dict, wait_for: list | None = None) -> dict:
    """build_tokenizer, served from the cache only while data/tokenizer still holds that result;
    wait_for: what must finish first (Prefect's wait_for: the prepare_data result)."""
    current = stages.tokenizer_is_current(config_from_dict(config))
    return build_tokenizer.with_options(refresh_cache=not current)(config, wait_for=wait_for)
