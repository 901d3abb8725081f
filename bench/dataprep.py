"""Data-preparation throughput: `pack_lm` against the tokenizer alone and against the HF `run_clm` recipe.

    python bench/dataprep.py                       # trains a 32k tokenizer on the default corpus, then measures
    python bench/dataprep.py --tokenizer data/tokenizer --repeats 5 --scales 1 3

Every method runs in its own fresh process on the same documents (the default corpus: Python's stdlib source; scale
k: k copies of it as separate files) with the same tokenizer, and the methods are interleaved `--repeats` times so
a load spike on a shared machine hits them alike. Timing starts after imports (torch, datasets, tokenizers are
imported first in every process) and covers:

    raw           the fast tokenizer's batched call over texts already in memory (the practical limit):
                  `encode_batch_fast` in one call and in ~1 MB batches, and `encode_batch` in one call
    pack_lm       `llm.data.pack.pack_corpus`: find and read files, tokenise in --num-proc processes, append EOS,
                  split, write shards, sha256, manifest
    run_clm       `load_dataset(text)` + `map(tokenize, batched, num_proc)` + `map(group_texts, num_proc)`, as in
                  transformers' examples/pytorch/language-modeling/run_clm.py (fresh cache dir each run)

tokens/s divides the corpus's token count (without separators) by the wall time. Peak memory is the largest sum of
PSS (proportional set size: shared pages split between the processes sharing them) over a method's process and its
children, sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine_load import busy_seconds, own_cpu_seconds, steal_seconds, wait_for_quiet  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# Child side: one method, one run, prints {"seconds": ..., "tokens": ...}
# --------------------------------------------------------------------------------------------------------------------


def run_raw(files: list[str], tokenizer: str, variant: str) -> tuple[float, int]:
    from llm.data.corpus import iter_text_batches
    from llm.data.pack import _chunks
    from llm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer).tokenizer
    texts = [t for batch in iter_text_batches([Path(f) for f in files]) for t in batch if t]
    batches = [c for _, c in _chunks(iter([texts]), 1 << 20)] if variant == "fast_batched" else [texts]
    encode = tok.encode_batch if variant == "encode_batch" else tok.encode_batch_fast
    start = time.perf_counter()
    tokens = sum(len(e) for batch in batches for e in encode(batch, add_special_tokens=False))
    return time.perf_counter() - start, tokens


def run_pack(files: list[str], tokenizer: str, num_proc: int | None, out: str) -> tuple[float, int]:
    from llm.data.pack import pack_corpus

    start = time.perf_counter()
    manifest = pack_corpus(out, tokenizer, files, num_proc=num_proc, overwrite=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds, manifest["stats"]["text_tokens"]


def run_clm(files: list[str], tokenizer: str, num_proc: int, out: str, lines: bool) -> tuple[float, int]:
    """transformers' run_clm.py preprocessing, unchanged but for the data files and the cache dir.

    `lines=False` reads one document per file, the same documents as the other methods; `lines=True` is what
    run_clm.py does with a .txt train file (one row per line, keep_linebreaks=True).
    """
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    block_size = min(1024, hf_tokenizer.model_max_length)

    def tokenize_function(examples):
        return hf_tokenizer(examples["text"])

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated_examples.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    start = time.perf_counter()
    unit = {"keep_linebreaks": True} if lines else {"sample_by": "document"}
    raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=out, encoding_errors="replace", **unit)
    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    tokenized.map(group_texts, batched=True, num_proc=num_proc)
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for batch in tokenized["train"].iter(1000) for ids in batch["input_ids"])
    shutil.rmtree(out, ignore_errors=True)
    return seconds, tokens


def child(args: argparse.Namespace) -> None:
    import datasets  # noqa: F401  imported before timing in every method, as in any real script
    import numpy  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401

    files = Path(args.files).read_text().splitlines()
    method, _, variant = args.child.partition(":")
    if method == "raw":
        seconds, tokens = run_raw(files, args.tokenizer, variant)
    elif method == "pack":
        seconds, tokens = run_pack(files, args.tokenizer, int(variant) or None, args.out)
    else:
        seconds, tokens = run_clm(files, args.tokenizer, int(variant), args.out, lines=method == "clm_lines")
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


# --------------------------------------------------------------------------------------------------------------------
# Parent side: corpora, tokenizer, interleaved runs, memory sampling, table
# --------------------------------------------------------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


QUIET_WAIT = 180.0  # --quiet-wait


def measure(cmd: list[str]) -> tuple[str, int, float, float, float]:
    """Run a child; return its stdout, the peak PSS summed over its process tree, its wall time, the CPU seconds
    other processes on the machine used meanwhile (the load the measurement shared the CPUs with) and the CPU
    seconds the hypervisor gave to other guests."""
    import psutil

    wait_for_quiet(QUIET_WAIT)
    busy0, own0, steal0 = busy_seconds(), own_cpu_seconds(), steal_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                pids = [proc.pid] + [c.pid for c in parent.children(recursive=True)]
            except psutil.Error:
                pids = [proc.pid]
            peak[0] = max(peak[0], sum(pss_bytes(p) for p in pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    foreign = (busy_seconds() - busy0) - (own_cpu_seconds() - own0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return out, peak[0], wall, max(foreign, 0.0), steal_seconds() - steal0


def make_corpus(workdir: Path, scale: int) -> Path:
    """A file listing the corpus: the default corpus, or `scale` copies of it as separate files."""
    from llm.data.corpus import default_corpus_files

    files = default_corpus_files()
    if scale > 1:
        stdlib = Path(os.path.commonpath(files))
        copies = []
        for k in range(scale):
            for f in files:
                dest = workdir / f"corpus_x{scale}" / str(k) / f.relative_to(stdlib)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
                copies.append(dest)
        files = copies
    listing = workdir / f"files_x{scale}.txt"
    listing.write_text("\n".join(str(f) for f in files) + "\n")
    return listing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer folder; default: train a --vocab-size BPE on the default corpus")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 3], help="corpus sizes, in copies of the stdlib")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-proc", type=int, default=os.cpu_count(), help="run_clm's num_proc (default: all CPUs)")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--quiet-wait", type=float, default=180.0,
                   help="before each run, wait up to this many seconds for other processes to go idle")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="run only the methods whose name starts so")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dataprep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from llm.data.pack import default_num_proc

    n = args.num_proc
    other = n if default_num_proc() == 1 else 1  # the other way to run pack_lm: processes or threads
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from llm.data.corpus import default_corpus_files, iter_text_batches
        from llm.data.tokenizer import train_bpe

        start = time.perf_counter()
        tok = train_bpe(iter_text_batches(default_corpus_files(), batch_size=256), args.vocab_size)
        tokenizer = str(tok.save(workdir / "tokenizer"))
        print(f"# trained a {args.vocab_size}-token BPE on the default corpus in {time.perf_counter() - start:.1f}s")

    methods = {"raw encode_batch_fast, one call": "raw:fast_one",
               "raw encode_batch_fast, 1 MB batches": "raw:fast_batched",
               "raw encode_batch, one call": "raw:encode_batch",
               f"pack_lm, default (--num-proc {default_num_proc()})": "pack:0",
               f"pack_lm --num-proc {other}": f"pack:{other}",
               f"run_clm recipe, num_proc={n}": f"clm:{n}",
               f"run_clm recipe, num_proc={n}, line by line (its .txt default)": f"clm_lines:{n}"}
    if args.only:
        methods = {k: v for k, v in methods.items() if k.startswith(tuple(args.only))}
    runs: dict[tuple[int, str], list[dict]] = {}
    cli: dict[int, tuple] = {}
    for scale in args.scales:
        listing = make_corpus(workdir, scale)
        for r in range(args.repeats):
            for name, spec in methods.items():
                cmd = [sys.executable, __file__, "--child", spec, "--files", str(listing), "--tokenizer", tokenizer,
                       "--out", str(workdir / "out")]
                out, peak, wall, foreign, steal = measure(cmd)
                result = json.loads(out.strip().splitlines()[-1])
                run = {**result, "peak": peak, "foreign": foreign / wall}
                runs.setdefault((scale, name), []).append(run)
                print(f"# x{scale} run {r}: {name:62s} {run['seconds']:7.2f}s "
                      f"{run['tokens'] / run['seconds']:>11,.0f} tok/s  peak {peak / 2**20:6.0f} MiB  "
                      f"others used {run['foreign']:.0%} of a CPU, host steal {steal / wall:.0%}", flush=True)
        # The command a user types: no --input is the default corpus itself; scale k is the folder of k copies.
        inputs = ["--input", str(workdir / f"corpus_x{scale}")] if scale > 1 else []
        cmd = [sys.executable, "-m", "data_prep.pack_lm", *inputs, "--tokenizer", tokenizer,
               "--output", str(workdir / "cli"), "--overwrite", "--no-progress"]
        _, peak, wall, foreign, _ = measure(cmd)
        cli[scale] = (wall, peak, foreign / wall)

    def clean(scale: int, name: str) -> list[dict]:
        """Runs during which other processes used < 10% of a CPU; all runs if there is none."""
        quiet = [r for r in runs[(scale, name)] if r["foreign"] < 0.10]
        return quiet or runs[(scale, name)]

    def rate(scale: int, name: str, stat=min) -> float:
        return clean(scale, name)[0]["tokens"] / stat(r["seconds"] for r in clean(scale, name))

    print(f"\n# load average at end {os.getloadavg()[0]:.2f}; best/median over runs with the machine otherwise "
          f"idle (others < 10% of a CPU)\n")
    print("| corpus | method | tokens | best s | median s | best tokens/s | quiet runs | peak memory (PSS) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        size = sum(Path(f).stat().st_size for f in (workdir / f"files_x{scale}.txt").read_text().split())
        for name in methods:
            kept, every = clean(scale, name), runs[(scale, name)]
            best, median = min(r["seconds"] for r in kept), statistics.median(r["seconds"] for r in kept)
            quiet = sum(r["foreign"] < 0.10 for r in every)
            print(f"| stdlib x{scale} ({size / 1e6:.0f} MB) | {name} | {kept[0]['tokens']:,} | {best:.2f} | "
                  f"{median:.2f} | {kept[0]['tokens'] / best:,.0f} | {quiet}/{len(every)} | "
                  f"{max(r['peak'] for r in every) / 2**20:,.0f} MiB |")
    print()
    pack_name, clm_name = f"pack_lm, default (--num-proc {default_num_proc()})", f"run_clm recipe, num_proc={n}"
    for scale in args.scales:
        line = f"stdlib x{scale}: `python -m data_prep.pack_lm` end to end (interpreter start and imports " \
               f"included): {cli[scale][0]:.1f}s, peak {cli[scale][1] / 2**20:,.0f} MiB, others used " \
               f"{cli[scale][2]:.0%} of a CPU"
        raws = [m for m in methods if m.startswith("raw")]
        if pack_name in methods and raws:
            best = rate(scale, pack_name) / max(rate(scale, m) for m in raws)
            median = rate(scale, pack_name, statistics.median) / max(rate(scale, m, statistics.median) for m in raws)
            line += f"; pack_lm / fastest raw tokenizer call = {best:.2f} (best), {median:.2f} (median)"
        if pack_name in methods and clm_name in methods:
            best = rate(scale, pack_name) / rate(scale, clm_name)
            median = rate(scale, pack_name, statistics.median) / rate(scale, clm_name, statistics.median)
            line += f"; pack_lm / run_clm (same documents) = {best:.2f} (best), {median:.2f} (median)"
        print(line)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
