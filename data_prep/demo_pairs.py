"""A small offline parallel corpus for trying the translation workflow: English -> "reversed English".

A demo and smoke-test corpus, not a real language pair. Sources are English sentences from the comments and
docstrings of the Python standard library's source (present wherever Python is, so nothing is downloaded),
cleaned to plain words and basic punctuation and de-duplicated; the "translation" of a sentence is its words in
reverse order. Reversal keeps the vocabulary but moves every word, so a model has to attend over the whole source,
and BLEU against the reference means something (a model that copies the source scores low).

    python -m data_prep.demo_pairs --output data/demo_pairs.tsv
    python -m data_prep.pack_translation --tsv data/demo_pairs.tsv --vocab-size 2000 --output data/demo_pairs

Output: one `source<TAB>target` line per pair, written atomically. The same --seed on the same Python version gives
byte-identical output (files are read in sorted order; the pairs are a seeded sample of the candidate sentences).
"""

from __future__ import annotations

import argparse
import os
import random
import re
from pathlib import Path

from data_prep import run_cli
from llm.data.corpus import default_corpus_files
from llm.data.errors import DataError

DEFAULT_OUTPUT = "data/demo_pairs.tsv"
# A sentence is words of letters and digits, with at most an apostrophe or hyphen inside and basic punctuation
# after; anything else (code, paths, markup, non-ASCII) rejects the whole line rather than leaving a fragment.
WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['-][A-Za-z0-9]+)*[.,;:!?]?")
QUOTES = ('"""', "'''")


def text_lines(path: Path):
    """Comment lines and lines inside triple-quoted strings (docstrings, mostly) of one source file, unmarked."""
    in_string = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            quotes = sum(s.count(q) for q in QUOTES)
            if in_string or quotes:
                yield s.replace('"""', " ").replace("'''", " ")
            elif s.startswith("#") and not s.startswith("#!"):
                yield s.lstrip("#")
            in_string ^= quotes % 2 == 1  # an odd count opens or closes a string


def clean(text: str, min_words: int, max_words: int) -> str | None:
    """The line's words joined by single spaces if it is plain prose of min_words..max_words words, else None."""
    words = text.split()
    if not min_words <= len(words) <= max_words or not all(WORD.fullmatch(w) for w in words):
        return None
    return " ".join(words)


def candidates(files: list[Path], min_words: int, max_words: int) -> dict[str, int]:
    """Distinct sentences, in file order, each with the index of the first file it was found in."""
    found: dict[str, int] = {}
    for i, path in enumerate(files):
        for text in text_lines(path):
            sentence = clean(text, min_words, max_words)
            if sentence is not None and sentence not in found:
                found[sentence] = i
    return found


def reverse_words(sentence: str) -> str:
    return " ".join(reversed(sentence.split()))


def write_atomic(path: Path, lines) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # a crash leaves no half-written output
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.demo_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="TSV file to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--pairs", type=int, default=20000, help="pairs to write, at most (default: %(default)s)")
    p.add_argument("--test-pairs", type=int, default=200,
                   help="sentences held out (not in --output) as OUTPUT.test.src / .test.ref (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sample of sentences (default: %(default)s)")
    p.add_argument("--min-words", type=int, default=3, help="shortest source, in words (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=16, help="longest source, in words (default: %(default)s)")
    args = p.parse_args(argv)
    if args.pairs <= 0 or args.test_pairs < 0 or not 1 <= args.min_words <= args.max_words:
        raise DataError(f"need --pairs > 0 and 1 <= --min-words <= --max-words, got {args.pairs}, "
                        f"{args.min_words}, {args.max_words}")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")

    files = default_corpus_files()
    found = candidates(files, args.min_words, args.max_words)
    if not found:
        raise DataError(f"no sentence of {args.min_words}..{args.max_words} words in {len(files)} files")
    # One sample, its first --test-pairs held out: test sentences never occur in the training pairs.
    chosen = random.Random(args.seed).sample(list(found), min(args.pairs + args.test_pairs, len(found)))
    test, sentences = chosen[:args.test_pairs], chosen[args.test_pairs:]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (f"{s}\t{reverse_words(s)}\n" for s in sentences))
    if test:
        src, ref = out.with_suffix(".test.src"), out.with_suffix(".test.ref")
        write_atomic(src, (s + "\n" for s in test))
        write_atomic(ref, (reverse_words(s) + "\n" for s in test))
        print(f"held out {len(test):,} other sentences as a test set: {src}, {ref}")
    used = len({found[s] for s in sentences})
    short = f" (all there are; asked for {args.pairs:,})" if len(sentences) < args.pairs else ""
    print(f"wrote {out}: {len(sentences):,} pairs{short} from {used:,} of {len(files):,} standard-library files "
          f"({len(found):,} distinct sentences of {args.min_words}-{args.max_words} words found)")
    print(f"next: python -m data_prep.pack_translation --tsv {out} --vocab-size 2000 --output {out.with_suffix('')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
