"""The pipeline's stages as plain functions: prepare → tokenizer → train → evaluate → generate →
register.

Prefect tasks (tasks/) wrap these; DVC stages run them through `lmpipe stage NAME`. Stages talk
through files under data/ and outputs/, and return small dicts of paths, ids and metrics.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from lmpipe import data, tokenizer
from lmpipe.common.errors import UserError
from lmpipe.common.fileio import atomic_write_text, file_md5
from lmpipe.common.paths import METRICS, REGISTERED, SAMPLES, TOKEN_STATS, TOKENIZER_DIR, TRAIN_INFO
from lmpipe.config import Config, TokenizerConfig

FINGERPRINT = TOKENIZER_DIR / "fingerprint"  # what the tokenizer was built from (cache check)



def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise UserError(f"{path}: not found; run 'lmpipe stage {stage}' (or 'lmpipe run') first")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; re-run 'lmpipe stage {stage}'") from None


def preflight(cfg: Config) -> None:
    """Check what can be checked before any work: the corpus, the devices, the GPT-2 tokenizer.

    Raises UserError, so a bad input stops `lmpipe run` before Prefect or MLflow start.
    """
    from lmpipe.common.device import pick_device

    corpus = data.split_corpus(cfg.data.source, cfg.data.val_fraction, cfg.data.seed,
                               cfg.model.block_size + 1)
    if cfg.tokenizer_kind() == "char":
        unknown = sorted(set(cfg.generate.prompt) - set(corpus.text("train") + corpus.text("val")))
        if unknown:
            raise UserError("generate.prompt has character(s) that never occur in the corpus, so "
                            "the char tokenizer cannot encode them: "
                            f"{', '.join(map(repr, unknown))}; change the prompt")
    pick_device(cfg.train.device)
    pick_device(cfg.generate.device)
    if cfg.unsupported_gradient_checkpointing():
        raise UserError(cfg.unsupported_gradient_checkpointing())
    if cfg.model.type == "gpt2":
        check_pretrained(cfg)
    elif cfg.tokenizer_kind() == "gpt2":
        tokenizer.load_gpt2(cfg.tokenizer.gpt2_path)


def check_pretrained(cfg: Config) -> str:
    """model.type gpt2: the pretrained model is there, its tokenizer is the one asked for, and its
    positions hold model.block_size. Returns where it lies (a directory, or a hub name online)."""
    name = cfg.model.pretrained
    where = tokenizer.locate_pretrained(name)
    kind = cfg.tokenizer_kind()
    if kind != "gpt2":
        raise UserError(f"tokenizer.kind={kind} cannot work with model.type=gpt2 "
                        f"(model.pretrained={name!r}): the pretrained model reads its own "
                        "tokenizer's ids; set tokenizer.kind=auto")
    own = tokenizer.load_gpt2(where)  # the model's own tokenizer must load, whatever else is set
    path = cfg.tokenizer.gpt2_path
    if path not in (name, TokenizerConfig.gpt2_path) and \
            tokenizer.load_gpt2(path).tok.get_vocab() != own.tok.get_vocab():
        raise UserError(f"tokenizer.gpt2_path={path!r} has a different vocabulary from "
                        f"model.pretrained={name!r}; leave tokenizer.gpt2_path unset (the model's "
                        "own tokenizer is used)")
    config = Path(where) / "config.json"
    n_positions = json.loads(config.read_text()).get("n_positions") if config.is_file() else None
    if n_positions is not None and cfg.model.block_size > n_positions:
        raise UserError(f"model.block_size={cfg.model.block_size} is more than the "
                        f"{n_positions} positions of model.pretrained={name!r}; set "
                        f"model.block_size to {n_positions} or less")
    return where


# --- prepare -------------------------------------------------------------------------------------

def prepare_fingerprint(cfg: Config) -> str:
    """Changes with the corpus bytes, the split settings or data.py: the prepare stage's cache
    key."""
    src = data.resolve_source(cfg.data.source)
    return _code_hash("data.py", data.fingerprint(src, cfg.data.val_fraction, cfg.data.seed))


def prepared_is_current(cfg: Config) -> bool:
    """data/prepared holds what these settings would produce (so a cached result may be reused)."""
    meta = data.PREPARED_DIR / "meta.json"
    src = data.resolve_source(cfg.data.source)
    fp = data.fingerprint(src, cfg.data.val_fraction, cfg.data.seed)
    return meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fp


def prepare(cfg: Config) -> dict:
    return data.prepare(cfg.data.source, cfg.data.val_fraction, cfg.data.seed,
                        min_chars=cfg.model.block_size + 1)


# --- tokenizer -----------------------------------------------------------------------------------

def tokenizer_fingerprint(cfg: Config) -> str:
    """Changes with the tokenizer settings, the prepared splits or tokenizer.py: its cache key."""
    meta = data.load_meta()
    parts = [json.dumps(asdict(cfg.tokenizer), sort_keys=True), file_md5(meta["train"]),
             file_md5(meta["val"])]
    if cfg.model.type == "gpt2":  # the tokenizer is the pretrained model's own
        parts.append(cfg.model.pretrained)
    return _code_hash("tokenizer.py", hashlib.sha256("|".join(parts).encode()).hexdigest())


def tokenizer_is_current(cfg: Config) -> bool:
    return (tokenizer.TOKENIZER_FILE.exists() and FINGERPRINT.exists()
            and FINGERPRINT.read_text() == tokenizer_fingerprint(cfg))


def build_tokenizer(cfg: Config) -> dict:
    """Build and save the tokenizer; write the stats table with token counts per split."""
    import pandas as pd

    meta = data.load_meta()
    texts = {s: Path(meta[s]).read_text(encoding="utf-8") for s in ("train", "val")}
    gpt2_path = (tokenizer.locate_pretrained(cfg.model.pretrained) if cfg.model.type == "gpt2"
                 else cfg.tokenizer.gpt2_path)
    tok = tokenizer.build_tokenizer(cfg.tokenizer_kind(), texts["train"], texts["val"],
                                    cfg.tokenizer.vocab_size, gpt2_path)
    stats = pd.read_csv(meta["stats"])
    stats["tokens"] = [len(tok.encode(texts[s])) for s in stats["split"]]
    stats["tokenizer"] = tok.kind
    tokenizer.save(tok)
    atomic_write_text(TOKEN_STATS, stats.to_csv(index=False))
    atomic_write_text(FINGERPRINT, tokenizer_fingerprint(cfg))
    return {"tokenizer": str(tokenizer.TOKENIZER_FILE), "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "stats": str(TOKEN_STATS)}


def _code_hash(module_file: str, fp: str) -> str:
    """Fold the stage's own source into its cache key: changed code means a changed stage."""
    src = (Path(__file__).parent / module_file).read_bytes()
    return hashlib.sha256(src + fp.encode()).hexdigest()


