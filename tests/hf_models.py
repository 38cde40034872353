"""Tiny GPT-2 models for tests, built here (nothing is downloaded): a GPT2LMHeadModel from a small
GPT2Config and a byte-level BPE tokenizer trained on the bundled corpus, written with
save_pretrained as a local directory, and laid out as a Hugging Face hub cache
(HF_HUB_CACHE/models--<name>/snapshots/<rev>/ + refs/main) so from_pretrained("gpt2") finds it
offline."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus" / "dear_agnes"
SHAPES = {  # two different tiny configs under the guide's two names
    "gpt2": {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 64},
    "gpt2-medium": {"n_layer": 3, "n_head": 2, "n_embd": 24, "n_positions": 64},
}


def _tokenizer(vocab_size: int = 300):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.md")))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_gpt2(directory: str | Path, name: str = "gpt2", seed: int = 0) -> Path:
    """A GPT2LMHeadModel of SHAPES[name] and its tokenizer, saved to `directory`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, **SHAPES[name])
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def hf_cache(cache: str | Path, name: str, source: str | Path, rev: str = "0" * 40) -> Path:
    """Lay `source` (a save_pretrained directory) out as hub model `name` in the cache `cache`
    (what HF_HUB_CACHE points to); return the snapshot directory."""
    root = Path(cache) / f"models--{name.replace('/', '--')}"
    snapshot = root / "snapshots" / rev
    shutil.copytree(source, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snapshot


def offline_hub(cache: str | Path) -> dict[str, Path]:
    """Both tiny models in a fresh hub cache under `cache`: {name: snapshot directory}."""
    out = {}
    for i, name in enumerate(SHAPES):
        out[name] = hf_cache(cache, name, tiny_gpt2(Path(cache).parent / f"src-{name}", name, i))
    return out
