"""Checkpoints of every format lmpipe reads, behind one view: lmpipe's own, nanoGPT's `ckpt.pt`,
nanochat step files (`model_/meta_/optim_XXXXXX`), Hugging Face model directories, Lightning `.ckpt`
files, and bare state dicts. Read-only: lmpipe writes its own format only (convert.py).

Every torch file is opened with weights_only=True and memory-mapped (safeload.torch_load), so
describing a checkpoint reads its metadata, not its tensors.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.ckpt.safeload import pickle_load, torch_load
from lmpipe.ckpt.store import foreign_hint, is_state
from lmpipe.common.errors import UserError

NANOCHAT_RE = re.compile(r"^(model|meta|optim)_(\d{6})(?:_rank(\d+))?\.(pt|json)$")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
NANOCHAT_GROUPS = ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints",
                   "chatrl_checkpoints")


@dataclass
class View:
    """One checkpoint, whatever wrote it."""
    format: str  # lmpipe | nanogpt | nanochat | hf | lightning | torch
    path: Path  # what names it: a file, or the directory of a Hugging Face model
    files: list[Path]
    state: Any  # {tensor name: tensor}, memory-mapped
    step: int | None = None
    # type, vocab_size, block_size, n_layer, n_head, n_embd
    arch: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # as the file stores them
    tokenizer: dict[str, Any] | None = None  # kind, vocab_size, where; None: none found
    optimizer: Any = None  # a state_dict, a list of them (one per optimizer or rank), or None
    versions: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # top-level keys of the main file
    format_version: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # source, val_loss, run_id, ...
    raw: Any = None


def open_view(path: str | Path, trust_pickle: bool = False) -> View:
    """Detect the format of a file or directory and read it. UserError if it is none of them."""
    from lmpipe.ckpt.store import refuse_manifest

    path = Path(os.path.expanduser(str(path)))
    refuse_manifest(path)
    if not path.exists():
        raise UserError(f"Checkpoint not found: {path}; 'lmpipe ckpt doctor {path}' shows what "
                        "exists nearby")
    try:
        return _open(path, trust_pickle)
    # JSON errors are ValueErrors
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: its layout is not what its format promises "
                        f"({type(e).__name__}: {e}); "
                        f"'lmpipe ckpt doctor {path}' may say more") from None


def _open(path: Path, trust_pickle: bool) -> View:
    if path.is_dir():
        return _open_dir(path, trust_pickle)
    m = NANOCHAT_RE.match(path.name)
    if m and (path.parent / f"model_{m[2]}.pt").exists():
        return read_nanochat(path.parent, int(m[2]), trust_pickle)
    if path.suffix == ".safetensors" and not (path.parent / "config.json").exists():
        state = SafetensorsDict([path])
        return View("torch", path, [path], state, arch=infer_arch(state), keys=list(state))
    if path.suffix == ".safetensors" or path.name == "config.json":
        return read_hf(path.parent, trust_pickle)
    return classify(path, torch_load(path, trust_pickle), trust_pickle)


def _open_dir(path: Path, trust_pickle: bool) -> View:
    if (path / "config.json").exists() and any((path / w).exists() for w in HF_WEIGHTS):
        return read_hf(path, trust_pickle)
    steps = nanochat_steps(path)
    if steps:
        return read_nanochat(path, steps[-1], trust_pickle)
    if (path / "ckpt.pt").exists():
        return open_view(path / "ckpt.pt", trust_pickle)
    from lmpipe.ckpt.locate import latest_verified

    return open_view(latest_verified(path), trust_pickle)


def classify(path: Path, obj: Any, trust_pickle: bool = False) -> View:
    """Tell the format of a loaded torch file by its keys."""
    keys = list(obj) if isinstance(obj, dict) else []
    if "model_state_dict" in keys:
        return read_lmpipe(path, obj)
    if "model" in keys and "model_args" in keys:
        return read_nanogpt(path, obj, trust_pickle)
    if "state_dict" in keys and ("pytorch-lightning_version" in keys or "global_step" in keys):
        return read_lightning(path, obj)
    state = obj if is_state(obj) else next((obj[k] for k in ("state_dict", "model") if k in keys
                                             and is_state(obj[k])), None)
    if state is None:
        raise UserError(f"{path}: Checkpoint does not contain model_state_dict; "
                        f"{foreign_hint(obj, path)}")
    return View("torch", path, [path], state, step=_int(obj.get("step")) if keys else None,
                arch=infer_arch(state), keys=keys, raw=obj)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# --- readers -----------------------------------------------------------------------------

def read_lmpipe(path: Path, obj: dict) -> View:
    from lmpipe.ckpt.manifest import read_manifest
    from lmpipe.ckpt.payload import architecture, current_val_loss, strip_prefixes
    from lmpipe.ckpt.store import parse_filename

    hp = obj.get("hyperparameters") or {}
    arch = architecture(obj)
    entry = read_manifest(path.parent).get(path.name, {})
    named = parse_filename(path) or {}
    metrics = obj.get("metrics") or {}
    info = {"source": obj.get("source") or named.get("source"),
            "run_id": obj.get("run_id") or entry.get("run_id"),
            "val_loss": current_val_loss(metrics, _int(obj.get("step"))),
            "val_step": metrics.get("val_step"), "time": named.get("time")}
    return View("lmpipe", path, [path], strip_prefixes(obj["model_state_dict"]),
                step=_int(obj.get("step")),
                arch=arch, hyperparameters=hp, tokenizer=_lmpipe_tokenizer(obj.get("tokenizer")),
                optimizer=obj.get("optimizer_state_dict"), versions=obj.get("versions") or {},
                keys=list(obj),
                format_version=obj.get("format_version"), info=info, raw=obj)


def _lmpipe_tokenizer(text: str | None) -> dict | None:
    if not text:
        return None
    from lmpipe.tokenizer import from_json

    try:
        tok = from_json(text)
    except UserError as e:
        return {"kind": "unreadable", "vocab_size": None, "where": "embedded", "problem": str(e)}
    return {"kind": tok.kind, "vocab_size": tok.vocab_size, "where": "embedded in the checkpoint"}


def read_nanogpt(path: Path, obj: dict, trust_pickle: bool = False) -> View:
    from lmpipe.ckpt.payload import strip_prefixes

    args, config = dict(obj.get("model_args") or {}), dict(obj.get("config") or {})
    meta = nanogpt_meta_path(path, config)
    if meta is not None:
        vocab = pickle_load(meta, trust_pickle).get("vocab_size")
        tok = {"kind": "char", "vocab_size": vocab, "where": str(meta)}
    else:
        tok = {"kind": "gpt2", "vocab_size": 50257,
               "where": "assumed: without a meta.pkl nanoGPT encodes with GPT-2's BPE (tiktoken)"}
    return View("nanogpt", path, [path], strip_prefixes(obj["model"]),
                step=_int(obj.get("iter_num")),
                arch={"type": "gpt", **args},
                hyperparameters={"model_args": args, "config": config},
                tokenizer=tok, optimizer=obj.get("optimizer"), keys=list(obj),
                info={"source": config.get("dataset"),
                      "val_loss": _float(obj.get("best_val_loss"))}, raw=obj)


def nanogpt_meta_path(path: Path, config: dict) -> Path | None:
    """nanoGPT's sample.py reads data/<dataset>/meta.pkl; look there and beside the checkpoint."""
    dataset = str(config.get("dataset") or "")
    for cand in (path.parent / "meta.pkl", Path("data") / dataset / "meta.pkl",
                 path.parent.parent / "data" / dataset / "meta.pkl"):
        if dataset or cand.parent == path.parent:
            if cand.is_file():
                return cand
    return None


