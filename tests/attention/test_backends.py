"""Every backend that runs here against the eager reference, forward and backward: plain causal and full
attention, packed documents, key padding (self- and cross-attention), MHA/GQA/MQA. CPU always; CUDA in bf16
where a GPU is present (those tests are marked `cuda`)."""

import pytest
import torch

from llm.attention import DocumentMask, eager_attention, get_attention, select
from tests.attention.cases import DEVICES, KINDS, TOL, assert_close, check_against_eager, half, qkv, runnable


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Hkv", [8, 2, 1])  # MHA, GQA, MQA
def test_backends_match_eager_forward_and_backward(device, kind, Hkv):
    for name in runnable(device):
        check_against_eager(get_attention(name), kind, device, half(device), Hkv)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_bf16_forward(kind):
    for name in runnable("cpu"):
        check_against_eager(get_attention(name), kind, "cpu", torch.bfloat16, Hkv=2, backward=False)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_with_kv_offset_is_bottom_right_aligned(device):
    """With fewer queries than keys (decoding after a prefill), query i sits at key position Tk - Tq + i."""
    dtype = half(device)
    q, k, v = qkv(Tq=5, Tk=20, device=device, dtype=dtype)
    full_q = torch.cat([qkv(Tq=15, Tk=20, device=device, dtype=dtype, seed=3)[0], q], dim=1)  # (B, 20, H, D)
    expected = eager_attention(full_q, k, v, causal=True)[:, -5:]
    for name in runnable(device):
        out = get_attention(name)(q, k, v, causal=True)
        assert_close(out.float(), expected.float(), TOL[dtype][0], name)


@pytest.mark.parametrize("device", DEVICES)
def test_document_mask_equals_each_document_alone(device):
    lengths = [[10, 25, 13], [48]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    docs = DocumentMask.from_position_ids(position_ids)
    assert docs.cu_seqlens.tolist() == [0, 10, 35, 48, 96] and docs.max_seqlen == 48
    dtype = half(device)
    q, k, v = qkv(dtype=dtype, device=device)
    for name in ["eager"] + runnable(device):
        out = get_attention(name)(q, k, v, causal=True, docs=docs)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                sl = slice(start, start + n)
                alone = eager_attention(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], causal=True)
                assert_close(out[b:b + 1, sl].float(), alone.float(), TOL[dtype][0], name)
                start += n


def test_document_mask_from_a_row_starting_mid_document():
    # A row whose first token continues a document from the previous window still starts a segment.
    pos = torch.tensor([[7, 8, 9, 0, 1, 0]])
    docs = DocumentMask.from_position_ids(pos)
    assert docs.doc_ids.tolist() == [[1, 1, 1, 2, 2, 3]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 6] and docs.max_seqlen == 3


def test_dense_document_mask_is_built_once_per_batch():
    docs = DocumentMask.from_position_ids(torch.tensor([[0, 1, 2, 0, 1]]))
    assert docs.dense(5, 5) is docs.dense(5, 5)  # every layer reuses the first layer's mask
    assert not torch.equal(docs.dense(5, 5, causal=False), docs.dense(5, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_each_call_runs_what_select_reports(device, monkeypatch):
    """The backend a model calls resolves `auto` by the same `select` the trainer logs, once per kind of call."""
    import llm.attention.selection as selection

    calls = []

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return select(*args, **kwargs)

    monkeypatch.setattr(selection, "select", counting)
    attend = get_attention("auto")
    dtype = half(device)
    q, k, v = qkv(dtype=dtype, device=device)
    docs = DocumentMask.from_position_ids(torch.tensor([[0] * 1 + list(range(1, 48))] * 2, device=device))
    for _ in range(3):
        attend(q, k, v, causal=True)
        attend(q, k, v, causal=True, docs=docs)
    assert len(calls) == 2  # one decision per (device, dtype, masks), remembered
    chosen = select("auto", q.device, dtype, document_masking=True)
    assert attend._chosen[(q.device, dtype, True, False)] == chosen
