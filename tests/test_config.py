import pytest
import yaml

from lmpipe.common.errors import ConfigError
from lmpipe.config import ENV_VARS, Config, config_from_dict, load_config
from models import MODELS


def test_repo_params_yaml_is_valid_and_every_model_key_is_registered():
    from conftest import REPO

    cfg = load_config(REPO / "params.yaml", env={})
    assert cfg.model.type in MODELS
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Config().to_dict()) | {"by_model"}  # every section is in params.yaml
    assert set(raw["by_model"]) <= set(MODELS)
    for model_type in MODELS:
        load_config(REPO / "params.yaml", [f"model.type={model_type}"], env={})


def test_precedence_cli_over_env_over_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: 10\ncheckpoint:\n  interval: 7\n")
    assert load_config(p, env={}).train.steps == 10
    assert load_config(p, env={"TRAINING_STEPS": "20"}).train.steps == 20
    assert load_config(p, ["train.steps=30"], env={"TRAINING_STEPS": "20"}).train.steps == 30
    assert load_config(p, env={}).checkpoint.interval == 7


def test_seed_environment_variables_keep_their_meaning(tmp_path):
    env = {"ENABLE_CHECKPOINTS": "false", "CHECKPOINT_INTERVAL": "250", "CHECKPOINT_DIR": "ck",
           "MODEL_TYPE": "bigram", "TRAINING_STEPS": "99", "TRAINING_DATA_SOURCE": "my.txt",
           "DEVICE": "cpu", "GPT2_MODEL_NAME": "gpt2-medium", "NPROC": "2"}
    assert set(env) == set(ENV_VARS)
    cfg = load_config(tmp_path / "none.yaml", env=env)
    c = cfg.checkpoint
    assert (c.enabled, c.interval, c.dir) == (False, 250, "ck")
    assert (cfg.model.type, cfg.train.steps, cfg.data.source) == ("bigram", 99, "my.txt")
    assert cfg.train.device == cfg.generate.device == "cpu"
    assert cfg.model.pretrained == cfg.model.variant == "gpt2-medium"
    assert cfg.train.nproc == 2


def test_seed_defaults_without_params_file(tmp_path):
    cfg = load_config(tmp_path / "none.yaml", env={})
    assert cfg.checkpoint.interval == 500 and cfg.checkpoint.dir == "checkpoints"


def test_every_problem_is_reported_with_key_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=-5", "train.lr=abc", "model.type=transformer",
                           "model.n_head=3",
                           "train.nope=1"], env={"DEVICE": "tpu"})
    text = str(e.value)
    assert "train.steps must be a positive integer, got -5" in text
    assert "train.lr must be a number, got 'abc'" in text
    assert "model.type must be one of bigram, gpt, nanochat, gpt2, got 'transformer'" in text
    assert "model.n_embd must be divisible by model.n_head" in text
    assert "unknown key 'train.nope'" in text
    assert ("train.device must be one of auto, cpu, cuda, mps, got 'tpu' "
            "(from environment variable DEVICE)") in text
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


BY_MODEL_PARAMS = """
model:
  type: gpt
train:
  lr: 0.001
  min_lr: 0.0001
  steps: 10
by_model:
  bigram:
    train:
      lr: 0.1
      min_lr: 0.01
      steps: 50
"""


def test_by_model_defaults_sit_above_params_and_below_env_and_cli(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(BY_MODEL_PARAMS)
    lr = lambda *over, **env: load_config(p, list(over), env=env).train.lr  # noqa: E731
    assert lr() == 0.001  # gpt: the general sections
    assert lr(MODEL_TYPE="bigram") == lr("model.type=bigram") == 0.1
    assert lr("model.type=bigram", "train.lr=0.3") == 0.3  # -S beats by_model
    assert lr("model.type=bigram", "by_model.bigram.train.lr=0.02") == 0.02  # -S edits the table
    assert lr("by_model.bigram.train.lr=0.02") == 0.001  # ... which applies to bigram only
    env = {"MODEL_TYPE": "bigram", "TRAINING_STEPS": "7"}
    cfg = load_config(p, env=env)
    assert (cfg.train.steps, cfg.train.min_lr) == (7, 0.01)  # the environment beats by_model too
    p.write_text(BY_MODEL_PARAMS.replace("type: gpt", "type: bigram"))
    assert lr() == 0.1 and lr("model.type=gpt") == 0.001


def test_by_model_keys_and_values_are_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(BY_MODEL_PARAMS + "  rnn:\n    train:\n      lr: 0.1\n"
                 "  gpt:\n    train:\n      lr: -1\n      lrr: 1\n    data:\n      seed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["by_model.bigram.model.type=gpt", "by_model.bigram.lr=1",
                        "model.type=bigram", "by_model.bigram.train.steps=abc"], env={})
    assert e.value.problems == [
        f"{p}: unknown model type 'rnn' in by_model; known: bigram, gpt, nanochat, gpt2",
        f"{p}: unknown key 'by_model.gpt.train.lrr'; keys in by_model.gpt.train: steps, "
        "batch_size, lr, min_lr, warmup_steps, weight_decay, beta1, beta2, grad_clip, "
        "eval_interval, eval_batches, log_interval, seed, device, grad_accum_steps, nproc, "
        "gradient_checkpointing, dtype, resume",
        f"{p}: unknown section 'by_model.gpt.data'; known: model, train",
        "-S: unknown key 'by_model.bigram.model.type'; keys in by_model.bigram.model: n_layer, "
        "n_head, n_embd, block_size, dropout, bias, n_kv_head, pretrained, variant, lora_r, "
        "lora_alpha, lora_dropout, lora_target_modules",
        "override 'by_model.bigram.lr=1' must look like by_model.TYPE.SECTION.KEY=value "
        "(e.g. by_model.bigram.train.lr=0.1)",
        "train.steps must be an integer, got 'abc' (from -S by_model.bigram)",
        # another model type's values are checked too, before any run could pick them up
        f"train.lr must be a positive number, got -1.0 (from {p} by_model.gpt)",
    ]


def test_config_command_prints_the_resolved_values(capsys):
    from conftest import REPO

    from lmpipe.cli.main import main

    assert main(["config", "--params", str(REPO / "params.yaml"), "-S", "model.type=bigram"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    assert "by_model" not in printed
    bigram_lr = repo["by_model"]["bigram"]["train"]["lr"]
    assert printed["train"]["lr"] == bigram_lr != repo["train"]["lr"]


def test_lora_settings_nest_under_model_and_a_negative_rank_is_refused(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  lora:\n    r: 8\n    target_modules: [c_attn, c_proj]\n")
    m = load_config(p, env={}).model
    assert (m.lora_r, m.lora_target_modules) == (8, "c_attn,c_proj")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["model.lora.r=-1"], env={})
    assert e.value.problems == ["model.lora.r must be an integer >= 0, got -1 (from -S)"]
