"""Tokenise a corpus in parallel and pack it into token shards for language-model pretraining.

Each document's tokens are followed by EOS (and preceded by BOS where the tokenizer's template puts one); shards
hold uint16 tokens when the vocabulary fits (else uint32) with a versioned header and a document index; documents
are split into train/val by a seeded hash; manifest.json records the format version, tokenizer hash and vocab size,
per-shard counts, sizes and sha256, and the source files.
The same input gives byte-identical output, whatever --num-proc. The checksums are also recorded in verified/
(with file times and per-block checksums, so not byte-identical) so that training trusts the fresh shards without
hashing them again.

    python -m data_prep.pack_lm                                   # default corpus + data/tokenizer -> data/stdlib
    python -m data_prep.pack_lm --input corpus/ --tokenizer data/tokenizer --output data/corpus --num-proc 16
    python -m data_prep.pack_lm --input 'web/*.parquet' --text-column content --tokenizer path/to/hf-tokenizer
    python -m data_prep.pack_lm --input corpus/ --tokenizer models/SmolLM2-135M --output data/smol   # a model's own
"""

from __future__ import annotations

import argparse
import time

from data_prep import DEFAULT_DATA_DIR, DEFAULT_TOKENIZER_DIR, run_cli
from llm.data.corpus import TXT_UNITS
from llm.data.errors import DataError
from llm.data.pack import DEFAULT_SHARD_TOKENS, pack_corpus
from llm.data.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.pack_lm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="corpus files, folders (searched recursively) or globs: .txt/.md/.py (one document per "
                        "file, see --txt-unit), .jsonl/.json, .csv, .parquet (one per row), optionally .gz/.zst/... "
                        "Default: the Python standard library's source files")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER_DIR,
                   help="tokenizer folder (from data_prep.train_tokenizer, or any Hugging Face tokenizer folder) "
                        "or a tokenizer.json file (default: %(default)s)")
    p.add_argument("--output", default=DEFAULT_DATA_DIR, help="dataset folder to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--text-column", default="text", help="column holding the text in json/csv/parquet rows")
    p.add_argument("--txt-unit", choices=TXT_UNITS, default="document",
                   help="what one document of a text file is (default: %(default)s = the whole file)")
    p.add_argument("--encoding-errors", default="replace",
                   help="how undecodable bytes in text files are handled: replace (U+FFFD, default) or strict")
    p.add_argument("--eos-token", default=None, help="document separator token, if the tokenizer's EOS is unset")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="start every document with the BOS token: auto (default) where the tokenizer's own "
                        "template does (Llama 3, Mistral), not otherwise (Qwen, SmolLM2, tokenizers we train)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents in the validation split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split (default: %(default)s)")
    p.add_argument("--num-proc", type=int, default=None,
                   help="tokenizer processes; 1 = this process, with the tokenizer's own threads (default: 1 on "
                        "machines with up to 2 CPUs, where it is faster, else one process per CPU)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="start a new shard after this many tokens, at a document boundary (default: %(default)s)")
    p.add_argument("--chunk-chars", type=int, default=1 << 20,
                   help="characters per unit of parallel work; bounds memory (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_proc is not None and args.num_proc <= 0:
        raise DataError(f"--num-proc = {args.num_proc}: must be positive")
    if args.chunk_chars <= 0 or args.shard_tokens <= 0:
        raise DataError("--chunk-chars and --shard-tokens must be positive")
    tok = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
    start = time.perf_counter()
    manifest = pack_corpus(
        args.output, tok, args.input, text_column=args.text_column, txt_unit=args.txt_unit,
        encoding_errors=args.encoding_errors, val_fraction=args.val_fraction, seed=args.seed,
        num_proc=args.num_proc, shard_tokens=args.shard_tokens, chunk_chars=args.chunk_chars,
        overwrite=args.overwrite, progress=not args.no_progress, bos=args.bos)
    seconds = time.perf_counter() - start
    stats = manifest["stats"]
    print(f"wrote {args.output}: {len(manifest['sources'])} files, {stats['documents_read']} documents, "
          f"{stats['text_tokens']:,} tokens ({manifest['dtype']}) in {seconds:.1f}s "
          f"= {stats['text_tokens'] / seconds:,.0f} tokens/s")
    for split, entry in manifest["splits"].items():
        print(f"  {split:5s}: {entry['num_docs']:>9,} documents {entry['num_tokens']:>14,} tokens "
              f"(EOS included) in {len(entry['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
