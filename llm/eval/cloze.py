"""A cloze task built offline from a packed dataset's held-out documents, as an lm-evaluation-harness YAML task.

Each example is a place in a document of the split (one per document, more when documents are fewer than the
examples asked for): a passage (up to `context_chars` characters, starting at a line
boundary) ends just before a word, and the model picks that word among 4 candidates. As in LAMBADA, the word is
one that already occurs in the passage (so the context can tell it), at least `min_chars` long; the 3 distractors
are other words of the same document, so every candidate is plausible vocabulary there. Documents, positions,
distractors and the order of the choices are drawn from a seeded generator: the same dataset and seed give the
same file. Scored by loglikelihood (accuracy; acc_norm divides by the candidate's length in bytes). Chance is 25%.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from llm.data.errors import DataError
from llm.data.shards import PackedSplit
from llm.data.tokenizer import load_tokenizer

WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")


def cloze_examples(data: str | Path, *, split: str = "val", examples: int = 200, seed: int = 1234,
                   context_chars: int = 600, min_chars: int = 4) -> list[dict]:
    packed = PackedSplit(data, split)
    decode = load_tokenizer(data).tokenizer.decode
    rng = np.random.default_rng(seed)
    per_document = -(-examples // max(packed.num_docs, 1))  # several per document only when documents are few
    out = []
    for k in rng.permutation(packed.num_docs).tolist():
        if len(out) == examples:
            break
        text = decode(packed.document(k).tolist(), skip_special_tokens=True)
        words = [(m.start(), m.group()) for m in WORD.finditer(text) if len(m.group()) >= min_chars]
        vocabulary = sorted({w for _, w in words})
        if len(vocabulary) < 4:
            continue
        # Targets: a word that already occurs in the passage before it, with enough text before it.
        last: dict[str, int] = {}
        candidates = []
        for pos, w in words:
            if pos >= context_chars // 3 and w in last and last[w] >= pos - context_chars:
                candidates.append((pos, w))
            last[w] = pos
        for c in rng.permutation(len(candidates))[:per_document].tolist():
            pos, word = candidates[c]
            start = max(0, pos - context_chars)
            if start > 0 and "\n" in text[start:pos]:
                start = text.index("\n", start, pos) + 1  # begin at a line
            if word not in WORD.findall(text[start:pos]) or len(out) == examples:
                continue
            others = [w for w in vocabulary if w != word]
            choices = [word] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
            order = rng.permutation(4)
            out.append({"context": text[start:pos], "choices": [choices[i] for i in order],
                        "label": int(np.flatnonzero(order == 0)[0]), "document": k, "offset": pos})
    if not out:
        raise DataError(f"{data}: no document of split {split!r} has a passage with 4 distinct words of "
                        f"{min_chars}+ characters to build a cloze example from")
    return out


def task_yaml(name: str, jsonl: Path, source: str) -> str:
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": source},
    }
    return (f"# Cloze task built by data_prep.make_cloze from {source}: pick the word that ends the passage "
            "among 4.\n" + json.dumps(config, indent=2) + "\n")  # JSON is YAML


def write_cloze_task(data: str | Path, out_dir: str | Path, *, name: str = "cloze", overwrite: bool = False,
                     **options) -> tuple[Path, int]:
    """Write `<out_dir>/<name>.jsonl` and `<out_dir>/<name>.yaml` (whole, or nothing); returns the YAML's path and
    the number of examples."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir} exists and is not empty (--overwrite replaces it)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DataError(f"task name {name!r}: use letters, digits, '_', '.' or '-'")
    rows = cloze_examples(data, **options)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with open(partial / f"{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    # The YAML names the data file at its final place.
    (partial / f"{name}.yaml").write_text(task_yaml(name, out_dir / f"{name}.jsonl", f"{data}"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir / f"{name}.yaml", len(rows)
