"""What a resume trains on and what it says first: the checkpoint's own data (by fingerprint), new
data with --source, the guide's MODE=resume that only shows the plan, imported checkpoints resumed
with a fresh training state, SEED for samples, and warnings for settings that do nothing."""
import json

import mlflow
import pytest
import torch
from builders import CHARS, save_nanogpt

from lmpipe.cli import seed
from lmpipe.cli.main import main
from lmpipe.config import inert_settings, load_config
from lmpipe.train.schedule import Schedule

NO_LOGGED_MODELS = ["-S", "tracking.log_checkpoints=false"]


def ckpts(d, pattern="checkpoint_*.pt"):
    return sorted(d.glob(pattern), key=lambda p: p.stat().st_mtime)


def load(p):
    return torch.load(p, weights_only=True)


def prepared_meta(project):
    return json.loads((project / "data" / "prepared" / "meta.json").read_text())


@pytest.fixture
def trained(project):
    """A tiny run on data/corpus.md (source name 'corpus'): checkpoints at steps 10 and 20."""
    for stage in ("prepare", "tokenizer", "train"):
        assert main(["stage", stage, *NO_LOGGED_MODELS]) == 0
    return ckpts(project / "checkpoints")[-1]


def new_letters(project, name="new_data.md"):
    """New text in the corpus's own characters, so the char tokenizer can encode it."""
    f = project / name
    f.write_text("## About the hedge\n\nDear Agnes, the hedge is too tall. " * 30
                 + "\n\n## About the kettle\n\nDear Agnes, my kettle "
                 "sings to the neighbour's parrot. " * 30 + "\n", encoding="utf-8")
    return f


def test_resume_continues_on_its_own_data_after_other_data_was_prepared(project, trained, capsys):
    first = load(trained)
    own_fp = first["hyperparameters"]["data"]["fingerprint"]
    assert own_fp == prepared_meta(project)["fingerprint"]
    assert first["hyperparameters"]["data"]["source"] == "data/corpus.md"

    # the guide's training_resume.py on new data: data/prepared now holds new_data
    new_letters(project)
    assert main(["resume", "--checkpoint", str(trained), "--source", "new_data.md", "--steps", "5",
                 *NO_LOGGED_MODELS]) == 0
    on_new = ckpts(project / "checkpoints", "checkpoint_gpt_new_data_step0025_*.pt")
    assert len(on_new) == 1  # named after the new source
    hp = load(on_new[0])["hyperparameters"]["data"]
    assert hp["source"] == "new_data.md"
    assert hp["fingerprint"] == prepared_meta(project)["fingerprint"] != own_fp

    capsys.readouterr()
    assert main(["resume", "--checkpoint", str(trained), "--steps", "5", *NO_LOGGED_MODELS]) == 0
    assert "re-preparing the checkpoint's own data from data/corpus.md" in capsys.readouterr().err
    again = ckpts(project / "checkpoints", "checkpoint_gpt_corpus_step0025_*.pt")
    assert len(again) == 1  # named after its own source, not new_data
    hp = load(again[0])["hyperparameters"]["data"]
    assert hp["source"] == "data/corpus.md" and hp["fingerprint"] == own_fp
    assert prepared_meta(project)["fingerprint"] == own_fp  # the steps were trained on this data
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    tags = mlflow.get_run(first["run_id"]).data.tags
    assert tags["lmpipe.resume.step20.data"] == f"data/corpus.md ({own_fp})"


