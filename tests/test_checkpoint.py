import re

import pytest
import torch

from lmpipe.ckpt.locate import resolve_checkpoint
from lmpipe.ckpt.payload import build_payload
from lmpipe.ckpt.rebuild import model_from_checkpoint, tokenizer_from_checkpoint
from lmpipe.ckpt.store import checkpoint_filename, load_checkpoint, parse_filename, save_checkpoint
from lmpipe.common.errors import UserError
from lmpipe.config import load_config
from lmpipe.tokenizer import CharTokenizer
from lmpipe.train.loop import make_optimizer
from models import build_model


def _payload(step=10):
    cfg = load_config(None,
                      ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.block_size=8"],
                      env={})
    torch.manual_seed(0)
    model = build_model({"type": "gpt", "vocab_size": 5, "n_layer": 1, "n_head": 2, "n_embd": 8,
                         "block_size": 8})
    opt = make_optimizer(model, cfg.train)
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    opt.step()
    return model, opt, build_payload(weights=model.state_dict(), optimizer=opt.state_dict(),
                                     hyperparameters=cfg.to_dict(),
                                     tokenizer_json=CharTokenizer("abcde").to_json(),
                                     step=step, vocab_size=5, block_size=8, source="x")


def test_filename_follows_the_seed_format():
    from datetime import datetime

    name = checkpoint_filename("bigram", "carolyn_hax", 500, datetime(2025, 11, 10, 23, 15, 0))
    assert name == "checkpoint_bigram_carolyn_hax_step0500_11102025_231500.pt"
    assert parse_filename(name)["step"] == 500


def test_round_trip_identical_tensors_and_hyperparameters(tmp_path):
    model, opt, payload = _payload()
    path = tmp_path / "c.pt"
    entry = save_checkpoint(path, payload)
    assert entry["size"] == path.stat().st_size and entry["step"] == 10
    raw = torch.load(path, weights_only=True)  # safe loading works on the raw file
    for key in ("model_state_dict", "optimizer_state_dict", "hyperparameters", "vocab_size",
                "block_size",
                "batch_size", "step", "tokenizer", "format_version"):
        assert key in raw
    loaded = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded["model_state_dict"][k])
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, loaded["optimizer_state_dict"]["state"][pid][k])
    assert loaded["hyperparameters"] == payload["hyperparameters"]
    rebuilt = model_from_checkpoint(loaded)
    x = torch.randint(0, 5, (1, 8))
    assert torch.equal(rebuilt(x)[0], model.eval()(x)[0])
    assert tokenizer_from_checkpoint(loaded).decode([0, 4]) == "ae"
    # no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.json", "c.pt"]


def test_compiled_model_prefixes_are_stripped(tmp_path):
    _, _, payload = _payload()
    payload["model_state_dict"] = {f"_orig_mod.{k}": v for k,
                                   v in payload["model_state_dict"].items()}
    save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in raw["model_state_dict"])


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="Checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    _, _, payload = _payload()
    path = tmp_path / "c.pt"
    save_checkpoint(path, payload)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="Checkpoint does not contain model_state_dict"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_latest_and_glob_resolution(tmp_path):
    import os
    import time

    _, _, payload = _payload()
    names = [checkpoint_filename("gpt", "x", s) for s in (10, 20)]
    for i, n in enumerate(names):
        save_checkpoint(tmp_path / n, payload)
        os.utime(tmp_path / n, (time.time() + i, time.time() + i))
    assert resolve_checkpoint("latest", tmp_path).name == names[1]
    assert re.search("step0010", resolve_checkpoint(str(tmp_path / "*step0010*"), tmp_path).name)
    with pytest.raises(UserError, match="no checkpoints in"):
        resolve_checkpoint("latest", tmp_path / "empty")


def test_an_asynchronous_save_keeps_tied_weights_one_tensor(tmp_path):
    """The async snapshot copies into reused buffers; wte and lm_head (one tensor) stay one in
    the file, which is then the size a synchronous save writes."""
    from lmpipe.config import CheckpointConfig
    from lmpipe.train.saver import Checkpointer

    _, _, payload = _payload()
    sizes = []
    for async_save in (True, False):
        d = tmp_path / f"async{async_save}"
        saver = Checkpointer(d, CheckpointConfig(async_save=async_save), "r")
        saver.save(d / "c.pt", payload)
        saver.wait()
        sd = load_checkpoint(d / "c.pt")["model_state_dict"]
        w, head = sd["transformer.wte.weight"], sd["lm_head.weight"]
        assert w.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        sizes.append((d / "c.pt").stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 1024
