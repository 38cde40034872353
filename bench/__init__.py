"""Benchmarks (`make bench`): speed targets live here as printed ratios, never in timed tests."""


def quiet_offline_transformers() -> None:
    """transformers offline (nothing is downloaded: models are built from configs) and quiet."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
