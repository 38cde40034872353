import pytest
import yaml

from lmpipe.config import ENV_VARS, Config, config_from_dict, load_config
from lmpipe.errors import ConfigError
from models import MODELS


def test_repo_params_yaml_is_valid_and_every_model_key_is_registered():
    from conftest import REPO

    cfg = load_config(REPO / "params.yaml", env={})
    assert cfg.model.type in MODELS
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Config().to_dict())  # every section is documented in params.yaml


def test_precedence_cli_over_env_over_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: 10\ncheckpoint:\n  interval: 7\n")
    assert load_config(p, env={}).train.steps == 10
    assert load_config(p, env={"TRAINING_STEPS": "20"}).train.steps == 20
    assert load_config(p, ["train.steps=30"], env={"TRAINING_STEPS": "20"}).train.steps == 30
    assert load_config(p, env={}).checkpoint.interval == 7


def test_seed_environment_variables_keep_their_meaning(tmp_path):
    env = {"ENABLE_CHECKPOINTS": "false", "CHECKPOINT_INTERVAL": "250", "CHECKPOINT_DIR": "ck",
           "MODEL_TYPE": "bigram", "TRAINING_STEPS": "99", "TRAINING_DATA_SOURCE": "my.txt", "DEVICE": "cpu"}
    assert set(env) == set(ENV_VARS)
    cfg = load_config(tmp_path / "none.yaml", env=env)
    assert (cfg.checkpoint.enabled, cfg.checkpoint.interval, cfg.checkpoint.dir) == (False, 250, "ck")
    assert (cfg.model.type, cfg.train.steps, cfg.data.source) == ("bigram", 99, "my.txt")
    assert cfg.train.device == cfg.generate.device == "cpu"


def test_seed_defaults_without_params_file(tmp_path):
    cfg = load_config(tmp_path / "none.yaml", env={})
    assert cfg.checkpoint.interval == 500 and cfg.checkpoint.dir == "checkpoints"


def test_every_problem_is_reported_with_key_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=-5", "train.lr=abc", "model.type=transformer", "model.n_head=3",
                           "train.nope=1"], env={"DEVICE": "tpu"})
    text = str(e.value)
    assert "train.steps must be a positive integer, got -5" in text
    assert "train.lr must be a number, got 'abc'" in text
    assert "model.type must be one of bigram, gpt, nanochat, got 'transformer'" in text
    assert "model.n_embd must be divisible by model.n_head" in text
    assert "unknown key 'train.nope'" in text
    assert "train.device must be one of auto, cpu, cuda, mps, got 'tpu' (from environment variable DEVICE)" in text
    assert len(e.value.problems) == 7  # DEVICE sets two keys: both are reported


def test_bad_yaml_and_bad_override_syntax(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, env={})
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["steps=3"], env={})


def test_round_trip_through_dict_tolerates_old_and_new_keys():
    cfg = load_config(None, ["train.steps=42"], env={})
    d = cfg.to_dict()
    d["train"]["removed_long_ago"] = 1
    del d["model"]["bias"]
    back = config_from_dict(d)
    assert back.train.steps == 42 and back.model.bias is False
    assert cfg.flat()["train.steps"] == 42
