"""Build a cloze task (an lm-evaluation-harness YAML task reading a local JSONL file) from a packed dataset's
held-out documents: each example is a passage that ends just before a word, and the model picks that word among 4
candidates drawn from the same document. `llm eval MODEL --tasks OUT/cloze.yaml` scores it; so can
`train.eval_tasks: [OUT/cloze.yaml]` during training.

    python -m data_prep.make_cloze data/stdlib --output data/cloze
    python -m data_prep.make_cloze data/stdlib --output data/cloze --examples 500 --split val --seed 7
"""

from __future__ import annotations

import argparse

from data_prep import run_cli
from llm.eval.cloze import write_cloze_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.make_cloze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="a folder written by data_prep.pack_lm")
    p.add_argument("--output", required=True, help="the folder to write <name>.yaml and <name>.jsonl into")
    p.add_argument("--name", default="cloze", help="the task's name in lm-eval's results (default: %(default)s)")
    p.add_argument("--split", default="val", help="documents to draw from; keep them out of training "
                   "(default: %(default)s)")
    p.add_argument("--examples", type=int, default=200, help="at most this many, one per document "
                   "(default: %(default)s)")
    p.add_argument("--context-chars", type=int, default=600, help="passage length in characters (default: "
                   "%(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="which documents, words and distractors (default: "
                   "%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path, n = write_cloze_task(args.data_dir, args.output, name=args.name, overwrite=args.overwrite,
                               split=args.split, examples=args.examples, seed=args.seed,
                               context_chars=args.context_chars)
    print(f"wrote {n} examples: {path} (score it with: llm eval MODEL --tasks {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
