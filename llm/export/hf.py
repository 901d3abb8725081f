"""Export a training checkpoint to a `transformers` folder of its family (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM: `families.py`), verified before it is written.

The folder is assembled under a temporary name next to OUT_DIR: config.json, model.safetensors (sharded with an
index above --max-shard-size), the tokenizer, generation_config.json and a model card (the tokenizer files and
generation config of the `train.init_from` model where the run trained with its tokenizer). It is then loaded back with
`transformers` (safetensors only, no remote code) and compared with our model on sample sequences: logits within
`LOGITS_TOL` and identical greedy continuations. Only then is it renamed to OUT_DIR; on failure nothing is left.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from llm.checkpoint.staging import staged_folder
from llm.config import ModelConfig, RunConfig, load_config
from llm.export.families import Family, to_hf_config
from llm.export.layout import AdapterError, to_hf_state_dict
from llm.generate import Sampling, generate
from llm.models import Decoder, build_model

LOGITS_TOL = 1e-4  # max abs logit difference, both sides in fp32 on the exported weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportVerificationError(RuntimeError):
    pass


def check_same_shape(ours: ModelConfig, theirs: ModelConfig, where: str) -> None:
    """The run's model section must describe the model being loaded (the attention backend may differ, and the
    context length: continuing at a longer one is how a model's context is extended)."""
    same_as = {"d_ff": "ffn_hidden", "n_kv_heads": "kv_heads", "d_head": "head_dim", "family": "export_family"}
    diffs = [f"model.{f.name}: {where} has {getattr(theirs, f.name)!r}, the config {getattr(ours, f.name)!r}"
             for f in dataclasses.fields(ModelConfig)
             if f.name not in ("attention", "init_std", "ffn_multiple_of", "max_seq_len") and getattr(ours, f.name) !=
             getattr(theirs, f.name) and not (f.name in same_as and getattr(ours, same_as[f.name]) ==
                                              getattr(theirs, same_as[f.name]))]
    if diffs:
        raise AdapterError(f"{where} does not match the run's model section:\n  " + "\n  ".join(diffs))


def _init_source(cfg: RunConfig, data_tokenizer: Path) -> Path | None:
    """The `train.init_from` folder when the run continued a model whose tokenizer is the one it trained with."""
    from llm.data.tokenizer import load_tokenizer

    source = Path(cfg.train.init_from) if cfg.train.init_from else None
    if source is None or not (source / "tokenizer.json").is_file():
        return None
    try:
        same = load_tokenizer(source).sha256 == load_tokenizer(data_tokenizer).sha256
    except ValueError:  # a tokenizer we cannot read (DataError): keep the data's own
        return None
    return source if same else None


def _sample_inputs(vocab_size: int, tokenizer, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    texts = ["def main():\n    return", "The quick brown fox", "import os\nimport sys\n"]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    random = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (1, 17, 64)]
    return [e for e in encoded if e] + random


