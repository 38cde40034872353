"""Tiny checkpoints in each format's documented layout: lmpipe, nanoGPT (train.py's ckpt.pt plus
data/<dataset>/meta.pkl), nanochat (checkpoint_manager.py's model_/meta_/optim_ files under
base_checkpoints/<tag>/), Hugging Face (config.json + model.safetensors) and Lightning (.ckpt)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from lmpipe.ckpt.payload import build_payload
from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint
from lmpipe.config import Config, ModelConfig, load_config
from lmpipe.tokenizer import CharTokenizer
from lmpipe.train.loop import make_optimizer
from models import build_model

CHARS = sorted(set("Dear Agnes, my hedge is too tall.\n"))
ARCH = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, "dropout": 0.0,
        "bias": False}


def tiny_model(arch: dict | None = None, vocab: int = len(CHARS), seed: int = 0):
    torch.manual_seed(seed)
    return build_model({**(arch or ARCH), "vocab_size": vocab})


def stepped_optimizer(model):
    """AdamW (lmpipe's and nanoGPT's grouping) after one step, so it has state."""
    opt = make_optimizer(model, load_config(None).train)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    return opt


def lmpipe_payload(model=None, step: int = 10, source: str = "letters", arch: dict | None = None,
                   **extra) -> dict:
    arch = arch or ARCH
    model = model or tiny_model(arch)
    hp = Config(model=ModelConfig(**arch)).to_dict()
    return {**build_payload(weights=model.state_dict(),
                            optimizer=stepped_optimizer(model).state_dict(),
                            hyperparameters=hp, tokenizer_json=CharTokenizer(CHARS).to_json(),
                            step=step,
                            vocab_size=len(CHARS), block_size=arch["block_size"], source=source,
                            run_id=f"run{step}",
                            metrics={"val_loss": 2.0 - step / 1000, "best_val_loss": 1.9},
                            batch_size=4), **extra}


def save_lmpipe(directory: Path, step: int = 10, model_type: str = "gpt", source: str = "letters",
                **kw) -> Path:
    path = Path(directory) / checkpoint_filename(model_type, source, step)
    save_checkpoint(path, lmpipe_payload(step=step, source=source, **kw))
    return path


def save_nanogpt(root: Path, compiled: bool = True, with_meta: bool = True) -> Path:
    """out/ckpt.pt as nanoGPT's train.py writes it, and data/shakespeare_char/meta.pkl."""
    model = tiny_model({**ARCH, "bias": True, "dropout": 0.1})
    state = {("_orig_mod." if compiled else "") + k: v for k, v in model.state_dict().items()}
    args = {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, "bias": True,
            "vocab_size": len(CHARS),
            "dropout": 0.1}
    config = {"dataset": "shakespeare_char", "learning_rate": 1e-3, "max_iters": 5000,
              "batch_size": 12,
              "warmup_iters": 100, "min_lr": 1e-4, "compile": compiled}
    path = Path(root) / "out" / "ckpt.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": state, "optimizer": stepped_optimizer(model).state_dict(),
                "model_args": args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.4697), "config": config}, path)
    if with_meta:
        meta = Path(root) / "data" / "shakespeare_char" / "meta.pkl"
        meta.parent.mkdir(parents=True)
        with open(meta, "wb") as f:
            pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                         "stoi": {c: i for i, c in enumerate(CHARS)}}, f)
    return path


def save_nanochat(base: Path, tag: str = "d2", steps=(100, 200)) -> Path:
    """<base>/base_checkpoints/<tag>/{model,meta,optim}_XXXXXX files and <base>/tokenizer/."""
    d = Path(base) / "base_checkpoints" / tag
    d.mkdir(parents=True)
    cfg = {"sequence_len": 16, "vocab_size": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
           "n_embd": 8}
    torch.manual_seed(1)
    state = {"transformer.wte.weight": torch.randn(32, 8), "lm_head.weight": torch.randn(32, 8)}
    for i in range(2):
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"):
            state[f"transformer.h.{i}.{m}.weight"] = torch.randn(8, 8)
        state[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.randn(32, 8)
        state[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.randn(8, 32)
    for step in steps:
        torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, d / f"model_{step:06d}.pt")
        (d / f"meta_{step:06d}.json").write_text(json.dumps(
            {"step": step, "val_bpb": 1.1 - step / 1000, "model_config": cfg,
             "user_config": {"depth": 2},
             "device_batch_size": 4, "max_seq_len": 16}))
        adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(32, 8))]).state_dict()
        torch.save([adam], d / f"optim_{step:06d}_rank0.pt")
    (Path(base) / "tokenizer").mkdir()
    (Path(base) / "tokenizer" / "tokenizer.pkl").write_bytes(b"placeholder")
    return d


def save_hf(d: Path, step: int | None = 300, weights: str = "model.safetensors") -> Path:
    """A GPT-2 style Hugging Face directory: config.json, model.safetensors (or pytorch_model.bin),
    tokenizer.json, and trainer_state.json as the Trainer writes it into checkpoint-N/."""
    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True)
    torch.manual_seed(2)
    t = {"transformer.wte.weight": torch.randn(40, 8), "transformer.wpe.weight": torch.randn(16, 8),
         "transformer.ln_f.weight": torch.ones(8), "transformer.ln_f.bias": torch.zeros(8),
         "transformer.h.0.attn.c_attn.weight": torch.randn(8, 24),
         "transformer.h.0.attn.c_attn.bias": torch.zeros(24)}
    if weights == "model.safetensors":
        save_file(t, str(d / weights))
    else:
        torch.save(t, d / weights)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 40,
                                               "n_positions": 16,
                                               "n_embd": 8, "n_layer": 1, "n_head": 2}))
    (d / "tokenizer.json").write_text("{}")
    if step is not None:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_metric": 2.5}))
    return d


def save_lightning(path: Path, hyper_parameters=None) -> Path:
    model = tiny_model()
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [stepped_optimizer(model).state_dict()], "lr_schedulers": [],
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}":
                              {"best_model_score": torch.tensor(1.2)}},
                "hparams_name": "kwargs",
                "hyper_parameters": hyper_parameters or {"n_layer": 1, "lr": 1e-3},
                "loops": {}}, path)
    return path
