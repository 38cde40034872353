"""Tokenizers behind one interface: encode, decode, to_json/save, load, vocab_size.

- char: the vocabulary (every character of the corpus) is stored in the file, so it rebuilds
  exactly.
- bpe:  byte-level BPE trained on the train split with the `tokenizers` library.
- gpt2: GPT-2's byte-level BPE, from a local model directory (or a hub name when online).
- tiktoken: a tiktoken-style byte-level BPE (merge ranks + split pattern), as nanochat saves it;
  only imported checkpoints carry one (`lmpipe ckpt import`).

The saved form is one JSON document; checkpoints embed it, so inference needs no data/ directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from lmpipe.common.errors import UserError
from lmpipe.common.fileio import atomic_write_text
from lmpipe.common.paths import TOKENIZER_FILE

FORMAT = "lmpipe-tokenizer"
EOT = "<|endoftext|>"


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: Iterable[str], keep_order: bool = False):
        # keep_order: a saved vocabulary (or nanoGPT's itos) whose ids are its positions
        self.chars = list(chars) if keep_order else sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in missing[:20])
            raise UserError(
                f"text has {len(missing)} character(s) unknown to the char tokenizer: {shown}; "
                "remove them, or rebuild the tokenizer on data that contains them") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": 1, "kind": self.kind, "vocab": self.chars})


class HFTokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE, trained here or GPT-2's)."""

    def __init__(self, kind: str, tok):
        self.kind = kind
        self.tok = tok

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": 1, "kind": self.kind,
                           "tokenizer": json.loads(self.tok.to_str())})


class RankedBPE:
    """tiktoken's byte-level BPE from its data alone (no tiktoken needed): the text is split by the
    pattern, and each piece's bytes are merged pairwise, lowest rank first. Special tokens decode
    but are never produced by encode (tiktoken's encode_ordinary)."""
    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], pattern: str, special: dict[str, int]):
        import regex

        self.ranks, self.pattern, self.special = ranks, pattern, special
        self.split = regex.compile(pattern)
        self.by_id = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special.items()}

    @property
    def vocab_size(self) -> int:
        return max(self.by_id) + 1

    def encode(self, text: str) -> list[int]:
        return [i for piece in self.split.findall(text) for i in self._merge(piece.encode())]

    def _merge(self, piece: bytes) -> list[int]:
        if piece in self.ranks:
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            pairs = [(self.ranks.get(a + b, 1 << 62), i) for i,
                     (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.by_id[i] for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        import base64

        return json.dumps({"format": FORMAT, "version": 1, "kind": self.kind,
                           "pattern": self.pattern,
                           "special": self.special,
                           "ranks": {base64.b64encode(b).decode(): i for b,
                                     i in self.ranks.items()}})

    @classmethod
    def from_spec(cls, spec: dict) -> "RankedBPE":
        import base64

        return cls({base64.b64decode(b): int(i) for b, i in spec["ranks"].items()}, spec["pattern"],
                   {str(k): int(v) for k, v in spec.get("special", {}).items()})


Tokenizer = CharTokenizer | HFTokenizer | RankedBPE


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer("bpe", tok)


def load_gpt2(name_or_path: str) -> HFTokenizer:
    """GPT-2's tokenizer from a local directory (tokenizer.json, or vocab.json + merges.txt),
    the local Hugging Face cache, or — only when HF_HUB_OFFLINE=0 — the hub."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        cached = _hf_cached_file(name_or_path)
        path = cached.parent if cached else path
    if (path / "tokenizer.json").is_file():
        return HFTokenizer("gpt2", HFTok.from_file(str(path / "tokenizer.json")))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = HFTok(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return HFTokenizer("gpt2", tok)
    if os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False"):
        from transformers import AutoTokenizer

        return HFTokenizer("gpt2", AutoTokenizer.from_pretrained(name_or_path).backend_tokenizer)
    raise UserError(
        f"tokenizer.gpt2_path {name_or_path!r}: no local directory with tokenizer.json or "
        "vocab.json + merges.txt, and hub downloads are off; point it at a local GPT-2 model "
        "directory, or set HF_HUB_OFFLINE=0 to allow a download")


def locate_pretrained(name: str) -> str:
    """model.pretrained as a directory from_pretrained (and load_gpt2) can read: a local directory,
    or the snapshot in the local Hugging Face cache; with HF_HUB_OFFLINE=0 an uncached hub name is
    returned as is (to be downloaded). Not found: one UserError line with the two fixes."""
    from models.gpt2 import PretrainedNotFound, hub_cache, locate

    try:
        return locate(name)
    except PretrainedNotFound as e:
        fetch = (f"HF_HUB_OFFLINE=0 python -c \"from transformers import GPT2LMHeadModel, "
                 f"AutoTokenizer; GPT2LMHeadModel.from_pretrained('{name}'); "
                 f"AutoTokenizer.from_pretrained('{name}')\"")
        raise UserError(
            f"model.pretrained={name!r}: {e.reason} (looked in {e.looked}); pass a local model "
            "directory (GPT2_MODEL_NAME=/path/to/model or -S model.pretrained=/path/to/model), or "
            f"fetch it once on a connected machine ({fetch}) and copy its Hugging Face cache "
            f"directory to {hub_cache()} (or point HF_HUB_CACHE at the copy)") from None


def _hf_cached_file(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "tokenizer.json")
    except Exception:  # an invalid repo id is simply "not cached"
        return None
    return Path(hit) if isinstance(hit, str) else None


def build_tokenizer(kind: str, train_text: str, val_text: str, vocab_size: int,
                    gpt2_path: str) -> Tokenizer:
    if kind == "char":
        # Both splits: a character seen only in validation must still be encodable.
        return CharTokenizer(train_text + val_text)
    if kind == "bpe":
        return train_bpe([train_text], vocab_size)
    if kind == "gpt2":
        return load_gpt2(gpt2_path)
    raise UserError(f"tokenizer.kind must be one of char, bpe, gpt2, got {kind!r}")


def from_json(text: str) -> Tokenizer:
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UserError(f"tokenizer is not valid JSON ({e}); rebuild it with 'lmpipe stage "
                        "tokenizer'") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise UserError("tokenizer JSON is not an lmpipe tokenizer (missing format "
                        "'lmpipe-tokenizer'); rebuild it with 'lmpipe stage tokenizer'")
    kind = spec.get("kind")
    if kind == "char" and isinstance(spec.get("vocab"), list):
        return CharTokenizer(spec["vocab"], keep_order=True)
    if kind in ("bpe", "gpt2") and isinstance(spec.get("tokenizer"), dict):
        from tokenizers import Tokenizer as HFTok

        return HFTokenizer(kind, HFTok.from_str(json.dumps(spec["tokenizer"])))
    if kind == "tiktoken" and isinstance(spec.get("ranks"),
                                         dict) and isinstance(spec.get("pattern"), str):
        return RankedBPE.from_spec(spec)
    raise UserError(f"tokenizer JSON of kind {kind!r} is incomplete or unknown; rebuild it with "
                    "'lmpipe stage tokenizer'")


def save(tok: Tokenizer, path: str | Path = TOKENIZER_FILE) -> Path:
    atomic_write_text(path, tok.to_json())
    return Path(path)


def load(path: str | Path = TOKENIZER_FILE) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: tokenizer not found; run 'lmpipe stage tokenizer' (or 'lmpipe "
                        "run') first")
    return from_json(path.read_text(encoding="utf-8"))
