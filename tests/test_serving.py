"""Generation defaults have one source, the generate section of the configuration: the registered
model's signature and the served model's fallback take theirs from it."""
from __future__ import annotations

from conftest import REPO

from lmpipe.config import GenerateConfig, load_config


def test_the_signature_defaults_are_the_runs_generate_section():
    from lmpipe.tracking.registry import model_signature

    g = load_config(None, ["generate.max_new_tokens=42", "generate.temperature=1.5",
                           "generate.top_k=7", "generate.seed=99"], env={}).generate
    params = model_signature(g).params.params
    assert {p.name: p.default for p in params} == g.sampling() == {
        "max_new_tokens": 42, "temperature": 1.5, "top_k": 7, "seed": 99}
    assert {p.name: p.dtype.name for p in params} == {
        "max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}


def test_the_served_model_falls_back_to_the_generate_defaults():
    from lmpipe.serving import TextGenerator

    defaults = GenerateConfig().sampling()
    assert TextGenerator.settings(None) == defaults
    assert TextGenerator.settings({"top_k": 5}) == {**defaults, "top_k": 5}
    # the values the repo's params.yaml ships (what a registered model's signature carries)
    assert defaults == load_config(REPO / "params.yaml", env={}).generate.sampling()
