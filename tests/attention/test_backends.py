"""Every backend against the eager reference: fp32, bf16, GQA, causal with a KV offset, packed documents."""

import pytest
import torch

from llm.attention import AttentionUnavailable, DocumentMask, eager_attention, get_attention
from llm.attention.flash import flash_module
from tests.conftest import devices

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def backends(device: str) -> list[str]:
    names = ["sdpa", "auto"]
    if device == "cuda" and flash_module() is not None:
        names.append("flash")
    return names


def qkv(B=2, Tq=48, Tk=48, H=8, Hkv=2, D=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda T, heads: torch.randn(B, T, heads, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(Tq, H), make(Tk, Hkv), make(Tk, Hkv)


def cases(device):
    dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16, torch.float16]
    return [(name, dtype) for name in backends(device) for dtype in dtypes
            if not (name == "flash" and dtype == torch.float32)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("Hkv", [8, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("causal", [True, False])
def test_backends_match_eager(device, Hkv, causal):
    for name, dtype in cases(device):
        q, k, v = qkv(Hkv=Hkv, dtype=dtype, device=device)
        ref = eager_attention(q, k, v, causal=causal)
        out = get_attention(name)(q, k, v, causal=causal)
        tol = TOL.get(dtype, 2e-3)
        assert out.shape == q.shape and out.dtype == dtype
        assert (out.float() - ref.float()).abs().max().item() <= tol, (name, dtype)


@pytest.mark.parametrize("device", devices())
def test_causal_with_kv_offset_is_bottom_right_aligned(device):
    """With fewer queries than keys (decoding after a prefill), query i sits at key position Tk - Tq + i."""
    q, k, v = qkv(Tq=5, Tk=20, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    full_q = torch.cat([qkv(Tq=15, Tk=20, device=device, dtype=q.dtype, seed=3)[0], q], dim=1)  # (B, 20, H, D)
    expected = eager_attention(full_q, k, v, causal=True)[:, -5:]
    for name, dtype in cases(device):
        if dtype != q.dtype:
            continue
        out = get_attention(name)(q, k, v, causal=True)
        assert (out.float() - expected.float()).abs().max().item() <= TOL.get(dtype, 2e-3), name


@pytest.mark.parametrize("device", devices())
def test_document_mask_equals_each_document_alone(device):
    lengths = [[10, 25, 13], [48]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    docs = DocumentMask.from_position_ids(position_ids)
    assert docs.cu_seqlens.tolist() == [0, 10, 35, 48, 96] and docs.max_seqlen == 48
    for name, dtype in [("eager", torch.float32 if device == "cpu" else torch.bfloat16)] + cases(device):
        q, k, v = qkv(dtype=dtype, device=device)
        out = get_attention(name)(q, k, v, causal=True, docs=docs)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                sl = slice(start, start + n)
                alone = eager_attention(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], causal=True)
                assert (out[b:b + 1, sl].float() - alone.float()).abs().max().item() <= TOL.get(dtype, 2e-3)
                start += n


def test_document_mask_from_a_row_starting_mid_document():
    # A row whose first token continues a document from the previous window still starts a segment.
    pos = torch.tensor([[7, 8, 9, 0, 1, 0]])
    docs = DocumentMask.from_position_ids(pos)
    assert docs.doc_ids.tolist() == [[1, 1, 1, 2, 2, 3]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 6] and docs.max_seqlen == 3


def test_unknown_and_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        get_attention("fast")
    if flash_module() is None:
        with pytest.raises(AttentionUnavailable, match="needs the flash-attn package"):
            get_attention("flash")
    else:
        q, k, v = qkv()  # CPU fp32: flash-attn cannot run it
        with pytest.raises(AttentionUnavailable, match="CUDA tensors in fp16/bf16"):
            get_attention("flash")(q, k, v, causal=True)


def test_auto_uses_sdpa_off_cuda():
    q, k, v = qkv()
    assert torch.equal(get_attention("auto")(q, k, v, causal=True), get_attention("sdpa")(q, k, v, causal=True))
