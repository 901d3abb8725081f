"""`llm eval MODEL`: lm-eval tasks and/or perplexity of text, on a checkpoint, a run folder or a transformers folder.

Backends: `ours` wraps our Decoder (a checkpoint of any ZeRO stage, consolidated on the CPU; or a transformers
folder of a family we import); `hf` is lm-eval's own HFLM on a transformers folder (any causal LM transformers
loads). `auto`: ours for our checkpoints, hf for transformers folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def load_lm(model: str, backend: str, device: str, batch_size: int, max_length: int | None):
    """(an lm-eval model, the backend used)."""
    path = Path(model)
    hf_folder = (path / "config.json").is_file()
    if backend == "auto":
        backend = "hf" if hf_folder else "ours"
    if backend == "hf":
        if not hf_folder:
            raise ValueError(f"{model}: --backend hf takes a transformers folder (with config.json); `llm export` "
                             "writes one from a checkpoint, or use --backend ours")
        from lm_eval.models.huggingface import HFLM

        with contextlib.redirect_stdout(sys.stderr):
            return HFLM(pretrained=str(path), device=device, batch_size=batch_size, dtype="float32",
                        max_length=max_length), "hf"
    from llm.eval.harness import OurLM
    from llm.generate import load_model

    if not hf_folder:
        from llm.checkpoint.consolidate import resolve_checkpoint
        from llm.config import load_config

        if load_config(resolve_checkpoint(path) / "config.yaml").task == "translation":
            raise ValueError(f"{model} is a translation model: score it with `llm translate --input SRC --ref REF` "
                             "(BLEU, chrF)")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints
        decoder, tokenizer = load_model(path, device=device)
    return OurLM(decoder, tokenizer, batch_size=batch_size, max_length=max_length, progress=sys.stderr.isatty()), "ours"


def default_output(model: str) -> Path:
    path = Path(model)
    if (path / "config.json").is_file():
        return Path(f"eval-{path.resolve().name}.json")
    return path / "eval.json"


def write_json(path: Path, results: dict) -> None:
    """Atomically: a temporary file, renamed."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(args) -> int:
    if not args.tasks and not args.data:
        raise ValueError("nothing to evaluate: give --tasks (lm-eval task names or YAML files) and/or --data "
                         "(text files or a packed dataset folder)")
    from llm.eval.harness import Harness
    from llm.eval.perplexity import documents, perplexity

    # Unknown task names and missing task files fail before the model is loaded.
    harness = Harness(args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                      log_samples=args.log_samples, bootstrap_iters=1000) if args.tasks else None
    lm, backend = load_lm(args.model, args.backend, args.device, args.batch_size, args.max_length)
    results: dict = {"model": str(args.model), "backend": backend}
    if harness is not None:
        from lm_eval.utils import make_table

        scored = harness.run(lm)
        if not args.log_samples:
            scored.pop("samples", None)
        results |= scored
        print(make_table(scored))
    if args.data:
        docs = documents(args.data, lm.tokenizer, split=args.split, limit=args.limit, text_column=args.text_column)
        ppl = perplexity(lm, docs, progress=sys.stderr.isatty())
        results["perplexity"] = {"data": args.data, **ppl}
        print(f"perplexity of {', '.join(args.data)}: {ppl['documents']:,} documents, {ppl['tokens']:,} tokens, "
              f"{ppl['bytes']:,} bytes: loss {ppl['loss']:.4f}, perplexity {ppl['ppl']:.2f}, "
              f"bits per byte {ppl['bits_per_byte']:.4f}")
    output = Path(args.output) if args.output else default_output(args.model)
    write_json(output, results)
    print(f"results: {output}")
    return 0
