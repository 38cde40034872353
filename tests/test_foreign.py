"""Foreign checkpoints (nanoGPT, nanochat, Hugging Face, Lightning), `lmpipe ckpt doctor`, import,
and safe loading: nothing in a checkpoint file runs unless the user passes --trust-pickle."""
import argparse
import json
import os
import pickle

import pytest
import torch
from builders import (
    CHARS,
    lmpipe_payload,
    save_hf,
    save_lightning,
    save_lmpipe,
    save_nanochat,
    save_nanogpt,
)

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.rebuild import load_for_inference
from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
from lmpipe.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def zoo(project, monkeypatch):
    """One checkpoint of each format; nanochat in the guide's ~/.cache/nanochat layout."""
    monkeypatch.setenv("HOME", str(project))
    save_nanogpt(project / "nanogpt")
    save_nanochat(project / ".cache" / "nanochat")
    save_hf(project / "hf" / "checkpoint-300")
    save_lightning(project / "lightning.ckpt")
    return project


def test_list_inspect_verify_every_format(zoo, capsys):
    rows = json.loads(run(capsys, "ckpt", "list", str(zoo), "--json")[1])
    # hidden directories (.git, .venv, .cache) are not walked into unless named
    assert {(r["format"], r["step"]) for r in rows} == {("nanogpt", 250), ("hf", 300),
                                                        ("lightning", 120)}
    tag = json.loads(run(capsys, "ckpt", "list", "~/.cache/nanochat/base_checkpoints/d2",
                         "--json")[1])
    assert [(r["model"], r["source"], r["step"]) for r in tag] == [("nanochat-d2", "d2", 100),
                                                                   ("nanochat-d2", "d2", 200)]
    expect = {"nanogpt/out/ckpt.pt": ("nanogpt", 250, 1336, "char"),
              ".cache/nanochat/base_checkpoints/d2": ("nanochat", 200, 2048, "nanochat (tiktoken)"),
              "hf/checkpoint-300": ("hf", 300, 680, "hf"),
              "lightning.ckpt": ("lightning", 120, None, None)}
    for path, (fmt, step, params, tok) in expect.items():
        code, out, _ = run(capsys, "ckpt", "inspect", path, "--json")
        d = json.loads(out)
        assert code == 0 and (d["format"], d["step"]) == (fmt, step), path
        assert params is None or d["total_params"] == params
        assert (d["tokenizer"] or {}).get("kind") == tok
    assert json.loads(run(capsys, "ckpt", "inspect", "lightning.ckpt",
                          "--json")[1])["optimizer"][0]["type"] == "AdamW"
    code, out, _ = run(capsys, "ckpt", "verify", str(zoo))
    assert code == 0 and out.count("ok    ") == 3
    code, out, _ = run(capsys, "ckpt", "verify", "~/.cache/nanochat/base_checkpoints")
    assert code == 0 and out.count("ok    ") == 2 and "(nanochat, step 200)" in out


def test_verify_and_doctor_foreign_problems(zoo, capsys):
    state = torch.load("nanogpt/out/ckpt.pt", weights_only=True)
    state["model"]["_orig_mod.transformer.wte.weight"][1, 1] = float("inf")
    torch.save(state, "nanogpt/out/ckpt.pt")
    (zoo / ".cache/nanochat/base_checkpoints/d2/meta_000200.json").unlink()
    (zoo / ".cache/nanochat/tokenizer/tokenizer.pkl").unlink()
    code, out, _ = run(capsys, "ckpt", "verify", str(zoo))
    assert code == 1
    out += run(capsys, "ckpt", "verify", "~/.cache/nanochat/base_checkpoints/d2")[1]
    # wte and lm_head are tied: one storage, two names
    assert ("nanogpt/out/ckpt.pt: nonfinite: NaN or Inf in 2 weight tensor(s): "
            "transformer.wte.weight, lm_head") in out
    assert "model_000200.pt: incomplete: meta_000200.json is missing" in out
    code, out, _ = run(capsys, "ckpt", "doctor",
                       "~/.cache/nanochat/base_checkpoints/d2/model_000100.pt")
    assert code == 3 and "missing tokenizer" in out and "python -m scripts.tok_train" in out
    code, out, _ = run(capsys, "ckpt", "doctor", "nanogpt/out/ckpt.pt")
    assert "_orig_mod. prefixes" in out and "lmpipe strips them on load" in out


