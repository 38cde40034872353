"""Conversions between lmpipe checkpoints and other formats.

import: a nanoGPT `ckpt.pt` (with its meta.pkl vocabulary, or GPT-2's tokenizer) becomes an lmpipe
`gpt` checkpoint that `lmpipe generate` runs; a nanochat step (model_/meta_ files plus its
tokenizer.pkl) becomes a `nanochat` one; so does an lmpipe-style file that lacks its tokenizer.
export: weights as safetensors plus config and tokenizer JSON, or a Hugging Face GPT-2 directory.
Outputs are written to a temporary name and renamed into place: never half-written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmpipe.ckpt.payload import architecture, build_payload
from lmpipe.ckpt.safeload import pickle_load
from lmpipe.ckpt.views import View, open_view
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import fsync_dir, fsync_path

# nanoGPT's train.py config names → lmpipe's params.yaml keys
NANOGPT_TRAIN = {"learning_rate": "lr", "min_lr": "min_lr", "warmup_iters": "warmup_steps",
                 "max_iters": "steps",
                 "weight_decay": "weight_decay", "beta1": "beta1", "beta2": "beta2",
                 "grad_clip": "grad_clip",
                 "batch_size": "batch_size", "eval_interval": "eval_interval"}


def import_checkpoint(src: str | Path, out_dir: str | Path, meta: str | None = None,
                      tokenizer_file: str | None = None,
                      gpt2_path: str = "gpt2", trust_pickle: bool = False) -> Path:
    """Convert `src` into an lmpipe checkpoint in `out_dir`; return its path."""
    from lmpipe.ckpt.rebuild import model_from_checkpoint
    from lmpipe.ckpt.store import checkpoint_filename, save_checkpoint

    v = open_view(src, trust_pickle)
    if v.format == "nanogpt":
        payload = _from_nanogpt(v, meta, tokenizer_file, gpt2_path, trust_pickle)
    elif v.format == "nanochat":
        payload = _from_nanochat(v, tokenizer_file)
    elif v.format == "lmpipe" and tokenizer_file:
        payload = _with_tokenizer(v, tokenizer_file)
    else:
        what = ("an lmpipe checkpoint that lacks its tokenizer needs --tokenizer FILE"
                if v.format == "lmpipe" else f"{v.format} checkpoints can be listed, inspected, "
                "verified and diagnosed, not imported")
        raise UserError(f"{src}: lmpipe ckpt import converts nanoGPT and nanochat checkpoints; "
                        f"{what}")
    # the weights must fit the model they claim to be, before writing
    model_from_checkpoint(payload)
    out = Path(out_dir) / checkpoint_filename(payload["model_type"], payload["source"],
                                              payload["step"])
    save_checkpoint(out, payload)
    return out


def _from_nanogpt(v: View, meta: str | None, tokenizer_file: str | None, gpt2_path: str,
                  trust_pickle: bool) -> dict:
    from lmpipe import tokenizer as toks
    from lmpipe.ckpt.rebuild import is_mask_buffer
    from lmpipe.config import ModelConfig, config_from_dict

    args, config = v.hyperparameters["model_args"], v.hyperparameters["config"]
    if tokenizer_file:
        tok = toks.load(tokenizer_file)
    elif meta or v.tokenizer["kind"] == "char":
        itos = pickle_load(meta or v.tokenizer["where"], trust_pickle)["itos"]
        tok = toks.CharTokenizer([itos[i] for i in range(len(itos))], keep_order=True)
    else:
        tok = toks.load_gpt2(gpt2_path)
    vocab = int(args["vocab_size"])
    if tok.vocab_size > vocab:
        raise UserError(f"{v.path}: the tokenizer has {tok.vocab_size} tokens, the model only "
                        f"{vocab}; pass the dataset's meta.pkl with --meta")
    model = {k: args[k] for k in asdict(ModelConfig()) if k in args}
    train = {NANOGPT_TRAIN[k]: config[k] for k in NANOGPT_TRAIN if k in config}
    source = re.sub(r"[^a-z0-9]+", "_",
                    str(config.get("dataset") or "nanogpt").lower()).strip("_") or "nanogpt"
    hp = config_from_dict({"model": {**model, "type": "gpt"}, "train": train,
                           "data": {"source": source},
                           "tokenizer": {"kind": tok.kind}}).to_dict()
    return build_payload(weights={k: t for k, t in v.state.items() if not is_mask_buffer(k)},
                         hyperparameters=hp, tokenizer_json=tok.to_json(), step=v.step or 0,
                         vocab_size=vocab, block_size=int(args["block_size"]), source=source,
                         metrics={"val_loss": v.info.get("val_loss")},
                         imported_from={"format": "nanogpt", "path": str(v.path)})


def _from_nanochat(v: View, tokenizer_file: str | None) -> dict:
    """nanochat's model_/meta_ files → an lmpipe `nanochat` checkpoint; its tokenizer.pkl (a pickled
    tiktoken Encoding) becomes lmpipe's `tiktoken` tokenizer, or --tokenizer gives one."""
    from lmpipe.ckpt.payload import strip_prefixes
    from lmpipe.config import config_from_dict

    arch = {k: int(v.arch[k]) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
            if v.arch.get(k) is not None}
    tok = _nanochat_tokenizer(v, tokenizer_file)
    vocab = int(v.arch.get("vocab_size") or 0)
    if tok.vocab_size > vocab:
        raise UserError(f"{v.path}: the tokenizer has {tok.vocab_size} tokens, the model only "
                        f"{vocab}; pass the tokenizer it was trained with (--tokenizer)")
    source = re.sub(r"[^a-z0-9]+", "_",
                    str(v.info.get("source") or "nanochat").lower()).strip("_") or "nanochat"
    train = {"batch_size": v.raw.get("device_batch_size"),
             "steps": (v.raw.get("user_config") or {}).get("num_iterations")}
    hp = config_from_dict({"model": {**arch, "type": "nanochat"}, "data": {"source": source},
                           "train": {k: x for k,
                                     x in train.items() if isinstance(x, int) and x > 0},
                           "tokenizer": {"kind": tok.kind}}).to_dict()
    # nanochat keeps bfloat16
    state = {k: t.float() for k, t in strip_prefixes(dict(v.state)).items()}
    _refuse_unknown_tensors(v.path, state, {**hp["model"], "vocab_size": vocab})
    return build_payload(weights=state, hyperparameters=hp, tokenizer_json=tok.to_json(),
                         step=v.step or 0,
                         vocab_size=vocab, block_size=arch["block_size"], source=source,
                         imported_from={"format": "nanochat", "path": str(v.path),
                                        "val_bpb": v.info.get("val_bpb")})


