import json

import numpy as np
import pytest

from data_prep import pack_lm, run_cli
from llm.data.corpus import default_corpus_files
from llm.data.shards import MANIFEST, PackedSplit, sha256_file
from llm.data.tokenizer import load_tokenizer
from llm.data.verify import RECORD, RECORD_DIR
from tests.data.conftest import write_jsonl


def pack(*args) -> int:
    return run_cli(pack_lm.main, [*map(str, args), "--no-progress"])


def documents(folder, split, eos):
    """Every document of a split as (text without EOS) after checking each one ends in its single EOS."""
    s = PackedSplit(folder, split)
    tok = load_tokenizer(folder).tokenizer
    out = []
    for k in range(s.num_docs):
        ids = s.document(k).tolist()
        assert ids[-1] == eos and eos not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


def test_round_trip_split_and_manifest(tmp_path, tiny_corpus, tiny_tokenizer, tiny_docs, loaded_tokenizer):
    out = tmp_path / "ds"
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", out, "--val-fraction", 0.2,
                "--shard-tokens", 3000, "--num-proc", 2) == 0
    eos = loaded_tokenizer.eos_id
    train, val = documents(out, "train", eos), documents(out, "val", eos)
    # Each split holds its documents in corpus order; together they are the corpus; they share no document.
    position = {d: i for i, d in enumerate(tiny_docs)}
    assert len(position) == len(tiny_docs)
    assert [position[d] for d in train] == sorted(position[d] for d in train)
    assert [position[d] for d in val] == sorted(position[d] for d in val)
    assert sorted(train + val) == sorted(tiny_docs) and not set(train) & set(val)
    assert 0.1 < len(val) / len(tiny_docs) < 0.3

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == loaded_tokenizer.sha256 == sha256_file(out / "tokenizer.json")
    assert manifest["tokenizer"]["vocab_size"] == 512
    assert manifest["sources"] == [{"path": str(tiny_corpus.resolve()), "bytes": tiny_corpus.stat().st_size}]
    assert manifest["stats"]["documents_read"] == len(tiny_docs)
    # UTF-8 bytes of each split's text (the corpus has non-ASCII), for bits per byte.
    for split_name, docs in (("train", train), ("val", val)):
        assert manifest["splits"][split_name]["text_bytes"] == sum(len(d.encode()) for d in docs)
    assert sum(len(d.encode()) for d in tiny_docs) > sum(len(d) for d in tiny_docs)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2
    for shard in shards + manifest["splits"]["val"]["shards"]:
        assert sha256_file(out / shard["bin"]) == shard["bin_sha256"]
        assert (out / shard["bin"]).stat().st_size == 32 + 2 * shard["num_tokens"]
    assert sum(s["num_docs"] for s in shards) == len(train)
    # The stream is the documents' tokens, each followed by EOS, in order.
    tok = loaded_tokenizer.tokenizer
    expected = np.concatenate([tok.encode(d).ids + [eos] for d in train])
    split = PackedSplit(out, "train")
    np.testing.assert_array_equal(split.read(0, split.num_tokens), expected)


def test_packed_shards_are_recorded_as_verified(tmp_path, tiny_corpus, tiny_tokenizer, hashes):
    out = tmp_path / "ds"
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", out, "--val-fraction", 0.2,
                "--shard-tokens", 3000) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    names = {s[kind] for entry in manifest["splits"].values() for s in entry["shards"] for kind in ("bin", "idx")}
    record = json.loads((out / RECORD_DIR / RECORD).read_text())
    assert set(record["files"]) == names
    assert all((out / RECORD_DIR / f"{name}.crc32").is_file() for name in names)
    for split in manifest["splits"]:
        PackedSplit(out, split).read(0, 100)
    assert hashes == []  # the first start after packing hashes nothing


def test_identical_bytes_whatever_num_proc(tmp_path, tiny_corpus, tiny_tokenizer):
    for name, procs in (("a", 1), ("b", 2), ("c", 2)):
        assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / name,
                    "--num-proc", procs, "--chunk-chars", 5000 if name != "c" else 777, "--shard-tokens", 4000) == 0
    def listing(folder):  # verified/ holds file times: a record of this copy, not part of the output
        return sorted(p.name for p in folder.iterdir() if p.name != RECORD_DIR)

    files = listing(tmp_path / "a")
    for other in ("b", "c"):
        assert listing(tmp_path / other) == files
    for name in files:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_seed_changes_the_split(tmp_path, tiny_corpus, tiny_tokenizer):
    for seed in (1, 2):
        pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / str(seed), "--seed", seed,
             "--val-fraction", 0.2)
    counts = [json.loads((tmp_path / s / MANIFEST).read_text())["splits"]["val"] for s in ("1", "2")]
    assert counts[0]["shards"][0]["bin_sha256"] != counts[1]["shards"][0]["bin_sha256"]
    pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "noval", "--val-fraction", 0)
    assert json.loads((tmp_path / "noval" / MANIFEST).read_text())["splits"]["val"]["num_docs"] == 0


