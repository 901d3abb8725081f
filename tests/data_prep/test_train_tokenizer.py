import pytest

from data_prep import run_cli, train_tokenizer
from llm.data.corpus import default_corpus_files
from llm.data.tokenizer import load_tokenizer
from tests.data.conftest import make_docs, write_jsonl


def train(*args) -> int:
    return run_cli(train_tokenizer.main, list(map(str, args)))


def test_trains_from_jsonl_column_and_loads_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    docs = make_docs(200, seed=4)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs, column="content")
    assert train("--input", corpus, "--text-column", "content", "--vocab-size", 512, "--output", tmp_path / "tok") == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(hf) == 512
    assert (hf.unk_token, hf.bos_token, hf.eos_token, hf.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.decode(hf(docs[0])["input_ids"]) == docs[0]
    # Trained on this text, merges shorten it well below one token per byte.
    assert len(hf(docs[0])["input_ids"]) < 0.6 * len(docs[0].encode())


def test_text_folder_glob_and_max_chars(tmp_path):
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(make_docs(30, seed=5)):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(doc)
    assert train("--input", tmp_path / "txt", "--vocab-size", 400, "--output", tmp_path / "a") == 0
    assert train("--input", str(tmp_path / "txt" / "*.txt"), "--vocab-size", 400, "--output", tmp_path / "b") == 0
    assert load_tokenizer(tmp_path / "a").sha256 == load_tokenizer(tmp_path / "b").sha256  # same files, same result
    assert train("--input", tmp_path / "txt", "--vocab-size", 400, "--max-chars", 500, "--output", tmp_path / "c") == 0
    assert load_tokenizer(tmp_path / "c").sha256 != load_tokenizer(tmp_path / "a").sha256


def test_default_corpus_slice(tmp_path, monkeypatch):
    files = default_corpus_files()[:20]
    monkeypatch.setattr(train_tokenizer, "default_corpus_files", lambda: files)
    assert train("--vocab-size", 600, "--output", tmp_path / "tok") == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 600
    assert len(tok.tokenizer.encode("def __init__(self):").ids) < 10  # learnt Python: 19 bytes, fewer tokens


@pytest.mark.parametrize("args, message", [
    (["--input", "missing_dir/"], "missing_dir/: no such file or folder"),
    (["--vocab-size", "100"], "vocab_size = 100: must be at least 260"),
])
def test_errors(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("some text")
    if "--input" not in args:
        args = ["--input", "c.txt", *args]
    assert train(*args, "--output", tmp_path / "tok") == 2
    assert message in capsys.readouterr().err
