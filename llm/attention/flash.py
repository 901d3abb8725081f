"""The flash-attn packages, imported lazily: FlashAttention-2, -3 and -4 (CUDA, fp16/bf16 only).

Three packages, one contract (`flash_attn_func` for a batch, `flash_attn_varlen_func` with `cu_seqlens`):

- FA2, `pip install flash-attn`: module `flash_attn`, compute capability 8.0 and newer (Ampere, Ada, Hopper, ...);
- FA3, built from the flash-attention repository's `hopper/`: module `flash_attn_interface`, Hopper (9.x);
- FA4, `pip install flash-attn-4`: module `flash_attn.cute`, Hopper and Blackwell (9.x, 10.x).

`PACKAGES` is in order of preference: the newest that supports the GPU wins. Packed documents and padding go
through the varlen function (`varlen.attend_varlen`), so no mask tensor is ever built.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass

import torch

from . import varlen
from .masks import DocumentMask, KeyMask
from .varlen import attend_varlen


@dataclass(frozen=True)
class FlashPackage:
    label: str  # "FA2", "FA3", "FA4"
    module_name: str
    distributions: tuple[str, ...]  # pip names, for the version
    majors: tuple[int, ...] | None  # compute capability majors it runs on; None: 8 and newer

    def supports(self, cap: tuple[int, int]) -> bool:
        return cap[0] >= 8 if self.majors is None else cap[0] in self.majors


PACKAGES = (
    FlashPackage("FA3", "flash_attn_interface", ("flash_attn_3", "flash-attn-3"), (9,)),
    FlashPackage("FA4", "flash_attn.cute", ("flash-attn-4",), (9, 10)),
    FlashPackage("FA2", "flash_attn", ("flash-attn", "flash_attn"), None),
)


@dataclass(frozen=True)
class Installed:
    package: FlashPackage
    module: object
    version: str

    def describe(self) -> str:
        return f"flash-attn {self.version} ({self.package.label})"


@functools.cache
def installed() -> tuple[Installed, ...]:
    """The flash-attn packages that import here and have both functions, in order of preference."""
    found = []
    for package in PACKAGES:
        try:
            module = importlib.import_module(package.module_name)
        except Exception:  # not installed, or an ABI/CUDA mismatch (OSError, RuntimeError), or a missing dependency
            continue
        # FA4 alone leaves `flash_attn` an empty namespace package: check for the functions, not the module.
        if hasattr(module, "flash_attn_func") and hasattr(module, "flash_attn_varlen_func"):
            found.append(Installed(package, module, _version(module, package.distributions)))
    return tuple(found)


def _version(module, distributions: tuple[str, ...]) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return str(getattr(module, "__version__", "?"))


def flash_module():
    """The preferred installed flash-attn module (any GPU), or None when none is installed."""
    found = installed()
    return found[0].module if found else None


def package_for(device: torch.device) -> Installed | None:
    """The preferred installed package that supports the GPU `device` is (None off CUDA or when none does)."""
    if device.type != "cuda":
        return None
    cap = varlen.capability(device)
    for found in installed():
        # ROCm builds of flash-attn are FA2; FA3/FA4 are NVIDIA-only whatever the capability numbers say.
        if found.package.supports(cap) and (torch.version.hip is None or found.package.label == "FA2"):
            return found
    return None


def why_no_flash(device: torch.device) -> str:
    """Why `package_for(device)` found nothing, in a few words for a log line."""
    found = installed()
    if not found:
        return "flash-attn not installed"
    major, minor = varlen.capability(device)
    names = ", ".join(f.package.label for f in found)
    return f"installed flash-attn ({names}) does not support compute capability {major}.{minor}"


# ---- calling a package ----------------------------------------------------------------------------------------


def _first(out):
    # FA4 returns (out, lse); FA3 did too before it grew `return_attn_probs`; FA2 returns the tensor.
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def _varlen_kernel(module):
    fn = module.flash_attn_varlen_func
    # FA4 releases before 2026 had no max_seqlen_* (they derive it themselves); everything else requires them.
    with_max = _takes(fn, "max_seqlen_q")

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        lengths = dict(max_seqlen_q=max_q, max_seqlen_k=max_k) if with_max else {}
        return _first(fn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **lengths, causal=causal,
                         softmax_scale=scale))

    return kernel


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    docs: DocumentMask | None = None, scale: float | None = None,
                    key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv -> (B, Tq, H, D). GQA is native.

    Runs on the package `package_for(q.device)`; `select` has checked that there is one and that q is half
    precision. `key_mask` (B, Tk) is False at padding keys (see `varlen.attend_varlen` for causal + key mask).
    """
    found = package_for(q.device)
    if found is None:
        raise RuntimeError(f"no installed flash-attn package runs on {q.device}")
    if docs is None and key_mask is None:
        # Causal masking in flash-attn is bottom-right aligned, as incremental decoding needs.
        return _first(found.module.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale))
    if docs is not None and key_mask is not None:
        raise ValueError("attention backend 'flash' takes document boundaries or a key mask, not both")
    return attend_varlen(_varlen_kernel(found.module), q, k, v, causal=causal, docs=docs, scale=scale,
                         key_mask=key_mask)
