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
from typing import NamedTuple

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
    resuming.Resume) or the param train.resume ("latest", a path, or an MLflow URI such as
    models:/NAME@champion) asks to resume. out: a directory of this call's own for train.json, the
    training log and plot (train.attempts), so that concurrent trainings share no file; None:
    outputs/."""
    from lmpipe.ckpt.integrity import require_intact
    from lmpipe.ckpt.rebuild import EARLIER
    from lmpipe.ckpt.store import load_checkpoint
    from lmpipe.tracking.uris import resolve
    from lmpipe.train import distributed
    from lmpipe.train.resume import Resume, check_architecture, recorded_data, say
    from lmpipe.train.run import run_training

    if resume is None and not cfg.train.resume and cfg.model.type == "gpt2":
        check_pretrained(cfg)  # fail before any work when the pretrained model is not here
    if resume is None and cfg.train.resume:  # the tracked param: resume to train.steps
        resume = Resume(resolve(cfg.train.resume, cfg.checkpoint.dir),
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
    if distributed.wants_launch(cfg.train.nproc):
        return _launch(cfg, entry, resume)
    info = run_training(cfg, entry, resume, out)
    if info is None:  # a rank > 0 of a torchrun job: rank 0 reports
        return {}
    _write_json(TRAIN_INFO if out is None else out / TRAIN_INFO.name, info)
    return info


def _launch(cfg: Config, entry: str, resume) -> dict:
    """train.nproc > 1 outside torchrun: train under `torchrun --nproc-per-node N` (one attempt,
    lmpipe.train.attempts), which publishes train.json, the log and the plot into outputs/."""
    import uuid

    from lmpipe.train import attempts

    directory = attempts.ATTEMPTS / uuid.uuid4().hex
    try:
        return attempts.train(cfg.to_dict(), directory, entry, resume)
    except attempts.TrainingCrashed as e:  # no Prefect retry follows: say where to go on from
        raise attempts.crashed_without_retry(e, directory, cfg.checkpoint.dir) from None


def _train_info(train_info: dict | None) -> dict:
    return train_info or _read_json(TRAIN_INFO, "train")


# --- resume: train on from any checkpoint -------------------------------------------------------

class ResumePlan(NamedTuple):
    """A resume, checked before anything is written: the checkpoint, what is asked of it
    (a resuming.Resume), the loaded checkpoint and the data it trains on (a resuming.DataChoice)."""
    path: Path
    resume: object
    ckpt: dict
    choice: object


def plan_resume(cfg: Config, checkpoint: str = "latest", step: int | None = None,
                steps: int | None = None, lr: float | None = None, source: str | None = None,
                no_optimizer: bool = False, warmup: int | None = None,
                overrides=()) -> ResumePlan:
    """Resolve and check a resume (`lmpipe resume`, the lmpipe-resume flow); raises UserError before
    anything is written. overrides: the `-S` settings, to refuse an architecture the checkpoint
    does not have."""
    from lmpipe.ckpt.integrity import require_intact
    from lmpipe.ckpt.rebuild import EARLIER
    from lmpipe.ckpt.store import load_checkpoint
    from lmpipe.config import explicit_settings
    from lmpipe.tracking.uris import resolve
    from lmpipe.train import resume as resuming

    path = resolve(checkpoint, cfg.checkpoint.dir, step=step)
    require_intact(path, "the checkpoint to resume", EARLIER.format(path=path))
    if warmup is None:
        warmup = resuming.REWARMUP if no_optimizer else 0
    resume = resuming.Resume(path, steps, lr, no_optimizer, warmup)
    ckpt = load_checkpoint(path, mmap=True)
    resuming.plan(ckpt, resume)
    # an architecture asked for explicitly
    if any(key.startswith("model.") for key in explicit_settings(overrides)):
        resuming.check_architecture(ckpt, cfg.model, path, "lmpipe resume")
    if source:
        resuming.check_new_source(ckpt, source, cfg.data.val_fraction, cfg.data.seed)
        choice = resuming.new_data(cfg, source)
    else:
        choice = resuming.own_data(ckpt, path)
    return ResumePlan(path, resume, ckpt, choice)


def resume(cfg: Config, plan: ResumePlan, entry: str = "cli") -> dict:
    """Train on from the plan's checkpoint, re-preparing its data first when needed; returns what
    train returns."""
    import dataclasses

    from lmpipe.train.resume import say

    say(plan.choice.note)
    cfg = dataclasses.replace(cfg, data=plan.choice.data)
    if plan.choice.prepare:
        prepare(cfg)
    return train(cfg, entry=entry, resume=plan.resume)


def sample(cfg: Config, checkpoint: str = "latest", prompt: str | None = None,
           max_new_tokens: int | None = None, temperature: float | None = None,
           top_k: int | None = None, seed: int | None = None, device: str | None = None) -> dict:
    """Text from any checkpoint (`lmpipe generate`, the lmpipe-generate flow); each setting left
    None comes from the generate section. Returns the text, the checkpoint, its step, the device."""
    from lmpipe.ckpt.rebuild import load_for_inference
    from lmpipe.common.device import pick_device
    from lmpipe.generate import generate_text
    from lmpipe.tracking.uris import resolve

    g = cfg.generate
    path = resolve(checkpoint, cfg.checkpoint.dir)
    device = pick_device(device or g.device)
    ckpt, model, tok = load_for_inference(path, device)
    pick = lambda a, d: d if a is None else a  # noqa: E731
    text = generate_text(model, tok, pick(prompt, g.prompt), pick(max_new_tokens, g.max_new_tokens),
                         pick(temperature, g.temperature), pick(top_k, g.top_k), pick(seed, g.seed),
                         device)
    return {"text": text, "checkpoint": str(path), "step": ckpt["step"], "device": str(device)}


# --- evaluate ------------------------------------------------------------------------------------

def evaluate(cfg: Config, train_info: dict | None = None) -> dict:
    """Val loss, perplexity and bits per byte of every checkpoint of the training run (each on the
    same val tokens, evaluate.max_batches bounding them) → MLflow eval_* on the run and on each
    checkpoint's logged model at its step; the final checkpoint's → outputs/metrics.json.

    Returns the final checkpoint's metrics and "checkpoints": one row per checkpoint, by step
    ({"step", "checkpoint", "val_loss", "perplexity", "bits_per_byte"}).
    """
    from lmpipe import tracking
    from lmpipe.common.device import pick_device
    from lmpipe.tracking import runs

    info = _train_info(train_info)
    device = pick_device(cfg.train.device)
    val_text = Path(data.load_meta()["val"]).read_text(encoding="utf-8")
    tracking.connect()  # not setup: a tracking server that is down gets the metrics later
    model_ids = {**(info.get("model_ids") or {}), str(info["step"]): info.get("final_model_id")}
    rows, final = [], {}
    for path in _run_checkpoints(info):
        step, metrics = _evaluate_checkpoint(path, val_text, cfg, device)
        runs.log_eval_metrics(info["run_id"], step, metrics, model_ids.get(str(step)))
        rows.append({"step": step, "checkpoint": str(path),
                     **{k: metrics[k] for k in ("val_loss", "perplexity", "bits_per_byte")}})
        final = {**metrics, "step": step} if str(path) == info["checkpoint"] else final
    _write_json(METRICS, final)
    return {**{k: v for k, v in final.items() if k != "step"}, "checkpoints": rows}


def _run_checkpoints(info: dict) -> list[Path]:
    """The run's checkpoints still on disk (retention may have removed some), the final one last."""
    final = Path(info["checkpoint"])
    earlier = [p for p in map(Path, info.get("checkpoints", [])) if p != final and p.exists()]
    return earlier + [final]


