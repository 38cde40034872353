"""What `lmpipe ckpt list|inspect|verify|diff` compute: rows, descriptions, problems, differences.

Listing reads file names, the manifest and small JSON files only; lmpipe checkpoints are listed
without importing torch. Everything else opens checkpoints through formats.open_view.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from lmpipe.ckpt.views import (
    NANOCHAT_RE,
    View,
    hf_weight_files,
    nanochat_steps,
    open_view,
    shape_of,
)
from lmpipe.common.errors import UserError

SKIP_DIRS = {"mlruns", "__pycache__", "node_modules"}


@dataclass
class Row:
    format: str
    model: str
    source: str
    step: int | None
    time: datetime | None
    size: int
    val_loss: float | None
    # ok (size matches the manifest) | unverified | corrupt | - (no manifest: not checked)
    verified: str
    run_id: str
    path: str
    val_step: int | None = None  # the step val_loss comes from; val_loss is None if that is earlier

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self),
                "time": self.time.isoformat(timespec="seconds") if self.time else None}


def scan(root: str | Path, depth: int = 3) -> list[Row]:
    """Every checkpoint under `root` (itself and `depth` levels of subdirectories), newest last."""
    from lmpipe.ckpt.store import refuse_manifest

    root = Path(root).expanduser()
    if not root.is_dir():
        refuse_manifest(root, "list them with 'lmpipe ckpt list {directory}/'")
        raise UserError(f"Checkpoint not found: {root} is not a directory; train with "
                        "ENABLE_CHECKPOINTS=true, "
                        "or pass the directory that holds the checkpoints")
    rows = [row for d in _dirs(root, depth) for row in _rows_in(d)]
    return sorted(rows, key=lambda r: (r.time or datetime.min, r.step or 0))


def _dirs(root: Path, depth: int) -> Iterator[Path]:
    yield root
    if depth > 0:
        try:
            subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                             and p.name not in SKIP_DIRS)
        except OSError:  # unreadable: nothing to list there
            return
        for d in subdirs:
            yield from _dirs(d, depth - 1)


def _rows_in(d: Path) -> list[Row]:
    try:
        return _rows(d)
    # a malformed config.json or meta_*.json
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Row("?", "?", "?", None, None, 0, None, "unreadable", "",
                    f"{d} ({type(e).__name__}: {e})")]


def _rows(d: Path) -> list[Row]:
    if (d / "config.json").exists() and hf_weight_files(d):
        return [_hf_row(d)]
    rows = _lmpipe_rows(d) + [_nanochat_row(d, s) for s in nanochat_steps(d)]
    claimed = {Path(r.path).name for r in rows}
    others = [p for p in sorted(d.iterdir()) if p.is_file() and p.suffix in (".pt", ".ckpt", ".pth")
              and p.name not in claimed and not p.name.startswith(".")
              and not NANOCHAT_RE.match(p.name)
              and not p.name.startswith("checkpoint_")]
    return rows + [_torch_row(p) for p in others]


def _mtime(p: Path) -> datetime:
    return datetime.fromtimestamp(p.stat().st_mtime)


def _lmpipe_rows(d: Path) -> list[Row]:
    from lmpipe.ckpt.manifest import read_manifest
    from lmpipe.ckpt.payload import current_val_loss
    from lmpipe.ckpt.store import parse_filename

    manifest = read_manifest(d)
    rows = []
    for p in d.glob("checkpoint_*.pt"):
        named, entry, size = parse_filename(p) or {}, manifest.get(p.name), p.stat().st_size
        verified = "unverified" if entry is None else ("ok" if entry.get("size") == size
                                                       else "corrupt")
        metrics, step = (entry or {}).get("metrics") or {}, named.get("step")
        rows.append(Row("lmpipe", named.get("model", "?"), named.get("source", "?"), step,
                        named.get("time") or _mtime(p), size, current_val_loss(metrics, step),
                        verified, (entry or {}).get("run_id") or "", str(p),
                        metrics.get("val_step")))
    return rows


def _nanochat_row(d: Path, step: int) -> Row:
    model, meta = d / f"model_{step:06d}.pt", d / f"meta_{step:06d}.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    cfg = info.get("model_config") or {}
    size = sum(p.stat().st_size for p in [model, meta,
                                          *d.glob(f"optim_{step:06d}*.pt")] if p.exists())
    return Row("nanochat", f"nanochat-d{cfg['n_layer']}" if "n_layer" in cfg else "nanochat",
               d.name, step,
               _mtime(model), size, None, "-" if info else "no meta", "", str(model))


def _hf_row(d: Path) -> Row:
    cfg = json.loads((d / "config.json").read_text())
    trainer = d / "trainer_state.json"
    progress = json.loads(trainer.read_text()) if trainer.exists() else {}
    files = [d / f for f in hf_weight_files(d)]
    return Row("hf", cfg.get("model_type", "?"), d.name, progress.get("global_step"),
               _mtime(d / "config.json"),
               sum(f.stat().st_size for f in files if f.exists()), progress.get("best_metric"), "-",
               "", str(d))


def _torch_row(p: Path) -> Row:
    try:
        v = open_view(p)
    # one unreadable file must not stop the listing; verify and doctor explain it
    except Exception as e:
        return Row("?", "?", "?", None, _mtime(p), p.stat().st_size, None, _problem_word(e), "",
                   str(p))
    return Row(v.format, str(v.arch.get("type") or v.format), str(v.info.get("source") or p.stem),
               v.step, _mtime(p),
               p.stat().st_size, v.info.get("val_loss"), "-", str(v.info.get("run_id") or ""),
               str(p), v.info.get("val_step"))


def _problem_word(e: Exception) -> str:
    from lmpipe.ckpt.safeload import UnsafePickle

    return "unsafe" if isinstance(e, UnsafePickle) else "unreadable"


def filter_rows(rows: list[Row], model: str | None, source: str | None,
                step: int | None) -> list[Row]:
    return [r for r in rows if (model is None or r.model.lower() == model.lower())
            and (source is None or source.lower() in r.source.lower()) and (step is None
                                                                            or r.step == step)]


# --- inspect -------------------------------------------------------------------------------------

def describe(v: View) -> dict[str, Any]:
    """Everything `lmpipe ckpt inspect` shows, JSON-able; tensors are described, not read."""
    tensors, seen, unique = [], set(), 0
    for name in v.state:
        shape, dtype = shape_of(v.state, name)
        n = _numel(shape)
        tensors.append({"name": name, "shape": list(shape), "dtype": dtype, "params": n})
        key = _storage_key(v.state, name)
        if key not in seen:
            seen.add(key)
            unique += n
    return {
        "format": v.format, "path": str(v.path), "format_version": v.format_version,
        "files": [{"path": str(f), "size": f.stat().st_size} for f in v.files if f.exists()],
        "keys": v.keys, "step": v.step, "info": _info(v.info),
        "architecture": {k: x for k, x in v.arch.items() if x is not None},
        "hyperparameters": _plain(v.hyperparameters), "tensors": tensors,
        "total_params": sum(t["params"] for t in tensors), "unique_params": unique,
        "optimizer": optimizer_summary(v.optimizer, v.format), "tokenizer": v.tokenizer,
        "versions": v.versions, **_lora_summary(v),
    }


def _lora_summary(v: View) -> dict[str, Any]:
    """A LoRA checkpoint's settings and base (loaded and checked: a missing or different base is
    refused with one line)."""
    raw = v.raw if v.format == "lmpipe" and isinstance(v.raw, dict) else {}
    if not raw.get("base_model"):
        return {}
    from lmpipe.ckpt.lora import build_base, lora_settings, model_section

    build_base(raw["base_model"], str(v.path))
    base = raw["base_model"]
    return {"lora": {**lora_settings(model_section(raw)), "base": base.get("name"),
                     "base_type": base.get("type"), "base_sha256": base.get("sha256"),
                     "base_check": "found, sha256 matches"}}


def _info(info: dict[str, Any]) -> dict[str, Any]:
    """JSON-able, without empty values; a val_loss from an earlier step stays as null beside
    val_step, so that a reader of the JSON sees it is not the checkpoint's own."""
    return {k: _plain(x) for k, x in info.items()
            if x is not None or (k == "val_loss" and info.get("val_step") is not None)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _storage_key(state, name: str):
    """Tied weights (lm_head = wte) share one storage: count their parameters once."""
    import torch

    t = state[name] if isinstance(state, dict) else None
    if isinstance(t, torch.Tensor):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
    return name


def _plain(x: Any) -> Any:
    """JSON-able: tensors become numbers or shapes; unknown objects become their repr."""
    import torch

    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else f"tensor{list(x.shape)}"
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x) if not isinstance(x, datetime) else x.isoformat(timespec="seconds")