def test_doctor_not_found_names_the_nearest_step(project, capsys):
    for step in (100, 200, 300):
        save_lmpipe(project / "checkpoints", step)
    code, out, _ = run(capsys, "ckpt", "doctor",
                       "checkpoints/checkpoint_gpt_letters_step0250_11102025_231500.pt")
    assert code == 3 and "Checkpoint not found" in out and "steps: 100, 200, 300" in out
    nearest = "checkpoints/" + sorted((project / "checkpoints").glob("*step0200*"))[0].name
    assert f"nearest to step 250: {nearest} (step 200)" in out
    assert f"fix: lmpipe resume --checkpoint {nearest}" in out
    (project / "empty").mkdir()
    code, out, _ = run(capsys, "ckpt", "doctor", "empty/nothing.pt")
    assert code == 4 and "ENABLE_CHECKPOINTS=true python3 training.py" in out
    assert run(capsys, "ckpt", "doctor", "empty")[0] == 4  # an empty directory is not healthy


def test_doctor_corrupted_optimizer_mismatch_and_tokenizer(project, capsys):
    d = project / "checkpoints"
    first, second = save_lmpipe(d, 10, run_id="r1"), save_lmpipe(d, 20, run_id="r1")  # one run
    data = bytearray(second.read_bytes())
    data[-100] ^= 0xFF
    second.write_bytes(bytes(data))
    code, out, _ = run(capsys, "ckpt", "doctor", str(second))
    assert code == 3 and "corrupted" in out
    assert f"the last verified earlier checkpoint: {first}" in out
    assert f"fix: lmpipe resume --checkpoint {first}" in out
    first.write_bytes(b"truncated")  # no earlier checkpoint verifies now: broken
    assert run(capsys, "ckpt", "doctor", str(second))[0] == 4
    bad = lmpipe_payload(step=30)
    bad["optimizer_state_dict"]["state"][2]["exp_avg_sq"][0] = float("nan")
    opt = save_checkpoint(d / checkpoint_filename("gpt", "letters", 30), bad)
    code, out, _ = run(capsys, "ckpt", "doctor", str(d / opt["file"]))
    assert code == 3 and f"--checkpoint {d / opt['file']} --no-optimizer --warmup 100" in out
    # a conflicting architecture, forced on the command line
    good = save_lmpipe(d, 40)
    code, out, _ = run(capsys, "ckpt", "doctor", str(good), "-S", "model.n_layer=2", "-S",
                       "model.n_embd=16")
    assert code == 3 and "tensor size mismatch" in out
    assert "transformer.wte.weight: checkpoint (20, 8), configured model (20, 16)" in out
    assert "checkpoint has n_layer=1, n_embd=8; you asked for 2 and 16" in out
    # not forced: resume uses the checkpoint's own
    assert run(capsys, "ckpt", "doctor", str(good))[0] == 0
    # the seed's checkpoint contents, without a tokenizer: found beside it, and imported with it
    seedlike = {k: v for k, v in lmpipe_payload(step=50).items() if k != "tokenizer"}
    torch.save(seedlike, d / "checkpoint_gpt_letters_step0050_01012026_000000.pt")
    (d / "tokenizer.json").write_text(json.loads(json.dumps(lmpipe_payload()["tokenizer"])))
    code, out, _ = run(capsys, "ckpt", "doctor",
                       str(d / "checkpoint_gpt_letters_step0050_01012026_000000.pt"))
    fix = (f"lmpipe ckpt import {d / 'checkpoint_gpt_letters_step0050_01012026_000000.pt'} "
           f"--tokenizer {d / 'tokenizer.json'}")
    assert code == 3 and "missing tokenizer" in out and fix in out
    assert run(capsys, *fix.split()[1:], "--out", "fixed")[0] == 0
    assert run(capsys, "generate", "--checkpoint", "fixed/*step0050*", "--max-new-tokens", "5",
               "--prompt", "Dear")[0] == 0


