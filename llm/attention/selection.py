"""Which attention kernel runs: one decision from the device, the dtype, the installed packages and the batch.

`select(requested, device, dtype, document_masking=..., padding=...)` returns the backend with a short reason.
The models call it (through `Backend`) on every call, remembered per (device, dtype, masks), and the trainer
logs the same decision via `describe`. `auto` on CUDA in bf16/fp16:

1. a flash-attn package that supports the GPU (FA3, FA4, FA2; `flash.PACKAGES`): plain and masked batches alike;
2. otherwise PyTorch's own kernels: torch `varlen_attn` for document boundaries or padding, SDPA (its flash or
   cuDNN kernel, no mask tensor) for a plain batch; SDPA with a dense mask only where varlen_attn cannot run
   (compute capability below 8.0).

On CPU, or in float32, `auto` is SDPA (a dense mask where the batch needs one). Explicit names run exactly that
backend or fail at start-up with `AttentionUnavailable`: `flash` (a flash-attn package), `varlen` (torch
varlen_attn; a batch with no masks goes to SDPA's flash kernel, the same kernel), `sdpa`, `eager`. Where FA3 or
FA4 is installed and supports the GPU, `sdpa` and `varlen` have torch's flash kernel routed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import flash, sdpa, varlen
from .eager import eager_attention
from .masks import DocumentMask, KeyMask

NAMES = ("auto", "flash", "varlen", "sdpa", "eager")

AttentionFn = Callable[..., torch.Tensor]


class AttentionUnavailable(RuntimeError):
    """An attention backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class Selection:
    name: str  # the backend that runs: "flash", "varlen", "sdpa" or "eager"
    reason: str  # which kernel and why, for a log line
    fn: AttentionFn


def select(requested: str, device: torch.device | str, dtype: torch.dtype, *, document_masking: bool,
           padding: bool = False) -> Selection:
    """The backend for `model.attention = requested` on `device` in `dtype`, for batches with document boundaries
    (`document_masking`) or a key-padding mask (`padding`) or neither. Raises AttentionUnavailable (one line)
    when a backend asked for by name cannot run here. Selecting `sdpa` or `varlen` on a GPU that an installed
    FA3/FA4 supports routes torch's flash kernel to it, for the whole process (`sdpa.route_flash_path`)."""
    if requested not in NAMES:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(NAMES)}")
    device = torch.device(device)
    half = dtype in varlen.HALF
    masks = "document boundaries" if document_masking else "unpadded keys" if padding else None
    if requested == "eager":
        return Selection("eager", "eager fp32 reference (asked for by name)", eager_attention)
    if requested == "sdpa":
        return _sdpa(device, dtype, document_masking, padding, "asked for by name")
    if requested == "flash":
        problem = _flash_problem(device, dtype)
        if problem is not None:
            raise AttentionUnavailable(f"model.attention=flash cannot run here: {problem}; "
                                       "model.attention=auto picks the fastest backend that can")
        return _flash(flash.package_for(device), masks)
    if requested == "varlen":
        problem = varlen.varlen_problem(device, dtype)
        if problem is not None:
            raise AttentionUnavailable(f"model.attention=varlen cannot run here: {problem}; "
                                       "model.attention=auto picks the fastest backend that can")
        if masks is None:
            return _sdpa(device, dtype, False, False, "varlen asked for by name; a batch without masks has "
                                                      "nothing to unpad")
        return Selection("varlen", f"torch varlen_attn over {masks} (asked for by name){_routed(device)}",
                         varlen.varlen_attention)
    # auto
    if device.type != "cuda":
        return _sdpa(device, dtype, document_masking, padding, device.type.upper())
    if not half:
        return _sdpa(device, dtype, document_masking, padding, f"{_short(dtype)}: flash kernels need bf16/fp16")
    found = flash.package_for(device)
    if found is not None:
        return _flash(found, masks)
    why = flash.why_no_flash(device)
    if masks is None:
        return _sdpa(device, dtype, False, False, why)
    problem = varlen.varlen_problem(device, dtype)
    if problem is None:
        return Selection("varlen", f"torch varlen_attn over {masks} ({why})", varlen.varlen_attention)
    return _sdpa(device, dtype, document_masking, padding, f"{why}; {problem}")


