"""Data path: corpus -> tokenizer -> packed token shards -> resumable loader.

    corpus.py     finding corpus files (and the default stdlib corpus); streaming documents via HF `datasets`
    tokenizer.py  training a byte-level BPE, loading/hashing/saving tokenizer folders
    pack.py       parallel tokenisation into EOS-separated shards with a train/validation split
    shards.py     the shard format: headers, writer, manifest, reading, verification
    verify.py     the verification record (sha256 once per file) and per-block checksums on first read
    order.py      the keyed hash and permutation that define data order
    mixture.py    weighted blending of several packed datasets
    loader.py     the packed LM loader (training, validation); imports torch

Import the submodules directly; this package only re-exports the error type, so the CLIs stay light to import.
"""

from llm.data.errors import DataError

__all__ = ["DataError"]
