"""The data_prep CLIs are tested on the same tiny corpus and tokenizer as llm.data."""

from tests.data.conftest import (  # noqa: F401
    hashes,
    loaded_tokenizer,
    packed,
    tiny_corpus,
    tiny_docs,
    tiny_tokenizer,
)
