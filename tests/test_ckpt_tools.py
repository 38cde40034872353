"""`lmpipe ckpt` on lmpipe checkpoints: list, inspect, verify, diff, doctor, export."""
import json
import subprocess
import sys

import pytest
import torch
from builders import ARCH, CHARS, lmpipe_payload, save_lmpipe, tiny_model
from conftest import cli_env

from lmpipe.ckpt.manifest import update_manifest
from lmpipe.ckpt.payload import FORMAT_VERSION
from lmpipe.ckpt.rebuild import load_for_inference
from lmpipe.ckpt.store import checkpoint_filename, load_checkpoint, save_checkpoint
from lmpipe.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def ckdir(project):
    d = project / "checkpoints"
    save_lmpipe(d, 10, source="letters")
    save_lmpipe(d, 20, source="letters")
    save_lmpipe(d, 30, model_type="bigram", source="notes",
                arch={"type": "bigram", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 16,
                      "dropout": 0.0,
                      "bias": False})
    return d


def test_list_filters_and_reads_no_tensors(ckdir, capsys):
    code, out, _ = run(capsys, "ckpt", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["step"] for r in rows] == [10, 20, 30]  # newest last
    assert rows[0]["val_loss"] == pytest.approx(1.99)
    assert rows[0]["verified"] == "ok" and rows[0]["run_id"] == "run10"
    assert [r["step"] for r in json.loads(run(capsys, "ckpt", "list", "--model", "bigram",
                                              "--json")[1])] == [30]
    assert [r["step"] for r in json.loads(run(capsys, "ckpt", "list", "--source", "lett",
                                              "--json")[1])] == [10, 20]
    assert [r["step"] for r in json.loads(run(capsys, "ckpt", "list", "--step", "20",
                                              "--json")[1])] == [20]
    # a size that disagrees with the manifest shows without reading tensors
    with open(sorted(ckdir.glob("*step0020*"))[0], "ab") as f:
        f.write(b"x")
    rows = json.loads(run(capsys, "ckpt", "list", "--json")[1])
    assert [r["verified"] for r in rows] == ["ok", "corrupt", "ok"]
    # the table, in a fresh interpreter: torch is never imported for lmpipe checkpoints
    probe = ("import sys; from lmpipe.cli import main; main(['ckpt', 'list']); "
             "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=cli_env(), check=True)
    assert "MODEL" in res.stdout and "VAL LOSS" in res.stdout and "RUN ID" in res.stdout
    assert res.stdout.strip().endswith("no torch")


def test_inspect_describes_everything(ckdir, capsys):
    code, out, _ = run(capsys, "ckpt", "inspect", "latest", "--json")
    d = json.loads(out)
    model = tiny_model({**ARCH, "type": "bigram"})
    assert code == 0 and d["format"] == "lmpipe" and d["step"] == 30
    assert d["format_version"] == FORMAT_VERSION
    assert d["total_params"] == sum(p.numel() for p in model.parameters())
    assert d["tensors"][0] == {"name": "token_embedding_table.weight",
                               "shape": [len(CHARS), len(CHARS)],
                               "dtype": "float32", "params": len(CHARS) ** 2}
    assert d["optimizer"][0]["type"] == "AdamW"
    assert d["optimizer"][0]["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert d["tokenizer"]["kind"] == "char" and d["tokenizer"]["vocab_size"] == len(CHARS)
    assert d["versions"]["torch"] == str(torch.__version__)
    assert d["hyperparameters"]["model"]["type"] == "bigram"
    code, out, _ = run(capsys, "ckpt", "inspect", str(sorted(ckdir.glob("*step0010*"))[0]))
    assert "=== Optimizer ===" in out and "Total parameters:" in out
    assert "tied weights counted once" in out


def test_a_checkpoint_saved_between_evaluations_shows_when_its_val_loss_is_from(ckdir, capsys):
    """A stop request (Ctrl+C) between evaluations: the loop saves without evaluating, so list and
    inspect say when the last evaluation was instead of showing its loss as the checkpoint's."""
    from lmpipe.ckpt.payload import build_payload
    from lmpipe.config import load_config
    from lmpipe.tokenizer import CharTokenizer
    from lmpipe.train.loop import Callbacks, TrainState, make_optimizer, train
    from models import build_model

    cfg = load_config(None, ["train.steps=40", "train.eval_interval=10", "train.batch_size=4",
                             "train.eval_batches=2", "train.warmup_steps=2"], env={}).train
    data = torch.tensor(CharTokenizer(CHARS).encode("Dear Agnes, my hedge is too tall.\n" * 9))
    model = build_model({"type": "bigram", "vocab_size": len(CHARS), "block_size": 16})
    opt, state = make_optimizer(model, cfg), TrainState.fresh(cfg)

    def save(step, st):  # what training_run's save writes: weights, optimizer, state, st.metrics()
        arch = {**ARCH, "type": "bigram"}
        hp = lmpipe_payload(step=step, arch=arch)["hyperparameters"]
        save_checkpoint(ckdir / checkpoint_filename("bigram", "stopped", step), build_payload(
            weights=model.state_dict(), optimizer=opt.state_dict(), hyperparameters=hp,
            tokenizer_json="{}",
            step=step, vocab_size=len(CHARS), block_size=16, source="stopped",
            train_state=st.to_dict(),
            metrics=st.metrics()))

    train(model, opt, data, data, cfg, 16, "cpu", Callbacks(
        should_save=lambda step: step == 10, on_save=save,
        should_stop=lambda: state.step >= 17, on_stop=save), state)
    val10 = next(h["val_loss"] for h in state.history if h.get("step") == 10 and "val_loss" in h)
    assert (state.step, state.last_val_step) == (17, 10)

    rows = json.loads(run(capsys, "ckpt", "list", "--source", "stopped", "--json")[1])
    assert [(r["step"], r["val_loss"], r["val_step"]) for r in rows] == [
        (10, pytest.approx(val10), 10), (17, None, 10)]
    table = run(capsys, "ckpt", "list", "--source", "stopped")[1].splitlines()
    assert f"{val10:.4f}" in table[1] and "— (last eval at step 10)" in table[2]
    assert "1.9900" in run(capsys, "ckpt", "list", "--step", "10")[1]  # older: no val_step
    stopped = str(sorted(ckdir.glob("*_stopped_step0017_*"))[0])
    assert "  val_loss: — (last eval at step 10)\n" in run(capsys, "ckpt", "inspect", stopped)[1]
    info = json.loads(run(capsys, "ckpt", "inspect", stopped, "--json")[1])["info"]
    assert info["val_loss"] is None and info["val_step"] == 10
    info = json.loads(run(capsys, "ckpt", "inspect",
                          str(sorted(ckdir.glob("*_stopped_step0010_*"))[0]),
                          "--json")[1])["info"]
    assert info["val_loss"] == pytest.approx(val10) and info["val_step"] == 10


def test_verify_reports_each_problem(ckdir, capsys):
    code, out, _ = run(capsys, "ckpt", "verify", str(ckdir))
    assert code == 0 and out.count("ok    ") == 3
    # NaN in a weight, NaN in optimizer state, optimizer state of the wrong shape: all written with
    # valid manifests
    nan = lmpipe_payload(step=40)
    nan["model_state_dict"]["transformer.wpe.weight"][0, 0] = float("nan")
    save_checkpoint(ckdir / checkpoint_filename("gpt", "nan", 40), nan)
    bad_opt = lmpipe_payload(step=50)
    bad_opt["optimizer_state_dict"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    save_checkpoint(ckdir / checkpoint_filename("gpt", "opt", 50), bad_opt)
    flipped = sorted(ckdir.glob("*step0010*"))[0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    code, out, _ = run(capsys, "ckpt", "verify", str(ckdir))
    assert code == 1
    assert f"FAIL  {flipped}: integrity: " in out and "sha256 differs" in out
    assert "nonfinite: NaN or Inf in 1 weight tensor(s): transformer.wpe.weight" in out
    assert "optimizer: optimizer exp_avg of parameter 0 has shape (3, 3)" in out
    code, _, _ = run(capsys, "ckpt", "verify", str(sorted(ckdir.glob("*step0020*"))[0]))
    assert code == 0
    # weights that do not fit the hyperparameters the file declares (an edited file)
    edited = lmpipe_payload(step=60)
    edited["hyperparameters"]["model"]["n_embd"] = 16
    entry = save_checkpoint(ckdir / checkpoint_filename("gpt", "edited", 60), edited)
    code, out, _ = run(capsys, "ckpt", "verify", str(ckdir / entry["file"]))
    assert code == 1 and "architecture: weights do not fit the architecture it declares" in out
    code, out, _ = run(capsys, "ckpt", "doctor", str(ckdir / entry["file"]))
    assert code == 4
    assert "the weights themselves say vocab_size=20, n_embd=8, block_size=16, n_layer=1" in out


def test_diff_norms_and_shapes(ckdir, capsys):
    a, b = sorted(ckdir.glob("checkpoint_gpt_*"))
    code, out, _ = run(capsys, "ckpt", "diff", str(a), str(a), "--json")
    d = json.loads(out)
    assert code == 0 and d["relative_change"] == 0 and d["identical"] == len(d["changes"])
    save_checkpoint(ckdir / "checkpoint_gpt_wide_step0020_01012026_000000.pt",
                               lmpipe_payload(model=tiny_model({**ARCH, "n_embd": 16}, seed=5),
                                              step=20,
                                              arch={**ARCH, "n_embd": 16}))
    d = json.loads(run(capsys, "ckpt", "diff", str(a),
                       str(ckdir / "checkpoint_gpt_wide_step0020_01012026_000000.pt"),
                       "--json")[1])
    assert {"key": "model.n_embd", "a": 8, "b": 16} in d["hyperparameters"]
    assert {"name": "transformer.wte.weight", "a": [len(CHARS), 8],
            "b": [len(CHARS), 16]} in d["reshaped"]
    # same shapes, different weights: the per-tensor norms are the exact ‖B−A‖
    payload = lmpipe_payload(step=99)
    payload["model_state_dict"] = {k: v.clone() for k,
                                   v in load_checkpoint(a)["model_state_dict"].items()}
    payload["model_state_dict"]["transformer.wpe.weight"] += 0.5
    save_checkpoint(ckdir / "checkpoint_gpt_shift_step0099_01012026_000000.pt", payload)
    d = json.loads(run(capsys, "ckpt", "diff", str(a),
                       str(ckdir / "checkpoint_gpt_shift_step0099_01012026_000000.pt"),
                       "--json")[1])
    top = d["changes"][0]
    assert top["name"] == "transformer.wpe.weight" and top["max_abs"] == pytest.approx(0.5)
    assert top["norm"] == pytest.approx(0.5 * (16 * 8) ** 0.5)
    assert d["identical"] == len(d["changes"]) - 1


def test_export_safetensors_roundtrip(ckdir, capsys):
    from safetensors.torch import load_file

    from lmpipe.tokenizer import from_json

    src = sorted(ckdir.glob("checkpoint_gpt_*"))[0]
    code, out, _ = run(capsys, "ckpt", "export", str(src), "--format", "safetensors", "--out",
                       "exported")
    assert code == 0
    weights = load_file("exported/model.safetensors")
    saved = load_checkpoint(src)["model_state_dict"]
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    config = json.loads((ckdir.parent / "exported" / "config.json").read_text())
    assert config["architecture"]["n_embd"] == 8 and config["step"] == 10
    tok = from_json((ckdir.parent / "exported" / "tokenizer.json").read_text())
    assert tok.decode(tok.encode("Dear Agnes")) == "Dear Agnes"
    d = json.loads(run(capsys, "ckpt", "inspect", "exported", "--json")[1])
    assert d["step"] == 10 and d["architecture"]["n_embd"] == 8 and d["total_params"] > 0
    code, _, err = run(capsys, "ckpt", "export", str(src), "--out", "exported")
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_export_hf_matches_logits(ckdir, capsys):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    src = sorted(ckdir.glob("checkpoint_gpt_*"))[0]
    assert run(capsys, "ckpt", "export", str(src), "--format", "hf", "--out", "hf")[0] == 0
    _, ours, tok = load_for_inference(src)
    theirs = GPT2LMHeadModel.from_pretrained(ckdir.parent / "hf").eval()
    ids = torch.tensor([tok.encode("Dear Agnes, my")])  # within block_size
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], rtol=1e-4, atol=1e-5)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(ckdir.parent / "hf" / "tokenizer.json"))
    assert hf_tok.encode("Dear Agnes") == tok.encode("Dear Agnes")
    assert hf_tok.decode(tok.encode("my hedge\nis tall")) == "my hedge\nis tall"
    code, _, err = run(capsys, "ckpt", "export", str(sorted(ckdir.glob("checkpoint_bigram_*"))[0]),
                       "--format", "hf")
    assert code == 2 and "use --format safetensors" in err


def test_doctor_falls_back_only_within_the_lineage(project, capsys):
    """A corrupt gpt_dear_agnes checkpoint: not the newer gpt_new_data one (same run, resumed on
    other data), not gpt_dear_agnes of another run; only the earlier one of its own run."""
    d = project / "checkpoints"
    ours = save_lmpipe(d, 100, source="dear_agnes", run_id="run-a")
    other_run = save_lmpipe(d, 200, source="dear_agnes", run_id="run-b")
    damaged = save_lmpipe(d, 300, source="dear_agnes", run_id="run-a")
    other_source = save_lmpipe(d, 250, source="new_data", run_id="run-a")  # the newest file
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    code, out, _ = run(capsys, "ckpt", "doctor", str(damaged))
    assert code == 3 and f"the last verified earlier checkpoint: {ours}" in out
    assert str(other_run) not in out and str(other_source) not in out
    assert "could not be confirmed" not in out
    ours.unlink()
    code, out, _ = run(capsys, "ckpt", "doctor", str(damaged))
    assert code == 4 and str(other_run) not in out and str(other_source) not in out
    assert ("no earlier checkpoint of its lineage (model gpt, source dear_agnes, MLflow run "
            "run-a) verifies") in out and "fix: retrain" in out
    # its run unknown (no manifest entry): same model and source at an earlier step, said so
    update_manifest(d, lambda m: m.pop(damaged.name))
    code, out, _ = run(capsys, "ckpt", "doctor", str(damaged))
    assert code == 3 and f"the last verified earlier checkpoint: {other_run}" in out
    assert "its lineage could not be confirmed" in out and str(other_source) not in out


def test_doctor_not_found_suggests_only_the_lineage(project, capsys):
    d = project / "checkpoints"
    save_lmpipe(d, 100, source="dear_agnes", run_id="run-a")
    save_lmpipe(d, 250, source="new_data", run_id="run-a")  # nearer in step, other data
    missing = "checkpoints/checkpoint_{}_dear_agnes_step0250_01012026_000000.pt"
    code, out, _ = run(capsys, "ckpt", "doctor", missing.format("gpt"))
    assert code == 3 and "step 250: checkpoints/checkpoint_gpt_dear_agnes_step0100_" in out
    assert "new_data" not in out.split("steps:")[1].split("\n", 1)[1]
    code, out, _ = run(capsys, "ckpt", "doctor", missing.format("bigram"))
    assert code == 4 and "none of them is of its lineage (model bigram, source dear_agnes)" in out