def _nanochat_tokenizer(v: View, tokenizer_file: str | None):
    from lmpipe import tokenizer as toks
    from lmpipe.ckpt.safeload import tiktoken_state
    from lmpipe.ckpt.views import nanochat_base_dir

    if tokenizer_file:
        return toks.load(tokenizer_file)
    if v.tokenizer is None:
        where = nanochat_base_dir(Path(v.path).parent) / "tokenizer"
        raise UserError(f"{v.path}: nanochat's tokenizer.pkl is not in {where}; pass --tokenizer "
                        "FILE, or copy the tokenizer/ directory that nanochat's scripts.tok_train "
                        "wrote beside base_checkpoints/")
    state = tiktoken_state(Path(v.tokenizer["where"]) / "tokenizer.pkl")
    return toks.RankedBPE(dict(state["mergeable_ranks"]), state["pat_str"],
                          dict(state.get("special_tokens") or {}))


def _refuse_unknown_tensors(path: Path, state: dict, arch: dict) -> None:
    """Later nanochat versions add tensors (value embeddings, per-layer scalars) that this
    architecture lacks: refuse them instead of silently dropping weights."""
    from lmpipe.ckpt.rebuild import shape_mismatches

    _, missing, extra = shape_mismatches(state, arch)
    if extra or missing:
        what = (f"tensors it does not have: {', '.join(extra[:4])}" if extra
                else f"no {', '.join(missing[:4])}")
        raise UserError(f"{path}: this nanochat checkpoint has {what}; lmpipe builds the "
                        "architecture of nanochat's first release (rotary, QK norm, ReLU², untied "
                        "head), not this version's")


