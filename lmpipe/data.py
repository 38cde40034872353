"""Data preparation: read a corpus, normalise it, split it into documents, deduplicate, split
train/val by document, and write the splits plus a stats table."""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lmpipe.common.errors import UserError
from lmpipe.common.fileio import atomic_write_text
from lmpipe.common.paths import PREPARED_DIR

BUNDLED_CORPORA = Path(__file__).resolve().parent.parent / "data" / "corpus"
TEXT_SUFFIXES = (".md", ".txt")


@dataclass(frozen=True)
class Source:
    name: str  # short, filename-safe: goes into checkpoint names and the registered model name
    files: tuple[Path, ...]


def source_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "corpus"


def resolve_source(source: str, root: Path = Path(".")) -> Source:
    """A bundled corpus name (data/corpus/<name>), a .md/.txt file, or a directory of them."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [root / path, root / "data/corpus" / source,
                                                     BUNDLED_CORPORA / source]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        bundled = sorted(p.name for p in BUNDLED_CORPORA.glob("*") if p.is_dir())
        raise UserError(
            f"data.source {source!r}: no such file, directory or bundled corpus; "
            f"give a path to a .md/.txt file or directory, or one of: {', '.join(bundled)}")
    if found.is_dir():
        files = tuple(sorted(p for p in found.rglob("*") if p.is_file()
                             and p.suffix.lower() in TEXT_SUFFIXES
                             and not any(part.startswith(".") for part
                                         in p.relative_to(found).parts)))
        if not files:
            raise UserError(f"data.source {str(found)!r}: directory has no .md or .txt files; add "
                            "some")
    else:
        if found.suffix.lower() not in TEXT_SUFFIXES:
            raise UserError(f"data.source {str(found)!r}: expected a .md or .txt file, got "
                            f"{found.suffix or 'no suffix'}")
        files = (found,)
    return Source(source_name(found.stem if found.is_file() else found.name), files)


def read_text(path: Path) -> str:
    """UTF-8 → NFC, LF line endings, no BOM. Binary or non-UTF-8 input is a UserError."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UserError(f"{path}: looks like a binary file (contains NUL bytes); give a UTF-8 text "
                        "file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-save it as UTF-8, e.g. "
                        "iconv -t UTF-8") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def split_documents(text: str, markdown: bool) -> list[str]:
    """Markdown: one document per `## ` section (the letters of a column). Text: blank-line
    blocks."""
    pattern = r"\n(?=## )" if markdown else r"\n\s*\n"
    docs = [d.strip() for d in re.split(pattern, text)]
    return [d for d in docs if d]


def dedupe(docs: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for d in docs:
        key = " ".join(d.split())
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def split_train_val(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """By document, with a fixed seed; order within each split is kept. A single-document corpus
    is split inside the document at a line boundary instead."""
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
        return [text[:cut].strip()], [text[cut:].strip()]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val_idx = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in val_idx],
            [d for i, d in enumerate(docs) if i in val_idx])


def fingerprint(source: Source, val_fraction: float, seed: int) -> str:
    """Changes when the corpus bytes or the split settings change: the cache key of this stage."""
    h = hashlib.sha256(json.dumps([val_fraction, seed]).encode())
    for f in source.files:
        h.update(str(f.name).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Corpus:
    source: Source
    train: list[str]
    val: list[str]
    documents_raw: int

    def text(self, split: str) -> str:
        return "\n\n".join(getattr(self, split)) + "\n"


def split_corpus(source_spec: str, val_fraction: float, seed: int, min_chars: int) -> Corpus:
    """Read, normalise, split into documents, deduplicate and split train/val; validate sizes.

    min_chars: each split must hold more characters than this (one training block plus one).
    """
    source = resolve_source(source_spec)
    docs: list[str] = []
    for f in source.files:
        text = read_text(f)
        if not text.strip():
            raise UserError(f"{f}: empty or whitespace-only; add text or remove the file from "
                            f"{source_spec!r}")
        docs.extend(split_documents(text, markdown=f.suffix.lower() == ".md"))
    unique = dedupe(docs)
    train, val = split_train_val(unique, val_fraction, seed)
    corpus = Corpus(source, train, val, len(docs))
    for split in ("train", "val"):
        n = len(corpus.text(split))
        if n <= min_chars:
            where = source.files[0] if len(source.files) == 1 else source_spec
            raise UserError(
                f"{where}: corpus too small: the {split} split has {n} characters, not more than "
                f"one training block ({min_chars}); add text or lower model.block_size")
    return corpus


def prepare(source_spec: str, val_fraction: float, seed: int, min_chars: int,
            out_dir: Path = PREPARED_DIR) -> dict:
    """Write train.txt, val.txt, stats.csv and meta.json to out_dir; return meta (paths + stats)."""
    import pandas as pd

    corpus = split_corpus(source_spec, val_fraction, seed, min_chars)
    texts = {s: corpus.text(s) for s in ("train", "val")}
    stats = pd.DataFrame([{"split": s, "documents": len(getattr(corpus, s)), "characters": len(t),
                           "bytes": len(t.encode())} for s, t in texts.items()])
    n_unique = len(corpus.train) + len(corpus.val)
    meta = {
        "source": corpus.source.name, "source_spec": source_spec,
        "files": [str(f) for f in corpus.source.files], "documents_raw": corpus.documents_raw,
        "duplicates_removed": corpus.documents_raw - n_unique,
        "fingerprint": fingerprint(corpus.source, val_fraction, seed),
        "train": str(out_dir / "train.txt"), "val": str(out_dir / "val.txt"),
        "stats": str(out_dir / "stats.csv"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        atomic_write_text(out_dir / f"{split}.txt", text)
    atomic_write_text(out_dir / "stats.csv", stats.to_csv(index=False))
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(out_dir: Path = PREPARED_DIR) -> dict:
    path = out_dir / "meta.json"
    if not path.exists():
        raise UserError(f"{path}: prepared data not found; run 'lmpipe stage prepare' (or 'lmpipe "
                        "run') first")
    return json.loads(path.read_text())
