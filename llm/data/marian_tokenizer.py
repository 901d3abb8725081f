"""Marian (OPUS-MT) tokenizers, used as they are: `transformers`' MarianTokenizer over the folder's files.

A Marian folder has two SentencePiece models, `source.spm` for sources and `target.spm` for targets, whose pieces
map to ids through one vocabulary, `vocab.json` (a piece the vocabulary lacks is `<unk>`). Its ids are not the
SentencePiece models' own, and there is no fast (`tokenizers`) form of it, so it is read by MarianTokenizer itself
(which needs the `sentencepiece` package): the same ids as `transformers` gives, for sources (language codes such
as `>>fra<<` included) and targets alike. EOS is `</s>`; there is no BOS: the decoder starts from the padding token
(Marian's `decoder_start_token_id`). Checkpoints with separate source and target vocabularies (`target_vocab.json`)
are refused: our encoder-decoder has one id space.

`MarianSentencePiece` offers what translation needs of a tokenizer, as `LoadedTokenizer` does: `encode(texts,
side)`, `decode(rows, side)`, `token_id(role)`, `decoder_start_id`, `vocab_size`, `sha256`, `save(folder)`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from llm.data.errors import DataError

FILES = ("source.spm", "target.spm", "vocab.json")


def is_marian_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "source.spm").is_file() and not (path / "tokenizer.json").is_file()


class MarianSentencePiece:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        missing = [name for name in FILES if not (self.folder / name).is_file()]
        if missing:
            raise DataError(f"{self.folder}: a Marian tokenizer needs {', '.join(FILES)}; missing {', '.join(missing)}")
        if (self.folder / "target_vocab.json").is_file():
            raise DataError(f"{self.folder}: separate source and target vocabularies (target_vocab.json) are not "
                            "supported: the encoder-decoder has one id space for both sides")
        try:
            import sentencepiece  # noqa: F401
            from transformers import MarianTokenizer
        except ImportError:
            raise DataError(f"{self.folder}: a Marian tokenizer needs the sentencepiece package "
                            "(pip install sentencepiece)") from None
        with warnings.catch_warnings():  # "Recommended: pip install sacremoses": it only normalises on request
            warnings.simplefilter("ignore")
            try:
                self.hf = MarianTokenizer.from_pretrained(str(self.folder))
            except Exception as e:
                raise DataError(f"{self.folder}: MarianTokenizer cannot read it: {type(e).__name__}: {e}") from None
        if self.hf.separate_vocabs:
            raise DataError(f"{self.folder}: separate_vocabs is true: separate source and target vocabularies are "
                            "not supported (the encoder-decoder has one id space for both sides)")
        self.special_tokens = {"unk": str(self.hf.unk_token), "bos": None, "eos": str(self.hf.eos_token),
                               "pad": str(self.hf.pad_token)}
        self.source = str(self.folder.resolve())
        for role, token in self.special_tokens.items():
            if token is not None and token not in self.hf.encoder:
                raise DataError(f"{self.folder / 'vocab.json'}: the {role} token {token!r} is not in the vocabulary")

    def token_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.hf.encoder[token]

    @property
    def eos_id(self) -> int:
        return self.token_id("eos")

    @property
    def decoder_start_id(self) -> int:
        """Marian's decoder starts from its padding token."""
        return self.token_id("pad")

    @property
    def vocab_size(self) -> int:
        return len(self.hf.encoder)

    @property
    def sha256(self) -> str:
        """Of what decides the ids: both SentencePiece models, the vocabulary (as a mapping) and the special tokens."""
        h = hashlib.sha256()
        for name in FILES[:2]:
            h.update((self.folder / name).read_bytes())
        h.update(json.dumps([self.hf.encoder, self.special_tokens], sort_keys=True).encode())
        return h.hexdigest()

    def encode(self, texts: Sequence[str], side: str = "src") -> list[list[int]]:
        """Token ids of each text (no EOS): `source.spm` for side "src", `target.spm` for "tgt"."""
        if not texts:
            return []
        key = "text" if side == "src" else "text_target"
        return self.hf(**{key: list(texts)}, add_special_tokens=False)["input_ids"]

    def decode(self, rows: Sequence[Sequence[int]], side: str = "tgt") -> list[str]:
        """Texts of token rows, special tokens left out (as `transformers` decodes a Marian model's output)."""
        return self.hf.batch_decode([list(r) for r in rows], skip_special_tokens=True)

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer's files (the SentencePiece models as they are): a folder MarianTokenizer loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        return folder
