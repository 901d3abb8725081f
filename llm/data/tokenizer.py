"""Tokenizers: train a byte-level BPE, load a tokenizer folder, hash it, save it so `AutoTokenizer` loads it.

Everything downstream works on a `tokenizers.Tokenizer` (the fast Rust one) plus the ids of its special tokens.
A tokenizer is taken from a folder holding `tokenizer.json` (ours, or any Hugging Face fast tokenizer), a bare
`tokenizer.json` file, or a Hugging Face folder with only slow-tokenizer files, which `transformers` converts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.data.errors import DataError

# The special tokens our models need, by role; ids 0..3 in this order in a tokenizer we train (as Llama's).
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_EOS_FALLBACKS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")


@dataclass
class LoadedTokenizer:
    """A fast tokenizer and its special tokens (role -> token string; None where the tokenizer has none)."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    source: str = ""

    def token_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self.token_id("eos")

    def template_bos(self) -> int | None:
        """The token the tokenizer's own template puts before every text (Llama's and Mistral's BOS), or None
        (Qwen, SmolLM2, tokenizers we train: no template)."""
        plain = self.tokenizer.encode("x", add_special_tokens=False).ids
        full = self.tokenizer.encode("x", add_special_tokens=True).ids
        return full[0] if len(full) > len(plain) and full[1:len(plain) + 1] == plain else None

    @property
    def decoder_start_id(self) -> int:
        """The translation decoder's start token: BOS, or EOS where there is none."""
        bos = self.token_id("bos")
        return self.eos_id if bos is None else bos

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], side: str = "src") -> list[list[int]]:
        """Token ids of each text without special tokens (`side`: one tokenizer serves sources and targets)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, rows: Sequence[Sequence[int]], side: str = "tgt") -> list[str]:
        """Texts of token rows, special tokens left out."""
        return self.tokenizer.decode_batch([list(r) for r in rows], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def sha256(self) -> str:
        """Hash of the tokenizer's canonical serialization: equal hashes mean equal token ids for any text."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json`: a folder `AutoTokenizer.from_pretrained` loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.to_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000_000}
        config.update({f"{role}_token": tok for role, tok in self.special_tokens.items() if tok is not None})
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return folder


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(folder: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins, as in transformers
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        for role in SPECIAL_TOKENS:
            token = _token_content(data.get(f"{role}_token"))
            if token is not None:
                found[role] = token
    return found


def load_tokenizer(path: str | Path, eos_token: str | None = None):
    """Load a tokenizer folder (or a `tokenizer.json` file). `eos_token` overrides the folder's EOS token.

    The EOS token is required: packing separates documents with it. Raises DataError naming the path otherwise.
    A Marian (OPUS-MT) folder, SentencePiece models and vocab.json, gives a `MarianSentencePiece` (translation).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: tokenizer not found (expected a folder with tokenizer.json, or the file itself)")
    from llm.data.marian_tokenizer import MarianSentencePiece, is_marian_tokenizer

    if is_marian_tokenizer(path):
        if eos_token is not None:
            raise DataError(f"{path}: a Marian tokenizer's EOS is its own ({eos_token!r} cannot replace it)")
        return MarianSentencePiece(path)
    folder = path if path.is_dir() else path.parent
    json_file = path if path.is_file() else path / "tokenizer.json"
    if json_file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(json_file))
        except Exception as e:
            raise DataError(f"{json_file}: not a tokenizers JSON file: {e}") from None
        special = _read_special_tokens(folder)
    else:  # a Hugging Face folder with only slow-tokenizer files: let transformers convert it
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path))
            tokenizer = hf.backend_tokenizer
        except Exception as e:
            raise DataError(f"{path}: no tokenizer.json and transformers could not load it: {e}") from None
        special = {role: getattr(hf, f"{role}_token", None) for role in SPECIAL_TOKENS}
        special = {role: tok for role, tok in special.items() if tok is not None}
    if eos_token is not None:
        special["eos"] = eos_token
    elif "eos" not in special:
        special["eos"] = next((t for t in _EOS_FALLBACKS if tokenizer.token_to_id(t) is not None), None)
    loaded = LoadedTokenizer(tokenizer, {role: special.get(role) for role in SPECIAL_TOKENS}, str(path.resolve()))
    for role, token in loaded.special_tokens.items():
        if token is not None and tokenizer.token_to_id(token) is None:
            raise DataError(f"{path}: {role} token {token!r} is not in the vocabulary")
    if loaded.special_tokens["eos"] is None:
        raise DataError(f"{path}: tokenizer has no EOS token (needed to separate documents); pass --eos-token")
    return loaded


def _limit_chars(batches: Iterable[list[str]], max_chars: int | None) -> Iterator[list[str]]:
    """Pass batches through until about `max_chars` characters have gone by (whole documents only)."""
    seen = 0
    for batch in batches:
        if max_chars is not None:
            cut = 0
            while cut < len(batch) and seen < max_chars:
                seen += len(batch[cut])
                cut += 1
            batch = batch[:cut]
        if not batch:
            return
        yield batch


def train_bpe(batches: Iterable[list[str]], vocab_size: int, min_frequency: int = 2,
              max_chars: int | None = None, show_progress: bool = False) -> LoadedTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, lossless: decode(encode(text)) == text).

    `batches` yields lists of documents; they are streamed to the trainer, which keeps only word counts in memory.
    `max_chars` stops after that many characters (training on a sample of a large corpus is usual).
    """
    min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size = {vocab_size}: must be at least {min_vocab} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_limit_chars(batches, max_chars), trainer)
    return LoadedTokenizer(tokenizer, dict(SPECIAL_TOKENS), "trained")
