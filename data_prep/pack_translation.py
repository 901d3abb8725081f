"""Tokenise parallel text with one joint tokenizer and pack the sentence pairs into token shards for translation.

    python -m data_prep.pack_translation --tsv train.tsv --output data/wmt --vocab-size 32000
    python -m data_prep.pack_translation --source train.de --target train.en --tokenizer data/tok --output data/wmt
    python -m data_prep.pack_translation --jsonl train.jsonl --source-field de --target-field en --output data/wmt
    python -m data_prep.pack_translation --hf-dataset wmt14_saved --source-field translation.de \\
        --target-field translation.en --output data/wmt

Input: a TSV (source TAB target per line), two line-aligned files, JSONL rows with source and target fields, or a
local Hugging Face `datasets` folder (from `save_to_disk`); fields may be dotted paths into nested rows
("translation.de"). Text files may be gzipped. Both sides are stripped of surrounding whitespace.

Tokenizer: --tokenizer takes an existing one; otherwise a byte-level BPE is trained on both sides together (a joint
vocabulary, which shared embeddings need). It must have EOS and padding tokens. A Marian (OPUS-MT) model folder is
taken as it is, to fine-tune that model (`train.init_from`): sources through its source.spm, targets through its
target.spm, both into its vocab.json.

Filters, counted in the manifest: pairs with an empty side; pairs with a side longer than --max-len tokens; pairs
whose longer side has more than --max-ratio times the tokens of the shorter (misaligned pairs, as Moses'
clean-corpus-n.perl, whose -ratio 1.5 the fairseq WMT recipes use).

Output: the shard format of `llm.data.shards` (data_prep.inspect and verify_dataset read it) with splits
train.src/train.tgt/val.src/val.tgt, pair k being document k of each side, each followed by EOS, and a manifest
with "task": "translation". A pair goes to validation by a keyed hash of its index in the input (--val-fraction,
--seed), so the split does not depend on the filters. The same input gives byte-identical output (apart from the
verified/ record, which lets training trust the fresh shards without hashing them again).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep import run_cli
from llm.data.errors import DataError
from llm.data.order import derive_key, unit_hash
from llm.data.pack import DEFAULT_SHARD_TOKENS
from llm.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, dtype_name, token_dtype, write_manifest
from llm.data.tokenizer import LoadedTokenizer, load_tokenizer, train_bpe
from llm.data.translation import SIDES, TASK

_SPLIT_STREAM = 0x5EED_7A15  # the validation hash's key, apart from every other use of the seed
Pair = tuple[str, str]


# ---- reading ---------------------------------------------------------------------------------------------------


def _open_text(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _field(row, path: str, where: str) -> str:
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: no field {path!r} (has: {keys}); choose one with --source-field/--target-field")
        value = value[part]
    return "" if value is None else str(value)


def read_tsv(paths: list[Path], stats: dict) -> Iterator[Pair]:
    for path in paths:
        with _open_text(path) as f:
            for line in f:
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) < 2:
                    stats["malformed"] += 1  # no tab: not a pair
                    continue
                yield fields[0], fields[1]


def read_aligned(source: Path, target: Path) -> Iterator[Pair]:
    with _open_text(source) as fs, _open_text(target) as ft:
        for n, (s, t) in enumerate(itertools.zip_longest(fs, ft), start=1):
            if s is None or t is None:
                longer = target if s is None else source
                raise DataError(f"{source} and {target} are not line-aligned: line {n} of {longer} has no partner")
            yield s.rstrip("\r\n"), t.rstrip("\r\n")


def read_jsonl(paths: list[Path], src_field: str, tgt_field: str) -> Iterator[Pair]:
    for path in paths:
        with _open_text(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
                yield _field(row, src_field, f"{path}:{n}"), _field(row, tgt_field, f"{path}:{n}")


def read_hf_dataset(folder: Path, split: str, src_field: str, tgt_field: str) -> Iterator[Pair]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{folder}: not a saved `datasets` folder: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{folder}: no split {split!r} (has: {', '.join(ds)}); choose one with --hf-split")
        ds = ds[split]
    for batch in ds.iter(batch_size=1000):
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for row in rows:
            yield _field(row, src_field, str(folder)), _field(row, tgt_field, str(folder))


def pair_reader(args: argparse.Namespace):
    """A function `read(stats)` giving a fresh iterator over the input's pairs (the input is read twice when a
    tokenizer is trained); malformed lines are counted into `stats`."""
    if args.tsv:
        return lambda stats: read_tsv([Path(p) for p in args.tsv], stats)
    if args.source:
        return lambda stats: read_aligned(Path(args.source), Path(args.target))
    if args.jsonl:
        return lambda stats: read_jsonl([Path(p) for p in args.jsonl], args.source_field, args.target_field)
    return lambda stats: read_hf_dataset(Path(args.hf_dataset), args.hf_split, args.source_field, args.target_field)


def input_files(args: argparse.Namespace) -> list[Path]:
    """The input's files (checked to exist), for the manifest."""
    if args.hf_dataset:
        folder = Path(args.hf_dataset)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        return sorted(p for p in folder.rglob("*") if p.is_file())
    files = [Path(p) for p in (args.tsv or args.jsonl or [args.source, args.target])]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: no such file")
    return files


