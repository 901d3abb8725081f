"""Marian (OPUS-MT) tokenizers used as they are: the ids `transformers`' MarianTokenizer gives, sources through
source.spm and targets through target.spm; a saved copy is the same tokenizer (same hash); what we cannot use is
refused naming the folder."""

import shutil
from pathlib import Path

import pytest

from llm.data.errors import DataError
from llm.data.marian_tokenizer import MarianSentencePiece
from llm.data.tokenizer import load_tokenizer
from tests.data_prep.test_pack_translation import make_pairs
from tests.export.hf_models import marian_tokenizer_files

PAIRS = make_pairs(500, seed=11)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return marian_tokenizer_files(tmp_path_factory.mktemp("marian-tok"), PAIRS)


def test_ids_are_marians_for_each_side(folder):
    from transformers import MarianTokenizer

    tok, hf = load_tokenizer(folder), MarianTokenizer.from_pretrained(str(folder))
    assert isinstance(tok, MarianSentencePiece)
    sources, targets = [s for s, _ in PAIRS[:20]], [t for _, t in PAIRS[:20]]
    assert tok.encode(sources, "src") == hf(sources, add_special_tokens=False)["input_ids"]
    assert tok.encode(targets, "tgt") == hf(text_target=targets, add_special_tokens=False)["input_ids"]
    assert tok.encode(targets, "tgt") != tok.encode(targets, "src")  # two SentencePiece models, one vocabulary
    assert tok.decode(tok.encode(targets, "tgt")) == targets
    assert (tok.token_id("eos"), tok.token_id("unk"), tok.token_id("pad")) == (0, 1, tok.vocab_size - 1)
    assert tok.decoder_start_id == tok.token_id("pad") and tok.token_id("bos") is None


def test_a_saved_copy_is_the_same_tokenizer(folder, tmp_path):
    tok = load_tokenizer(folder)
    copy = load_tokenizer(tok.save(tmp_path / "copy"))
    assert copy.sha256 == tok.sha256
    assert copy.encode([s for s, _ in PAIRS[:10]]) == tok.encode([s for s, _ in PAIRS[:10]])
    other = Path(shutil.copytree(folder, tmp_path / "other"))
    shutil.copy(other / "target.spm", other / "source.spm")  # another source model: another tokenizer
    assert load_tokenizer(other).sha256 != tok.sha256


def test_what_cannot_be_used_is_refused_naming_the_folder(folder, tmp_path):
    separate = Path(shutil.copytree(folder, tmp_path / "separate"))
    (separate / "target_vocab.json").write_text((separate / "vocab.json").read_text())
    with pytest.raises(DataError, match=f"{separate}: separate source and target vocabularies"):
        load_tokenizer(separate)
    missing = Path(shutil.copytree(folder, tmp_path / "missing"))
    (missing / "vocab.json").unlink()
    with pytest.raises(DataError, match=f"{missing}: a Marian tokenizer needs .*missing vocab.json"):
        load_tokenizer(missing)
    with pytest.raises(DataError, match="a Marian tokenizer's EOS is its own"):
        load_tokenizer(folder, eos_token="<pad>")