# --- train ---------------------------------------------------------------------------------------

def train(cfg: Config, entry: str = "cli", resume=None, out: Path | None = None) -> dict:
    """Train with periodic checkpoints, tracked in one MLflow run. Fresh unless `resume` (a
    resuming.Resume) or the param train.resume ("latest" or a path) asks to resume. out: a
    directory of this call's own for train.json, the training log and plot (train.attempts), so
    that concurrent trainings share no file; None: outputs/."""
    from lmpipe.ckpt.integrity import require_intact
    from lmpipe.ckpt.locate import resolve_checkpoint
    from lmpipe.ckpt.rebuild import EARLIER
    from lmpipe.ckpt.store import load_checkpoint
    from lmpipe.train.resume import Resume, check_architecture, recorded_data, say
    from lmpipe.train.run import run_training

    if resume is None and not cfg.train.resume and cfg.model.type == "gpt2":
        check_pretrained(cfg)  # fail before any work when the pretrained model is not here
    if resume is None and cfg.train.resume:  # the tracked param: resume to train.steps
        resume = Resume(resolve_checkpoint(cfg.train.resume, cfg.checkpoint.dir),
                        total=cfg.train.steps)
        require_intact(resume.checkpoint, "the checkpoint train.resume names",
                       EARLIER.format(path=resume.checkpoint))
        ckpt = load_checkpoint(resume.checkpoint, mmap=True)
        check_architecture(ckpt, cfg.model, resume.checkpoint, f"train.resume={cfg.train.resume}")
        saved, fingerprint = recorded_data(ckpt)
        # DVC tracks data.source
        if fingerprint and fingerprint != data.load_meta().get("fingerprint"):
            say(f"train.resume continues {resume.checkpoint} on data.source={cfg.data.source}, not "
                f"on the data it was trained on ({saved.source}); the new checkpoints record the "
                "new source")
    info = run_training(cfg, entry, resume, out)
    _write_json(TRAIN_INFO if out is None else out / TRAIN_INFO.name, info)
    return info


