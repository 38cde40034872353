"""A/B comparison of checkpoints: each one verified and loaded the same way, scored on the same
text (bits per byte, comparable across tokenizers), sampled with the same prompt and seed, and
laid side by side.

Plain functions, so `lmpipe compare` and a flow can share them: resolve → compare (rows) →
render_table / to_json / log.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmpipe.common.errors import UserError
from lmpipe.common.paths import PREPARED_DIR
from lmpipe.config import Config

DEFAULT_TEXT = PREPARED_DIR / "val.txt"

# (row key, table heading): the table's columns, in order; JSON keeps every row key.
COLUMNS = [("name", "name"), ("model_type", "type"), ("tokenizer", "tokenizer"), ("step", "step"),
           ("parameters", "params"), ("size_mb", "size MB"), ("val_bpb", "val bpb"),
           ("val_loss", "val loss"), ("perplexity", "ppl"), ("tokens_per_s", "tok/s")]


@dataclass(frozen=True)
class Settings:
    """What every model is measured with: the same text, prompt, seed and sampling."""
    text: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    device: str
    batch_size: int
    max_batches: int


def settings(cfg: Config, text: str | Path | None = None, **overrides: Any) -> Settings:
    """The generate and evaluate sections of the config, with the overrides that are not None."""
    g, e = cfg.generate, cfg.evaluate
    base = {"text": str(text or DEFAULT_TEXT), "prompt": g.prompt,
            "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_k": g.top_k,
            "seed": g.seed, "device": g.device, "batch_size": e.batch_size,
            "max_batches": e.max_batches}
    base.update({k: v for k, v in overrides.items() if v is not None})
    for key, bad, need in (("max_batches", base["max_batches"] < 0,
                            "0 (the whole text) or a positive integer"),
                           ("max_new_tokens", base["max_new_tokens"] < 1, "a positive integer"),
                           ("temperature", not base["temperature"] > 0, "a positive number"),
                           ("top_k", base["top_k"] < 0, "0 (off) or a positive integer")):
        if bad:
            raise UserError(f"--{key.replace('_', '-')} must be {need}, got {base[key]}")
    return Settings(**base)


def resolve(specs: list[str], directory: str | Path) -> list[Path]:
    """Each spec (a path, a glob, 'latest' or an MLflow URI) → a checkpoint file; every one is
    checked before any model is loaded, so a bad one stops the comparison before any work."""
    from lmpipe.ckpt.store import load_checkpoint
    from lmpipe.tracking.uris import resolve as resolve_spec

    if len(specs) < 2:
        got = "none" if not specs else f"one ({specs[0]!r})"
        raise UserError(f"compare needs at least two checkpoints; got {got}; pass two or more "
                        "paths, globs, 'latest' or models:/ and runs:/ URIs")
    paths = [resolve_spec(spec, directory) for spec in specs]
    for path in paths:
        if not path.is_file():
            load_checkpoint(path)  # raises the usual "Checkpoint not found" line
    seen: dict[Path, str] = {}
    for spec, path in zip(specs, paths, strict=True):
        if path.resolve() in seen:
            raise UserError(f"compare needs different checkpoints; {seen[path.resolve()]!r} and "
                            f"{spec!r} both name {path}")
        seen[path.resolve()] = spec
    return paths


def read_text(path: str | Path) -> str:
    from lmpipe.data import read_text as read

    path = Path(path)
    if not path.is_file():
        hint = ("run 'lmpipe stage prepare' first, or " if path == DEFAULT_TEXT else "")
        raise UserError(f"{path}: validation text not found; {hint}pass --text FILE")
    text = read(path)
    if not text.strip():
        raise UserError(f"{path}: empty or whitespace-only; pass --text FILE with some text")
    return text


def compare(paths: list[Path], s: Settings) -> list[dict[str, Any]]:
    """One row per checkpoint, loaded one at a time (only one model in memory)."""
    from lmpipe.common.device import pick_device

    text = read_text(s.text)
    device = pick_device(s.device)
    rows = [measure(path, text, s, device) for path in paths]
    names = [r["name"] for r in rows]
    if len(set(names)) < len(names):  # same file names in different folders
        for r in rows:
            r["name"] = r["path"]
    return rows


def measure(path: Path, text: str, s: Settings, device: str) -> dict[str, Any]:
    """One checkpoint: verify and load, score the text, generate a sample, time the sampling."""
    from lmpipe.ckpt.payload import architecture
    from lmpipe.ckpt.rebuild import load_for_inference

    ckpt, model, tok = load_for_inference(path, device)
    metrics = score(model, tok, text, ckpt["block_size"], s, device, path)
    sample, tokens_per_s = timed_sample(model, tok, s, device, path)
    row = {"name": path.name, "path": str(path), "model_type": type_label(architecture(ckpt)),
           "tokenizer": tok.kind, "step": int(ckpt.get("step") or 0),
           "parameters": sum(p.numel() for p in model.parameters()),
           "size_mb": path.stat().st_size / 1e6, "val_bpb": metrics["bits_per_byte"],
           "val_loss": metrics["val_loss"], "perplexity": metrics["perplexity"],
           "eval_tokens": int(metrics["tokens"]), "tokens_per_s": tokens_per_s, "sample": sample}
    return row


def type_label(arch: dict[str, Any]) -> str:
    """The model type, with its LoRA rank when the checkpoint was trained with adapters."""
    r = arch.get("lora_r") or 0
    return f"{arch['type']}+lora(r={r})" if r else str(arch["type"])


def score(model, tok, text: str, block_size: int, s: Settings, device: str,
          path: Path) -> dict[str, float]:
    """evaluation.evaluate on the model's own tokens of the text; windows shrink to fit a text
    shorter than the model's context."""
    import torch

    from lmpipe.evaluation import evaluate

    try:
        ids = tok.encode(text)
    except UserError as e:
        raise UserError(f"{path.name} cannot score {s.text}: {e}") from None
    if len(ids) < 2:
        raise UserError(f"{s.text}: too short to score ({len(ids)} token(s) for {path.name}); "
                        "pass --text FILE with more text")
    window = min(block_size, len(ids) - 1)
    return evaluate(model, torch.tensor(ids, dtype=torch.long), len(text.encode()), window,
                    s.batch_size, s.max_batches, device)


