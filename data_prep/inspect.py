"""Summarise a packed dataset, check it against its manifest, and print a few decoded sample windows.

    python -m data_prep.inspect data/stdlib
    python -m data_prep.inspect data/stdlib --split val --samples 5 --seq-len 64 --verify
"""

from __future__ import annotations

import argparse

import numpy as np

from data_prep import run_cli
from llm.data.errors import DataError
from llm.data.order import Permutation, derive_key
from llm.data.shards import MANIFEST, PackedSplit, read_manifest, verify_dataset
from llm.data.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="a folder written by data_prep.pack_lm")
    p.add_argument("--split", default="train", help="split to sample windows from (default: %(default)s)")
    p.add_argument("--samples", type=int, default=3, help="decoded windows to print (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which windows are picked (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file again and compare with the manifest's sha256, refreshing the verification "
                        "record (without it: files unchanged since they were last verified are trusted)")
    return p.parse_args(argv)


def summary(manifest: dict) -> list[str]:
    tok = manifest["tokenizer"]
    lines = [f"format {manifest['format']} v{manifest['format_version']}, dtype {manifest['dtype']}",
             f"tokenizer: vocab {tok['vocab_size']}, sha256 {tok['sha256'][:16]}..., special "
             + ", ".join(f"{r}={t!r}" for r, t in tok["special_tokens"].items() if t is not None),
             f"sources: {len(manifest['sources'])} files, {sum(s['bytes'] for s in manifest['sources']):,} bytes"
             + (" (default corpus: Python standard library)" if manifest.get("default_corpus") else ""),
             "options: " + ", ".join(f"{k}={v}" for k, v in manifest["options"].items())]
    for split, entry in manifest["splits"].items():
        docs = max(entry["num_docs"], 1)
        lines.append(f"{split:5s}: {entry['num_docs']:>9,} documents {entry['num_tokens']:>14,} tokens "
                     f"(mean {entry['num_tokens'] / docs:,.0f} per document) in {len(entry['shards'])} shard(s)")
        for shard in entry["shards"]:
            lines.append(f"       {shard['bin']}: {shard['num_tokens']:,} tokens, {shard['num_docs']:,} documents, "
                         f"sha256 {shard['bin_sha256'][:12]}...")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = read_manifest(args.data_dir)
    for line in summary(manifest):
        print(line)
    verify_dataset(args.data_dir, rehash=args.verify)
    checked = ("sizes, headers and sha256, every file hashed now" if args.verify else
               "sizes, headers and sha256, files unchanged since verified not hashed again; --verify hashes all")
    print(f"integrity: all files match {MANIFEST} ({checked})")
    if args.samples <= 0:
        return 0
    split = PackedSplit(args.data_dir, args.split)
    n = (split.num_tokens - 1) // args.seq_len
    if n <= 0:
        raise DataError(f"{args.data_dir}: split {args.split!r} has {split.num_tokens} tokens, no window of "
                        f"{args.seq_len + 1}")
    tok = load_tokenizer(args.data_dir).tokenizer
    picks = Permutation(n, derive_key(args.seed))(np.arange(min(args.samples, n)))
    for i in picks.tolist():
        window = split.read(i * args.seq_len, args.seq_len + 1)
        print(f"\n--- {args.split} window {i} of {n}: tokens [{i * args.seq_len}, {(i + 1) * args.seq_len + 1}) ---")
        print(tok.decode(window.tolist(), skip_special_tokens=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
