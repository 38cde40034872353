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


def test_predict_refuses_what_only_lmpipe_can_check_all_problems_at_once():
    """The served model's request check (an MlflowException with INVALID_PARAMETER_VALUE is what
    MLflow's scoring server turns into a 400 with its message)."""
    import pandas as pd
    import pytest
    from mlflow.exceptions import MlflowException

    from lmpipe.serving import TextGenerator
    from lmpipe.tokenizer import CharTokenizer

    model = TextGenerator()
    model.tok = CharTokenizer("Dear Agnes,")
    frame = pd.DataFrame({"prompt": ["Dear", None, "Dear €"]})
    with pytest.raises(MlflowException) as e:
        model.check(TextGenerator.prompts(frame),
                    TextGenerator.settings({"max_new_tokens": 0, "temperature": -1.0, "top_k": -2}))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400
    assert str(e.value.message) == (
        "params.max_new_tokens must be a positive integer, got 0; params.temperature must be a "
        "positive number, got -1.0; params.top_k must be 0 (no top-k filtering) or a positive "
        "integer, got -2; prompt 1 is missing (null); send a string; prompt 2: text has 1 "
        "character(s) unknown to the char tokenizer: '€'; remove them, or rebuild the tokenizer on "
        "data that contains them")
    model.check(TextGenerator.prompts({"prompt": ["Dear", ""]}), TextGenerator.settings(None))
    assert TextGenerator.prompts("Dear") == ["Dear"]