def timed_sample(model, tok, s: Settings, device: str, path: Path) -> tuple[str, float]:
    """The sample for the shared prompt and seed, and the sampling speed in new tokens per second
    (after a short warm-up, so the first calls' setup is not counted)."""
    from lmpipe.generate import generate_text

    args = (s.temperature, s.top_k, s.seed, device)
    try:
        generate_text(model, tok, s.prompt, min(s.max_new_tokens, 8), *args)
    except UserError as e:
        raise UserError(f"{path.name} cannot take the prompt: {e}") from None
    start = time.perf_counter()
    text = generate_text(model, tok, s.prompt, s.max_new_tokens, *args)
    return text, s.max_new_tokens / max(time.perf_counter() - start, 1e-9)


# --- output --------------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]):
    """The side-by-side table as a pandas DataFrame (one row per model, COLUMNS' headings)."""
    import pandas as pd

    return pd.DataFrame([{head: r[key] for key, head in COLUMNS} for r in rows])


def render_table(rows: list[dict[str, Any]], s: Settings) -> str:
    """The table, then one block per model with its sample: what `lmpipe compare` prints."""
    df = table(rows)
    formats = {"params": _count, "size MB": "{:.2f}".format, "val bpb": "{:.4f}".format,
               "val loss": "{:.4f}".format, "ppl": "{:.2f}".format, "tok/s": "{:.1f}".format}
    lines = [f"validation text: {s.text}, the same for every model (bpb compares across "
             "tokenizers; loss and ppl are in each model's own tokens)", "",
             df.to_string(index=False, formatters=formats), ""]
    lines.append(f"samples: prompt {s.prompt!r}, seed {s.seed}, {s.max_new_tokens} new tokens, "
                 f"temperature {s.temperature}, top_k {s.top_k}")
    for r in rows:
        lines += ["", f"--- {r['name']} ---", r["sample"].rstrip("\n")]
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def to_json(rows: list[dict[str, Any]], s: Settings) -> str:
    """The same data as the table, every field, as JSON; non-finite numbers become null."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in r.items()} for r in rows]
    return json.dumps({"settings": asdict(s), "models": clean}, indent=2) + "\n"


def log(rows: list[dict[str, Any]], s: Settings, experiment: str) -> str:
    """The comparison as one MLflow run (lmpipe/tracking/runs.py): the checkpoints and settings as
    params, each model's metrics under its name, the table as compare.md and compare.json."""
    from lmpipe.tracking.runs import log_comparison

    return log_comparison(experiment, *_logged(rows, s))


