import json

import pytest

from llm.data.errors import DataError
from llm.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe


def test_trained_tokenizer_round_trips_and_has_special_tokens(loaded_tokenizer, tiny_docs):
    tok = loaded_tokenizer.tokenizer
    assert loaded_tokenizer.vocab_size == 512
    assert [loaded_tokenizer.token_id(r) for r in ("unk", "bos", "eos", "pad")] == [0, 1, 2, 3]
    for text in tiny_docs[:20] + ["never seen: Ωμέγα ✓ \t tabs\r\n", "  leading spaces"]:
        assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless, no unknown tokens


def test_saved_folder_loads_with_transformers(tiny_tokenizer, loaded_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    for role, token in SPECIAL_TOKENS.items():
        assert getattr(hf, f"{role}_token") == token
    assert hf.eos_token_id == loaded_tokenizer.eos_id
    text = "doc: kalo mine, the ß"
    assert hf(text)["input_ids"] == loaded_tokenizer.tokenizer.encode(text).ids


def test_hf_folder_saved_by_transformers_loads(tiny_tokenizer, tmp_path, loaded_tokenizer):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tiny_tokenizer)).save_pretrained(tmp_path / "hf")
    again = load_tokenizer(tmp_path / "hf")
    assert again.eos_id == loaded_tokenizer.eos_id
    assert again.sha256 == load_tokenizer(tmp_path / "hf" / "tokenizer.json", eos_token="</s>").sha256


def test_hash_is_stable_and_tracks_content(tiny_tokenizer, loaded_tokenizer, tiny_docs):
    assert load_tokenizer(tiny_tokenizer).sha256 == loaded_tokenizer.sha256
    other = train_bpe([tiny_docs[:100]], vocab_size=400)
    assert other.sha256 != loaded_tokenizer.sha256


def test_eos_is_required(tiny_tokenizer, tmp_path):
    folder = tmp_path / "noeos"
    folder.mkdir()
    tok = json.loads((tiny_tokenizer / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "</s>"]
    tok["model"]["vocab"].pop("</s>")
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="no EOS token"):
        load_tokenizer(folder)
    assert load_tokenizer(folder, eos_token="<pad>").eos_id == 3
    with pytest.raises(DataError, match="eos token '<nope>' is not in the vocabulary"):
        load_tokenizer(folder, eos_token="<nope>")
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


def test_vocab_size_floor():
    with pytest.raises(DataError, match="at least 260"):
        train_bpe([["text"]], vocab_size=100)
