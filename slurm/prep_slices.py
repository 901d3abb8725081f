"""Data preparation as a Slurm job array: pack slices of a corpus in parallel, then merge them into one dataset that
is byte for byte what a single `python -m data_prep.pack_lm` run with the same arguments writes.

    python slurm/prep_slices.py slice --index I --count N -- PACK_LM_ARGS   # one array task: slice I of N
    python slurm/prep_slices.py merge --count N -- PACK_LM_ARGS             # after all slices: the final dataset

PACK_LM_ARGS are `data_prep.pack_lm`'s own arguments (--input, --tokenizer, --output, --val-fraction, ...). The
corpus's files (in pack_lm's order) are cut into N contiguous slices of about equal bytes; a slice is whole files, so
a corpus needs at least N files to keep N tasks busy. Slice I is packed by pack_lm itself into
OUTPUT.slices/slice-0000I, with every document in its train split (--val-fraction 0); the merge then:

  - numbers documents globally: slice I's documents follow those of slices 0..I-1 (`documents_read` in each
    slice's manifest, empty documents included, since pack_lm counts them in the index it splits by);
  - decides train or validation per document with pack_lm's keyed hash of that global index and --seed;
  - re-cuts the token streams into shards of --shard-tokens at document boundaries, as one run would;
  - writes the manifest with the sources, options and summed statistics of one run.

Each task then re-reads its slice's files (no tokenising) to record the UTF-8 bytes of every stored document
(slice-0000I.bytes.npy: the merge sums them per split into the manifest's `text_bytes`, for bits per byte) and,
since empty documents are not stored, where any were (slice-0000I.empty.json: the merge needs their positions to
number the others).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python slurm/prep_slices.py ...`

from data_prep import pack_lm, run_cli  # noqa: E402
from llm.data.corpus import default_corpus_files, iter_text_batches, resolve_inputs  # noqa: E402
from llm.data.errors import DataError  # noqa: E402
from llm.data.order import unit_hash  # noqa: E402
from llm.data.pack import split_key  # noqa: E402  (the split's hash: must be pack_lm's own)
from llm.data.shards import SPLITS, PackedSplit, ShardWriter, read_manifest, token_dtype, write_manifest  # noqa: E402

BLOCK_TOKENS = 1 << 24  # tokens re-sharded at a time: bounds the merge's memory, whatever the shard size


def corpus_files(args: argparse.Namespace) -> list[Path]:
    """The files one pack_lm run would read, in its order."""
    return resolve_inputs(args.input) if args.input else default_corpus_files()


def slices(files: list[Path], count: int) -> list[list[Path]]:
    """`count` contiguous runs of files of about equal total bytes (some empty when there are fewer files)."""
    sizes = np.array([f.stat().st_size for f in files], dtype=np.float64)
    ends = np.cumsum(sizes)
    total = ends[-1] if len(ends) and ends[-1] > 0 else 1.0
    # File k goes to the slice its byte midpoint falls in: deterministic, and no slice is left empty needlessly.
    owner = np.minimum(((ends - sizes / 2) / total * count).astype(np.int64), count - 1)
    return [[f for f, o in zip(files, owner, strict=True) if o == i] for i in range(count)]


def slices_dir(args: argparse.Namespace) -> Path:
    out = Path(args.output).resolve()
    return out.with_name(out.name + ".slices")


def check_output_free(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DataError(f"{out}: already exists and is not empty; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------------------------
# One array task
# --------------------------------------------------------------------------------------------------------------------


def pack_slice(index: int, count: int, pack_argv: list[str]) -> int:
    args = pack_lm.parse_args(pack_argv)
    check_output_free(args)  # fail in the first minute, not after the whole corpus was tokenised
    files = slices(corpus_files(args), count)[index]
    part = slices_dir(args) / f"slice-{index:05d}"
    if not files:
        print(f"slice {index}/{count}: no files (the corpus has fewer files than slices)")
        return 0
    print(f"slice {index}/{count}: {len(files)} file(s), {files[0]} .. {files[-1]}", flush=True)
    # pack_lm itself, on this slice's files; later options win in argparse, so these override the user's.
    rc = run_cli(pack_lm.main, [*pack_argv, "--input", *map(str, files), "--output", str(part),
                                "--val-fraction", "0", "--overwrite", "--no-progress"])
    if rc != 0:
        return rc
    manifest = read_manifest(part)
    # Where the skipped documents were, in the slice's numbering (the same reader and rule as pack_lm's), and the
    # UTF-8 bytes of each stored one (the merge sums them per split for the manifest's text_bytes).
    empty, nbytes, i = [], [], 0
    for batch in iter_text_batches(files, args.text_column, 64, args.txt_unit, args.encoding_errors):
        empty += [i + k for k, text in enumerate(batch) if not text]
        nbytes += [len(text.encode("utf-8", "replace")) for text in batch if text]
        i += len(batch)
    stats = manifest["stats"]
    if i != stats["documents_read"] or len(empty) != stats["empty_documents_skipped"]:
        raise DataError(f"{part}: re-reading its files gave {i} documents ({len(empty)} empty), the manifest "
                        f"says {stats['documents_read']} ({stats['empty_documents_skipped']})")
    if empty:
        Path(f"{part}.empty.json").write_text(json.dumps(empty))
    np.save(f"{part}.bytes.npy", np.asarray(nbytes, dtype=np.int64))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# The final step
# --------------------------------------------------------------------------------------------------------------------


def _reshard(part: Path, is_val: np.ndarray, writers: dict[str, ShardWriter]) -> None:
    """Append the slice's documents to the train and val writers, in order, per `is_val`."""
    data = PackedSplit(part, "train", verify_checksums=True)
    starts = data.doc_starts(0, data.num_tokens)
    ends = np.append(starts[1:], data.num_tokens)
    a = 0
    while a < len(starts):
        # Documents [a, b): at least one, and no more than BLOCK_TOKENS tokens beyond the first.
        b = max(a + 1, int(np.searchsorted(ends, starts[a] + BLOCK_TOKENS, side="right")))
        tokens = data.read(int(starts[a]), int(ends[b - 1] - starts[a]))
        lens, val = ends[a:b] - starts[a:b], is_val[a:b]
        in_val = np.repeat(val, lens)
        writers["train"].add(tokens[~in_val], lens[~val])
        writers["val"].add(tokens[in_val], lens[val])
        a = b