def optimizer_summary(opt: Any, fmt: str) -> list[dict[str, Any]] | None:
    if opt is None:
        return None
    out = []
    for o in opt if isinstance(opt, list) else [opt]:
        if not (isinstance(o, dict) and "param_groups" in o):
            out.append({"type": type(o).__name__})
            continue
        state = o.get("state") or {}
        keys = sorted({k for st in state.values() for k in st})
        groups = [{"params": len(g["params"]), **{k: _plain(g[k]) for k in ("lr", "weight_decay",
                                                                            "betas", "momentum")
                                                  if k in g}} for g in o["param_groups"]]
        steps = [int(st["step"]) for st in state.values() if "step" in st]
        out.append({"type": _optimizer_type(keys, o["param_groups"], fmt), "param_groups": groups,
                    "params_with_state": len(state), "state_keys": keys,
                    "step": max(steps) if steps else None})
    return out


def _optimizer_type(keys: list[str], groups: list[dict], fmt: str) -> str:
    if {"exp_avg", "exp_avg_sq"} <= set(keys):
        if fmt in ("lmpipe", "nanogpt") or any(g.get("decoupled_weight_decay") for g in groups):
            return "AdamW"
        return "Adam or AdamW"
    if "momentum_buffer" in keys:
        return "SGD or Muon (momentum)"
    return "unknown (state keys: " + ", ".join(keys) + ")" if keys else "no state yet"


