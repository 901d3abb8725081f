"""Translation training: our encoder-decoder against `transformers`' MarianMTModel of the same shape, side by side.

One run, on the same parallel data, the same batches (loaded once, held in memory) and the same number of optimizer
steps, interleaved (A B A B ...):
  A  our EncoderDecoder in a bare PyTorch loop
  M  the modern variant of the same model (pre-norm RMSNorm, rotary positions, SwiGLU with ~2/3 of d_ff as its
     hidden size, no biases, grouped-query attention with half the heads for keys and values) in the same loop;
     scored at the end and, from a copy taken then, at --modern-at of the steps (the same schedule, cut short)
  B  MarianMTModel built from the same TranslationModelConfig (`llm.export.marian.to_marian_config`, SDPA
     attention) in the same loop: A / B is what our model code costs or saves against the reference implementation
  C  (--with-llm-train) `llm train` with a `task: translation` config of the same shape, data and optimizer, as a
     real subprocess (Accelerate + DeepSpeed ZeRO-0, loader, metrics): C / A is the trainer's overhead
  F  (--marian-steps, 0: skip) fine-tuning an OPUS-MT style model: a random MarianMTModel of the same shape with
     swish feed-forwards and SentencePiece source/target models with one vocab.json (`transformers`' own
     initialisation, saved locally as a downloaded checkpoint is), the data packed with its tokenizer,
     `llm train` from it (`train.init_from`, the inverse_sqrt schedule), then `llm export` back to Marian
     (verified: logits, tokenisation, greedy translations); its loss at the first and last steps and the
     export's largest logit difference. `--part marian` runs only this.
Both loops: AdamW (betas 0.9, 0.98, no weight decay), linear warm-up then linear decay (`llm.engine.optim`), grad
clip 1.0, label-smoothed cross-entropy (eps 0.1; ours from its chunked output head as `llm train` computes it,
Marian's by `label_smoothed_loss` on its logits: the same value), dropout 0.1, fp32,
the same torch seed before each model is built (Marian keeps its own initialisation unless --marian-init ours).

Data: `data_prep.demo_pairs` (English sentences from the stdlib's comments -> the same words reversed: no
download), packed by `data_prep.pack_translation` with a joint BPE. Throughput: target tokens (no padding) per
second of one optimizer step, the median over the steps after --warmup (robust to bursts of other work on a shared
machine; the rate over all those steps together and the CPU other processes used are printed too), then the median
of the repeats. Quality: BLEU and chrF (sacreBLEU, `llm.translate.score_translations`) on held-out pairs (the packed
validation split) of the first repeat's models, beam search with the same beam size and the same maximum length
for both (ours: `llm.translate`; Marian: `generate` with the settings `llm.export.marian` exports).

    python bench/translation.py                                 # d 256, 3+3 layers, 300 steps, 2 repeats
    python bench/translation.py --steps 40 --repeats 1 --pairs 4000 --bleu-pairs 50   # a quick look
    python bench/translation.py --part marian                   # the Marian fine-tuning run alone
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_load import busy_seconds, own_cpu_seconds, wait_for_quiet  # noqa: E402
from data_prep import demo_pairs, pack_translation  # noqa: E402
from llm.config import OptimConfig  # noqa: E402
from llm.data.tokenizer import load_tokenizer  # noqa: E402
from llm.data.translation import ParallelSplit, TranslationDataConfig, TranslationLoader  # noqa: E402
from llm.engine.optim import build_optimizer, lr_factor, set_lr  # noqa: E402
from llm.export.marian import to_marian_config, to_marian_state_dict  # noqa: E402
from llm.export.marian_import import read_marian_config  # noqa: E402
from llm.models.encoder_decoder import build_translation_model, label_smoothed_loss, translation_preset  # noqa: E402
from llm.translate import DecodeConfig, SpecialIds, evaluate_bleu, pad_batch  # noqa: E402


def prepare_data(workdir: Path, args) -> Path:
    tsv, data = workdir / "demo_pairs.tsv", workdir / "demo_pairs"
    demo_pairs.main(["--output", str(tsv), "--pairs", str(args.pairs), "--seed", str(args.seed)])
    pack_translation.main(["--tsv", str(tsv), "--vocab-size", str(args.vocab_size), "--output", str(data),
                           "--val-fraction", str(args.val_fraction), "--seed", str(args.seed)])
    return data


def held_out(data: Path, tok, n: int) -> tuple[list[str], list[str]]:
    """The first n validation pairs as text (byte-level BPE decodes back to the packed sentences exactly)."""
    val = ParallelSplit(data, "val")
    pairs = [val.pair(k) for k in range(min(n, val.num_pairs))]
    return tok.decode([s[:-1].tolist() for s, _ in pairs], "src"), tok.decode([t[:-1].tolist() for _, t in pairs])


def build_marian(cfg, ids: SpecialIds, init_from=None):
    from transformers import MarianConfig, MarianMTModel

    model = MarianMTModel(MarianConfig(**to_marian_config(cfg, ids), attn_implementation="sdpa"))
    if init_from is not None:  # our initial weights, permuted into Marian's layout: the same starting function
        model.load_state_dict(to_marian_state_dict(init_from.state_dict(), cfg), strict=False)
    return model


def ours_loss(model, b: dict, pad_id: int, eps: float) -> torch.Tensor:
    """Our training path: the loss from the chunked output head (`llm.models.loss`), no full logits. Right-padded
    targets need no decoder pad mask (see llm.models.encoder_decoder), so neither model gets one."""
    summed = model(b["src_ids"], b["src_pad_mask"], b["tgt_in_ids"], None, labels=b["labels"], pad_id=pad_id,
                   label_smoothing=eps, reduction="sum")
    return summed / b["num_tokens"]


def marian_loss(model, b: dict, pad_id: int, eps: float) -> torch.Tensor:
    logits = model(input_ids=b["src_ids"], attention_mask=(~b["src_pad_mask"]).long(),
                   decoder_input_ids=b["tgt_in_ids"]).logits
    return label_smoothed_loss(logits, b["labels"], pad_id, eps)


def bare_loop(model, batches: list[dict], optim: OptimConfig, args, pad_id: int, loss_of,
              snapshot_at: int | None = None) -> dict:
    """AdamW on the given batches: target tokens/s of the steps after warm-up (the median step's, and all of them
    together) and the mean loss of the last 20 steps; with `snapshot_at`, a copy of the model after that step."""
    snapshot = None
    model.train()
    opt = build_optimizer(model, optim)
    rates, tokens, seconds, losses = [], 0, 0.0, []
    for step, batch in enumerate(batches):
        set_lr(opt, optim.lr * lr_factor(step, len(batches), optim))
        t = time.perf_counter()
        loss = loss_of(model, batch, pad_id, args.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also waits for the step to finish before the clock stops
        dt = time.perf_counter() - t
        if step >= args.warmup:
            rates.append(batch["num_tokens"] / dt)
            tokens, seconds = tokens + batch["num_tokens"], seconds + dt
        if snapshot_at == step + 1:
            snapshot = copy.deepcopy(model)
    return {"tok_s": statistics.median(rates), "tok_s_total": tokens / seconds,
            "loss": statistics.mean(losses[-20:]), "snapshot": snapshot}


def measured(run, *a, quiet_wait: float = 0.0) -> dict:
    """`run(*a)`'s result plus "others": the share of one CPU other processes used meanwhile."""
    wait_for_quiet(quiet_wait)
    busy, own, start = busy_seconds(), own_cpu_seconds(), time.perf_counter()
    result = run(*a)
    others = (busy_seconds() - busy) - (own_cpu_seconds() - own)
    return {**result, "others": max(others, 0.0) / (time.perf_counter() - start)}