def _evaluate_checkpoint(path: Path, val_text: str, cfg: Config, device: str) -> tuple[int, dict]:
    """(step, metrics) of one checkpoint on the val text, in its own tokenizer's tokens."""
    import torch

    from lmpipe.ckpt.rebuild import load_for_inference
    from lmpipe.evaluation import evaluate as eval_model

    ckpt, model, tok = load_for_inference(path, device)
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    return ckpt["step"], eval_model(model, val_ids, len(val_text.encode()), ckpt["block_size"],
                                    cfg.evaluate.batch_size, cfg.evaluate.max_batches, device)


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
    tracking.connect()  # not setup: a tracking server that is down gets the samples later
    runs.log_samples(info["run_id"], ckpt["step"], text)
    return {"samples": str(SAMPLES), "text": samples[0]}


# --- register ------------------------------------------------------------------------------------

def registered_name(cfg: Config, source: str) -> str:
    """One registered model per model type and data source."""
    return cfg.tracking.model_name or f"lmpipe-{cfg.model.type}-{source}"


def register(cfg: Config, train_info: dict | None = None, metrics: dict | None = None) -> dict:
    """Register the final checkpoint as a pyfunc model version with its lineage, alias it
    challenger, and champion as tracking.promote decides on `metrics` (the evaluate stage's; read
    from outputs/metrics.json when not given) → outputs/registered.json."""
    from lmpipe import tracking
    from lmpipe.tracking import registry, runs, versions

    info = _train_info(train_info)
    if not cfg.tracking.register:
        result = {"registered": False}
    else:
        metrics = _eval_metrics(metrics, info["step"])
        tracking.setup(cfg.tracking.experiment)  # a tracking server that is down: one line
        runs.flush_pending()
        checkpoint, params = Path(info["checkpoint"]), cfg.flat()
        lineage = versions.version_lineage(info["run_id"], checkpoint, info["step"], params)
        result = registry.register_model(info["run_id"], checkpoint,
                                         registered_name(cfg, info["source"]), info["step"],
                                         params, cfg.generate)
        result |= versions.annotate(result["name"], result["version"], lineage, metrics,
                                    cfg.tracking.promote, registry.sample_request(cfg.generate))
    _write_json(REGISTERED, result)
    return result


def _eval_metrics(metrics: dict | None, step: int) -> dict[str, float]:
    """The full evaluation's metrics of the checkpoint at `step` (promotion compares them)."""
    metrics = dict(metrics or _read_json(METRICS, "evaluate"))
    if metrics.get("step", step) != step or "bits_per_byte" not in metrics:
        raise UserError(f"{METRICS} is not the evaluation of the step-{step} checkpoint being "
                        "registered; run 'lmpipe stage evaluate' first")
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}