# --- diff ----------------------------------------------------------------------------------------

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: _plain(d)} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v,
                                                             dict) else {f"{prefix}{k}": _plain(v)})
    return out


def diff(a: View, b: View) -> dict[str, Any]:
    """Hyperparameter differences, tensors added/removed/reshaped, and per-tensor weight-change
    norms (‖B−A‖, relative to ‖A‖, and the largest absolute change)."""
    fa = flatten({"architecture": a.arch, "step": a.step, **a.hyperparameters})
    fb = flatten({"architecture": b.arch, "step": b.step, **b.hyperparameters})
    params = [{"key": k, "a": fa.get(k),
               "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    sa = {n: shape_of(a.state, n) for n in a.state}
    sb = {n: shape_of(b.state, n) for n in b.state}
    reshaped = [{"name": n, "a": list(sa[n][0]),
                 "b": list(sb[n][0])} for n in sa if n in sb and sa[n][0] != sb[n][0]]
    changes, total_d, total_a = [], 0.0, 0.0
    for n in sa:
        if n in sb and sa[n][0] == sb[n][0]:
            ta, tb = a.state[n].double(), b.state[n].double()
            d, na = float((tb - ta).norm()), float(ta.norm())
            total_d, total_a = total_d + d * d, total_a + na * na
            changes.append({"name": n, "norm": d,
                            "relative": d / na if na else (0.0 if d == 0 else float("inf")),
                            "max_abs": float((tb - ta).abs().max()) if ta.numel() else 0.0})
    changes.sort(key=lambda c: -c["relative"])
    return {"a": str(a.path), "b": str(b.path), "hyperparameters": params,
            "added": sorted(set(sb) - set(sa)), "removed": sorted(set(sa) - set(sb)),
            "reshaped": reshaped,
            "changes": changes,
            "relative_change": (total_d ** 0.5) / (total_a ** 0.5) if total_a else 0.0,
            "identical": sum(1 for c in changes if c["norm"] == 0.0)}