# ---- packing ---------------------------------------------------------------------------------------------------


def _chunks(pairs: Iterator[Pair], size: int) -> Iterator[list[Pair]]:
    chunk = []
    for pair in pairs:
        chunk.append((pair[0].strip(), pair[1].strip()))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pack_pairs(out_dir: str | Path, tokenizer, pairs: Iterator[Pair], *, max_len: int = 250,
               max_ratio: float = 1.5, val_fraction: float = 0.01, seed: int = 1234,
               shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_pairs: int = 10000, stats: dict | None = None,
               sources: list[dict] | None = None, overwrite: bool = False) -> dict:
    """Filter, tokenise and write `pairs` (source, target strings) as a packed translation dataset; the manifest."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction}: must be in [0, 1)")
    if max_len <= 0 or max_ratio < 1:
        raise DataError(f"max_len = {max_len} must be positive and max_ratio = {max_ratio} at least 1")
    eos, pad = tokenizer.token_id("eos"), tokenizer.token_id("pad")
    if pad is None:
        raise DataError(f"{tokenizer.source}: the tokenizer has no padding token, which batches of pairs need")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    partial.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {f"{split}.{side}": ShardWriter(partial, f"{split}.{side}", dtype, shard_tokens)
               for split in ("train", "val") for side in SIDES}
    stats = stats if stats is not None else {}
    stats.update({k: stats.get(k, 0) for k in ("malformed", "pairs_read", "empty", "too_long", "ratio",
                                              "train_pairs", "val_pairs")})
    split_key, first = derive_key(seed, _SPLIT_STREAM), 0
    try:
        for chunk in _chunks(pairs, chunk_pairs):
            encoded = [tokenizer.encode([p[i] for p in chunk], side) for i, side in enumerate(SIDES)]
            src_len = np.array([len(e) for e in encoded[0]])
            tgt_len = np.array([len(e) for e in encoded[1]])
            empty = np.array([not s or not t for s, t in chunk]) | (src_len == 0) | (tgt_len == 0)
            too_long = ~empty & ((src_len > max_len) | (tgt_len > max_len))
            short, long_ = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
            bad_ratio = ~empty & ~too_long & (long_ > max_ratio * np.maximum(short, 1))
            keep = ~(empty | too_long | bad_ratio)
            is_val = unit_hash(split_key, first + np.arange(len(chunk))) < val_fraction
            for split, sel in (("train", keep & ~is_val), ("val", keep & is_val)):
                for side, enc in zip(SIDES, encoded, strict=True):
                    docs = [enc[i] + [eos] for i in np.flatnonzero(sel)]
                    if docs:
                        writers[f"{split}.{side}"].add(np.concatenate(docs), [len(d) for d in docs])
                stats[f"{split}_pairs"] += int(sel.sum())
            stats["pairs_read"] += len(chunk)
            stats["empty"] += int(empty.sum())
            stats["too_long"] += int(too_long.sum())
            stats["ratio"] += int(bad_ratio.sum())
            first += len(chunk)
        splits = {name: writer.close() for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if stats["train_pairs"] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"no sentence pair was kept out of {stats['pairs_read']} read ({stats}); check the input "
                        f"and --max-len/--max-ratio")
    tokenizer.save(partial)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": TASK, "dtype": dtype_name(dtype),
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "source": tokenizer.source,
                      "special_tokens": tokenizer.special_tokens,
                      "special_ids": {role: tokenizer.token_id(role) for role in tokenizer.special_tokens} | {
                          "decoder_start": tokenizer.decoder_start_id}},
        "options": {"max_len": max_len, "max_ratio": max_ratio, "val_fraction": val_fraction, "seed": seed,
                    "shard_tokens": shard_tokens},
        "sources": sources or [], "stats": stats, "splits": splits,
    }
    write_manifest(partial, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return manifest


def train_joint_tokenizer(pairs: Iterator[Pair], vocab_size: int, max_chars: int | None = None) -> LoadedTokenizer:
    """A byte-level BPE trained on both sides of the pairs, interleaved (one vocabulary for both languages)."""
    def batches():
        for chunk in _chunks(pairs, 1000):
            yield [text for pair in chunk for text in pair]

    return train_bpe(batches(), vocab_size, max_chars=max_chars)


# ---- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.pack_translation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--tsv", nargs="+", metavar="FILE", help="TSV files: source TAB target per line")
    src.add_argument("--source", metavar="FILE", help="source sentences, one per line (with --target)")
    src.add_argument("--target", metavar="FILE", help="target sentences, line-aligned with --source")
    src.add_argument("--jsonl", nargs="+", metavar="FILE", help="JSONL files with --source-field/--target-field")
    src.add_argument("--hf-dataset", metavar="DIR", help="a local `datasets` folder written by save_to_disk")
    p.add_argument("--source-field", default="source", help="JSONL/datasets field of the source (dotted for nested)")
    p.add_argument("--target-field", default="target", help="JSONL/datasets field of the target (dotted for nested)")
    p.add_argument("--hf-split", default="train", help="split of a DatasetDict folder (default: %(default)s)")
    p.add_argument("--tokenizer", help="an existing tokenizer folder or tokenizer.json, or a Marian (OPUS-MT) model "
                                       "folder (default: train one)")
    p.add_argument("--vocab-size", type=int, default=32000, help="joint BPE vocabulary to train (default: 32000)")
    p.add_argument("--tokenizer-max-chars", type=float, default=None,
                   help="train the tokenizer on about this many characters from the start of the input")
    p.add_argument("--output", required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--max-len", type=int, default=250, help="drop pairs with a side longer than this many tokens")
    p.add_argument("--max-ratio", type=float, default=1.5,
                   help="drop pairs whose longer side has more than this times the shorter side's tokens")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of pairs for validation")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard and side")
    args = p.parse_args(argv)
    given = [bool(args.tsv), bool(args.source or args.target), bool(args.jsonl), bool(args.hf_dataset)]
    if sum(given) != 1:
        p.error("give exactly one input: --tsv, --source with --target, --jsonl or --hf-dataset")
    if bool(args.source) != bool(args.target):
        p.error("--source and --target go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    read = pair_reader(args)
    files = input_files(args)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        max_chars = None if args.tokenizer_max_chars is None else int(args.tokenizer_max_chars)
        tok = train_joint_tokenizer(read({"malformed": 0}), args.vocab_size, max_chars)
        print(f"trained a joint byte-level BPE of {tok.vocab_size} tokens")
    stats = {"malformed": 0}
    sources = [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files]
    manifest = pack_pairs(args.output, tok, read(stats), max_len=args.max_len, max_ratio=args.max_ratio,
                          val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                          stats=stats, sources=sources, overwrite=args.overwrite)
    s = manifest["stats"]
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f}s: {s['pairs_read']:,} pairs read, "
          f"{s['train_pairs']:,} train, {s['val_pairs']:,} val; dropped {s['empty']:,} empty, {s['too_long']:,} "
          f"longer than {args.max_len} tokens, {s['ratio']:,} over ratio {args.max_ratio}, "
          f"{s['malformed']:,} malformed lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
