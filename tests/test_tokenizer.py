import pytest

from lmpipe import tokenizer
from lmpipe.common.errors import UserError

TEXT = "Dear Agnes,\nMy neighbour's café — naïve? Ünïcødé 👋 and tabs\tok.\n"


def test_char_round_trip_and_exact_rebuild(tmp_path):
    tok = tokenizer.build_tokenizer("char", TEXT, "xyz", 0, "")
    ids = tok.encode(TEXT + "xyz")
    assert tok.decode(ids) == TEXT + "xyz"
    tokenizer.save(tok, tmp_path / "t.json")
    back = tokenizer.load(tmp_path / "t.json")
    assert back.chars == tok.chars and back.encode(TEXT) == ids[: len(TEXT)]


def test_char_unknown_character_is_named():
    tok = tokenizer.CharTokenizer("abc")
    with pytest.raises(UserError, match=r"unknown to the char tokenizer: '#'"):
        tok.encode("ab#")


def test_bpe_round_trip_and_vocab_size(tmp_path):
    corpus = (TEXT * 50) + "".join(f"word{i} " for i in range(300))
    tok = tokenizer.build_tokenizer("bpe", corpus, "", 300, "")
    assert tok.vocab_size == 300
    for s in (TEXT, "unseen: ∑ 日本語 🙂\n"):
        assert tok.decode(tok.encode(s)) == s  # byte-level: nothing is out of vocabulary
    tokenizer.save(tok, tmp_path / "t.json")
    back = tokenizer.load(tmp_path / "t.json")
    assert back.kind == "bpe" and back.encode(TEXT) == tok.encode(TEXT)


def test_gpt2_kind_from_a_local_directory(tmp_path):
    """A GPT-2-style directory (vocab.json + merges.txt), built locally: no download."""
    bpe = tokenizer.train_bpe([TEXT * 20], 280)
    bpe.tok.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    tok = tokenizer.build_tokenizer("gpt2", "", "", 0, str(tmp_path))
    assert tok.kind == "gpt2" and tok.decode(tok.encode(TEXT)) == TEXT
    assert tokenizer.from_json(tok.to_json()).encode(TEXT) == tok.encode(TEXT)


def test_gpt2_offline_without_local_files_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=0"):
        tokenizer.load_gpt2("no-such-model-anywhere")
