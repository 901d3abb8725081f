"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streamed token by token.

`load_model` takes any of: a run folder of `llm train` (its latest checkpoint), one checkpoint folder, or a
`transformers` folder of a family we import (Llama, Mistral, Qwen2, Qwen3: an export of ours or a published
model); it returns our Decoder and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.models import Decoder


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from logits (V,)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Decoder, prompt: list[int], s: Sampling, eos_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids after `prompt` (stops at EOS, which is included, or after max_new_tokens)."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    device = model.tok_embeddings.weight.device
    max_len = min(model.cfg.context, len(prompt) + s.max_new_tokens)
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {model.cfg.context}")
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    model.eval()
    cache = model.new_cache(1, max_len)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]  # prefill
    out: list[int] = []
    while True:
        token = next_token(logits, s, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id or len(out) == s.max_new_tokens or cache.length >= max_len:
            return out
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def load_model(path: str | Path, device: str = "cpu") -> tuple[Decoder, object]:
    """Our Decoder (fp32, eval mode) and its tokenizer, from a run folder, a checkpoint or a transformers folder."""
    import dataclasses

    from transformers import AutoTokenizer

    from llm.checkpoint.consolidate import consolidated_state_dict, resolve_checkpoint, tokenizer_folder
    from llm.config import load_config
    from llm.export.families import load_hf_folder
    from llm.models import build_model

    path = Path(path)
    if (path / "config.json").is_file():
        cfg, state = load_hf_folder(path)
        tok_dir = path
    else:
        step_dir = resolve_checkpoint(path)
        run_cfg = load_config(step_dir / "config.yaml")
        cfg, state = run_cfg.model, consolidated_state_dict(step_dir)
        tok_dir = tokenizer_folder(run_cfg)
    model = build_model(dataclasses.replace(cfg, attention="auto"))
    model.load_state_dict(state, strict=True)
    model = model.float().to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(tok_dir))
