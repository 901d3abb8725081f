"""The varlen path on CPU: our batches turned into varlen calls (cu_seqlens, unpadding, zeroed padding queries),
run through a reference kernel that attends segment by segment with eager, forward and backward; and the calls into
the flash-attn packages, through stand-ins with each package's signature and return convention."""

import types

import pytest
import torch

from llm.attention import KeyMask, eager_attention, flash, varlen
from llm.attention.flash import Installed
from tests.attention.cases import KINDS, check_against_eager, qkv


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """The varlen contract, slowly: each segment alone (bottom-right causal), checking the metadata on the way."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    assert max_q == max(lens_q) and max_k == max(lens_k), "max_seqlen must be the longest segment"
    assert q.shape[0] == cu_q[-1] and k.shape[0] == v.shape[0] == cu_k[-1]
    outs = []
    for i in range(len(lens_q)):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        outs.append(eager_attention(q[None, sq], k[None, sk], v[None, sk], causal=causal, scale=scale)[0])
    return torch.cat(outs)  # (Nq, H, D)


def through_reference(q, k, v, *, causal, docs=None, key_mask=None):
    return varlen.attend_varlen(reference_kernel, q, k, v, causal=causal, docs=docs, scale=None, key_mask=key_mask)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith(("documents", "padded"))])
@pytest.mark.parametrize("Hkv", [8, 2])
def test_varlen_packing_matches_eager(kind, Hkv):
    check_against_eager(through_reference, kind, "cpu", torch.float32, Hkv)


def test_padding_queries_of_causal_self_attention_get_zero():
    q, k, v = qkv(B=2, Tq=6, Tk=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = varlen.attend_varlen(reference_kernel, q, k, v, causal=True, docs=None, scale=None, key_mask=mask)
    assert torch.equal(out[0, 4:], torch.zeros_like(out[0, 4:]))


def test_unpadding_is_computed_once_per_batch():
    keys = KeyMask(torch.tensor([[True, True, False], [True, False, False]]))
    first = keys.unpadded
    assert keys.unpadded is first  # cached: the next layers reuse it
    indices, cu, longest = first
    assert indices.tolist() == [0, 1, 3] and cu.tolist() == [0, 2, 3] and cu.dtype == torch.int32 and longest == 2
    assert KeyMask.of(keys) is keys and KeyMask.of_padding(keys) is keys
    assert KeyMask.of_padding(torch.tensor([[False, True]])).mask.tolist() == [[True, False]]


def test_varlen_rejects_both_masks_and_kv_offsets():
    q, k, v = qkv(B=2, Tq=4, Tk=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="as many queries as keys"):
        varlen.attend_varlen(reference_kernel, q, k, v, causal=True, docs=None, scale=None, key_mask=mask)
    with pytest.raises(ValueError, match="exactly one"):
        varlen.attend_varlen(reference_kernel, q, k, v, causal=True, docs=None, scale=None, key_mask=None)


# ---- the flash-attn packages' calling conventions ---------------------------------------------------------------


def _dense(q, k, v, softmax_scale, causal):
    return eager_attention(q, k, v, causal=causal, scale=softmax_scale)


def fa2_module():
    """flash_attn 2.x: positional cu_seqlens/max_seqlen, returns the output."""
    m = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        return _dense(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        return reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale)

    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


def fa3_module(old: bool):
    """flash_attn_interface (FA3): scale and causal after the tensors; early builds returned (out, lse)."""
    m = types.ModuleType("flash_attn_interface")
    wrap = (lambda out: (out, None)) if old else (lambda out: out)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        return wrap(_dense(q, k, v, softmax_scale, causal))

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):
        return wrap(reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale))

    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


def fa4_module(with_max_seqlen: bool):
    """flash_attn.cute (FA4): everything after q, k, v by keyword, `qv` first; returns (out, lse). Releases of 2025
    had no max_seqlen_* arguments."""
    m = types.ModuleType("flash_attn.cute")

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, return_lse=False):
        return _dense(q, k, v, softmax_scale, causal), None

    if with_max_seqlen:
        def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                   max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                                   softmax_scale=None, causal=False, window_size=(None, None), return_lse=False):
            return reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                    softmax_scale), None
    else:
        def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                                   page_table=None, softmax_scale=None, causal=False, window_size=(None, None)):
            lens_q, lens_k = cu_seqlens_q[1:] - cu_seqlens_q[:-1], cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            return reference_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, int(lens_q.max()), int(lens_k.max()),
                                    causal, softmax_scale), None

    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


PACKAGE = {p.label: p for p in flash.PACKAGES}
STAND_INS = {
    "FA2": lambda: Installed(PACKAGE["FA2"], fa2_module(), "2.8.3"),
    "FA3": lambda: Installed(PACKAGE["FA3"], fa3_module(old=False), "3.0.0"),
    "FA3 (early)": lambda: Installed(PACKAGE["FA3"], fa3_module(old=True), "3.0.0b1"),
    "FA4": lambda: Installed(PACKAGE["FA4"], fa4_module(with_max_seqlen=True), "4.0.0"),
    "FA4 (2025)": lambda: Installed(PACKAGE["FA4"], fa4_module(with_max_seqlen=False), "4.0.0.dev"),
}


@pytest.mark.parametrize("package", list(STAND_INS))
@pytest.mark.parametrize("kind", KINDS)
def test_flash_wrapper_calls_each_package_right(package, kind, monkeypatch):
    found = STAND_INS[package]()
    monkeypatch.setattr(flash, "package_for", lambda device: found)
    check_against_eager(flash.flash_attention, kind, "cpu", torch.float32, Hkv=2)


def test_flash_packages_are_found_by_their_functions(monkeypatch):
    import sys

    flash.installed.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # FA4 alone: a bare namespace
    fa3 = fa3_module(old=False)
    fa3.__version__ = "3.0.0b1"
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    try:
        found = flash.installed()
        assert [f.package.label for f in found] == ["FA3"] and found[0].version == "3.0.0b1"
        assert flash.flash_module() is fa3
    finally:
        flash.installed.cache_clear()


def test_translation_model_unpads_the_source_once_per_batch():
    """Encoder self-attention and decoder cross-attention read the same source keys: one KeyMask for all layers."""
    from llm.models.encoder_decoder import build_translation_model, translation_preset

    cfg = translation_preset("tiny", vocab_size=50, dropout=0.0, attention="sdpa", max_seq_len=32)
    model = build_translation_model(cfg, seed=0).eval()
    seen = []
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "cross_attn")):
            def record(q, k, v, *, _attend=module.attend, _name=name, **kwargs):
                seen.append((_name, kwargs["key_mask"]))
                return _attend(q, k, v, **kwargs)

            module.attend = record
    src, tgt = torch.randint(4, 50, (2, 7)), torch.randint(4, 50, (2, 5))
    src_pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    with torch.no_grad():
        model(src, src_pad, tgt)
    source_masks = [m for name, m in seen if not name.startswith("decoder_layers") or "cross" in name]
    assert len(source_masks) == cfg.n_encoder_layers + cfg.n_decoder_layers
    assert all(m is source_masks[0] for m in source_masks) and isinstance(source_masks[0], KeyMask)
    assert all(m is None for name, m in seen if name.endswith("decoder_layers.0.self_attn"))
