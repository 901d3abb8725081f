"""data_prep.pack_translation: every input format packs the same pairs, filters are applied and counted, the joint
tokenizer covers both languages, the output is deterministic and verifiable, bad input is one clear error."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from data_prep import pack_translation
from data_prep import run_cli as _run_cli
from llm.data.shards import verify_dataset
from llm.data.tokenizer import load_tokenizer
from llm.data.translation import ParallelSplit

# A toy language pair: word-for-word, with German-ish spellings and one two-word expression.
LEXICON = {"haus": "house", "baum": "tree", "katze": "cat", "hund": "dog", "auto": "car", "gross": "big",
           "klein": "small", "rot": "red", "blau": "blue", "schnell": "fast", "das": "the", "ist": "is",
           "gruen": "green", "wasser": "water", "tisch": "table", "eins": "one", "zwei": "two", "drei": "three",
           "nicht": "not", "sehr": "very", "zug": "train", "buch": "book", "stadt": "city", "guten": "good",
           "morgen": "morning", "danke": "thanks", "schoen": "beautiful", "vielleicht": "maybe",
           "unterwegs": "on-the-way"}


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = sorted(LEXICON)
    pairs = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        pairs.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    return pairs


def write_formats(folder: Path, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The same pairs as a TSV, two aligned (gzipped) files, nested JSONL and a saved HF dataset: CLI arguments."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    with gzip.open(folder / "src.de.gz", "wt") as fs, gzip.open(folder / "tgt.en.gz", "wt") as ft:
        fs.writelines(s + "\n" for s, _ in pairs)
        ft.writelines(t + "\n" for _, t in pairs)
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"id": i, "translation": {"de": s, "en": t}}) + "\n"
                                                for i, (s, t) in enumerate(pairs)))
    ds = datasets.Dataset.from_dict({"translation": [{"de": s, "en": t} for s, t in pairs]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder / "hf"))
    nested = ["--source-field", "translation.de", "--target-field", "translation.en"]
    return {"tsv": ["--tsv", str(folder / "pairs.tsv")],
            "aligned": ["--source", str(folder / "src.de.gz"), "--target", str(folder / "tgt.en.gz")],
            "jsonl": ["--jsonl", str(folder / "pairs.jsonl"), *nested],
            "hf": ["--hf-dataset", str(folder / "hf"), *nested]}


def run(*args: str) -> int:
    return _run_cli(pack_translation.main, list(args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    pairs = make_pairs(1500)
    return pairs, write_formats(folder, pairs)


@pytest.fixture(scope="module")
def packed_tsv(tmp_path_factory, corpus):
    """Packed from the TSV with a jointly trained tokenizer (vocab 400), 10% validation."""
    out = tmp_path_factory.mktemp("packed") / "ds"
    assert run(*corpus[1]["tsv"], "--vocab-size", "400", "--output", str(out), "--val-fraction", "0.1",
               "--max-ratio", "3") == 0
    return out


def shard_hashes(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {name: [s["bin_sha256"] for s in split["shards"]] for name, split in manifest["splits"].items()}


def test_every_input_format_packs_the_same_pairs(tmp_path, corpus, packed_tsv):
    pairs, formats = corpus
    reference = shard_hashes(packed_tsv)
    stats = json.loads((packed_tsv / "manifest.json").read_text())["stats"]
    assert stats["pairs_read"] == len(pairs) and stats["train_pairs"] + stats["val_pairs"] > 0.95 * len(pairs)
    for name, args in formats.items():
        out = tmp_path / name
        assert run(*args, "--tokenizer", str(packed_tsv), "--output", str(out), "--val-fraction", "0.1",
                   "--max-ratio", "3") == 0, name
        assert shard_hashes(out) == reference, name
        assert json.loads((out / "manifest.json").read_text())["stats"] == stats, name


def test_pairs_decode_back_to_the_input_and_end_in_eos(corpus, packed_tsv):
    pairs, _ = corpus
    tok = load_tokenizer(packed_tsv)
    eos = tok.eos_id
    texts = set(pairs)
    for split in ("train", "val"):
        data = ParallelSplit(packed_tsv, split)
        assert data.num_pairs > 0
        for k in range(0, data.num_pairs, 37):
            src, tgt = data.pair(k)
            assert src[-1] == eos and tgt[-1] == eos and eos not in src[:-1]
            decoded = (tok.tokenizer.decode(src[:-1].tolist()), tok.tokenizer.decode(tgt[:-1].tolist()))
            assert decoded in texts


def test_the_joint_tokenizer_learns_both_languages(packed_tsv):
    tok = load_tokenizer(packed_tsv).tokenizer
    for word in ("vielleicht", "unterwegs", "beautiful", "morning"):  # words of one side only
        assert len(tok.encode(" " + word).ids) <= 2, word
    assert len(tok.encode(" xylophon").ids) >= 5  # a word of neither
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(packed_tsv)).pad_token == "<pad>"


def test_filters_are_applied_and_counted(tmp_path, packed_tsv):
    good = make_pairs(50, seed=3)
    bad = ["\tonly target", "only source\t", "   \t   ", "no tab on this line",
           "haus " * 40 + "\thouse", "haus\t" + "house " * 40,  # over --max-len 30 on either side
           "haus\thouse big red blue green water"]  # ratio 6 > 3
    lines = [f"{s}\t{t}" for s, t in good[:25]] + bad + [f"{s}\t{t}" for s, t in good[25:]]
    (tmp_path / "mixed.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run("--tsv", str(tmp_path / "mixed.tsv"), "--tokenizer", str(packed_tsv), "--output", str(out),
               "--max-len", "30", "--max-ratio", "3", "--val-fraction", "0") == 0
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats == {"malformed": 1, "pairs_read": 56, "empty": 3, "too_long": 2, "ratio": 1,
                     "train_pairs": 50, "val_pairs": 0}
    tok = load_tokenizer(out).tokenizer
    data = ParallelSplit(out, "train")
    kept = [tuple(tok.decode(side[:-1].tolist()) for side in data.pair(k)) for k in range(data.num_pairs)]
    assert kept == good  # in input order


def test_validation_split_does_not_depend_on_the_filters(tmp_path, corpus, packed_tsv):
    def split_of(out: Path) -> dict:
        tok = load_tokenizer(out).tokenizer
        where = {}
        for split in ("train", "val"):
            data = ParallelSplit(out, split)
            for k in range(data.num_pairs):
                where[tok.decode(data.pair(k)[0][:-1].tolist())] = split
        return where

    loose = split_of(packed_tsv)
    strict = tmp_path / "strict"
    assert run(*corpus[1]["tsv"], "--tokenizer", str(packed_tsv), "--output", str(strict), "--val-fraction", "0.1",
               "--max-ratio", "3", "--max-len", "20") == 0
    strict_split = split_of(strict)
    assert len(strict_split) < len(loose)
    assert all(loose[s] == split for s, split in strict_split.items())


def test_output_is_deterministic_and_verifies(tmp_path, corpus, hashes):
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        assert run(*corpus[1]["aligned"], "--vocab-size", "300", "--output", str(outs[-1])) == 0
    a, b = ((o / "manifest.json").read_text() for o in outs)
    assert json.loads(a)["tokenizer"]["sha256"] == json.loads(b)["tokenizer"]["sha256"]
    assert shard_hashes(outs[0]) == shard_hashes(outs[1])
    manifest = verify_dataset(outs[0], checksums=True)
    assert hashes == []  # packing recorded every shard as verified: opening does not hash them again
    assert manifest["task"] == "translation" and set(manifest["splits"]) == {"train.src", "train.tgt", "val.src",
                                                                             "val.tgt"}
    from data_prep import inspect

    assert _run_cli(inspect.main, [str(outs[0]), "--samples", "1", "--split", "train.tgt", "--seq-len", "16"]) == 0


def test_bad_input_is_one_clear_error(tmp_path, packed_tsv, capsys):
    (tmp_path / "a.txt").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    tok = ["--tokenizer", str(packed_tsv)]
    assert run("--source", str(tmp_path / "a.txt"), "--target", str(tmp_path / "b.txt"), *tok,
               "--output", str(tmp_path / "o1")) == 2
    assert "not line-aligned: line 3 of" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o1.partial").exists()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"de": "eins", "en": "one"}) + "\n")
    assert run("--jsonl", str(tmp_path / "rows.jsonl"), *tok, "--output", str(tmp_path / "o2")) == 2
    assert "no field 'source' (has: de, en)" in capsys.readouterr().err
    assert run("--tsv", str(tmp_path / "missing.tsv"), *tok, "--output", str(tmp_path / "o3")) == 2
    assert "no such file" in capsys.readouterr().err
    assert run("--tsv", str(tmp_path / "a.txt"), *tok, "--output", str(packed_tsv)) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("--tsv", str(tmp_path / "a.txt"), "--jsonl", str(tmp_path / "rows.jsonl"), "--output", "x")