def log_into(run_id: str, rows: list[dict[str, Any]], s: Settings) -> None:
    """What `log` logs, into an existing run (the A/B flow's parent run)."""
    from lmpipe.tracking.runs import log_comparison_into

    log_comparison_into(run_id, *_logged(rows, s))


def _logged(rows: list[dict[str, Any]], s: Settings) -> tuple[dict, dict, dict, dict]:
    """(params, metrics, artifacts, lineage inputs) of a comparison in MLflow."""
    params = {f"checkpoint_{i}": r["path"] for i, r in enumerate(rows, 1)}
    params.update({k: v for k, v in asdict(s).items() if k != "device"})
    metrics = {}
    for r in rows:
        name = re.sub(r"[^\w\-. /]", "_", r["name"].removesuffix(".pt"))
        metrics.update({f"{name}/{k}": float(r[k]) for k in
                        ("val_bpb", "val_loss", "perplexity", "tokens_per_s", "parameters",
                         "size_mb") if math.isfinite(float(r[k]))})
    artifacts = {"compare.md": "```\n" + render_table(rows, s) + "```\n",
                 "compare.json": to_json(rows, s)}
    return params, metrics, artifacts, {"val_text": s.text}


# --- the A/B flow (flows/ab.py): one parent run, its children's final checkpoints compared -------

def open_ab_run(cfg: Config, names: list[str], params: dict[str, Any]) -> str:
    """The A/B test's parent run (named ab-<N>configs, left running): the configurations' names
    and `params` as params. Returns its id."""
    from lmpipe.tracking.runs import start_parent_run

    configs = {f"config_{i}": name for i, name in enumerate(names, 1)}
    return start_parent_run(cfg.tracking.experiment, f"ab-{len(names)}configs",
                            {**configs, **params}, {"lmpipe.kind": "ab"})


def compare_ab(cfg: Config, trained: list[dict[str, Any]], names: list[str],
               parent_run_id: str) -> tuple[list[dict[str, Any]], Settings]:
    """The children's final checkpoints (trained: train_model's results) compared, one row per
    child under its name; each child's scores logged on its own run as the evaluate stage's
    eval_* metrics, and the table into the parent run (compare.md, compare.json)."""
    from lmpipe import tracking
    from lmpipe.tracking.runs import log_eval_metrics

    s = settings(cfg)
    rows = compare([Path(t["checkpoint"]) for t in trained], s)
    tracking.setup(cfg.tracking.experiment)
    for row, t, name in zip(rows, trained, names, strict=True):
        row["name"] = name
        scores = {"val_loss": row["val_loss"], "perplexity": row["perplexity"],
                  "bits_per_byte": row["val_bpb"], "tokens": row["eval_tokens"]}
        log_eval_metrics(t["run_id"], row["step"], scores, t.get("final_model_id"))
    log_into(parent_run_id, rows, s)
    return rows, s


def close_ab_run(cfg: Config, run_id: str, ok: bool) -> None:
    """The parent run ends FINISHED, or FAILED when the A/B test did not complete."""
    from lmpipe import tracking
    from lmpipe.tracking.runs import end_run

    tracking.setup(cfg.tracking.experiment)
    end_run(run_id, ok)
