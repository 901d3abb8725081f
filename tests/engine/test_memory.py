"""The activation-memory formula (`llm.engine.memory.activation_memory`) against what autograd really keeps: the
storages saved for the backward of one forward, measured with saved-tensor hooks on the CPU in fp32 and bf16."""

import pytest
import torch

from llm.config import ModelConfig
from llm.engine.memory import activation_memory
from llm.models.decoder import Decoder


def saved_bytes(model, ids, labels) -> int:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,heads,kv,ffn", [(256, 4, 2, 704), (512, 8, 8, 1408), (384, 6, 1, 2048)])
def test_formula_counts_the_activations_per_token(d, heads, kv, ffn, dtype):
    """Per token: the difference between two sequence lengths (what does not grow with the tokens, such as the
    token ids or a copy of the output head's weight, drops out)."""
    cfg = ModelConfig(vocab_size=4096, d_model=d, n_layers=2, n_heads=heads, n_kv_heads=kv, d_ff=ffn,
                      max_seq_len=1024, attention="sdpa")
    model = Decoder(cfg).to(dtype)

    def measured(tokens: int) -> int:
        ids, labels = torch.randint(0, 4096, (2, tokens)), torch.randint(0, 4096, (2, tokens))
        return saved_bytes(model, ids, labels)

    per_token = (measured(512) - measured(256)) / (2 * 256)
    estimate = activation_memory(cfg, 1, precision="fp32" if dtype == torch.float32 else "bf16")
    assert estimate == pytest.approx(per_token, rel=0.02), (per_token, estimate)


def test_sequence_parallel_and_checkpointing_scale_it():
    cfg = ModelConfig(vocab_size=4096, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192)
    whole = activation_memory(cfg, 32768)
    # 1/8 of the tokens; the all-to-all keeps its own q, k, v and output where RoPE and attention kept theirs
    assert activation_memory(cfg, 32768, sequence_parallel=8) == pytest.approx(whole / 8, rel=0.03)
    assert activation_memory(cfg, 32768, micro_batch=2) == pytest.approx(2 * whole)
    checkpointed = activation_memory(cfg, 32768, checkpointing=True)
    assert whole / 16 < checkpointed < whole / 8  # 16 layer inputs + one of the 16 layers recomputed