def nanochat_steps(directory: Path) -> list[int]:
    return sorted({int(m[2]) for p in directory.glob("model_*.pt")
                   if (m := NANOCHAT_RE.match(p.name))})


def nanochat_base_dir(directory: Path) -> Path:
    """~/.cache/nanochat (or $NANOCHAT_BASE_DIR): the parent of base_checkpoints/<tag>/."""
    if directory.parent.name in NANOCHAT_GROUPS:
        return directory.parent.parent
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def read_nanochat(directory: Path, step: int, trust_pickle: bool = False) -> View:
    model_file, meta_file = directory / f"model_{step:06d}.pt", directory / f"meta_{step:06d}.json"
    optim_files = sorted(directory.glob(f"optim_{step:06d}*.pt"))
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    cfg = dict(meta.get("model_config") or {})
    arch = {"type": "nanochat", "block_size": cfg.get("sequence_len"), **cfg}
    tok_dir = nanochat_base_dir(directory) / "tokenizer"
    tok = ({"kind": "nanochat (tiktoken)", "vocab_size": cfg.get("vocab_size"),
            "where": str(tok_dir)}
           if (tok_dir / "tokenizer.pkl").exists() else None)
    files = [f for f in (model_file, meta_file) if f.exists()] + optim_files
    return View("nanochat", model_file, files, torch_load(model_file, trust_pickle), step=step,
                arch=arch,
                hyperparameters={k: v for k,
                                 v in meta.items() if k in ("model_config", "user_config")},
                tokenizer=tok,
                optimizer=_per_rank([torch_load(f, trust_pickle) for f in optim_files]),
                keys=sorted(meta), info={"source": directory.name,
                                         "val_bpb": _float(meta.get("val_bpb")),
                                         "missing_meta": not meta_file.exists()}, raw=meta)


def _per_rank(loaded: list) -> list | None:
    """nanochat saves one file per rank, each a list of optimizer state dicts (or one)."""
    return [o for item in loaded for o in (item if isinstance(item, list) else [item])] or None


