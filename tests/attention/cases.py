"""Shared inputs for the attention tests: devices (CUDA ones marked and skipped without a GPU), random q/k/v,
the batch kinds every backend must handle, and a comparison of outputs and gradients with the eager reference."""

import pytest
import torch

from llm.attention import DocumentMask, eager_attention
from llm.attention.flash import package_for
from llm.attention.varlen import varlen_problem

GPU = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]

# Max error allowed, relative to max(1, the reference's largest magnitude): outputs, then gradients.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 4e-2), torch.float16: (4e-3, 1e-2)}

DOC_LENGTHS = [[10, 25, 13], [48]]  # two rows of 48 tokens: three documents, then one
KEY_LENGTHS = [48, 30, 1]  # right padding, one row with a single real key


def runnable(device: str) -> list[str]:
    """The backends (besides eager) that can run on `device` here."""
    names = ["sdpa", "auto"]
    if device == "cuda":
        if varlen_problem(torch.device("cuda"), torch.bfloat16) is None:
            names.append("varlen")
        if package_for(torch.device("cuda")) is not None:
            names.append("flash")
    return names


def half(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def qkv(B=2, Tq=48, Tk=48, H=8, Hkv=2, D=64, dtype=torch.float32, device="cpu", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def make(T, heads):
        return torch.randn(B, T, heads, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    return make(Tq, H), make(Tk, Hkv), make(Tk, Hkv)


def documents(device: str) -> DocumentMask:
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOC_LENGTHS]).to(device)
    return DocumentMask.from_position_ids(position_ids)


def key_mask(T: int, device: str, lengths=KEY_LENGTHS) -> torch.Tensor:
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(device)  # (B, T), True at real keys


def batch(kind: str, device: str):
    """(B, Tq, Tk, attention kwargs, query rows that carry meaning (B, Tq) or None) for a kind of batch."""
    if kind == "causal":
        return 2, 48, 48, dict(causal=True), None
    if kind == "full":
        return 2, 48, 48, dict(causal=False), None
    if kind == "documents":
        return 2, 48, 48, dict(causal=True, docs=documents(device)), None
    if kind == "padded self-attention":  # the translation decoder with a target key mask: padding queries differ
        keys = key_mask(48, device)
        return 3, 48, 48, dict(causal=True, key_mask=keys), keys
    if kind == "padded cross-attention":  # queries of one length, padded keys of another
        return 3, 20, 48, dict(causal=False, key_mask=key_mask(48, device)), None
    raise ValueError(kind)


KINDS = ["causal", "full", "documents", "padded self-attention", "padded cross-attention"]


def check_against_eager(fn, kind: str, device: str, dtype: torch.dtype, Hkv: int, backward: bool = True):
    """`fn`'s output, and its q/k/v gradients, equal the fp32 eager reference's on the same (rounded) inputs."""
    B, Tq, Tk, kwargs, rows = batch(kind, device)
    q, k, v = qkv(B=B, Tq=Tq, Tk=Tk, Hkv=Hkv, dtype=dtype, device=device, grad=backward)
    ref_inputs = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    out, ref = fn(q, k, v, **kwargs), eager_attention(*ref_inputs, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    if rows is not None:
        weight = weight * rows[:, :, None, None]  # outputs at padding queries are not meaningful
    tol_out, tol_grad = TOL[dtype]
    assert_close(out.float() * (weight != 0), ref * (weight != 0), tol_out, "output")
    if backward:
        (out.float() * weight).sum().backward()
        (ref * weight).sum().backward()
        for name, t, r in zip("qkv", (q, k, v), ref_inputs, strict=True):
            assert_close(t.grad.float(), r.grad, tol_grad, f"d{name}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{what}: max error {err:.3g}"