def test_resume_refuses_when_its_data_is_gone_or_changed(project, trained, capsys):
    before = sorted(p.name for p in (project / "checkpoints").iterdir())
    corpus = project / "data" / "corpus.md"
    corpus.write_text(corpus.read_text() + "\n## One more\n\nDear Agnes, one more letter.\n")
    assert main(["resume", "--checkpoint", str(trained), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has changed since the checkpoint was written" in err
    assert "--source data/corpus.md" in err
    assert len(err.splitlines()) == 1

    corpus.rename(project / "elsewhere.md")
    assert main(["resume", "--checkpoint", str(trained), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its training data 'data/corpus.md' is not here any more; pass --source PATH" in err
    assert sorted(p.name for p in (project / "checkpoints").iterdir()) == before  # nothing written


def test_guide_mode_resume_without_variables_shows_the_plan_and_trains_nothing(project, trained,
                                                                               monkeypatch,
                                                                                capsys):
    before = ckpts(project / "checkpoints")
    monkeypatch.setenv("CHECKPOINT_PATH", "checkpoints/checkpoint_gpt_corpus_step0020_*.pt")
    monkeypatch.setenv("MODE", "resume")
    assert seed.load_checkpoint() == 0
    out = capsys.readouterr().out
    fp = load(trained)["hyperparameters"]["data"]["fingerprint"]
    assert "from step 20 to step 5020 (5000 steps)" in out
    assert "cosine decay from 0.0003 at step 20" in out
    assert f"data: data/corpus.md (fingerprint {fp[:12]})" in out
    assert "optimizer state: restored from the checkpoint" in out
    assert f"lmpipe resume --checkpoint checkpoints/{trained.name} --steps 5000 --lr 0.0003" in out
    assert "MODE=resume RESUME_TRAINING_STEPS=5000 RESUME_LEARNING_RATE=0.0003" in out
    assert ckpts(project / "checkpoints") == before

    monkeypatch.setenv("RESUME_TRAINING_STEPS", "3")  # either variable starts it
    assert seed.load_checkpoint() == 0
    assert ckpts(project / "checkpoints", "*_step0023_*.pt")


def test_seed_draws_different_samples(project, trained, monkeypatch, capsys):
    monkeypatch.setenv("CHECKPOINT_PATH", str(trained))
    monkeypatch.setenv("MAX_NEW_TOKENS", "40")
    samples = []
    for value in ("", "1", "2", ""):
        monkeypatch.setenv("SEED", value)
        assert seed.load_checkpoint() == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[3]  # the default: generate.seed
    assert len(set(samples[:3])) == 3
    monkeypatch.setenv("SEED", "abc")
    from lmpipe.cli.main import guarded

    assert guarded(seed.load_checkpoint) == 2
    assert "SEED must be an integer, got 'abc'" in capsys.readouterr().err


def test_imported_nanogpt_checkpoint_resumes_with_a_fresh_training_state(project, capsys):
    src = save_nanogpt(project / "nano")
    assert main(["ckpt", "import", str(src), "--out", "imported"]) == 0
    path = ckpts(project / "imported")[0]
    text = project / "mine.txt"
    text.write_text(("Dear Agnes, my hedge is too tall.\n" * 20 + "\n") * 6, encoding="utf-8")
    assert set(text.read_text()) <= set(CHARS)
    capsys.readouterr()

    assert main(["resume", "--checkpoint", str(path), "--steps", "4", "--source", "mine.txt"]) == 2
    err = capsys.readouterr().err
    assert "no training state (imported from nanogpt); resume it with a fresh optimizer" in err
    assert main(["resume", "--checkpoint", str(path), "--steps", "4", "--no-optimizer"]) == 2
    err = capsys.readouterr().err
    assert "its training data 'shakespeare_char' is not here any more; pass --source" in err

    assert main(["resume", "--checkpoint", str(path), "--steps", "4", "--no-optimizer", "--warmup",
                 "2",
                 "--source", "mine.txt", "-S", "checkpoint.dir=checkpoints",
                 *NO_LOGGED_MODELS]) == 0
    err = capsys.readouterr().err
    assert "has no training state: starting a fresh one at step 250" in err
    assert "2-step learning-rate" in err
    out = load(ckpts(project / "checkpoints", "checkpoint_gpt_mine_step0254_*.pt")[0])
    # from nanoGPT's own plan (5000 iters, warmup 100, lr 1e-3)
    schedule = out["train_state"]["schedule"]
    assert (schedule["start"], schedule["warmup"], schedule["end"]) == (250, 2, 254)
    assert schedule["peak"] == pytest.approx(Schedule.fresh(5000, 100, 1e-3, 1e-4).lr_at(250))
    assert out["hyperparameters"]["data"]["source"] == "mine.txt"
    assert set(out["optimizer_state_dict"]["state"])  # the new optimizer took steps
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    # a new run, with its params
    assert mlflow.get_run(out["run_id"]).data.params["model.n_embd"] == "8"


def test_settings_that_do_nothing_are_named(tmp_path):
    cfg = load_config(None, ["model.type=bigram", "model.n_layer=3", "tokenizer.vocab_size=400"],
                      env={"CHECKPOINT_INTERVAL": "50", "ENABLE_CHECKPOINTS": "false"})
    lines = inert_settings(cfg,
                           ["model.type=bigram", "model.n_layer=3", "tokenizer.vocab_size=400"],
                           env={"CHECKPOINT_INTERVAL": "50", "ENABLE_CHECKPOINTS": "false",
                                "GPT2_MODEL_NAME": "gpt2"})
    assert any(ln.startswith("GPT2_MODEL_NAME=gpt2 has no effect") for ln in lines)
    assert any(ln.startswith("model.n_layer (from -S) has no effect: model.type is bigram") for ln
               in lines)
    inert = "tokenizer.vocab_size (from -S) has no effect: tokenizer.kind is char"
    assert any(ln.startswith(inert) for ln in lines)
    assert any("checkpoint.interval (from environment variable CHECKPOINT_INTERVAL)" in ln for ln
               in lines)
    assert len(lines) == 4
    useful = load_config(None,
                         ["model.n_layer=3", "tokenizer.kind=bpe", "tokenizer.vocab_size=400"],
                         env={})
    assert inert_settings(useful,
                          ["model.n_layer=3", "tokenizer.kind=bpe", "tokenizer.vocab_size=400"],
                          env={}) == []


def test_cli_warns_once_for_an_ignored_setting(project, monkeypatch, capsys):
    monkeypatch.setenv("GPT2_MODEL_NAME", "gpt2-medium")
    assert main(["config"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmpipe: warning: GPT2_MODEL_NAME=gpt2-medium has no effect: model.type is "
                   "gpt; it chooses the pretrained model for MODEL_TYPE=gpt2"]


def test_resume_names_settings_it_ignores(project, trained, capsys):
    capsys.readouterr()
    assert main(["resume", "--checkpoint", str(trained), "--steps", "2", "--dry-run", "-S",
                 "train.lr=0.5", "-S", "train.nproc=2"]) == 0
    err = capsys.readouterr().err
    assert "train.lr (from -S) has no effect on a resume" in err and "--steps N / --lr X" in err
    assert "train.nproc" not in err  # how many processes train on: the current setting


def save_nanochat_with_tokenizer(base):
    """nanochat's layout (base_checkpoints/<tag>/model_/meta_ files, tokenizer/tokenizer.pkl) with a
    real model of its architecture and a tokenizer.pkl pickled as tiktoken pickles its Encoding."""
    import pickle
    import sys
    import types

    from models import build_model

    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"e ", b"th", b"the", b" t", b"De", b"Dea", b"ar", b"es"):
        ranks[word] = len(ranks)
    special = {"<|bos|>": len(ranks)}
    pattern = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
               r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

    # pickles like tiktoken.core.Encoding: its class by name, then __getstate__'s dict
    class Encoding:
        __module__, __qualname__ = "tiktoken.core", "Encoding"

        def __getstate__(self):
            return {"name": "rustbpe", "pat_str": pattern, "mergeable_ranks": ranks,
                    "special_tokens": special}

    fake = types.ModuleType("tiktoken.core")
    fake.Encoding = Encoding
    package = types.ModuleType("tiktoken")
    package.core = fake
    sys.modules.update({"tiktoken": package, "tiktoken.core": fake})
    try:
        blob = pickle.dumps(Encoding())
    finally:
        del sys.modules["tiktoken"], sys.modules["tiktoken.core"]
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.pkl").write_bytes(blob)
    cfg = {"sequence_len": 16, "vocab_size": len(ranks) + 1, "n_layer": 2, "n_head": 2,
           "n_kv_head": 1, "n_embd": 8}
    torch.manual_seed(3)
    model = build_model({"type": "nanochat", "vocab_size": cfg["vocab_size"], "block_size": 16,
                         "n_layer": 2,
                         "n_head": 2, "n_kv_head": 1, "n_embd": 8})
    for p in model.parameters():  # nanochat zero-inits its head: give it something to say
        torch.nn.init.normal_(p, std=0.3)
    d = base / "base_checkpoints" / "d2"
    d.mkdir(parents=True)
    torch.save({k: t.to(torch.bfloat16) for k, t in model.state_dict().items()},
               d / "model_000400.pt")
    (d / "meta_000400.json").write_text(json.dumps({"step": 400, "val_bpb": 1.2,
                                                    "model_config": cfg,
                                                    "user_config": {"depth": 2},
                                                    "device_batch_size": 4}))
    return d


def test_imported_nanochat_checkpoint_generates_and_resumes(project, capsys):
    d = save_nanochat_with_tokenizer(project / "nanochat")
    assert main(["ckpt", "import", str(d / "model_000400.pt"), "--out", "imported"]) == 0
    path = ckpts(project / "imported")[0]
    assert path.name.startswith("checkpoint_nanochat_d2_step0400_")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(path), "--prompt", "Dear Agnes, the",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("Dear Agnes, the")
    ckpt = load(path)
    from lmpipe.tokenizer import from_json

    tok = from_json(ckpt["tokenizer"])
    assert tok.decode(tok.encode("Dear Agnes, the hedge!")) == "Dear Agnes, the hedge!"
    # merged by rank: "Dea" + "r"
    assert tok.encode("the") == [258] and len(tok.encode("Dear")) == 2

    assert main(["resume", "--checkpoint", str(path), "--steps", "3", "--no-optimizer", "--warmup",
                 "1",
                 "--source", "data/corpus.md", "-S", "checkpoint.dir=checkpoints",
                 *NO_LOGGED_MODELS]) == 0
    out = load(ckpts(project / "checkpoints", "checkpoint_nanochat_corpus_step0403_*.pt")[0])
    assert out["hyperparameters"]["model"]["n_kv_head"] == 1 and out["train_state"]["step"] == 403
    assert not torch.equal(out["model_state_dict"]["lm_head.weight"],
                           ckpt["model_state_dict"]["lm_head.weight"])


def test_nanochat_import_refuses_a_later_architecture_and_a_foreign_pickle(project, capsys):
    d = save_nanochat_with_tokenizer(project / "nanochat")
    state = torch.load(d / "model_000400.pt", weights_only=True)
    torch.save({**state, "resid_lambdas": torch.ones(2)}, d / "model_000400.pt")
    assert main(["ckpt", "import", str(d / "model_000400.pt"), "--out", "imported"]) == 2
    err = capsys.readouterr().err
    assert "has tensors it does not have: resid_lambdas" in err and not (project
                                                                         / "imported").exists()
    import pickle

    (project / "nanochat" / "tokenizer"
     / "tokenizer.pkl").write_bytes(pickle.dumps(ValueError("x")))
    torch.save(state, d / "model_000400.pt")
    assert main(["ckpt", "import", str(d / "model_000400.pt"), "--out", "imported"]) == 2
    assert ("expected a pickled tiktoken Encoding, but the pickle references builtins.ValueError"
            in capsys.readouterr().err)


def test_a_per_model_default_for_another_model_type_is_named():
    overrides = ["by_model.bigram.train.lr=0.2"]
    lines = inert_settings(load_config(None, overrides, env={}), overrides, env={})
    assert lines == ["by_model.bigram.train.lr (from -S) has no effect: model.type is gpt; it "
                     "applies when model.type is bigram"]
    assert inert_settings(load_config(None, [*overrides, "model.type=bigram"], env={}),
                          [*overrides, "model.type=bigram"], env={}) == []


def test_damaged_checkpoints_never_generate_or_resume(project, trained, capsys):
    import shutil

    copy = project / "backup" / trained.name  # a copy with no manifest beside it
    copy.parent.mkdir()
    shutil.copy(trained, copy)
    blob = bytearray(copy.read_bytes())
    at = blob.index(b"data/0") + 200  # inside the first tensor's bytes
    blob[at] ^= 0x10
    copy.write_bytes(bytes(blob))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(copy)]) == 2
    assert "the checkpoint is corrupt" in capsys.readouterr().err
    assert main(["resume", "--checkpoint", str(copy), "--steps", "2"]) == 2
    assert "the checkpoint to resume is corrupt" in capsys.readouterr().err
    trained.write_bytes(bytes(blob))  # in place: the manifest's sha256 catches it
    assert main(["generate", "--checkpoint", str(trained)]) == 2
    assert "sha256 differs from the manifest" in capsys.readouterr().err


def test_verify_checks_an_imported_nanochat_model_against_its_architecture(project, capsys):
    d = save_nanochat_with_tokenizer(project / "nanochat")
    assert main(["ckpt", "import", str(d / "model_000400.pt"), "--out", "imported"]) == 0
    path = ckpts(project / "imported")[0]
    assert main(["ckpt", "verify", str(path)]) == 0
    ckpt = load(path)
    # declares 2 key/value heads; the weights have 1
    ckpt["hyperparameters"]["model"]["n_kv_head"] = 2
    torch.save(ckpt, project / "imported" / "edited.pt")
    capsys.readouterr()
    assert main(["ckpt", "verify", str(project / "imported" / "edited.pt")]) == 1
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_k.weight: checkpoint (4, 8), model (8, 8)" in out
