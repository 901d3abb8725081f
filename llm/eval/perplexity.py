"""Perplexity and bits per byte of any text: packed shards (their documents) or files tokenised on the fly.

Every token of every document is predicted once, the first from the model's prefix token (BOS, or EOS where the
tokenizer has no BOS), in lm-eval's disjoint rolling windows of the model's context: exactly what lm-eval's
`loglikelihood_rolling` scores, run on the token lists directly so that our model and its `transformers` export
(lm-eval's HFLM) see the same tokens. Documents from packed shards lose the BOS/EOS the packer added (the
prefix token stands for the start; text has no end token); bytes are the UTF-8 bytes of the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from llm.data.errors import DataError

WINDOWS_PER_CALL = 64  # rolling windows handed to the model at once (its own batching splits them further)


def packed_documents(folder: Path, split: str, tokenizer, limit: int | None) -> Iterator[tuple[list[int], int]]:
    """(tokens, UTF-8 bytes) of the documents of a packed split, without the BOS/EOS the packer added."""
    from llm.data.shards import PackedSplit

    packed = PackedSplit(folder, split)
    _check_same_tokenizer(folder, tokenizer)
    options, special = packed.manifest["options"], packed.manifest["tokenizer"]["special_ids"]
    bos, eos = options.get("bos_id"), special.get("eos")
    for k in range(packed.num_docs if limit is None else min(limit, packed.num_docs)):
        tokens = packed.document(k).tolist()
        if bos is not None and tokens and tokens[0] == bos:
            tokens = tokens[1:]
        if tokens and tokens[-1] == eos:
            tokens = tokens[:-1]
        if tokens:
            yield tokens, len(tokenizer.decode(tokens, skip_special_tokens=True).encode("utf-8"))


def text_documents(inputs: list[str], tokenizer, limit: int | None, text_column: str = "text"
                   ) -> Iterator[tuple[list[int], int]]:
    """(tokens, UTF-8 bytes) of the documents of text files (.txt: one per file; .jsonl/.json/.csv/.parquet: one per
    row's `text_column`), tokenised without special tokens."""
    from llm.data.corpus import iter_text_batches, resolve_inputs

    count = 0
    for batch in iter_text_batches(resolve_inputs(inputs), text_column):
        for text in batch:
            if not text:
                continue
            if limit is not None and count == limit:
                return
            count += 1
            yield tokenizer.encode(text, add_special_tokens=False), len(text.encode("utf-8", "replace"))


def _check_same_tokenizer(folder: Path, tokenizer) -> None:
    """Packed token ids mean something only to the tokenizer that packed them: the vocabularies must be equal."""
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    if theirs != tokenizer.get_vocab():
        raise DataError(f"{folder} was packed with another tokenizer than the model's (their vocabularies "
                        "differ); give its text files instead, which are tokenised with the model's tokenizer")


def documents(data: list[str], tokenizer, *, split: str = "val", limit: int | None = None,
              text_column: str = "text") -> Iterator[tuple[list[int], int]]:
    if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file():
        return packed_documents(Path(data[0]), split, tokenizer, limit)
    return text_documents(data, tokenizer, limit, text_column)


def perplexity(lm, docs: Iterator[tuple[list[int], int]], progress: bool = True) -> dict:
    """Summed log-likelihood of every document under `lm` (an lm-eval TemplateLM: ours or HFLM) and the figures
    derived from it: loss (nats per token), perplexity, bits per byte."""
    from tqdm import tqdm

    from llm.eval.harness import rolling_windows

    total, tokens, nbytes, ndocs = 0.0, 0, 0, 0
    pending: list[tuple] = []

    def flush() -> float:
        if not pending:
            return 0.0
        scored = lm._loglikelihood_tokens(list(pending), disable_tqdm=True)
        pending.clear()
        return sum(logp for logp, _ in scored)

    bar = tqdm(desc="perplexity", unit="doc", disable=not progress)
    for ids, size in docs:
        pending.extend((None, *w) for w in rolling_windows(ids, lm.prefix_token_id, lm.max_length))
        tokens, nbytes, ndocs = tokens + len(ids), nbytes + size, ndocs + 1
        if len(pending) >= WINDOWS_PER_CALL:
            total += flush()
        bar.update(1)
    total += flush()
    bar.close()
    if not tokens:
        raise DataError("no text to score: the documents given are empty")
    loss = -total / tokens
    return {"documents": ndocs, "tokens": tokens, "bytes": nbytes, "loglikelihood": total, "loss": loss,
            "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": -total / (math.log(2) * max(nbytes, 1))}
