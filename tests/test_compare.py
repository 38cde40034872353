"""`lmpipe compare`: checkpoints of different kinds scored on the same text, sampled with the same
prompt and seed, side by side (table, JSON, an MLflow run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from builders import CHARS, save_lmpipe

from lmpipe import compare
from lmpipe.cli.main import main
from lmpipe.config import load_config

TEXT = "Dear Agnes, my hedge is too tall.\n" * 12
PROMPT = "Dear Agnes,"


def char_gpt(d: Path) -> Path:
    return save_lmpipe(d, step=10)


def char_bigram(d: Path) -> Path:
    return save_lmpipe(d, step=20, model_type="bigram", arch={"type": "bigram", "block_size": 16})


def bpe_gpt(d: Path) -> Path:
    """A gpt on a byte-level BPE tokenizer: its tokens are not the char models' tokens."""
    from builders import ARCH, tiny_model

    from lmpipe.ckpt.payload import build_payload
    from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
    from lmpipe.config import Config, ModelConfig
    from lmpipe.tokenizer import train_bpe

    tok = train_bpe([TEXT + "".join(CHARS)], 300)
    model = tiny_model(vocab=tok.vocab_size, seed=3)
    hp = Config(model=ModelConfig(**ARCH)).to_dict()
    path = Path(d) / checkpoint_filename("gpt", "bpe", 30)
    save_checkpoint(path, build_payload(
        weights={k: v.clone() for k, v in model.state_dict().items()}, hyperparameters=hp,
        tokenizer_json=tok.to_json(), step=30, vocab_size=tok.vocab_size,
        block_size=ARCH["block_size"], source="bpe"))
    return path