def merge(count: int, pack_argv: list[str]) -> int:
    args = pack_lm.parse_args(pack_argv)
    check_output_free(args)
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction = {args.val_fraction}: must be in [0, 1)")
    files = corpus_files(args)
    plan = slices(files, count)
    where = slices_dir(args)
    parts = [where / f"slice-{i:05d}" for i in range(count) if plan[i]]
    missing = [str(p) for p in parts if not (p / "manifest.json").is_file()]
    if missing:
        raise DataError(f"slice(s) not packed (did an array task fail?): {', '.join(missing)}")
    manifests = [read_manifest(p) for p in parts]
    sources = [s for m in manifests for s in m["sources"]]
    if [s["path"] for s in sources] != [str(f) for f in files]:
        raise DataError(f"{where}: the slices' files are not the corpus's files in order; were they packed with "
                        f"other --input arguments or slice count? Remove {where} and run the array again")
    first = manifests[0]
    for p, m in zip(parts, manifests, strict=True):
        for key in ("format_version", "dtype", "tokenizer"):
            if m[key] != first[key]:
                raise DataError(f"{p}: {key} differs from {parts[0]}'s; the slices were packed differently")

    out = Path(args.output)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    dtype = token_dtype(first["tokenizer"]["vocab_size"])
    writers = {split: ShardWriter(partial, split, dtype, args.shard_tokens) for split in SPLITS}
    val_key = split_key(args.seed)
    stats: dict[str, int] = {}
    text_bytes = dict.fromkeys(SPLITS, 0)
    offset = 0  # global index of the slice's first document
    try:
        for p, m in zip(parts, manifests, strict=True):
            n_read = m["stats"]["documents_read"]
            empty_file = Path(f"{p}.empty.json")
            empty = json.loads(empty_file.read_text()) if empty_file.is_file() else []
            if len(empty) != m["stats"]["empty_documents_skipped"]:
                raise DataError(f"{p}: {m['stats']['empty_documents_skipped']} empty documents but {empty_file} "
                                f"lists {len(empty)}; pack this slice again")
            kept = np.setdiff1d(np.arange(n_read, dtype=np.int64), np.asarray(empty, dtype=np.int64))
            is_val = unit_hash(val_key, offset + kept) < args.val_fraction
            doc_bytes = np.load(f"{p}.bytes.npy")
            if len(doc_bytes) != len(kept):
                raise DataError(f"{p}: {p}.bytes.npy has {len(doc_bytes)} entries for {len(kept)} documents; pack "
                                "this slice again")
            text_bytes["train"] += int(doc_bytes[~is_val].sum())
            text_bytes["val"] += int(doc_bytes[is_val].sum())
            _reshard(p, is_val, writers)
            offset += n_read
            for key, value in m["stats"].items():
                stats[key] = stats.get(key, 0) + value
        splits = {split: writer.close() | {"text_bytes": text_bytes[split]} for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise

    for f in parts[0].iterdir():  # the tokenizer files, as pack_lm saves them next to the shards
        if f.is_file() and f.name != "manifest.json" and f.suffix not in (".bin", ".idx"):
            shutil.copyfile(f, partial / f.name)
    manifest = {**first, "sources": sources, "default_corpus": not args.input, "stats": stats, "splits": splits,
                "options": {**first["options"], "val_fraction": args.val_fraction, "seed": args.seed,
                            "shard_tokens": args.shard_tokens}}
    write_manifest(partial, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    if not os.environ.get("KEEP_SLICES"):
        shutil.rmtree(where)
    print(f"merged {len(parts)} slice(s) into {out}: {stats['documents_read']} documents, "
          f"{stats['text_tokens']:,} tokens")
    for split, entry in splits.items():
        print(f"  {split:5s}: {entry['num_docs']:>9,} documents {entry['num_tokens']:>14,} tokens "
              f"(EOS included) in {len(entry['shards'])} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, pack_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python slurm/prep_slices.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["slice", "merge"])
    p.add_argument("--index", type=int, help="this slice (slice only)")
    p.add_argument("--count", type=int, required=True, help="number of slices")
    a = p.parse_args(own)
    if a.count <= 0:
        p.error("--count must be positive")
    if a.command == "slice":
        if a.index is None or not 0 <= a.index < a.count:
            p.error(f"slice needs --index in [0, {a.count})")
        return run_cli(lambda _: pack_slice(a.index, a.count, pack_argv))
    return run_cli(lambda _: merge(a.count, pack_argv))


if __name__ == "__main__":
    raise SystemExit(main())