def test_import_nanogpt_then_generate(zoo, capsys):
    code, out, _ = run(capsys, "ckpt", "import", "nanogpt/out/ckpt.pt", "--out", "imported")
    assert code == 0
    path = next((zoo / "imported").glob("checkpoint_gpt_shakespeare_char_step0250_*.pt"))
    ckpt, model, tok = load_for_inference(path)
    original = torch.load("nanogpt/out/ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, original["_orig_mod." + k]) for k, v in model.state_dict().items())
    assert tok.chars == CHARS and ckpt["hyperparameters"]["model"]["bias"] is True
    assert ckpt["hyperparameters"]["train"]["lr"] == 1e-3 and verify_checkpoint(path).ok
    code, out, err = run(capsys, "generate", "--checkpoint", str(path), "--prompt", "Dear",
                         "--max-new-tokens", "12")
    assert code == 0 and out.startswith("Dear") and len(out.strip()) == 4 + 12
    assert "step 250" in err


def test_malicious_pickles_never_run(project, capsys):
    marker = project / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 1,
                "hyper_parameters": Payload()}, "evil.ckpt")
    for argv in (["ckpt", "inspect", "evil.ckpt"], ["ckpt", "verify", "evil.ckpt"],
                 ["ckpt", "list", "."],
                 ["ckpt", "doctor", "evil.ckpt"], ["generate", "--checkpoint", "evil.ckpt"]):
        code, out, err = run(capsys, *argv)
        assert not marker.exists(), argv
    code, out, err = run(capsys, "ckpt", "inspect", "evil.ckpt")
    assert code == 2 and "refused to load" in err
    assert "posix.mkdir" in err and "--trust-pickle" in err
    code, out, _ = run(capsys, "ckpt", "verify", "evil.ckpt")
    assert code == 1 and "unsafe: " in out
    save_nanogpt(project / "ng", with_meta=False)
    with open(project / "ng" / "out" / "meta.pkl", "wb") as f:
        pickle.dump(Payload(), f)
    code, _, err = run(capsys, "ckpt", "import", "ng/out/ckpt.pt")
    assert code == 2 and "refused to load" in err and not marker.exists()
    # a benign object (Lightning hyperparameters as an argparse Namespace) loads only when trusted
    save_lightning(project / "ns.ckpt", hyper_parameters=argparse.Namespace(n_layer=1, lr=0.1))
    assert run(capsys, "ckpt", "inspect", "ns.ckpt")[0] == 2
    code, out, _ = run(capsys, "ckpt", "inspect", "ns.ckpt", "--trust-pickle", "--json")
    assert code == 0 and json.loads(out)["hyperparameters"] == {"n_layer": 1, "lr": 0.1}
    code, out, _ = run(capsys, "ckpt", "verify", "ns.ckpt", "--trust-pickle")
    assert code == 1 and "unsafe: " in out and "checked further because of --trust-pickle" in out


def test_sampling_never_emits_padded_vocabulary_ids():
    """nanoGPT pads GPT-2's 50257 tokens to 50304 rows: ids the tokenizer lacks are never
    sampled."""
    from lmpipe.generate import sample
    from models import build_model

    model = build_model({"type": "bigram", "vocab_size": 30, "block_size": 8})
    with torch.no_grad():
        model.token_embedding_table.weight[:, 25:] = 100.0  # the padded ids would win every draw
    gen = torch.Generator().manual_seed(0)
    out = sample(model, torch.zeros(1, 1, dtype=torch.long), 40, generator=gen, vocab_limit=25)
    assert int(out.max()) < 25
    assert int(sample(model, torch.zeros(1, 1, dtype=torch.long), 5, generator=gen)[:,
                                                                                    1:].min()) >= 25


def test_resume_refuses_a_conflicting_architecture(project):
    """train.resume (the DVC param) with other model.* values would train the checkpoint's
    architecture
    while recording the new one: refused, with the values that match."""
    from lmpipe import stages
    from lmpipe.common.errors import UserError
    from lmpipe.config import load_config

    path = save_lmpipe(project / "checkpoints", 10)
    cfg = load_config("params.yaml",
                      ["train.resume=latest", "model.n_layer=2", "model.n_embd=16",
                       "model.n_head=2"])
    with pytest.raises(UserError) as e:
        stages.train(cfg)
    where = path.relative_to(project)
    assert (f"train.resume=latest resumes {where}: checkpoint has n_layer=1, n_embd=8; you asked "
            "for 2 and 16") in str(e.value)
    assert "model.n_layer=1 model.n_embd=8" in str(e.value) and "lmpipe ckpt doctor" in str(e.value)
    assert len(list((project / "checkpoints").glob("*.pt"))) == 1


def test_hugging_face_bin_and_safetensors_read_alike(project, capsys):
    save_hf(project / "st")
    save_hf(project / "bin", weights="pytorch_model.bin")
    a = json.loads(run(capsys, "ckpt", "inspect", "st", "--json")[1])
    b = json.loads(run(capsys, "ckpt", "inspect", "bin", "--json")[1])
    assert sorted(map(str, a["tensors"])) == sorted(map(str,
                                                        b["tensors"])) and a["total_params"] == 680
    d = json.loads(run(capsys, "ckpt", "diff", "st", "bin", "--json")[1])
    assert d["relative_change"] == 0 and not (d["added"] or d["removed"] or d["reshaped"])
    assert run(capsys, "ckpt", "verify", "bin")[0] == 0