def read_hf(directory: Path, trust_pickle: bool = False) -> View:
    config = json.loads((directory / "config.json").read_text())
    weights = [directory / name for name in hf_weight_files(directory)]
    files = [directory / "config.json", *weights]
    if weights and weights[0].suffix == ".safetensors":
        state: Mapping = SafetensorsDict(weights)
    else:
        state = {k: v for w in weights for k, v in torch_load(w, trust_pickle).items()}
    trainer = directory / "trainer_state.json"
    progress = json.loads(trainer.read_text()) if trainer.exists() else {}
    m = re.search(r"checkpoint-(\d+)$", directory.name)
    step = _int(progress.get("global_step")) if progress else (int(m[1]) if m else None)
    tok_files = [directory / f for f in ("tokenizer.json", "vocab.json",
                                         "merges.txt") if (directory / f).exists()]
    files += tok_files
    optim = directory / "optimizer.pt"
    if optim.exists():
        files.append(optim)
    # what `lmpipe ckpt export --format safetensors` writes
    if config.get("format") == "lmpipe-safetensors":
        config = {**config, **config.get("architecture", {}),
                  "model_type": config.get("model_type")}
        step = config.get("step")
    get = lambda *names: next((config[n] for n in names if n in config), None)  # noqa: E731
    arch = {"type": config.get("model_type", "hf"), "vocab_size": get("vocab_size"),
            "block_size": get("n_positions", "max_position_embeddings", "block_size"),
            "n_layer": get("n_layer", "num_hidden_layers"),
            "n_head": get("n_head", "num_attention_heads"), "n_embd": get("n_embd", "hidden_size")}
    return View("hf", directory, files, state, step=step, arch=arch, hyperparameters=config,
                tokenizer={"kind": "hf", "vocab_size": arch["vocab_size"],
                           "where": str(tok_files[0])} if tok_files else None,
                optimizer=torch_load(optim, trust_pickle) if optim.exists() else None,
                versions={"transformers": config.get("transformers_version")}, keys=sorted(config),
                info={"source": directory.name, "val_loss": _float(progress.get("best_metric"))},
                raw=config)


def hf_weight_files(directory: Path) -> list[str]:
    for name in HF_WEIGHTS:
        if (directory / name).exists():
            if name.endswith(".index.json"):
                return sorted(set(json.loads((directory
                                              / name).read_text())["weight_map"].values()))
            return [name]
    return []


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsDict(Mapping):
    """{name: tensor} over safetensors files: shapes from the headers, each tensor read on
    access."""

    def __init__(self, paths: list[Path]):
        from safetensors import safe_open

        self._where = {}
        for path in paths:
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:
                raise UserError(f"{path}: not a readable safetensors file ({e}); re-export or "
                                "re-download it") from None
            self._where.update({k: f for k in f.keys()})

    def __getitem__(self, key: str):
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        s = self._where[key].get_slice(key)
        return tuple(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), s.get_dtype())


def read_lightning(path: Path, obj: dict) -> View:
    given = obj.get("hyper_parameters") or {}  # a dict, AttributeDict or argparse.Namespace
    hp = dict(given) if isinstance(given,
                                   dict) else dict(getattr(given, "__dict__",
                                                           {"value": repr(given)}))
    state = obj["state_dict"]
    arch = {**infer_arch(state), **{k: hp[k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                       "vocab_size")
                                    if k in hp}}
    return View("lightning", path, [path], state, step=_int(obj.get("global_step")), arch=arch,
                hyperparameters=hp,
                optimizer=obj.get("optimizer_states"), keys=list(obj),
                versions={"lightning": obj.get("pytorch-lightning_version")},
                info={"epoch": obj.get("epoch")}, raw=obj)


def infer_arch(state: dict) -> dict[str, Any]:
    """What a GPT-shaped state dict says about its architecture (n_head cannot be read off
    shapes)."""
    arch: dict[str, Any] = {}
    names = {k.split("transformer.", 1)[-1] if "transformer." in k else k: k for k in state}
    shape = lambda k: tuple(shape_of(state, names[k])[0])  # noqa: E731
    if "wte.weight" in names:
        arch["vocab_size"], arch["n_embd"] = shape("wte.weight")
    if "wpe.weight" in names:
        arch["block_size"] = shape("wpe.weight")[0]
    layers = {int(m[1]) for k in names if (m := re.match(r"h\.(\d+)\.", k))}
    if layers:
        arch["n_layer"] = max(layers) + 1
    return arch


def shape_of(state: Any, key: str) -> tuple[tuple[int, ...], str]:
    if isinstance(state, SafetensorsDict):
        return state.shape_dtype(key)
    t = state[key]
    return tuple(t.shape), str(t.dtype).removeprefix("torch.")