def describe(requested: str, device: torch.device | str, dtype: torch.dtype, *, document_masking: bool,
             padding: bool = False) -> tuple[str, str]:
    """(name, reason) of the backend a training run gets, for its start line and metrics.

    With `padding` (translation: source padding in encoder self- and cross-attention), the decoder's causal
    self-attention has no mask and may run on another backend: both reasons are given, and both names
    ("varlen+sdpa") where they differ.
    """
    chosen = select(requested, device, dtype, document_masking=document_masking, padding=padding)
    if not padding:
        return chosen.name, chosen.reason
    plain = select(requested, device, dtype, document_masking=False, padding=False)
    name = chosen.name if plain.name == chosen.name else f"{chosen.name}+{plain.name}"
    return name, f"padded: {chosen.reason}; unpadded: {plain.reason}"


class Backend:
    """What a model calls: the backend `select` picks for each call's device, dtype and masks, remembered (one
    dictionary look-up per call after the first). Same signature as every backend function."""

    def __init__(self, name: str):
        self.name = name
        self._chosen: dict[tuple, Selection] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 docs: DocumentMask | None = None, scale: float | None = None,
                 key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor:
        key = (q.device, q.dtype, docs is not None, key_mask is not None)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = select(self.name, q.device, q.dtype, document_masking=key[2], padding=key[3])
            self._chosen[key] = chosen
        return chosen.fn(q, k, v, causal=causal, docs=docs, scale=scale, key_mask=key_mask)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def check_installed(name: str) -> None:
    """At model build: fail on an unknown name, or on one whose package is missing whatever the device."""
    if name not in NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "flash" and not flash.installed():
        raise AttentionUnavailable(f"model.attention=flash: {_NO_FLASH}, or use model.attention=auto")
    if name == "varlen" and varlen.torch_varlen() is None:
        raise AttentionUnavailable(f"model.attention=varlen needs torch.nn.attention.varlen, which torch "
                                   f"{torch.__version__} lacks; use model.attention=auto")


_NO_FLASH = ("no flash-attn package (flash_attn, flash_attn_interface or flash_attn.cute) is importable here; "
             "install one on a CUDA machine (pip install -e '.[flash]')")


def _flash_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    if not flash.installed():
        return _NO_FLASH
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only, not {device.type}"
    if dtype not in varlen.HALF:
        return f"flash-attn needs bf16/fp16, not {_short(dtype)}"
    if flash.package_for(device) is None:
        return flash.why_no_flash(device)
    return None


def _flash(found: flash.Installed, masks: str | None) -> Selection:
    return Selection("flash", found.describe() + (f" varlen over {masks}" if masks else ""), flash.flash_attention)


def _sdpa(device: torch.device, dtype: torch.dtype, docs: bool, padding: bool, why: str) -> Selection:
    # SDPA's flash and cuDNN kernels need half precision and compute capability 8.0; below, it has none to offer.
    fused = device.type == "cuda" and dtype in varlen.HALF and varlen.capability(device) >= (8, 0)
    if docs:
        kind = "dense block-diagonal mask"
    elif padding:
        kind = "key-padding mask"
    else:
        kind = "flash/cuDNN kernel, no mask tensor" if fused else "no mask tensor"
    routed = _routed(device) if fused and not (docs or padding) else ""
    return Selection("sdpa", f"sdpa {kind} ({why}){routed}", sdpa.sdpa_attention)


def _routed(device: torch.device) -> str:
    """Route torch's flash kernel to an installed FA3/FA4 that supports this GPU; say so (or why not)."""
    if torch.version.hip is not None:
        return ""
    cap = varlen.capability(device)
    for found in flash.installed():
        if found.package.label in ("FA3", "FA4") and found.package.supports(cap):
            problem = sdpa.route_flash_path(found.package.label)
            return f"; torch's flash kernel is {found.describe()}" if problem is None else f"; {problem}"
    return ""


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