def _with_tokenizer(v: View, tokenizer_file: str) -> dict:
    from lmpipe import tokenizer as toks

    tok = toks.load(tokenizer_file)
    if tok.vocab_size > (v.arch.get("vocab_size") or 0):  # fewer is fine: padded embedding rows
        raise UserError(f"{tokenizer_file}: has {tok.vocab_size} tokens, the checkpoint's model "
                        f"{v.arch.get('vocab_size')}; use the tokenizer it was trained with")
    missing = [k for k in ("hyperparameters", "vocab_size", "block_size") if k not in v.raw]
    if missing:
        raise UserError(f"{v.path}: also lacks {', '.join(missing)}; it cannot be rebuilt as an "
                        "lmpipe checkpoint")
    from lmpipe.ckpt.store import parse_filename

    named, raw = parse_filename(v.path) or {}, v.raw
    payload = build_payload(weights=raw["model_state_dict"], hyperparameters=raw["hyperparameters"],
                            model_type=v.arch.get("type") or "gpt", tokenizer_json=tok.to_json(),
                            step=v.step or 0, vocab_size=raw["vocab_size"],
                            block_size=raw["block_size"],
                            source=v.info.get("source") or named.get("source", "imported"),
                            optimizer=raw.get("optimizer_state_dict"), run_id=raw.get("run_id"),
                            train_state=raw.get("train_state"), metrics=raw.get("metrics"),
                            batch_size=raw.get("batch_size"),
                            imported_from={"format": "lmpipe", "path": str(v.path)})
    return {**raw, **payload}  # other keys it carries stay



# --- export ------------------------------------------------------------------------------

def export(src: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write an lmpipe checkpoint as safetensors (+ config.json, tokenizer.json) or as a Hugging
    Face GPT-2 directory; return the directory."""
    from lmpipe.ckpt.rebuild import tokenizer_from_checkpoint
    from lmpipe.ckpt.store import load_checkpoint

    ckpt = load_checkpoint(src, mmap=True)
    src = Path(src)
    out = Path(out) if out else src.with_name(f"{src.stem}-{fmt}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; remove it or pass --out DIR")
    tok = tokenizer_from_checkpoint(ckpt)
    arch = architecture(ckpt)
    if fmt == "hf" and arch["type"] not in ("gpt", "gpt2"):
        raise UserError(f"{src}: a {arch['type']} model has no Hugging Face equivalent; use "
                        "--format safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        write = _write_hf if fmt == "hf" else _write_safetensors
        (_write_pretrained if fmt == "hf" and arch["type"] == "gpt2" else write)(tmp, ckpt, arch,
                                                                                  tok)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def _save_tensors(path: Path, tensors: dict[str, Any], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage (tied weights): every tensor gets its own contiguous copy
    save_file({k: t.detach().contiguous().clone() for k, t in tensors.items()}, str(path),
              metadata=meta)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_safetensors(d: Path, ckpt: dict, arch: dict, tok) -> None:
    _save_tensors(d / "model.safetensors", ckpt["model_state_dict"],
                  {"format": "pt", "step": str(ckpt["step"])})
    _write_json(d / "config.json", {"format": "lmpipe-safetensors", "model_type": arch["type"],
                                    "architecture": arch,
                                    "step": ckpt["step"], "source": ckpt.get("source"),
                                    "hyperparameters": ckpt["hyperparameters"]})
    (d / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")


def _write_hf(d: Path, ckpt: dict, arch: dict, tok) -> None:
    import torch

    sd, C, L = ckpt["model_state_dict"], arch["n_embd"], arch["n_layer"]
    out = {"transformer.wte.weight": sd["transformer.wte.weight"],
           "transformer.wpe.weight": sd["transformer.wpe.weight"]}
    dtype = sd["transformer.wte.weight"].dtype
    zeros = lambda n: torch.zeros(n, dtype=dtype)  # noqa: E731  GPT-2 always has biases
    for name, width in [(f"h.{i}.{m}", w) for i in range(L) for m, w in (
            ("ln_1", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C), ("ln_2", C),
            ("mlp.c_fc", 4 * C),
            ("mlp.c_proj", C))] + [("ln_f", C)]:
        w = sd[f"transformer.{name}.weight"]
        # HF Conv1D stores (in, out)
        out[f"transformer.{name}.weight"] = w.t() if w.dim() == 2 else w
        out[f"transformer.{name}.bias"] = sd.get(f"transformer.{name}.bias", zeros(width))
    _save_tensors(d / "model.safetensors", out, {"format": "pt"})
    hf_tok = tok.tok if hasattr(tok, "tok") else _char_as_hf(tok)
    # GPT-2's and lmpipe BPE's end-of-text token; None for char
    eot = hf_tok.token_to_id("<|endoftext|>")
    _write_json(d / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": arch["vocab_size"],
        "n_positions": arch["block_size"], "n_embd": C, "n_layer": L, "n_head": arch["n_head"],
        "n_inner": None,
        "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": arch.get("dropout", 0.0), "embd_pdrop": arch.get("dropout", 0.0),
        "attn_pdrop": arch.get("dropout", 0.0), "tie_word_embeddings": True,
        "lmpipe_step": ckpt["step"],
        "bos_token_id": eot, "eos_token_id": eot})
    hf_tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                              "model_max_length": arch["block_size"]})


def _write_pretrained(d: Path, ckpt: dict, arch: dict, tok) -> None:
    """A fine-tuned GPT-2: the rebuilt GPT2LMHeadModel's save_pretrained, and its tokenizer."""
    from lmpipe.ckpt.rebuild import model_from_checkpoint

    model_from_checkpoint(ckpt).hf.save_pretrained(d)
    _write_json(d / "lmpipe.json", {"step": ckpt["step"], "source": ckpt.get("source")})
    _save_hf_tokenizer(d, tok, arch["block_size"])


def _save_hf_tokenizer(d: Path, tok, block_size: int) -> None:
    """The checkpoint's own byte-level BPE as a Hugging Face tokenizer (no hub needed)."""
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>" if tok.tok.token_to_id("<|endoftext|>") is not None else None
    PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token=eot, eos_token=eot,
                            unk_token=eot, model_max_length=block_size).save_pretrained(d)


