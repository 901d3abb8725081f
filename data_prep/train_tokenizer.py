"""Train a byte-level BPE tokenizer on a corpus; write a folder that transformers.AutoTokenizer loads.

    python -m data_prep.train_tokenizer                                  # default corpus: Python's stdlib source
    python -m data_prep.train_tokenizer --input corpus/ --vocab-size 32000 --output data/tokenizer
    python -m data_prep.train_tokenizer --input 'shards/*.jsonl.gz' --text-column content --max-chars 2e9
"""

from __future__ import annotations

import argparse
import time

from data_prep import DEFAULT_TOKENIZER_DIR, run_cli
from llm.data.corpus import TXT_UNITS, default_corpus_files, iter_text_batches, resolve_inputs
from llm.data.errors import DataError
from llm.data.tokenizer import SPECIAL_TOKENS, train_bpe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.train_tokenizer", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="corpus files, folders (searched recursively) or globs: .txt/.md/.py (one document per "
                        "file, see --txt-unit), .jsonl/.json, .csv, .parquet (one per row), optionally .gz/.zst/... "
                        "Default: the Python standard library's source files")
    p.add_argument("--output", default=DEFAULT_TOKENIZER_DIR, help="folder to write (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="vocabulary size including the 256 byte tokens and the special tokens (default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--text-column", default="text", help="column holding the text in json/csv/parquet rows")
    p.add_argument("--txt-unit", choices=TXT_UNITS, default="document",
                   help="what one document of a text file is (default: %(default)s = the whole file)")
    p.add_argument("--encoding-errors", default="replace",
                   help="how undecodable bytes in text files are handled: replace (U+FFFD, default) or strict")
    p.add_argument("--max-chars", type=float, default=None,
                   help="train on at most about this many characters from the start of the corpus")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vocab_size <= 0:
        raise DataError(f"--vocab-size = {args.vocab_size}: must be positive")
    files = resolve_inputs(args.input) if args.input else default_corpus_files()
    print(f"training a {args.vocab_size}-token byte-level BPE on {len(files)} files"
          + ("" if args.input else " (default corpus: Python standard library)"))
    start = time.perf_counter()
    batches = iter_text_batches(files, args.text_column, 256, args.txt_unit, args.encoding_errors)
    max_chars = None if args.max_chars is None else int(args.max_chars)
    tok = train_bpe(batches, args.vocab_size, args.min_frequency, max_chars=max_chars, show_progress=True)
    folder = tok.save(args.output)
    print(f"wrote {folder} in {time.perf_counter() - start:.1f}s: vocab {tok.vocab_size}, special tokens "
          + ", ".join(f"{role}={tok.special_tokens[role]!r} (id {tok.token_id(role)})" for role in SPECIAL_TOKENS))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