def max_new(sources_tokens: list[list[int]], cfg) -> int:
    """One length limit for every sentence and both models: fairseq's 1.2 * longest source + 10, within positions."""
    return min(cfg.max_seq_len - 1, int(1.2 * max(len(s) for s in sources_tokens) + 10))


@torch.no_grad()
def marian_bleu(model, tok, ids: SpecialIds, sources, references, beam: int, limit: int, batch_size: int = 64):
    """Marian's beam search with the settings `llm.export.marian` writes into its generation config."""
    from llm.translate import encode_sources, score_translations

    model.eval()
    encoded = encode_sources(tok, sources, 10**9)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src, pad = pad_batch([encoded[i] for i in chunk], ids.pad)
        gen = model.generate(input_ids=src, attention_mask=(~pad).long(), num_beams=beam, do_sample=False,
                             max_length=limit + 2, length_penalty=1.0, early_stopping="never",  # start, limit, EOS
                             decoder_start_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
                             forced_eos_token_id=ids.eos, suppress_tokens=ids.never_generated)
        for i, row in zip(chunk, gen[:, 1:].tolist(), strict=True):
            out[i] = row[:row.index(ids.eos)] if ids.eos in row else row
    result = score_translations(tok.decode(out), references)
    return result.bleu, result.chrf


