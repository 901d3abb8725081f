"""data_prep.demo_pairs: deterministic, targets are the sources reversed, sentences are bounded and distinct, an
existing output is kept, and data_prep.pack_translation packs the result."""

from __future__ import annotations

import json

import pytest

from data_prep import demo_pairs, pack_translation
from data_prep import run_cli as _run_cli


def run(*args: str) -> int:
    return _run_cli(demo_pairs.main, list(args))


def read_pairs(path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.count("\t") == 1 for line in lines)
    return [tuple(line.split("\t")) for line in lines]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "pairs.tsv"
    assert run("--output", str(out), "--pairs", "2000", "--seed", "7") == 0
    return out


def test_same_seed_same_bytes_other_seed_other_sample(tmp_path, demo):
    again, other = tmp_path / "again.tsv", tmp_path / "other.tsv"
    assert run("--output", str(again), "--pairs", "2000", "--seed", "7") == 0
    assert run("--output", str(other), "--pairs", "2000", "--seed", "8") == 0
    assert again.read_bytes() == demo.read_bytes()
    assert other.read_bytes() != demo.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, not left behind


def test_pairs_are_distinct_bounded_sentences_and_their_reversal(demo):
    pairs = read_pairs(demo)
    assert len(pairs) == 2000
    sources = [s for s, _ in pairs]
    assert len(set(sources)) == len(sources)
    for source, target in pairs:
        words = source.split(" ")
        assert 3 <= len(words) <= 16 and all(words)
        assert target.split(" ") == words[::-1]
        assert source.isascii() and not any(c in source for c in "()[]{}=<>_#\"`")


def test_word_bounds_are_options(tmp_path):
    out = tmp_path / "short.tsv"
    assert run("--output", str(out), "--pairs", "300", "--min-words", "4", "--max-words", "5") == 0
    assert {len(s.split()) for s, _ in read_pairs(out)} == {4, 5}


def test_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    out = tmp_path / "pairs.tsv"
    out.write_text("keep me\n")
    assert run("--output", str(out), "--pairs", "10") == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert run("--output", str(out), "--pairs", "10", "--overwrite") == 0
    assert len(read_pairs(out)) == 10
    assert run("--output", str(out), "--pairs", "10", "--min-words", "5", "--max-words", "4", "--overwrite") == 2


def test_pack_translation_packs_it(tmp_path, demo):
    packed = tmp_path / "packed"
    assert _run_cli(pack_translation.main, ["--tsv", str(demo), "--vocab-size", "500", "--output", str(packed)]) == 0
    stats = json.loads((packed / "manifest.json").read_text())["stats"]
    assert stats["pairs_read"] == 2000 and stats["malformed"] == stats["empty"] == 0
    assert stats["train_pairs"] + stats["val_pairs"] > 0.9 * 2000  # the length-ratio filter may drop a few


def test_held_out_test_sentences_are_not_in_the_training_pairs(demo):
    sources = demo.with_suffix(".test.src").read_text(encoding="utf-8").splitlines()
    references = demo.with_suffix(".test.ref").read_text(encoding="utf-8").splitlines()
    assert len(sources) == len(references) == 200
    assert references == [" ".join(reversed(s.split())) for s in sources]
    assert not set(sources) & {s for s, _ in read_pairs(demo)}
