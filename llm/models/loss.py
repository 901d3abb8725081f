"""The loss head: the output projection and the cross-entropy in one op, a chunk of tokens at a time.

Why: at a Llama-3 vocabulary (128,256) and 8k tokens per micro-batch, full logits are 2.1 GB in bf16, their fp32
copy 4.2 GB, and cross-entropy saves as much again for the backward. Here the logits of one chunk of tokens exist
at a time, in fp32, and the forward pass computes the gradients too (the softmax is at hand then), so the backward
only scales them by the incoming gradient: what stays alive is a gradient the size of the hidden states, one the
size of the weight, and one chunk of logits. The matmul FLOPs are the unfused head's: one for the logits, two for
the gradients.

ZeRO-3 gathers a module's parameters only inside that module's forward and re-gathers them for the backward of
what was recorded there, so the loss has to run inside the output module's forward: `OutputHead` is the model's
`nn.Linear` output projection (same parameter name, tying unchanged) that returns logits without labels and the
loss with them.

Label smoothing is F.cross_entropy's: the target puts 1 - eps + eps / V on the label and eps / V on every other
class, so the loss is (1 - eps) * nll + eps * mean over classes of -log p. Labels equal to `ignore_index` add
nothing; "mean" divides by the number of the others.

On CUDA, Liger-Kernel's fused linear cross-entropy (Triton, the same definition) is used where it is installed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# The fp32 logits of one chunk stay under this. At vocab 128,256 that is 512 tokens on CPU: large enough that the
# matmuls run at full speed, small next to the weight's own gradient (docs/BENCHMARKS.md, "Loss head"). On a GPU,
# 4,096: there each chunk's read and write of the (V, d) fp32 weight gradient costs as much as ~1,500 tokens of
# matmul (bandwidth ~3 TB/s against ~1 PFLOP/s in bf16), so fewer, larger chunks.
CHUNK_BYTES = {"cpu": 256 * 2**20, "gpu": 2 * 2**30}

Reduction = Literal["mean", "sum"]


def chunk_tokens(vocab_size: int, budget: int = CHUNK_BYTES["cpu"]) -> int:
    """Tokens per chunk whose fp32 logits fit `budget`: a multiple of 64 (whole matmul tiles) where it can be."""
    n = budget // (4 * vocab_size)
    return max(1, n - n % 64 if n >= 64 else n)


def _chunked(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             ignore_index: int, eps: float, reduction: Reduction, chunk: int, grad_h: bool, grad_w: bool,
             grad_b: bool = False):
    """h (N, d), weight (V, d), bias (V,) or None, labels (N,) -> loss (fp32 scalar), d loss / d h (N, d) in h's
    dtype or None, d loss / d weight (V, d) in fp32 or None, d loss / d bias (V,) in fp32 or None."""
    valid = labels != ignore_index  # (N,)
    # Each token's weight in the reduction; a tensor, so that "mean" needs no device-to-host sync.
    scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=h.device)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if grad_h else None  # contiguous: mm writes rows
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if grad_b else None
    for start in range(0, len(h), chunk):
        rows = slice(start, start + chunk)
        w = valid[rows].float() * scale  # (n,) weights in the reduction, 0 where ignored
        loss += _chunk(h[rows], weight, bias, labels[rows].masked_fill(~valid[rows], 0), w, eps,
                       None if dh is None else dh[rows], dw, db)
    return loss, dh, dw, db


def _chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, w: torch.Tensor,
           eps: float, dh: torch.Tensor | None, dw: torch.Tensor | None, db: torch.Tensor | None) -> torch.Tensor:
    """One chunk (n tokens): return its weighted loss, write d loss / d h into `dh` (n, d), add d loss / d weight
    to `dw` (V, d) and d loss / d bias to `db` (V,). A function of its own so that its (n, V) buffer is freed before
    the next chunk's is made."""
    V = weight.shape[0]
    z = F.linear(h, weight, bias).float()  # (n, V) fp32 logits: the one large buffer, updated in place below
    target_logit = z.gather(1, labels[:, None]).squeeze(1)  # (n,)
    mean_logit = z.mean(dim=1) if eps else None  # (n,)
    peak = z.amax(dim=1)  # (n,)
    p = z.sub_(peak[:, None]).exp_()  # unnormalised softmax; z is gone from here on
    total = p.sum(dim=1)  # (n,)
    lse = peak + total.log()  # (n,) logsumexp
    row = lse - target_logit  # (n,) -log p(label)
    if eps:
        row = (1.0 - eps) * row + eps * (lse - mean_logit)  # -mean_j log p_j = lse - mean_j z_j
    if dh is None and dw is None and db is None:
        return (row * w).sum()
    # d (row * w) / d z = w * (softmax - (1 - eps) * onehot(label) - eps / V); normalised and weighted in one pass.
    g = p.mul_((w / total)[:, None])  # (n, V) becomes d loss / d logits
    if eps:
        g.sub_((w * (eps / V))[:, None])
    g.scatter_add_(1, labels[:, None], (w * (eps - 1.0))[:, None])
    g_w = g.to(weight.dtype)  # the matmuls run in the weight's dtype (as the unfused head's backward does)
    if dh is not None:
        torch.mm(g_w, weight, out=dh)  # (n, d)
    if dw is not None:
        if weight.dtype == torch.float32:
            dw.addmm_(g.t(), h)  # (V, d), accumulated in place
        else:  # the sum over chunks in fp32
            dw.add_(torch.mm(g_w.t(), h))
    if db is not None:
        db.add_(g.sum(dim=0))
    return (row * w).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss of `_chunked`; its gradients are made in the forward and only scaled in the backward. Nothing of the
    weight is saved: the backward does not need it."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, eps, reduction, chunk):
        loss, dh, dw, db = _chunked(h, weight, bias, labels, ignore_index, eps, reduction, chunk,
                                    *ctx.needs_input_grad[:3])
        ctx.save_for_backward(dh, dw, db)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: the buffers are this graph's own. (A second backward through a retained graph finds them
        # modified and fails loudly rather than returning scaled-twice gradients.)
        dh, dw, db = ctx.saved_tensors
        if dh is not None:
            dh = dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_loss).to(ctx.weight_dtype)
        if db is not None:
            db = db.mul_(grad_loss).to(ctx.weight_dtype)
        return dh, dw, db, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: Reduction = "mean", chunk_size: int | None = None,
                         impl: Literal["auto", "torch", "liger"] = "auto", bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Cross-entropy of the logits `h @ weight.T (+ bias)` against `labels`, without materialising them whole.

    h (..., d), weight (V, d), labels (...) -> fp32 scalar. Equals F.cross_entropy(F.linear(h, weight, bias).float(),
    labels, ignore_index=..., label_smoothing=..., reduction=...), its gradients included, except that a "mean"
    over no tokens is 0, not NaN. `chunk_size` tokens at a time (default: by `CHUNK_BYTES`). `impl="auto"` takes
    Liger-Kernel on CUDA where it is installed, this module's chunked PyTorch otherwise.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    h2, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)  # (N, d), (N,)
    if impl == "liger" or (impl == "auto" and h.is_cuda and _liger_installed()):
        return _liger(h2, weight, bias, labels, ignore_index, label_smoothing, reduction)
    chunk = chunk_size or chunk_tokens(weight.shape[0], CHUNK_BYTES["cpu" if h.device.type == "cpu" else "gpu"])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or (bias is not None and
                                                                               bias.requires_grad)):
        return _LinearCrossEntropy.apply(h2, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk)
    return _chunked(h2, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk, False, False)[0]


def _liger_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("liger_kernel") is not None


def _liger(h, weight, bias, labels, ignore_index, label_smoothing, reduction) -> torch.Tensor:
    # The module form: its constructor's keywords and forward(weight, input, target) -> loss have been the same
    # since Liger added label smoothing; the functional form's return type has changed across releases.
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                               reduction=reduction)
    return loss_fn(weight, h.contiguous(), labels.contiguous(), bias).float()


class OutputHead(nn.Linear):
    """The output projection (d_model -> vocab, a bias only where a model has one: Marian's). forward(x) -> logits
    (..., V); forward(x, labels, ...) -> the loss of `linear_cross_entropy`, computed here so that ZeRO-3 has the
    weight gathered (module docstring).
    """

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False):
        super().__init__(d_model, vocab_size, bias=bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100,
                label_smoothing: float = 0.0, reduction: Reduction = "mean") -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, ignore_index, label_smoothing, reduction,
                                    bias=self.bias)