def _train_info(train_info: dict | None) -> dict:
    return train_info or _read_json(TRAIN_INFO, "train")


# --- evaluate ------------------------------------------------------------------------------------

def evaluate(cfg: Config, train_info: dict | None = None) -> dict:
    """Val loss, perplexity and bits per byte of the final checkpoint → outputs/metrics.json +
    MLflow."""
    import torch

    from lmpipe import tracking
    from lmpipe.ckpt.rebuild import load_for_inference
    from lmpipe.common.device import pick_device
    from lmpipe.evaluation import evaluate as eval_model
    from lmpipe.tracking import runs

    info = _train_info(train_info)
    device = pick_device(cfg.train.device)
    ckpt, model, tok = load_for_inference(info["checkpoint"], device)
    val_text = Path(data.load_meta()["val"]).read_text(encoding="utf-8")
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    metrics = eval_model(model, val_ids, len(val_text.encode()), ckpt["block_size"],
                         cfg.evaluate.batch_size, cfg.evaluate.max_batches, device)
    _write_json(METRICS, {**metrics, "step": ckpt["step"]})
    tracking.setup(cfg.tracking.experiment)
    runs.log_eval_metrics(info["run_id"], ckpt["step"], metrics, info.get("final_model_id"))
    return metrics


# --- generate ------------------------------------------------------------------------------------

def generate(cfg: Config, train_info: dict | None = None) -> dict:
    """Samples from the final checkpoint → outputs/samples.txt + an MLflow artifact."""
    from lmpipe import tracking
    from lmpipe.ckpt.rebuild import load_for_inference
    from lmpipe.common.device import pick_device
    from lmpipe.generate import generate_text
    from lmpipe.tracking import runs

    info = _train_info(train_info)
    g = cfg.generate
    device = pick_device(g.device)
    ckpt, model, tok = load_for_inference(info["checkpoint"], device)
    samples = [generate_text(model, tok, g.prompt, g.max_new_tokens, g.temperature, g.top_k,
                             g.seed + i, device)
               for i in range(g.num_samples)]
    text = "\n\n-----\n\n".join(samples) + "\n"
    atomic_write_text(SAMPLES, text)
    tracking.setup(cfg.tracking.experiment)
    runs.log_samples(info["run_id"], ckpt["step"], text)
    return {"samples": str(SAMPLES), "text": samples[0]}


# --- register ------------------------------------------------------------------------------------

def registered_name(cfg: Config, source: str) -> str:
    """One registered model per model type and data source."""
    return cfg.tracking.model_name or f"lmpipe-{cfg.model.type}-{source}"


def register(cfg: Config, train_info: dict | None = None) -> dict:
    """Register the final checkpoint as a pyfunc model version → outputs/registered.json."""
    from lmpipe import tracking
    from lmpipe.tracking import registry

    info = _train_info(train_info)
    if not cfg.tracking.register:
        result = {"registered": False}
    else:
        tracking.setup(cfg.tracking.experiment)
        result = registry.register_model(info["run_id"], Path(info["checkpoint"]),
                                         registered_name(cfg, info["source"]), info["step"],
                                         cfg.flat(), cfg.generate)
    _write_json(REGISTERED, result)
    return result