def _char_as_hf(tok):
    """A character vocabulary as a `tokenizers` tokenizer: one token per character, decoded by
    joining."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t


# --- LoRA: export --merge ------------------------------------------------------------------------

def export_merged(src: str | Path, out: str | Path | None = None) -> Path:
    """A LoRA checkpoint with its adapters merged into the base (peft's merge_and_unload): for a
    gpt base, a full lmpipe checkpoint (no LoRA, no optimizer state); for gpt2, a Hugging Face
    directory (save_pretrained of the merged GPT2LMHeadModel, and the base's tokenizer)."""
    from lmpipe.ckpt.lora import CHECKPOINT_BASES, is_lora_checkpoint
    from lmpipe.ckpt.rebuild import load_for_inference
    from models import lora

    src = Path(src)
    ckpt, model, _ = load_for_inference(src)
    if not is_lora_checkpoint(ckpt):
        raise UserError(f"{src}: not a LoRA checkpoint (no base_model); --merge exports LoRA "
                        "checkpoints, use 'lmpipe ckpt export' without it")
    merged = lora.merge(model)
    as_checkpoint = ckpt["base_model"]["type"] in CHECKPOINT_BASES
    out = Path(out) if out else src.with_name(f"{src.stem}-merged" + (".pt" if as_checkpoint
                                                                      else ""))
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or pass --out PATH")
    if as_checkpoint:
        _save_merged_checkpoint(out, ckpt, merged, src)
    else:
        _save_merged_hf(out, ckpt, merged)
    return out


def _save_merged_checkpoint(out: Path, ckpt: dict, merged, src: Path) -> None:
    from lmpipe.ckpt.store import save_checkpoint

    hp = json.loads(json.dumps(ckpt["hyperparameters"]))
    hp["model"]["lora_r"] = 0
    save_checkpoint(out, build_payload(
        weights={k: v.detach().contiguous() for k, v in merged.state_dict().items()},
        hyperparameters=hp, tokenizer_json=ckpt["tokenizer"], step=ckpt["step"],
        vocab_size=ckpt["vocab_size"], block_size=ckpt["block_size"], source=ckpt["source"],
        run_id=ckpt.get("run_id"), metrics=ckpt.get("metrics"), batch_size=ckpt.get("batch_size"),
        model_type=ckpt.get("model_type"),
        imported_from={"format": "lmpipe-lora-merge", "path": str(src),
                       "base": ckpt["base_model"]}))


def _save_merged_hf(out: Path, ckpt: dict, merged) -> None:
    """save_pretrained of the Hugging Face model inside the merged model, with the checkpoint's
    tokenizer, written under a temporary name and renamed into place."""
    from lmpipe.ckpt.rebuild import tokenizer_from_checkpoint

    hf = next((m for m in merged.modules() if hasattr(m, "save_pretrained")), None)
    if hf is None:
        raise UserError(f"a merged {ckpt['base_model']['type']} model holds no Hugging Face "
                        "model to save; use --format safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        hf.save_pretrained(tmp)
        _save_hf_tokenizer(tmp, tokenizer_from_checkpoint(ckpt), ckpt["block_size"])
        for f in tmp.iterdir():
            fsync_path(f)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
