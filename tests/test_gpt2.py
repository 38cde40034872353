"""Fine-tuning a pretrained GPT-2 (model.type gpt2), offline: tiny GPT-2 models laid out as a
Hugging Face hub cache (tests/hf_models.py) under the guide's names gpt2 and gpt2-medium."""
import fnmatch
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, REPO, cli_env, tiny_corpus
from hf_models import _tokenizer, offline_hub
from test_cli import assert_user_error

from lmpipe import stages
from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.payload import build_payload
from lmpipe.ckpt.rebuild import model_from_checkpoint
from lmpipe.ckpt.store import load_checkpoint, save_checkpoint
from lmpipe.common.errors import UserError
from lmpipe.config import load_config
from lmpipe.tokenizer import load_gpt2
from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
from lmpipe.train.saver import GracefulStop, TrainingSaver, variant_slug
from models import build_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """{name: snapshot directory} of both tiny models in one hub cache, built once."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    return {"cache": cache, **offline_hub(cache)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is many times faster than several on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cfg(steps=12, **extra):
    over = ["model.type=gpt2", "model.block_size=16", f"train.steps={steps}",
            "train.warmup_steps=2", "train.batch_size=4", "train.log_interval=1",
            "train.eval_interval=6", "train.eval_batches=2", "train.lr=0.01", "train.device=cpu",
            *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, over, env={})


def _ids(hub):
    return torch.tensor(load_gpt2(str(hub["gpt2"])).encode(tiny_corpus()), dtype=torch.long)


def _model(cfg):
    torch.manual_seed(0)
    return build_model({"type": "gpt2", "pretrained": cfg.model.pretrained,
                        "block_size": cfg.model.block_size})


def _losses(state):
    return [h["train_loss"] for h in state.history if "train_loss" in h]


def test_fine_tune_lowers_the_loss(hub):
    cfg = _cfg(steps=16, **{"train.eval_interval": 100})
    model = _model(cfg)
    state = train(model, make_optimizer(model, cfg.train), _ids(hub), _ids(hub), cfg.train, 16,
                  "cpu")
    losses = _losses(state)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def _payload(model, opt, state, cfg, tok_json="{}"):
    hp = cfg.to_dict()
    hp["model"]["hf_config"] = model.hf_config
    return build_payload(weights=model.state_dict(), optimizer=opt.state_dict(),
                         hyperparameters=hp, tokenizer_json=tok_json, step=state.step,
                         vocab_size=model.vocab_size, block_size=16, source="x", run_id="r",
                         train_state=state.to_dict(), metrics=state.metrics(), dtype="float32")


def test_resume_with_grad_accumulation_is_bit_exact_and_needs_no_hub(hub, tmp_path, monkeypatch):
    cfg = _cfg(steps=6, **{"train.grad_accum_steps": 2, "train.eval_interval": 4})
    data = _ids(hub)
    straight = _model(cfg)
    opt = make_optimizer(straight, cfg.train)
    ref = train(straight, opt, data, data, cfg.train, 16, "cpu")

    half = _model(cfg)
    opt_h = make_optimizer(half, cfg.train)
    state = TrainState.fresh(cfg.train)
    state = train(half, opt_h, data, data, cfg.train, 16, "cpu",
                  Callbacks(should_stop=lambda: state.step >= 3), state)
    save_checkpoint(tmp_path / "c.pt", _payload(half, opt_h, state, cfg))

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))  # rebuilt from hf_config alone
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    model = model_from_checkpoint(ckpt).train()
    opt2 = make_optimizer(model, cfg.train)
    opt2.load_state_dict(ckpt["optimizer_state_dict"])
    resumed = train(model, opt2, data, data, cfg.train, 16, "cpu",
                    state=TrainState.from_dict(ckpt["train_state"]))
    assert _losses(state) + _losses(resumed) == _losses(ref)
    for (k, a), b in zip(straight.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert ckpt["dtype"] == "float32" and verify_checkpoint(tmp_path / "c.pt").ok


def test_kv_cache_gives_the_full_forward_logits(hub):
    model = _model(_cfg()).eval()
    idx = _ids(hub)[None, :12]
    cache = model.new_cache()
    model(idx[:, :8], cache=cache)
    step, _ = model(idx[:, 8:], cache=cache)
    assert len(cache) == 12
    assert torch.allclose(step, model(idx)[0][:, 8:], atol=1e-5)


def _saver(cfg, tmp_path):
    return TrainingSaver(cfg, {"source": "carolyn_hax"}, "r", GracefulStop(), model=None,
                         optimizer=None, tok=None, flush=lambda: None,
                         on_saved=lambda p, e: None)


@pytest.mark.parametrize("name", ["", "gpt2", "gpt2-medium", "/models/GPT2-Large/"])
def test_checkpoint_names_follow_the_guides_globs(name, tmp_path):
    env = {"MODEL_TYPE": "gpt2", **({"GPT2_MODEL_NAME": name} if name else {})}
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}"], env=env)
    path = _saver(cfg, tmp_path).path(1000 if name else 2000).name
    globs = {"": "checkpoint_gpt2_carolyn_hax_step2000_*.pt",
             "gpt2": "checkpoint_gpt2_*_gpt2_step1000*.pt",
             "gpt2-medium": "checkpoint_gpt2_*_gpt2medium_step1000*.pt"}
    assert [k for k, g in globs.items() if fnmatch.fnmatch(path, g)] == (
        [name] if name in globs else [])
    assert variant_slug(name) == {"": "", "gpt2": "gpt2", "gpt2-medium": "gpt2medium",
                                  "/models/GPT2-Large/": "gpt2large"}[name]


def test_pipeline_fine_tunes_and_its_checkpoint_stands_alone(project, hub, monkeypatch):
    """prepare → tokenizer (the pretrained model's own) → train with grad accumulation: the
    checkpoint records hf_config and dtype, rebuilds without the hub, and exports to HF."""
    from transformers import GPT2LMHeadModel

    from lmpipe.ckpt.convert import export

    cfg = load_config("params.yaml", ["tokenizer.kind=auto", "train.grad_accum_steps=2",
                                      "train.steps=6", "checkpoint.interval=3"],
                      env={"MODEL_TYPE": "gpt2"})
    stages.preflight(cfg)
    stages.prepare(cfg)
    assert stages.build_tokenizer(cfg)["vocab_size"] == 300
    info = stages.train(cfg)
    path = info["checkpoint"]
    assert "checkpoint_gpt2_corpus_step0006_" in path
    monkeypatch.setenv("HF_HUB_CACHE", str(project / "no-hub"))
    ckpt = load_checkpoint(path)
    assert ckpt["dtype"] == "float32" and ckpt["hyperparameters"]["model"]["hf_config"]["n_layer"]
    model = model_from_checkpoint(ckpt)
    out = export(path, "hf", project / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(idx)[0], hf(idx).logits)


def test_bad_pretrained_settings_are_one_clear_line(project, hub, tmp_path):
    def refused(*over, env=None):
        cfg = load_config("params.yaml", ["model.type=gpt2", *over], env=env or {})
        with pytest.raises(UserError) as e:
            stages.preflight(cfg)
        return str(e.value)

    msg = refused("model.pretrained=no-such-model")
    assert "'no-such-model'" in msg and "GPT2_MODEL_NAME=/path" in msg and "HF_HUB_OFFLINE=0" in msg
    assert str(hub["cache"]) in msg and "\n" not in msg
    assert "no such directory" in refused(f"model.pretrained={tmp_path}/missing")
    assert "tokenizer.kind=char cannot work with model.type=gpt2" in refused("tokenizer.kind=char")
    _tokenizer(vocab_size=280).save_pretrained(tmp_path / "other")
    assert "different vocabulary" in refused(f"tokenizer.gpt2_path={tmp_path / 'other'}",
                                             "tokenizer.kind=auto")
    assert "64 positions" in refused("model.block_size=65", "tokenizer.kind=auto")
    assert "gradient_checkpointing" in load_config_refusal()


def load_config_refusal():
    cfg = load_config(None, ["train.gradient_checkpointing=true"], env={})
    with pytest.raises(UserError) as e:
        stages.preflight(cfg)
    return str(e.value)


def test_stage_train_without_the_model_offline_fails_first(project, tmp_path):
    r = subprocess.run([str(BIN / "lmpipe"), "stage", "train", "-S", "model.type=gpt2"],
                       env=cli_env(HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True, timeout=120)
    assert_user_error(r, "model.pretrained='gpt2'", "not in the local Hugging Face cache",
                      str(tmp_path / "empty"), "GPT2_MODEL_NAME=/path/to/model")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (project / "checkpoints").exists() and not (project / "data" / "prepared").exists()


@pytest.mark.slow
def test_seed_guide_gpt2_commands(project, hub, prefect_harness):
    """The guide's GPT-2 commands verbatim: both GPT2_MODEL_NAME values, their A/B globs, a resume
    on new data."""
    from prefect.settings import PREFECT_API_URL

    env = {"HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1", "MODEL_TYPE": "gpt2",
           "PREFECT_API_URL": PREFECT_API_URL.value(), "ENABLE_CHECKPOINTS": "true",
           "OMP_NUM_THREADS": "1"}
    (project / "params.yaml").write_text(
        (project / "params.yaml").read_text().replace("kind: char", "kind: auto"))

    def script(name, **extra):
        r = subprocess.run([sys.executable, str(REPO / name)], cwd=project,
                           env=cli_env(**env, **extra), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    for name in ("gpt2", "gpt2-medium"):
        script("training.py", GPT2_MODEL_NAME=name, TRAINING_STEPS="4", CHECKPOINT_INTERVAL="2")
    ckpts = project / "checkpoints"
    a = sorted(ckpts.glob("checkpoint_gpt2_*_gpt2_step0004*.pt"))
    b = sorted(ckpts.glob("checkpoint_gpt2_*_gpt2medium_step0004*.pt"))
    assert len(a) == len(b) == 1
    # the guide's A/B globs, in both modes of scripts/load_checkpoint.py
    r = script("scripts/load_checkpoint.py", MODE="inference", PROMPT="Dear Agnes,",
               CHECKPOINT_PATH="checkpoints/checkpoint_gpt2_*_gpt2medium_step0004*.pt",
               MAX_NEW_TOKENS="5")
    assert r.stdout.startswith("Dear Agnes,")
    script("scripts/load_checkpoint.py", MODE="resume", RESUME_TRAINING_STEPS="2",
           CHECKPOINT_PATH="checkpoints/checkpoint_gpt2_*_gpt2_step0004*.pt")
    assert sorted(ckpts.glob("checkpoint_gpt2_*_gpt2_step0006*.pt"))
    (project / "new_letters.md").write_text("Dear Agnes, my kettle sings. " * 60)
    script("training_resume.py", CHECKPOINT_PATH=f"checkpoints/{b[0].name}",
           TRAINING_DATA_SOURCE="new_letters.md", RESUME_TRAINING_STEPS="2")
    assert sorted(ckpts.glob("checkpoint_gpt2_*_gpt2medium_step0006*.pt"))


def test_lora_on_gpt2_stores_adapters_merges_and_knows_its_base(project, hub, monkeypatch):
    """model.lora.r on gpt2: only adapter tensors plus the base's identity are saved; the rebuilt
    model and the merged Hugging Face export give the same logits; another model under the
    base's name is refused, naming both."""
    from hf_models import hf_cache
    from transformers import GPT2LMHeadModel

    from lmpipe.ckpt.convert import export_merged

    cfg = load_config("params.yaml", ["model.lora.r=4", "train.steps=4", "tokenizer.kind=auto"],
                      env={"MODEL_TYPE": "gpt2"})
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    path = stages.train(cfg)["checkpoint"]
    ckpt = load_checkpoint(path)
    assert ckpt["model_state_dict"] and all("lora_" in k for k in ckpt["model_state_dict"])
    assert ckpt["base_model"]["name"] == "gpt2" and len(ckpt["base_model"]["sha256"]) == 64
    model = model_from_checkpoint(ckpt)
    out = export_merged(path, project / "merged")
    merged = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.allclose(model(idx)[0], merged(idx).logits, atol=1e-5)
    other = project / "other-hub"
    hf_cache(other, "gpt2", hub["gpt2-medium"])  # a different model under the base's name
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    with pytest.raises(UserError) as e:
        model_from_checkpoint(ckpt)
    assert "gpt2" in str(e.value) and ckpt["base_model"]["sha256"][:12] in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_registered_gpt2_version_generates_through_pyfunc(project, hub):
    """The registry step on a fine-tuned gpt2: the version loads through mlflow.pyfunc (the
    hub out of reach) and generates with predict params."""
    import mlflow
    import pandas as pd

    cfg = load_config("params.yaml", ["tokenizer.kind=auto", "train.steps=4"],
                      env={"MODEL_TYPE": "gpt2"})
    stages.prepare(cfg)
    stages.build_tokenizer(cfg)
    info = stages.train(cfg)
    reg = stages.register(cfg, info, stages.evaluate(cfg, info))  # promotion needs the evaluation
    assert reg["uri"].startswith("models:/") and reg["aliases"] == ["challenger", "champion"]
    model = mlflow.pyfunc.load_model(reg["uri"])
    out = model.predict(pd.DataFrame({"prompt": ["Dear Agnes,"]}), params={"max_new_tokens": 5})
    assert len(out) == 1 and out[0].startswith("Dear Agnes,") and len(out[0]) > len("Dear Agnes,")
    reqs = (mlflow.artifacts.download_artifacts(f"{reg['uri']}/requirements.txt"))
    assert "transformers==" in open(reqs).read()