@torch.no_grad()
def verify(ours: Decoder, folder: Path, tokenizer, eos_id: int | None, new_tokens: int = 16) -> dict:
    """Load `folder` with transformers and compare it with `ours`; return a report with `ok`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False,
                                              dtype=torch.float32, attn_implementation="eager").eval()
    ours = ours.float().eval()
    report = {"logits_tol": LOGITS_TOL, "sequences": [], "ok": True}
    for ids in _sample_inputs(ours.cfg.vocab_size, tokenizer):
        x = torch.tensor([ids])
        hf_out = hf(x, output_hidden_states=True)
        per_layer, hidden = [], []
        handles = [b.register_forward_hook(lambda m, i, o, acc=hidden: acc.append(o)) for b in ours.layers]
        logits = ours(x)
        for h in handles:
            h.remove()
        for i, h in enumerate(hidden[:-1]):  # HF's last hidden state is after the final norm
            per_layer.append((f"layers.{i} output", (h - hf_out.hidden_states[i + 1]).abs().max().item()))
        diff = (logits - hf_out.logits).abs().max().item()
        per_layer.append(("logits", diff))
        ours_greedy = generate(ours, ids, Sampling(max_new_tokens=new_tokens), eos_id=eos_id)
        hf_greedy = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                                eos_token_id=eos_id, pad_token_id=eos_id)[0, len(ids):].tolist()
        same = ours_greedy == hf_greedy
        worst = sorted(per_layer, key=lambda kv: -kv[1])[:3]
        first = next((name for name, d in per_layer if d > LOGITS_TOL), None)  # where the two models part
        report["sequences"].append({"length": len(ids), "max_abs_logit_diff": diff, "greedy_equal": same,
                                    "first_diverging": first, "worst": worst})
        report["ok"] &= diff <= LOGITS_TOL and same
    return report


def _model_card(cfg: RunConfig, family: Family, step_dir: Path, manifest: dict | None, report: dict | None,
                dtype: str) -> str:
    lines = [f"# {Path(cfg.train.output_dir).name}", "",
             f"A causal language model trained with `llm` ({step_dir.name}), exported as "
             f"`{family.model_class}` in {dtype}" + (f", continued from `{cfg.train.init_from}`" if cfg.train.init_from
                                                     else "") + ".", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tokenizer = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
             "```", ""]
    if manifest:
        stats = manifest.get("splits", {}).get("train", {})
        lines += ["## Training data", "", f"- format {manifest.get('format')} v{manifest.get('format_version')}, "
                  f"{len(manifest.get('sources', []))} source file(s), tokenizer sha256 "
                  f"{manifest.get('tokenizer', {}).get('sha256', '?')[:16]}...",
                  f"- train split: {json.dumps(stats.get('num_tokens', stats))} tokens" if stats else "", ""]
    if report:
        worst = max(s["max_abs_logit_diff"] for s in report["sequences"])
        lines += ["## Verification", "", f"Loaded back with `transformers` and compared with the training code's model "
                  f"on {len(report['sequences'])} sequences: max abs logit difference {worst:.2e} "
                  f"(tolerance {LOGITS_TOL}), greedy continuations identical.", ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).strip(),
              "```", ""]
    return "\n".join(lines)


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", check: bool = True,
           max_shard_size: str = "5GB", overwrite: bool = False) -> dict | None:
    """Export `checkpoint` (a run folder or one checkpoint) to `out_dir`. Returns the verification report."""
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    from llm.checkpoint.consolidate import consolidated_state_dict, resolve_checkpoint, tokenizer_folder

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    step_dir = resolve_checkpoint(checkpoint)
    cfg = load_config(step_dir / "config.yaml")
    model = build_model(dataclasses.replace(cfg.model, attention="eager"))
    model.load_state_dict(consolidated_state_dict(step_dir), strict=True)
    # What is written is rounded to `dtype`; compare against our model holding exactly those values.
    model.to(DTYPES[dtype]).float().eval()
    tok_dir = tokenizer_folder(cfg)
    source = _init_source(cfg, tok_dir)
    tok_dir = source or tok_dir  # the imported model's own tokenizer files (chat template and all) when the same
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if len(tokenizer) > cfg.model.vocab_size:
        raise AdapterError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, the model {cfg.model.vocab_size}")
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad")}

    with staged_folder(out_dir) as tmp:
        family, kwargs = to_hf_config(cfg.model, **ids)
        hf = getattr(transformers, family.model_class)(getattr(transformers, family.config_class)(**kwargs))
        missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg.model), strict=False)
        if unexpected or missing != (["lm_head.weight"] if cfg.model.tie_embeddings else []):
            raise AdapterError(f"export state dict mismatch: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        hf.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if source is not None and (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(source).save_pretrained(tmp)  # the imported model's own
        else:
            GenerationConfig(**ids, do_sample=False).save_pretrained(tmp)
        manifest_path = Path(cfg.data.datasets[0].path) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        report = verify(model, tmp, tokenizer, ids["eos_token_id"]) if check else None
        if report is not None and not report["ok"]:
            lines = [f"  length {s['length']}: max |logit diff| {s['max_abs_logit_diff']:.3e}, greedy equal "
                     f"{s['greedy_equal']}, first diverging at {s['first_diverging']}, worst: "
                     + ", ".join(f"{n} {d:.2e}" for n, d in s["worst"]) for s in report["sequences"]]
            raise ExportVerificationError("the exported model does not reproduce ours (tolerance "
                                          f"{LOGITS_TOL}); nothing was written:\n" + "\n".join(lines))
        (tmp / "README.md").write_text(_model_card(cfg, family, step_dir, manifest, report, dtype))
        (tmp / "llm_export.json").write_text(json.dumps({"checkpoint": str(step_dir), "dtype": dtype,
                                                         "verification": report}, indent=2))
    return report
