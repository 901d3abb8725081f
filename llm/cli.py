"""`llm <subcommand>`: argument parsing only; each subcommand calls plain functions of the package."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from llm.config import ConfigError, load_config

GB = 1e9
TRANSLATION_INFO_LEN = 64  # `llm info` of a translation model: FLOPs for sentences of this many tokens


def _model_of(folder: str) -> dict:
    """`model: init_from`: the model section of a transformers folder (read by `llm.export.families`)."""
    from llm.export.families import model_section

    return model_section(folder)


def _info(args: argparse.Namespace) -> int:
    from llm.engine.memory import activation_memory, build_host_memory, model_state_memory
    from llm.models import build_model

    cfg = load_config(args.config, args.overrides, model_of=_model_of)
    m = cfg.model
    if cfg.task == "translation":
        from llm.models.encoder_decoder import build_translation_model

        seq_len = args.seq_len or TRANSLATION_INFO_LEN
        model = build_translation_model(m, device="meta")
        embedding = m.vocab_size * m.d_model * (1 if m.share_embeddings else 3)
        shape = (f"{m.n_encoder_layers}+{m.n_decoder_layers} layers ({m.norm}-norm {m.norm_type}, {m.positions} "
                 f"positions, {m.activation}{'' if m.bias else ', no biases'}), d_model {m.d_model}, "
                 f"{m.n_heads} heads ({m.kv_heads} kv), ffn {m.d_ff}, vocab {m.vocab_size}, "
                 f"{'shared' if m.share_embeddings else 'separate'} embeddings")
        at = f"per target token, sources and targets of {seq_len} tokens"
    else:
        seq_len = args.seq_len or cfg.data.seq_len
        model = build_model(m, device="meta")  # nothing is allocated
        embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
        features = [f"{m.rope_scaling.type} RoPE scaling x{m.rope_scaling.factor:g}" if m.rope_scaling else "",
                    "q/k/v biases" if m.attention_bias else "", "q/k norms" if m.qk_norm else "",
                    f"sliding window {m.sliding_window}" if m.sliding_window else "",
                    f"exports as {m.export_family}"]
        shape = (f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.kv_heads} kv), "
                 f"head_dim {m.head_dim}, ffn {m.ffn_hidden}, vocab {m.vocab_size}, "
                 f"{'tied' if m.tie_embeddings else 'untied'} embeddings, context {m.max_seq_len}; "
                 + ", ".join(f for f in features if f))
        at = f"at seq_len {seq_len}"
    params = model.num_params()
    activations = None
    if cfg.task == "lm":
        sp, micro = args.sp or cfg.train.sequence_parallel, args.micro_batch or cfg.train.micro_batch_size
        if sp < 1 or args.gpus % sp or m.n_heads % sp or seq_len % sp:
            raise ConfigError(f"--sp {sp}: must divide --gpus ({args.gpus}), model.n_heads ({m.n_heads}) and the "
                              f"sequence length ({seq_len})")
        activations = {"sequence_parallel": sp, "micro_batch": micro, **{
            name: activation_memory(m, seq_len, micro, sp, args.precision, checkpointing)
            for name, checkpointing in (("without_checkpointing", False), ("with_checkpointing", True))}}
    flops = model.flops_per_token(seq_len)
    attention_flops = model.attention_flops_per_token(seq_len)
    stages = model_state_memory(params, model.largest_layer_params(), args.gpus, args.precision)
    largest_param = max(p.numel() for p in model.parameters())
    build = build_host_memory(params, largest_param, args.gpus, args.precision)
    if args.json:
        print(json.dumps({
            "parameters": params, "embedding_parameters": embedding, "seq_len": seq_len,
            "flops_per_token": flops, "gpus": args.gpus, "precision": args.precision,
            "model_states_bytes_per_gpu": {s.name: {"gpu": s.gpu_bytes, "cpu": s.cpu_bytes} for s in stages},
            "build_host_bytes_per_process": build, "largest_parameter": largest_param,
            "activation_bytes_per_gpu": activations,
        }, indent=2))
        return 0
    print(f"config        {args.config}")
    print(f"parameters    {params:,} ({params / 1e9:.2f}B), of which embeddings {embedding:,}")
    print(f"shape         {shape}")
    print(f"FLOPs/token   {flops:.3e} for training (forward + backward) {at}, "
          f"attention {100 * attention_flops / flops:.1f}% of it")
    print(f"\nModel states per GPU with {args.gpus} GPU{'s' if args.gpus > 1 else ''}, {args.precision} "
          f"{'mixed precision ' if args.precision == 'bf16' else ''}AdamW "
          "(weights + gradients + optimizer; activations not included):")
    for s in stages:
        line = f"  {s.name:<22}{s.gpu_bytes / GB:10.2f} GB"
        if s.name == "ZeRO-3":
            line += f"   (incl. {4 * model.largest_layer_params() / GB:.2f} GB for the largest layer gathered)"
        if s.cpu_bytes:
            line += f"   + {s.cpu_bytes / GB:.2f} GB host memory per GPU"
        print(line)
    if activations is not None:
        sp, micro = activations["sequence_parallel"], activations["micro_batch"]
        print(f"\nActivations per GPU, {args.precision}, micro-batch {micro} x {seq_len:,} tokens"
              + (f", sequence parallel {sp} ({micro * seq_len // sp:,} tokens per GPU)" if sp > 1 else "")
              + " (see llm/engine/memory.py):")
        print(f"  {'without checkpointing':<22}{activations['without_checkpointing'] / GB:10.2f} GB")
        print(f"  {'with checkpointing':<22}{activations['with_checkpointing'] / GB:10.2f} GB   "
              "(train.activation_checkpointing)")
    print(f"\nHost memory per process to build the model ({args.gpus} process{'es' if args.gpus > 1 else ''}; "
          "before DeepSpeed's prepare, plus ~0.3 GB for torch and DeepSpeed):")
    print(f"  {'ZeRO-0/1/2':<22}{build['ZeRO-0/1/2'] / GB:10.2f} GB   the whole model in fp32 on every process")
    print(f"  {'ZeRO-3':<22}{build['ZeRO-3'] / GB:10.2f} GB   partitioned: 1/{args.gpus} of the model in "
          f"{args.precision} + its largest parameter ({largest_param:,}) whole")
    print(" " * 40 + "for a moment; on GPUs this is on the GPU instead, unless parameters are offloaded")
    return 0


def _train(args: argparse.Namespace) -> int:
    from llm.engine.trainer import main as train_main

    cfg = load_config(args.config, args.overrides, model_of=_model_of)
    return train_main(cfg, args.config)


def _export(args: argparse.Namespace) -> int:
    from llm.checkpoint.consolidate import resolve_checkpoint

    task = load_config(resolve_checkpoint(args.checkpoint) / "config.yaml").task
    if task == "translation":
        from llm.export.marian import export_checkpoint

        report = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, check=not args.no_verify,
                                   overwrite=args.overwrite)
        if report is not None:
            worst = report["max_abs_logit_diff"]
            print(f"verified with transformers (MarianMTModel) on {len(report['sentences'])} validation sentences: "
                  f"max abs logit difference {worst:.2e} (tolerance {report['logits_tol']}), same tokens, "
                  f"greedy translations identical")
    else:
        from llm.export.hf import export

        report = export(args.checkpoint, args.out_dir, dtype=args.dtype, check=not args.no_verify,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        if report is not None:
            worst = max(s["max_abs_logit_diff"] for s in report["sequences"])
            print(f"verified with transformers on {len(report['sequences'])} sequences: max abs logit difference "
                  f"{worst:.2e} (tolerance {report['logits_tol']}), greedy continuations identical")
    print(f"exported {args.out_dir}")
    return 0


def _translate(args: argparse.Namespace) -> int:
    import dataclasses

    from llm.translate import load_translation_model, read_lines, score_translations, translate

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints; stdout is translations only
        model, tokenizer, cfg = load_translation_model(args.model, device=args.device)
    overrides = {k: v for k, v in (("beam_size", args.beam), ("length_penalty", args.length_penalty),
                                   ("max_len_a", args.max_len_a), ("max_len_b", args.max_len_b),
                                   ("batch_size", args.batch_size)) if v is not None}
    decode = dataclasses.replace(cfg.decode, **overrides)
    decode.check("command line", prefix="--")
    sources = read_lines(args.input) if args.input != "-" else [line.strip() for line in sys.stdin]
    references = read_lines(args.ref) if args.ref else None
    if references is not None and len(references) != len(sources):
        raise ValueError(f"--ref {args.ref} has {len(references)} lines, --input {args.input} {len(sources)}")
    hypotheses = translate(model, tokenizer, sources, decode, decode.batch_size)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    else:
        sys.stdout.writelines(h + "\n" for h in hypotheses)
    if references is not None:
        result = score_translations(hypotheses, references, decode.bleu_tokenize)
        print(f"BLEU {result.bleu:.2f} ({result.bleu_signature})\nchrF {result.chrf:.2f} ({result.chrf_signature})",
              file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        from llm.eval.run import main as eval_main
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    return eval_main(args)


def _average(args: argparse.Namespace) -> int:
    from llm.checkpoint.consolidate import CheckpointNotFound, complete_checkpoints, write_weights_checkpoint
    from llm.translate import average_checkpoints

    checkpoints = complete_checkpoints(args.run)
    if args.last < 1:
        raise ValueError(f"--last {args.last}: must be at least 1")
    if len(checkpoints) < args.last:
        raise CheckpointNotFound(f"{args.run}: {len(checkpoints)} complete checkpoint(s), --last {args.last} asked "
                                 f"(raise train.keep_last to keep more)")
    chosen = checkpoints[-args.last:]
    with contextlib.redirect_stdout(sys.stderr):
        state = average_checkpoints(chosen)
    cfg = load_config(chosen[-1] / "config.yaml")
    write_weights_checkpoint(state, cfg, args.output, {"averaged": [str(p) for p in chosen]}, args.overwrite)
    print(f"averaged {', '.join(p.name for p in chosen)} -> {args.output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from llm.generate import Sampling, generate, load_model

    # stdout carries the generated text only: loading messages (DeepSpeed's consolidation prints) go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer = load_model(args.model, device=args.device)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    shown = ""
    print(args.prompt, end="", flush=True)

    def stream(token: int) -> None:  # decode everything so far: a character may span several tokens
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    generate(model, prompt, sampling, eos_id=tokenizer.eos_token_id, on_token=stream)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm", description="Train Llama-style language models with Accelerate + DeepSpeed ZeRO.",
        epilog="Run `llm <subcommand> --help` for a subcommand's options.")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)

    info = sub.add_parser(
        "info", help="parameters, FLOPs per token and per-GPU memory of a model or run config",
        description="Size a job before launching it: parameter count, training FLOPs per token at the configured "
                    "sequence length, and the memory per GPU that weights, gradients and AdamW state need under "
                    "ZeRO-0/1/2/3 (see llm/engine/memory.py for what is counted).")
    info.add_argument("config", help="a model preset (configs/model/7b.yaml, or just 7b) or a run config")
    info.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.n_layers=8")
    info.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs the states are sharded over")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: "
                      "data.seq_len of a run config; model.max_seq_len of a model preset; "
                      f"{TRANSLATION_INFO_LEN} for a translation model)")
    info.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    info.add_argument("--sp", type=int, default=None, help="sequence-parallel size for the activation memory "
                      "(default: train.sequence_parallel of a run config, else 1); --gpus counts all GPUs")
    info.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per forward for the "
                      "activation memory (default: train.micro_batch_size of a run config; 1 for a model preset)")
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.set_defaults(func=_info)

    train = sub.add_parser(
        "train", help="train a model (one process, or under `accelerate launch` on any number of GPUs/nodes)",
        description="Train with Accelerate + DeepSpeed ZeRO. Run it directly for one process, or as "
                    "`accelerate launch --config_file configs/accelerate/<launch>.yaml -m llm.cli train CONFIG` for "
                    "several. A run whose train.output_dir holds a checkpoint resumes from it. Exit codes: 0 done, "
                    "2 config error, 3 non-finite loss, 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint "
                    "(requeue it to resume).",
        epilog="example: llm train configs/train/tiny_cpu.yaml train.steps=50 train.output_dir=runs/try")
    train.add_argument("config", help="a run config, e.g. configs/train/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    train.set_defaults(func=_train)

    export = sub.add_parser(
        "export", help="export a checkpoint to a transformers folder (Llama, Mistral, Qwen2, Qwen3 or Marian), "
                       "verified",
        description="Consolidate a checkpoint of `llm train` (any ZeRO stage and number of processes, on CPU), "
                    "write config.json, safetensors weights, the tokenizer, generation_config.json and a model "
                    "card, then load the folder with transformers and compare logits and greedy continuations "
                    "with our model. A folder that fails the check is not written. Language models become "
                    "their model.family's class (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                    "Qwen3ForCausalLM); translation models (post-norm) MarianMTModel, checked on validation "
                    "sentences.",
        epilog="example: llm export runs/tiny_cpu exports/tiny --dtype bf16")
    export.add_argument("checkpoint", help="a run folder (its latest checkpoint) or one checkpoint folder")
    export.add_argument("out_dir", help="the folder to create")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default fp32)")
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    export.add_argument("--no-verify", action="store_true", help="skip loading it back with transformers")
    export.set_defaults(func=_export)

    gen = sub.add_parser(
        "generate", help="generate text from a checkpoint or a transformers folder (Llama, Mistral, Qwen2, Qwen3)",
        description="Incremental decoding with a KV cache, streamed as it is produced. Greedy by default; "
                    "--temperature > 0 samples (with optional --top-k / --top-p). Stops at EOS.",
        epilog='example: llm generate runs/tiny_cpu --prompt "def main(" --max-new-tokens 64')
    gen.add_argument("model", help="a run folder, a checkpoint folder or a transformers folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.set_defaults(func=_generate)

    tr = sub.add_parser(
        "translate", help="translate a file with a translation checkpoint (beam search), optionally scored by BLEU",
        description="Batched beam search (greedy with --beam 1) with the encoder output and the decoder's "
                    "self-attention cached. Reads one sentence per line, writes one translation per line (stdout "
                    "or --output); with --ref, prints sacreBLEU's BLEU and chrF with their signatures to stderr. "
                    "Decoding defaults come from the run config's `decode` section (a MarianMTModel folder's: its "
                    "generation config's beam size and length penalty).",
        epilog="examples: `llm translate runs/demo_mt --input valid.src --ref valid.tgt --beam 5`; "
               "`llm translate models/opus-mt-de-en --input test.de --ref test.en`")
    tr.add_argument("model", help="a translation run folder, one of its checkpoints, an `llm average` folder, or a "
                                  "transformers MarianMTModel folder (OPUS-MT)")
    tr.add_argument("--input", required=True, help="source sentences, one per line ('-': stdin)")
    tr.add_argument("--ref", help="reference translations, one per line, to score BLEU and chrF")
    tr.add_argument("--output", help="write translations here instead of stdout")
    tr.add_argument("--beam", type=int, help="beam size (1: greedy)")
    tr.add_argument("--length-penalty", type=float, help="score = log-prob / length ** this")
    tr.add_argument("--max-len-a", type=float, help="at most a * source length + b target tokens")
    tr.add_argument("--max-len-b", type=int)
    tr.add_argument("--batch-size", type=int, help="sentences decoded at once")
    tr.add_argument("--device", default="cuda" if _cuda() else "cpu")
    tr.set_defaults(func=_translate)

    avg = sub.add_parser(
        "average", help="average the weights of a run's last K checkpoints (as fairseq's recipes do)",
        description="Consolidate each of the run's last K complete checkpoints to fp32 and write their element-wise "
                    "mean as a weights-only checkpoint (model.safetensors + config.yaml), which `llm translate`, "
                    "`llm export` and `llm generate` take like any checkpoint. Keep enough checkpoints with "
                    "train.keep_last.",
        epilog="example: llm average runs/demo_mt --last 3 --output runs/demo_mt/avg3")
    avg.add_argument("run", help="a run folder (its checkpoints/ holds step-N folders)")
    avg.add_argument("--last", type=int, default=5, help="how many of the latest checkpoints (default 5)")
    avg.add_argument("--output", required=True, help="the folder to create")
    avg.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    avg.set_defaults(func=_average)

    ev = sub.add_parser(
        "eval", help="score a model on lm-evaluation-harness tasks and/or the perplexity of text",
        description="Run EleutherAI's lm-evaluation-harness (pip install 'llm[eval]') on a run folder, a checkpoint "
                    "(any ZeRO stage; no export needed) or a transformers folder: multiple-choice (loglikelihood) "
                    "and generation tasks, given by lm-eval name or as task YAML files. --data scores the "
                    "perplexity and bits per byte of text files or of a packed dataset's documents. Prints a "
                    "table and writes every figure to a JSON file. Offline by default (HF_HUB_OFFLINE=1 and "
                    "HF_DATASETS_OFFLINE=1 unless set): a task whose data is on the Hugging Face Hub fails with "
                    "how to point it at local files.",
        epilog="examples:\n  python -m data_prep.make_cloze data/stdlib --output data/cloze\n"
               "  llm eval runs/tiny_cpu --tasks data/cloze/cloze.yaml\n"
               "  llm eval runs/tiny_cpu --data data/stdlib --limit 200      (perplexity of validation documents)\n"
               "  llm eval exports/tiny --tasks data/cloze/cloze.yaml        (lm-eval's transformers backend)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("model", help="a run folder, a checkpoint folder or a transformers folder")
    ev.add_argument("--tasks", nargs="+", default=[], help="lm-eval task names or task YAML paths")
    ev.add_argument("--data", nargs="+", default=[], help="text files, folders or globs (.txt, .jsonl, .json, "
                    ".csv, .parquet), or one packed dataset folder (its --split's documents)")
    ev.add_argument("--split", default="val", help="split of a packed --data folder (default: %(default)s)")
    ev.add_argument("--text-column", default="text", help="column of the text in jsonl/csv/parquet --data")
    ev.add_argument("--limit", type=int, default=None, help="at most this many examples per task / documents")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, or 0)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: %(default)s)")
    ev.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    ev.add_argument("--backend", choices=["auto", "ours", "hf"], default="auto",
                    help="ours: our model (checkpoints; transformers folders of Llama, Mistral, Qwen2, Qwen3); hf: "
                         "lm-eval's transformers backend (transformers folders); auto (default): ours for "
                         "checkpoints, hf for transformers folders")
    ev.add_argument("--output", help="the JSON file to write (default: MODEL/eval.json for our runs and "
                    "checkpoints, ./eval-<folder>.json for a transformers folder)")
    ev.add_argument("--log-samples", action="store_true", help="keep every example's inputs and scores in the JSON")
    ev.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ev.set_defaults(func=_eval)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Offline unless told otherwise: no download is ever attempted behind the user's back (and none can hang).
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"llm {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        # Bad input (a missing checkpoint, an unsafe file, a failed verification): one clear line, no traceback.
        print(f"llm {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a launched worker, done: leave without teardown
        from llm.engine.distributed import exit_worker

        exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
