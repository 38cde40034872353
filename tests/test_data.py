import pytest

from lmpipe import data
from lmpipe.common.errors import UserError


def test_normalisation_bom_crlf_nfc(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffcafe\u0301\r\nline two\rthree".encode())
    assert data.read_text(f) == "caf\u00e9\nline two\nthree"


def test_markdown_splits_into_letters_and_dedupes():
    text = "# Title\n\n## One\nhello\n\n## Two\nworld\n\n## One\nhello\n"
    docs = data.split_documents(text, markdown=True)
    assert docs == ["# Title", "## One\nhello", "## Two\nworld", "## One\nhello"]
    assert data.dedupe(docs) == ["# Title", "## One\nhello", "## Two\nworld"]


def test_split_is_by_document_and_seeded():
    docs = [f"doc {i}" for i in range(20)]
    a = data.split_train_val(docs, 0.2, seed=3)
    assert a == data.split_train_val(docs, 0.2, seed=3)
    assert a != data.split_train_val(docs, 0.2, seed=4)
    train, val = a
    assert len(val) == 4 and set(train) | set(val) == set(docs) and not set(train) & set(val)


def test_prepare_writes_splits_stats_and_meta(project):
    meta = data.prepare("data/corpus.md", 0.2, 1, min_chars=17)
    train = (project / "data/prepared/train.txt").read_text()
    assert "Dear Agnes" in train and meta["source"] == "corpus"
    stats = (project / "data/prepared/stats.csv").read_text().splitlines()
    assert stats[0] == "split,documents,characters,bytes" and len(stats) == 3


def test_bundled_corpus_by_name_is_large_enough():
    src = data.resolve_source("dear_agnes")
    assert src.name == "dear_agnes"
    assert sum(f.stat().st_size for f in src.files) >= 100_000


@pytest.mark.parametrize("content,match", [
    (None, "no such file, directory or bundled corpus"),
    (b"", "empty or whitespace-only"),
    (b"   \n\n\t \n", "empty or whitespace-only"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("caf\u00e9 au lait".encode("latin-1"), "not valid UTF-8"),
    (b"Dear Agnes, hi.", "corpus too small"),
])
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, monkeypatch, content, match):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "corpus.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        data.prepare(str(f), 0.1, 1, min_chars=65)
    assert "corpus.txt" in str(e.value)
    assert not (tmp_path / "data").exists()


def test_directory_without_text_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="no .md or .txt files"):
        data.resolve_source(str(tmp_path))
