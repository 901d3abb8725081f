"""Command-line data preparation (thin wrappers over `llm.data`):

    python -m data_prep.train_tokenizer   corpus -> byte-level BPE tokenizer folder
    python -m data_prep.pack_lm           corpus + tokenizer -> packed token shards + manifest
    python -m data_prep.inspect DATA_DIR  manifest summary, integrity check, decoded sample windows
    python -m data_prep.make_cloze DATA_DIR --output DIR   a cloze task (lm-eval YAML) from held-out documents

With no --input, the corpus is the Python standard library's source (present wherever Python is).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from llm.data.errors import DataError

DEFAULT_TOKENIZER_DIR = "data/tokenizer"
DEFAULT_DATA_DIR = "data/stdlib"


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI's main; bad input (DataError) is one clear line on stderr and exit status 2, not a traceback."""
    try:
        return main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