def test_special_token_text_stays_text(tmp_path, tiny_tokenizer, loaded_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a literal </s> inside", "", "next <s> doc"])
    pack("--input", corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "ds", "--val-fraction", 0)
    docs = documents(tmp_path / "ds", "train", loaded_tokenizer.eos_id)  # checks: only one EOS per document
    assert docs == ["a literal </s> inside", "next <s> doc"]  # the empty document is skipped
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["stats"]["empty_documents_skipped"] == 1


def test_large_vocab_packs_as_uint32(tmp_path, tiny_corpus, tiny_tokenizer):
    big = load_tokenizer(tiny_tokenizer)
    big.tokenizer.add_tokens([f"<extra_{i}>" for i in range(66000)])
    big.save(tmp_path / "bigtok")
    corpus = write_jsonl(tmp_path / "c.jsonl", ["plain text <extra_65999> here", "more"])
    assert pack("--input", corpus, "--tokenizer", tmp_path / "bigtok", "--output", tmp_path / "ds",
                "--val-fraction", 0) == 0
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] > 65536
    split = PackedSplit(tmp_path / "ds", "train")
    assert split.dtype == np.uint32 and split.document(0).max() > 65535  # the added token's id survives
    assert (tmp_path / "ds" / "train_00000.bin").stat().st_size == 32 + 4 * split.num_tokens


def test_default_corpus_slice(tmp_path, tiny_tokenizer, monkeypatch, loaded_tokenizer):
    files = default_corpus_files()[:40]
    monkeypatch.setattr("llm.data.pack.default_corpus_files", lambda: files)
    assert pack("--tokenizer", tiny_tokenizer, "--output", tmp_path / "ds", "--val-fraction", 0) == 0
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["default_corpus"] and [s["path"] for s in manifest["sources"]] == [str(f) for f in files]
    docs = documents(tmp_path / "ds", "train", loaded_tokenizer.eos_id)
    expected = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    assert docs == [t for t in expected if t]


def test_errors_name_the_problem(tmp_path, tiny_corpus, tiny_tokenizer, capsys):
    out = tmp_path / "ds"
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", out) == 0
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", out) == 2
    assert f"{out}: already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", out, "--overwrite") == 0
    assert pack("--input", tmp_path / "nope.jsonl", "--tokenizer", tiny_tokenizer, "--output", tmp_path / "x") == 2
    assert "nope.jsonl: no such file or folder" in capsys.readouterr().err
    assert pack("--input", tiny_corpus, "--tokenizer", tmp_path / "notok", "--output", tmp_path / "x") == 2
    assert "notok: tokenizer not found" in capsys.readouterr().err
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "x",
                "--text-column", "body") == 2
    assert "no column 'body'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()  # nothing half-written left


@pytest.mark.parametrize("bad", [["--num-proc", "0"], ["--val-fraction", "1.5"]])
def test_bad_options(tmp_path, tiny_corpus, tiny_tokenizer, bad, capsys):
    assert pack("--input", tiny_corpus, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "x", *bad) == 2
    assert bad[0].lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")


def family_tokenizer(folder, kind: str):
    """A tokenizer folder shaped like a published model's: a byte-level BPE whose base vocabulary (70,000) is
    above uint16, and special tokens added after it. `llama3`: <|begin_of_text|> put before every text by the
    tokenizer's template, <|end_of_text|> as EOS. `qwen`: <|endoftext|> as EOS, no BOS, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab |= {f"filler{i}": len(vocab) + i for i in range(70_000 - len(vocab))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if kind == "llama3" else ["<|endoftext|>", "<|im_start|>"]
    tok.add_special_tokens(specials)
    eos = specials[1] if kind == "llama3" else specials[0]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 70_000)])
        config["bos_token"] = "<|begin_of_text|>"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["llama3", "qwen"])
def test_a_model_family_tokenizer_packs_and_loads(tmp_path, kind):
    """uint32 shards, the family's EOS (above the base vocabulary) after every document, its BOS before every
    document exactly where its template puts one; the loader takes a model vocabulary larger than the tokenizer's
    (embeddings with room for more special tokens) and refuses a smaller one, naming both."""
    from llm.config import DataConfig, DatasetEntry
    from llm.data.errors import DataError
    from llm.data.loader import build_train_loader

    folder = family_tokenizer(tmp_path / "tok", kind)
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"document {i}: " + "some text here " * (i % 7 + 1) for i in range(60)])
    assert pack("--input", corpus, "--tokenizer", folder, "--output", tmp_path / "ds", "--val-fraction", 0.1) == 0
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    eos, bos = (70_001, 70_000) if kind == "llama3" else (70_000, None)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_002
    assert manifest["options"]["bos_id"] == bos
    split = PackedSplit(tmp_path / "ds", "train")
    for k in range(split.num_docs):
        ids = split.document(k).tolist()
        assert ids[-1] == eos and eos not in ids[:-1]
        if bos is not None:
            assert ids[0] == bos and bos not in ids[1:]
        else:
            assert ids[0] < 70_000  # text, no special token first
    data = DataConfig(datasets=[DatasetEntry(path=str(tmp_path / "ds"))], seq_len=32)
    loader = iter(build_train_loader(data, 4, vocab_size=70_016))
    assert max(int(next(loader)["input_ids"].max()) for _ in range(4)) > 65_535  # special ids reach the model
    with pytest.raises(DataError, match="tokenizer vocab_size is 70002, larger than the model's vocab_size = 70000"):
        build_train_loader(data, 4, vocab_size=70_000)
    if kind == "llama3":  # and it can be turned off
        assert pack("--input", corpus, "--tokenizer", folder, "--output", tmp_path / "nobos", "--bos", "no") == 0
        assert PackedSplit(tmp_path / "nobos", "train").document(0).tolist()[0] != 70_000
