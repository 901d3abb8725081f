"""Tokenise a corpus in parallel and pack it into EOS-separated token shards with a train/validation split
(documents also start with BOS where the tokenizer's template puts one: Llama, Mistral).

The pipeline streams: the main process reads documents through `datasets` (streaming), cuts them into chunks of
about `chunk_chars` characters, and hands each chunk to a worker (a process, or a thread with `num_proc=1`), which
runs the fast tokenizer's batched `encode_batch_fast`, appends EOS to every document and splits the chunk's
documents into train and validation. Results come back in submission order and are appended to the shard writers,
with at most two chunks per worker in flight, so memory is bounded by a few chunks whatever the corpus size.

The output depends only on the input, the tokenizer and the options, never on `num_proc` or timing: chunks cut at
document boundaries and tokenisation is per document, the split is a keyed hash of each document's global index
(no random state, no need to know the corpus size in advance), and the manifest holds no timestamps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np

from llm.data.corpus import default_corpus_files, iter_text_batches, resolve_inputs
from llm.data.errors import DataError
from llm.data.order import derive_key, unit_hash
from llm.data.shards import FORMAT, FORMAT_VERSION, SPLITS, ShardWriter, dtype_name, token_dtype, write_manifest
from llm.data.tokenizer import LoadedTokenizer, load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB per uint16 shard: few files, each far below any file-system limit
_SPLIT_STREAM = 0x5EED_5B17  # keeps the split hash independent of the keys used for sample order


def split_key(seed: int) -> int:
    """The key of the train/validation hash for `seed`: whoever packs a slice of a corpus (a Slurm array task)
    must split its documents exactly as one `pack_lm` run over the whole corpus would."""
    return derive_key(seed, _SPLIT_STREAM)


def default_num_proc() -> int:
    """1 (threads in this process) on machines with <= 2 CPUs, where it measured faster than 2 processes (see
    docs/BENCHMARKS.md); one process per CPU on larger machines, where the GIL-bound share of the threaded mode
    (EOS/split work and conversions) would cap it."""
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else cpus


class ChunkTokenizer:
    """Turns a chunk of documents into (train tokens, train doc lengths, val tokens, val doc lengths, counts)."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, split_key: int, val_fraction: float,
                 bos_id: int | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Text that happens to contain "</s>" (or any special token) must stay text: only we insert separators.
        self.tokenizer.encode_special_tokens = True
        self.eos_id, self.bos_id, self.dtype = eos_id, bos_id, np.dtype(dtype)
        self.split_key, self.val_fraction = split_key, val_fraction

    def __call__(self, first_doc: int, texts: list[str]) -> tuple:
        keep = [i for i, t in enumerate(texts) if t]  # empty documents would only add a lone EOS
        encodings = self.tokenizer.encode_batch_fast([texts[i] for i in keep], add_special_tokens=False)
        lens = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        n_text = int(lens.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype, count=n_text)
        if self.bos_id is not None:  # BOS before every document
            ids = np.insert(ids, np.cumsum(lens) - lens, self.bos_id)
            lens += 1
        tokens = np.insert(ids, np.cumsum(lens), self.eos_id)  # EOS after every document
        lens += 1
        # Train or validation by a keyed hash of the document's global index: fixed per (seed, document).
        is_val = unit_hash(self.split_key, first_doc + np.asarray(keep, dtype=np.int64)) < self.val_fraction
        val_tokens = np.repeat(is_val, lens)
        # UTF-8 bytes of each split's text, for bits per byte (a measure that does not depend on the tokenizer).
        text_bytes = np.fromiter((len(texts[i].encode("utf-8", "replace")) for i in keep), dtype=np.int64,
                                 count=len(keep))
        return (tokens[~val_tokens], lens[~is_val], tokens[val_tokens], lens[is_val], n_text, len(texts) - len(keep),
                int(text_bytes[~is_val].sum()), int(text_bytes[is_val].sum()))


_WORKER: ChunkTokenizer | None = None


def _init_worker(*args) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    _WORKER = ChunkTokenizer(*args)


def _work(first_doc: int, texts: list[str]) -> tuple:
    return _WORKER(first_doc, texts)


class _Workers:
    """Where chunks are tokenised: `num_proc` worker processes, or (num_proc = 1) threads of this process.

    Processes scale with cores: each runs a single-threaded tokenizer and does its own EOS/split work. With one
    process the tokenizer's own thread pool does the parallel work; two chunks are encoded at once (encode releases
    the GIL), so reading and writing overlap encoding and one chunk's last long document does not leave the other
    threads idle. On a 2-CPU machine this measured faster than two processes (one copy of the tokenizer and its
    caches instead of two).
    """

    def __init__(self, num_proc: int, args: tuple):
        if num_proc > 1:
            # Forked before this process starts threads of its own (datasets, tqdm, the tokenizer's thread pool).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool, self.in_flight = mp.get_context(method).Pool(num_proc, _init_worker, args), 2 * num_proc
        else:
            self.pool, self.in_flight, self.local = ThreadPoolExecutor(2), 3, ChunkTokenizer(*args)

    def submit(self, first: int, texts: list[str]):
        if isinstance(self.pool, ThreadPoolExecutor):
            return self.pool.submit(self.local, first, texts)
        return self.pool.apply_async(_work, (first, texts))

    @staticmethod
    def result(task) -> tuple:
        return task.result() if hasattr(task, "result") else task.get()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(self.pool, ThreadPoolExecutor):
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.pool.terminate()  # after success every task is done; after an error, stop at once
            self.pool.join()