def quality(kind: str, model, tok, ids, sources, references, args, cfg) -> dict:
    from llm.translate import encode_sources

    limit = max_new(encode_sources(tok, sources, 10**9), cfg)
    t = time.perf_counter()
    if kind == "marian":
        bleu, chrf = marian_bleu(model, tok, ids, sources, references, args.beam, limit)
    else:  # max_len_a = 0: the same fixed limit for every row, as Marian's max_length
        r = evaluate_bleu(model, tok, sources, references, DecodeConfig(beam_size=args.beam, max_len_a=0.0,
                                                                          max_len_b=limit))
        bleu, chrf = r.bleu, r.chrf
    return {"bleu": bleu, "chrf": chrf, "decode_s": time.perf_counter() - t}


def warm_up_decoding(tok, ids, sources, references, args, cfg) -> None:
    """Decode a few sentences with throw-away models first: the first beam search in a process pays a one-off start
    cost (seconds on CPU) that would otherwise land in whichever model is scored first."""
    torch.manual_seed(args.seed)
    quality("ours", build_translation_model(cfg), tok, ids, sources[:8], references[:8], args, cfg)
    quality("marian", build_marian(cfg, ids), tok, ids, sources[:8], references[:8], args, cfg)


def run_llm_train(workdir: Path, data: Path, cfg, optim: OptimConfig, args) -> dict:
    out = workdir / f"llm-train-{time.time_ns()}"
    run = {"task": "translation", "model": dataclasses.asdict(cfg),
           "data": {"path": str(data), "max_tokens": args.max_tokens, "seed": args.seed},
           "optim": dataclasses.asdict(optim),
           "train": {"output_dir": str(out), "steps": args.steps, "zero_stage": 0, "precision": "fp32",
                     "seed": args.seed, "log_every": args.log_every, "eval_every": 0, "save_every": 0,
                     "keep_last": 1, "label_smoothing": args.label_smoothing}}
    path = workdir / "translation.yaml"
    path.write_text(yaml.safe_dump(run))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the same threads as the in-process loops
    proc = subprocess.run([sys.executable, "-m", "llm.cli", "train", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llm train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    # A record's rate covers the log_every steps before it: keep those that start after the warm-up.
    after = [(prev, r) for prev, r in zip(train[:-1], train[1:], strict=True)
             if r["step"] - args.log_every >= args.warmup]
    tokens = sum(r["tokens"] - prev["tokens"] for prev, r in after)
    seconds = sum((r["tokens"] - prev["tokens"]) / r["tokens_per_s"] for prev, r in after)
    return {"tok_s": statistics.median(r["tokens_per_s"] for _, r in after), "tok_s_total": tokens / seconds,
            "loss": statistics.mean(r["loss"] for r in train[-max(1, 20 // args.log_every):]), "out": out}


def marian_finetune(workdir: Path, args) -> dict:
    """F: a random MarianMTModel saved as a folder, imported by `llm train`, fine-tuned, exported back, verified."""
    from tests.export.hf_models import marian_folder

    tsv = workdir / "demo_pairs.tsv"
    pairs = [tuple(line.split("\t")) for line in tsv.read_text().splitlines()]
    folder = marian_folder(workdir / "opus-mt-random", pairs, seed=args.seed, spm_vocab=args.vocab_size,
                           perturb=False, d_model=args.d_model, encoder_layers=args.layers,
                           decoder_layers=args.layers, encoder_attention_heads=args.heads,
                           decoder_attention_heads=args.heads, encoder_ffn_dim=args.d_ff, decoder_ffn_dim=args.d_ff,
                           dropout=args.dropout, max_position_embeddings=256)
    data = workdir / "demo_pairs_marian"
    pack_translation.main(["--tsv", str(tsv), "--tokenizer", str(folder), "--output", str(data),
                           "--val-fraction", str(args.val_fraction), "--seed", str(args.seed)])
    out = workdir / "marian-run"
    run = {"task": "translation", "model": "init_from",
           "data": {"path": str(data), "max_tokens": args.max_tokens, "seed": args.seed, "bleu_sentences": 0},
           "optim": {"lr": args.lr, "betas": [0.9, 0.98], "weight_decay": 0.0, "warmup_steps": args.warmup_steps,
                     "schedule": "inverse_sqrt"},
           "train": {"init_from": str(folder), "output_dir": str(out), "steps": args.marian_steps, "zero_stage": 0,
                     "seed": args.seed, "log_every": 1, "eval_every": 0, "save_every": 0, "keep_last": 1}}
    (workdir / "marian.yaml").write_text(yaml.safe_dump(run))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for command in (["train", str(workdir / "marian.yaml")], ["export", str(out), str(workdir / "marian-export")]):
        proc = subprocess.run([sys.executable, "-m", "llm.cli", *command], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llm {command[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    report = json.loads((workdir / "marian-export" / "llm_export.json").read_text())["verification"]
    params = build_translation_model(read_marian_config(folder), device="meta").num_params()
    return {"params": params, "first": train[0]["loss"], "last": statistics.mean(r["loss"] for r in train[-10:]),
            "tok_s": statistics.median(r["tokens_per_s"] for r in train[args.warmup:]), "report": report}


def print_marian_finetune(f: dict, steps: int) -> None:
    r = f["report"]
    print(f"\nMarian fine-tuning (F), {f['params'] / 1e6:.2f}M parameters, {steps} steps of `llm train`: loss "
          f"{f['first']:.3f} at step 1 -> {f['last']:.3f} (mean of the last 10), {f['tok_s']:,.0f} target tok/s; "
          f"export verified {r['ok']}: max |logit diff| {r['max_abs_logit_diff']:.2e}, tokenisation equal "
          f"{r['tokenizer_equal']}, greedy equal on {sum(s['greedy_equal'] for s in r['sentences'])}/"
          f"{len(r['sentences'])} sentences")


def llm_train_model(out: Path, cfg):
    from llm.checkpoint.consolidate import consolidated_state_dict, resolve_checkpoint

    model = build_translation_model(cfg)
    model.load_state_dict(consolidated_state_dict(resolve_checkpoint(out)))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="encoder layers, and as many decoder layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput")
    p.add_argument("--warmup-steps", type=int, default=50, help="learning-rate warm-up")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch, padding included (fairseq's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pairs", type=int, default=20000, help="demo pairs to generate")
    p.add_argument("--vocab-size", type=int, default=2000, help="joint BPE vocabulary")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--bleu-pairs", type=int, default=300, help="held-out pairs translated for BLEU")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--marian-init", choices=["hf", "ours"], default="hf",
                   help="Marian's own initialisation (default), or our model's initial weights copied in")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--with-llm-train", action="store_true", help="also time `llm train` (task: translation)")
    p.add_argument("--modern-at", type=float, default=0.8, help="share of the steps the modern variant is also "
                   "scored at (its goal: the paper model's BLEU in at most 0.8x the steps)")
    p.add_argument("--log-every", type=int, default=1,
                   help="llm train's metrics interval (1: a rate per step, the statistic the loops report)")
    p.add_argument("--marian-steps", type=int, default=100, help="steps of the Marian fine-tuning run (0: skip it)")
    p.add_argument("--part", choices=["all", "compare", "marian"], default="all",
                   help="compare: the side-by-side training runs only; marian: the Marian fine-tuning run only")
    args = p.parse_args()
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (set), fp32, {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = prepare_data(workdir, args)
        finetuned = marian_finetune(workdir, args) if args.part != "compare" and args.marian_steps else None
        if args.part == "marian":
            print_marian_finetune(finetuned, args.marian_steps)
            return
        tok = load_tokenizer(data)
        ids = SpecialIds.from_tokenizer(tok)
        cfg = translation_preset("tiny", vocab_size=tok.vocab_size, d_model=args.d_model, n_encoder_layers=args.layers,
                                 n_decoder_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                                 dropout=args.dropout, max_seq_len=128, attention="sdpa")
        modern = dataclasses.replace(cfg, norm="pre", norm_type="rmsnorm", positions="rope", activation="swiglu",
                                     bias=False, n_kv_heads=max(1, args.heads // 2),
                                     d_ff=max(64, round(2 * args.d_ff / 3 / 64) * 64))
        optim = OptimConfig(lr=args.lr, betas=[0.9, 0.98], weight_decay=0.0, grad_clip=1.0,
                            warmup_steps=args.warmup_steps, schedule="linear")
        loader = TranslationLoader(TranslationDataConfig(path=str(data), max_tokens=args.max_tokens, seed=args.seed),
                                   0, 1, max_positions=cfg.max_seq_len)
        batches = [next(loader) for _ in range(args.steps)]
        sources, references = held_out(data, tok, args.bleu_pairs)
        n_tgt = sum(b["num_tokens"] for b in batches)
        print(f"{args.steps} steps of <= {args.max_tokens} tokens: {sum(len(b['labels']) for b in batches):,} pairs, "
              f"{n_tgt:,} target tokens ({loader.batches_per_epoch} batches per epoch); BLEU on {len(sources)} "
              f"held-out pairs, beam {args.beam}")

        warm_up_decoding(tok, ids, sources, references, args, cfg)
        names = (["llm train"] if args.with_llm_train else []) + ["bare loop, ours", "bare loop, modern",
                                                                  "bare loop, Marian"]
        cut = max(1, round(args.modern_at * args.steps))
        runs: dict[str, list[dict]] = {name: [] for name in names}
        scores: dict[str, dict] = {}
        for repeat in range(args.repeats):  # interleaved; the models of the first repeat are scored
            if args.with_llm_train:
                runs["llm train"].append(measured(run_llm_train, workdir, data, cfg, optim, args,
                                                    quiet_wait=args.quiet_wait))
                if repeat == 0:
                    trained = llm_train_model(runs["llm train"][0]["out"], cfg)
                    scores["llm train"] = quality("ours", trained, tok, ids, sources, references, args, cfg)
            torch.manual_seed(args.seed)
            ours = build_translation_model(cfg)
            start = copy.deepcopy(ours) if args.marian_init == "ours" else None  # before training changes it
            runs["bare loop, ours"].append(measured(bare_loop, ours, batches, optim, args, ids.pad, ours_loss,
                                                    quiet_wait=args.quiet_wait))
            if repeat == 0:
                scores["bare loop, ours"] = quality("ours", ours, tok, ids, sources, references, args, cfg)
            torch.manual_seed(args.seed)
            mod = build_translation_model(modern)
            runs["bare loop, modern"].append(measured(bare_loop, mod, batches, optim, args, ids.pad, ours_loss,
                                                      cut, quiet_wait=args.quiet_wait))
            if repeat == 0:
                scores["bare loop, modern"] = quality("ours", mod, tok, ids, sources, references, args, modern)
                scores[f"modern at {cut} steps"] = quality("ours", runs["bare loop, modern"][0]["snapshot"], tok,
                                                           ids, sources, references, args, modern)
            for r in runs["bare loop, modern"]:
                r["snapshot"] = None  # scored; free it
            torch.manual_seed(args.seed)
            marian = build_marian(cfg, ids, start)
            runs["bare loop, Marian"].append(measured(bare_loop, marian, batches, optim, args, ids.pad,
                                                      marian_loss, quiet_wait=args.quiet_wait))
            if repeat == 0:
                scores["bare loop, Marian"] = quality("marian", marian, tok, ids, sources, references, args, cfg)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{n} {runs[n][-1]['tok_s']:,.0f} tok/s" for n in names), flush=True)
        params = {"bare loop, ours": ours.num_params(), "llm train": ours.num_params(),
                  "bare loop, modern": mod.num_params(),
                  "bare loop, Marian": sum(p.numel() for p in marian.parameters() if p.requires_grad)}

    med = {n: statistics.median(r["tok_s"] for r in runs[n]) for n in names}
    print(f"\nshape: d {cfg.d_model}, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, {cfg.n_heads} heads, "
          f"ff {cfg.d_ff}, vocab {cfg.vocab_size}, shared embeddings; Marian init: {args.marian_init}\n")
    print("| run | params | target tok/s | train loss (end) | BLEU | chrF | decode s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        s = scores[n]
        print(f"| {n} | {params[n] / 1e6:.2f}M | {med[n]:,.0f} | {runs[n][0]['loss']:.3f} | {s['bleu']:.1f} "
              f"| {s['chrf']:.1f} | {s['decode_s']:.1f} |")
    m = scores[f"modern at {cut} steps"]
    print(f"| modern, copy after {cut} of {args.steps} steps | | | | {m['bleu']:.1f} | {m['chrf']:.1f} "
          f"| {m['decode_s']:.1f} |")
    print(f"\nmodern: shape as above with SwiGLU hidden {modern.d_ff}, {modern.kv_heads} kv heads; BLEU after "
          f"{cut / args.steps:.2f}x the steps {m['bleu']:.1f} vs the paper model's "
          f"{scores['bare loop, ours']['bleu']:.1f} after all of them")
    print(f"ours / Marian tok/s: {med['bare loop, ours'] / med['bare loop, Marian']:.3f}; modern / ours tok/s: "
          f"{med['bare loop, modern'] / med['bare loop, ours']:.3f}")
    if args.with_llm_train:
        print(f"llm train / bare loop ours tok/s: {med['llm train'] / med['bare loop, ours']:.3f}")
    if finetuned is not None:
        print_marian_finetune(finetuned, args.marian_steps)
    print("\nall repeats: median step tok/s, all steps' tok/s, CPU share others used meanwhile:")
    for n in names:
        print(f"  {n:18s} " + "   ".join(f"{r['tok_s']:,.0f} / {r['tok_s_total']:,.0f} / {r['others']:.0%}"
                                        for r in runs[n]))
    print(f"\n{time.perf_counter() - begin:.0f} s in all")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
