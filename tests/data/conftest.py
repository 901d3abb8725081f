"""Tiny corpora, a tokenizer trained on them (vocab 512) and packed datasets, built once per test session."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from llm.config import DataConfig, DatasetEntry
from llm.data.pack import pack_corpus
from llm.data.tokenizer import LoadedTokenizer, load_tokenizer, train_bpe

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "qua", "the", "and", "ing", "é", "ß", "日本"]


def make_docs(n: int, seed: int, min_words: int = 5, max_words: int = 120) -> list[str]:
    """n distinct pseudo-text documents (words, punctuation, newlines, some non-ASCII), reproducible from seed."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(min_words, max_words))]
        for j in range(0, len(words), 12):
            words[j] += rng.choice([".", ",", "\n", "\n\n", "", ";"])
        docs.append(f"doc {seed}-{i}: " + " ".join(words))
    return docs


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return make_docs(300, seed=1)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_docs) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", tiny_docs)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_docs) -> Path:
    tok = train_bpe([tiny_docs[i:i + 50] for i in range(0, len(tiny_docs), 50)], vocab_size=512)
    return tok.save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def loaded_tokenizer(tiny_tokenizer) -> LoadedTokenizer:
    return load_tokenizer(tiny_tokenizer)


@pytest.fixture(scope="session")
def packed(tmp_path_factory, tiny_corpus, tiny_tokenizer) -> Path:
    """The tiny corpus packed with several shards per split (shard_tokens is small) and 10% validation."""
    out = tmp_path_factory.mktemp("packed") / "ds"
    pack_corpus(out, tiny_tokenizer, [str(tiny_corpus)], val_fraction=0.1, shard_tokens=3000, num_proc=1)
    return out


@pytest.fixture(scope="session")
def packed_other(tmp_path_factory, tiny_tokenizer) -> Path:
    """A second, smaller dataset with the same tokenizer, for mixtures."""
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus2") / "other.jsonl", make_docs(60, seed=2))
    out = tmp_path_factory.mktemp("packed2") / "ds"
    pack_corpus(out, tiny_tokenizer, [str(corpus)], val_fraction=0.2, shard_tokens=2000, num_proc=1)
    return out


@pytest.fixture
def hashes(monkeypatch) -> list:
    """The files hashed by the verification record (llm.data.verify.hash_file) while the test runs, in order."""
    import llm.data.verify as verify

    calls, real = [], verify.hash_file

    def counted(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify, "hash_file", counted)
    return calls


def flip_byte(path: Path, offset: int, keep_mtime: bool = False) -> None:
    """Change one byte of a file; with keep_mtime, restore its times after (what bit rot looks like to stat)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def data_config(*paths: Path, weights: list[float] | None = None, **kwargs) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    entries = [DatasetEntry(path=str(p), weight=w) for p, w in zip(paths, weights, strict=True)]
    return DataConfig(datasets=entries, **kwargs)