def _chunks(batches: Iterator[list[str]], chunk_chars: int) -> Iterator[tuple[int, list[str]]]:
    """Regroup document batches into (index of first document, documents) of about `chunk_chars` characters."""
    first, chunk, size = 0, [], 0
    for batch in batches:
        for text in batch:
            chunk.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield first, chunk
                first, chunk, size = first + len(chunk), [], 0
    if chunk:
        yield first, chunk


def _prepare_output(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    partial.mkdir(parents=True)
    return partial


def pack_corpus(out_dir: str | Path, tokenizer: LoadedTokenizer | str | Path, inputs: list[str] | None = None, *,
                text_column: str = "text", txt_unit: str = "document", encoding_errors: str = "replace",
                val_fraction: float = 0.01, seed: int = 1234, num_proc: int | None = None,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_chars: int = 1 << 20, overwrite: bool = False,
                progress: bool = False, bos: str = "auto") -> dict:
    """Tokenise `inputs` (files, folders, globs; None: the default stdlib corpus) into a packed dataset folder.

    Every document ends with EOS. `bos`: "auto" starts it with BOS where the tokenizer's own template does (Llama,
    Mistral), "yes" always (the tokenizer must have a BOS token), "no" never.

    Returns the manifest. The folder is built as `<out_dir>.partial` and renamed when complete.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction}: must be in [0, 1)")
    num_proc = num_proc or default_num_proc()
    files = resolve_inputs(inputs) if inputs else default_corpus_files()
    tok = tokenizer if isinstance(tokenizer, LoadedTokenizer) else load_tokenizer(tokenizer)
    if not isinstance(tok, LoadedTokenizer):
        raise DataError(f"{tokenizer}: a Marian tokenizer is for translation data (data_prep.pack_translation)")
    if bos not in ("auto", "yes", "no"):
        raise DataError(f"bos = {bos!r}: expected auto, yes or no")
    bos_id = tok.template_bos() if bos == "auto" else tok.token_id("bos") if bos == "yes" else None
    if bos == "yes" and bos_id is None:
        raise DataError(f"{tok.source}: --bos yes, but the tokenizer has no BOS token")
    dtype = token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    partial = _prepare_output(out_dir, overwrite)
    writers = {split: ShardWriter(partial, split, dtype, shard_tokens) for split in SPLITS}
    args = (tok.to_json(), tok.eos_id, dtype.str, split_key(seed), val_fraction, bos_id)
    stats = {"documents_read": 0, "empty_documents_skipped": 0, "text_tokens": 0}
    text_bytes = dict.fromkeys(SPLITS, 0)

    def consume(result: tuple) -> None:
        train_tokens, train_lens, val_tokens, val_lens, n_text, n_empty, train_bytes, val_bytes = result
        text_bytes["train"] += train_bytes
        text_bytes["val"] += val_bytes
        writers["train"].add(train_tokens, train_lens)
        writers["val"].add(val_tokens, val_lens)
        stats["documents_read"] += len(train_lens) + len(val_lens) + n_empty
        stats["empty_documents_skipped"] += n_empty
        stats["text_tokens"] += n_text
        if bar is not None:
            bar.update(len(train_tokens) + len(val_tokens))

    bar = None
    chunks = _chunks(iter_text_batches(files, text_column, 64, txt_unit, encoding_errors), chunk_chars)
    try:
        with _Workers(num_proc, args) as workers:
            if progress:  # after the workers: tqdm starts a monitor thread, which a fork should not copy
                from tqdm import tqdm

                bar = tqdm(unit="tok", unit_scale=True, desc=f"pack {out_dir.name}", smoothing=0.1)
            pending: deque = deque()  # results are consumed in submission order: output never depends on timing
            for first, texts in chunks:
                pending.append(workers.submit(first, texts))
                if len(pending) >= workers.in_flight:
                    consume(workers.result(pending.popleft()))
            while pending:
                consume(workers.result(pending.popleft()))
        splits = {split: writer.close() | {"text_bytes": text_bytes[split]} for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()

    tok.save(partial)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "source": tok.source,
                      "special_tokens": tok.special_tokens,
                      "special_ids": {role: tok.token_id(role) for role in tok.special_tokens}},
        "options": {"text_column": text_column, "txt_unit": txt_unit, "encoding_errors": encoding_errors,
                    "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "bos_id": bos_id},
        "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "default_corpus": not inputs,
        "stats": stats,
        "splits": splits,
    }
    write_manifest(partial, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return manifest
