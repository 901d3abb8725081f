"""The chunked loss head: loss and gradients equal the unfused head's, no more than a chunk of logits at a time, and
both models return it from their output module (what ZeRO-3 needs)."""

import dataclasses
from importlib.util import find_spec

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm.models import build_model
from llm.models.encoder_decoder import build_translation_model, label_smoothed_loss, translation_preset
from llm.models.loss import OutputHead, chunk_tokens, linear_cross_entropy
from tests.conftest import devices

IGNORE = -100


def inputs(N=50, d=16, V=37, seed=0, device="cpu"):
    """Hidden states (2, N/2, d), a weight (V, d), labels (2, N/2) with some ignored, all leaves."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, N // 2, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.5
    y = torch.randint(0, V, (2, N // 2), generator=g)
    y[0, :3], y[1, -5:] = IGNORE, IGNORE
    return [t.to(device).requires_grad_(t.is_floating_point()) for t in (h, w, y)]


def unfused(h, w, y, eps, reduction):
    return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                           label_smoothing=eps, reduction=reduction)


def loss_and_grads(fn, h, w, *args):
    h.grad = w.grad = None
    loss = fn(h, w, *args)
    (loss * 0.7).backward()  # an upstream gradient other than 1, as the translation task's scale is
    return loss.detach(), h.grad.clone(), w.grad.clone()


def assert_close(got, ref, tol=1e-5):
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 50, 1000])  # several chunks with a short last one; exactly one; one larger
def test_loss_and_gradients_equal_the_unfused_head(device, eps, reduction, chunk):
    h, w, y = inputs(device=device)
    ref = loss_and_grads(unfused, h, w, y, eps, reduction)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, IGNORE, eps, reduction, chunk, impl="torch"), h, w, y)
    assert_close(got, ref)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_bias_on_the_logits_gets_the_unfused_heads_gradient(eps, reduction):
    """Marian's final_logits_bias: logits h @ W.T + b, the bias's gradient summed over tokens and chunks."""
    h, w, y = inputs()
    b = (torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1)) * 0.3).requires_grad_()
    grads = []
    for fn in (lambda: F.cross_entropy(F.linear(h, w, b).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                       label_smoothing=eps, reduction=reduction),
               lambda: linear_cross_entropy(h, w, y, IGNORE, eps, reduction, 7, impl="torch", bias=b)):
        h.grad = w.grad = b.grad = None
        loss = fn()
        (loss * 0.7).backward()
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert_close(grads[1], grads[0])


def test_bf16_weights_give_bf16_gradients_close_to_the_unfused_head():
    h, w, y = (t.detach().to(torch.bfloat16).requires_grad_() if t.is_floating_point() else t for t in inputs())
    ref = loss_and_grads(unfused, h, w, y, 0.1, "mean")
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, IGNORE, 0.1, "mean", 7, impl="torch"), h, w, y)
    assert got[0].dtype == torch.float32
    assert_close(got, ref, tol=2e-2)


def test_without_gradients_and_with_a_frozen_weight():
    h, w, y = inputs()
    ref = unfused(h, w, y, 0.1, "mean")
    with torch.no_grad():
        assert linear_cross_entropy(h, w, y, IGNORE, 0.1, chunk_size=7).item() == pytest.approx(ref.item(), rel=1e-6)
    w.requires_grad_(False)
    ref.backward()
    expected = h.grad.clone()
    h.grad = None
    linear_cross_entropy(h, w, y, IGNORE, 0.1, chunk_size=7).backward()
    assert (h.grad - expected).abs().max().item() <= 1e-6
    assert w.grad is None


def test_all_ignored_mean_is_zero_with_zero_gradients():
    h, w, y = inputs()
    loss = linear_cross_entropy(h, w, torch.full_like(y, IGNORE), chunk_size=7)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_a_second_backward_through_a_retained_graph_fails_instead_of_scaling_twice():
    h, w, y = inputs()
    loss = linear_cross_entropy(h, w, y, chunk_size=7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available() or find_spec("liger_kernel") is None,
                    reason="needs CUDA and liger_kernel")
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_kernel_equals_the_unfused_head(eps, reduction):
    h, w, y = inputs(N=512, d=64, V=1000, device="cuda")
    ref = loss_and_grads(unfused, h, w, y, eps, reduction)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, IGNORE, eps, reduction, impl="liger"), h, w, y)
    assert_close(got, ref, tol=1e-4)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_more_than_one_chunk_of_logits():
    N, d, V, chunk = 512, 8, 1000, 64  # the weight (V * d) is smaller than a chunk's logits (chunk * V)
    h, w, y = inputs(N, d, V)
    with LargestTensor() as seen:
        linear_cross_entropy(h, w, y, label_smoothing=0.1, chunk_size=chunk).backward()
    assert seen.largest == chunk * V  # not N * V
    with LargestTensor() as seen:
        unfused(h, w, y, 0.1, "mean").backward()
    assert seen.largest == N * V


def test_chunk_size_follows_the_byte_budget():
    assert chunk_tokens(128_256) == 512  # 256 MiB of fp32 logits at the Llama 3 vocabulary, whole tiles of 64
    assert chunk_tokens(97) >= 64 * 1000 and chunk_tokens(10**9) == 1


# ---- in the models ---------------------------------------------------------------------------------------------


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_decoder_returns_the_loss_of_its_logits(tiny_cfg, tied, eps):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_cfg, tie_embeddings=tied))
    assert isinstance(model.output, nn.Linear) and "output.weight" in model.state_dict()
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 2, 24)).unbind(0)
    y[0, :4] = IGNORE
    ref = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), label_smoothing=eps)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=y, label_smoothing=eps)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name, g in got.items():
        assert (g - ref_grads[name]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[name].abs().max().item()), name


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_encoder_decoder_returns_the_summed_label_smoothed_loss(share, eps):
    pad = 3
    cfg = translation_preset("tiny", vocab_size=50, dropout=0.0, attention="eager", max_seq_len=64,
                             share_embeddings=share)
    torch.manual_seed(0)
    model = build_translation_model(cfg)
    assert isinstance(model.output, OutputHead) and "output.weight" in model.state_dict()
    g = torch.Generator().manual_seed(1)
    src, tgt_in, labels = (torch.randint(4, 50, (3, 9), generator=g) for _ in range(3))
    src_pad = torch.arange(9)[None] >= torch.tensor([9, 5, 2])[:, None]
    labels = labels.masked_fill(torch.arange(9)[None] >= torch.tensor([3, 9, 6])[:, None], pad)
    src = src.masked_fill(src_pad, pad)
    ref = label_smoothed_loss(model(src, src_pad, tgt_in), labels, pad, eps, reduction="sum")
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    loss = model(src, src_pad, tgt_in, labels=labels, pad_id=pad, label_smoothing=eps)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    mean = model(src, src_pad, tgt_in, labels=labels, pad_id=pad, label_smoothing=eps, reduction="mean")
    assert mean.item() == pytest.approx(ref.item() / (labels != pad).sum().item(), rel=1e-6)
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name, grad in got.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[name].abs().max().item())