def gpt2(d: Path) -> Path:
    """A (tiny, untrained) GPT-2 with its own byte-level BPE, rebuilt from its stored config."""
    from hf_models import _tokenizer

    from lmpipe.ckpt.payload import build_payload
    from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
    from lmpipe.config import Config, ModelConfig, TokenizerConfig
    from lmpipe.tokenizer import HFTokenizer
    from models import build_model

    tok = HFTokenizer("gpt2", _tokenizer().backend_tokenizer)
    hf = {"vocab_size": tok.vocab_size, "n_positions": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
    model = build_model({"type": "gpt2", "block_size": 16, "hf_config": hf})
    hp = Config(tokenizer=TokenizerConfig(kind="gpt2"),
                model=ModelConfig(type="gpt2", block_size=16)).to_dict()
    hp["model"]["hf_config"] = hf
    path = Path(d) / checkpoint_filename("gpt2", "letters", 40)
    save_checkpoint(path, build_payload(
        weights=model.state_dict(), hyperparameters=hp, tokenizer_json=tok.to_json(), step=40,
        vocab_size=tok.vocab_size, block_size=16, source="letters"))
    return path


def lora_gpt(d: Path) -> Path:
    """LoRA adapters (r=4) on a char gpt base checkpoint: adapters and base identity only."""
    from lmpipe.ckpt.lora import base_for_training, wrap_base
    from lmpipe.ckpt.payload import build_payload
    from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
    from lmpipe.tokenizer import load as load_tokenizer
    from lmpipe.train.saver import model_weights

    base = save_lmpipe(Path(d), step=10, source="base")
    cfg = load_config(None, [f"model.pretrained={base}", "model.lora.r=4"], env={})
    cfg, model, tok, identity = base_for_training(cfg, load_tokenizer)
    model = wrap_base(model, identity, {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ""})
    weights, base_model = model_weights(model)
    path = Path(d) / checkpoint_filename("gpt", "lora", 50)
    save_checkpoint(path, build_payload(
        weights=weights, hyperparameters=cfg.to_dict(), tokenizer_json=tok.to_json(), step=50,
        vocab_size=tok.vocab_size, block_size=cfg.model.block_size, source="lora",
        base_model=base_model))
    return path


# Each builder writes one checkpoint of its kind into a folder and returns its path: compare has
# nothing type-specific.
BUILDERS = [char_gpt, char_bigram, bpe_gpt, gpt2, lora_gpt]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Every kind's checkpoint, the validation text, and settings for a quick comparison; built
    once for the module (the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("compare")
    paths = []
    for i, build in enumerate(BUILDERS):
        d = tmp_path / f"m{i}"
        d.mkdir()
        paths.append(build(d))
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    s = compare.settings(load_config(None), text, prompt=PROMPT, max_new_tokens=8, seed=5,
                         device="cpu", max_batches=0)
    return paths, text, s


def test_one_row_per_model_with_finite_bpb_and_samples_from_the_same_prompt(setup):
    paths, _, s = setup
    rows = compare.compare(paths, s)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [r["model_type"] for r in rows] == ["gpt", "bigram", "gpt", "gpt2", "gpt+lora(r=4)"]
    assert [r["tokenizer"] for r in rows] == ["char", "char", "bpe", "gpt2", "char"]
    for r in rows:
        assert math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0
        assert math.isfinite(r["val_loss"]) and r["perplexity"] == pytest.approx(
            math.exp(r["val_loss"]))
        assert r["sample"].startswith(PROMPT) and r["tokens_per_s"] > 0
        assert r["parameters"] > 0 and r["size_mb"] > 0
    # the char bigram's zero table predicts the uniform distribution: ln(vocab) nats a character
    bigram = rows[1]
    assert bigram["val_loss"] == pytest.approx(math.log(len(CHARS)), rel=1e-5)
    assert bigram["val_bpb"] == pytest.approx(math.log2(len(CHARS)), rel=1e-5)
    df = compare.table(rows)
    assert len(df) == len(BUILDERS) and list(df["name"]) == [p.name for p in paths]
    out = compare.render_table(rows, s)
    assert all(f"--- {p.name} ---" in out for p in paths) and "val bpb" in out


def test_cli_prints_the_table_and_json_that_matches(setup, capsys):
    paths, text, _ = setup
    argv = ["compare", *map(str, paths[:2]), "--text", str(text), "--prompt", PROMPT,
            "--max-new-tokens", "6", "--seed", "2", "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["prompt"] == PROMPT and data["settings"]["seed"] == 2
    assert [m["name"] for m in data["models"]] == [p.name for p in paths[:2]]
    for m in data["models"]:  # a second run: the same numbers, the same seeded samples
        assert f"{m['val_bpb']:.4f}" in table and m["sample"].rstrip("\n") in table


@pytest.mark.parametrize("given,needle", [
    ([], "compare needs at least two checkpoints; got none"),
    (["one.pt"], "compare needs at least two checkpoints; got one ('one.pt')"),
    (["s3://bucket/a.pt", "b.pt"], "s3://bucket/a.pt: not a checkpoint URI; pass models:/"),
    (["models:/lmpipe/1", "b.pt"], "models:/lmpipe/1: there is no tracking store at sqlite:///"),
])
def test_fewer_than_two_or_a_bad_uri_is_one_line(tmp_path, capsys, monkeypatch, given, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: none here
    assert main(["compare", *given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_or_text_is_one_line_before_any_work(setup, tmp_path, capsys,
                                                                 monkeypatch):
    paths, text, _ = setup
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["compare", str(paths[0]), "nope.pt", "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Checkpoint not found: nope.pt" in err[0], err
    assert main(["compare", str(paths[0]), str(paths[0])]) == 2
    assert "compare needs different checkpoints" in capsys.readouterr().err
    assert main(["compare", *map(str, paths[:2])]) == 2  # no data/prepared/val.txt here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data/prepared/val.txt: validation text not found" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-new-tokens", "0", "--max-new-tokens must be a positive integer, got 0"),
    ("--temperature", "0", "--temperature must be a positive number, got 0.0"),
    ("--max-batches", "-1", "--max-batches must be 0 (the whole text) or a positive integer"),
])
def test_bad_settings_are_one_line_before_any_model_loads(setup, capsys, flag, value, needle):
    paths, text, _ = setup
    assert main(["compare", *map(str, paths[:2]), "--text", str(text), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_text_a_char_model_cannot_read_names_the_model(setup, tmp_path, capsys):
    paths, _, _ = setup
    other = tmp_path / "other.txt"
    other.write_text("Zebras \u00a7 quickly\n", encoding="utf-8")
    assert main(["compare", *map(str, paths[:2]), "--text", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and paths[0].name in err[0] and "unknown to the char tokenizer" in err[0]


@pytest.mark.slow
def test_log_records_an_mlflow_run_with_the_table(setup, project, capsys):
    from mlflow import MlflowClient

    paths, text, _ = setup
    assert main(["compare", *map(str, paths), "--text", str(text), "--prompt", PROMPT,
                 "--max-new-tokens", "4", "--device", "cpu", "--log"]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name(load_config("params.yaml").tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["checkpoint_1"] == str(paths[0])
    assert run.data.params["checkpoint_3"] == str(paths[2])
    assert run.data.tags["lmpipe.kind"] == "compare"
    bpb = {k: v for k, v in run.data.metrics.items() if k.endswith("/val_bpb")}
    assert len(bpb) == len(BUILDERS)
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"compare.md", "compare.json"}
    local = client.download_artifacts(run.info.run_id, "compare.json", str(project))
    logged = json.loads(Path(local).read_text())
    assert [m["path"] for m in logged["models"]] == [str(p) for p in paths]
    assert run.info.run_id in capsys.readouterr().err
