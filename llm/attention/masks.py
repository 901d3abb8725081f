"""Document boundaries and key padding, each in the forms attention backends want, made once per batch.

Packing puts several documents into one training window. Tokens must not attend across a document boundary, so
the model is given position ids that restart at 0 at every document start. From those we derive, once per forward:

- `cu_seqlens`: cumulative document lengths over the flattened (B * T) tokens, for varlen kernels (flash-attn,
  torch's varlen_attn);
- `doc_ids`: a document number per token, from which backends without varlen build a block-diagonal causal mask.

Padding (the translation model's) is a `KeyMask`: True at real keys. Varlen kernels drop the padding keys first
("unpadding"), which needs their indices, per-row lengths and the longest row: a device sync, so `KeyMask` computes
them at most once and every layer of the forward reuses them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class DocumentMask:
    doc_ids: torch.Tensor  # (B, T) int64, increasing within a row; attention only where doc_ids match
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 over the flattened B * T tokens
    max_seqlen: int  # longest document, needed by varlen kernels
    # Dense masks already built, by (q_len, k_len, causal): every layer of a forward asks for the same one.
    _dense: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                          max_seqlen: int | None = None) -> DocumentMask:
        """Derive the mask from position ids that restart at 0 per document (a row start is always a boundary).

        A loader that already knows `cu_seqlens` and `max_seqlen` passes them to avoid a device sync here.
        """
        B, T = position_ids.shape
        starts = position_ids == 0  # (B, T)
        starts[:, 0] = True  # a row that begins mid-document still starts a new segment
        doc_ids = torch.cumsum(starts.long(), dim=1)  # (B, T), 1-based within each row
        if cu_seqlens is None:
            start_idx = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]  # flattened start offsets
            end = torch.tensor([B * T], device=position_ids.device)
            cu_seqlens = torch.cat([start_idx, end]).to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        return cls(doc_ids=doc_ids, cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=max_seqlen)

    def dense(self, q_len: int, k_len: int, causal: bool = True) -> torch.Tensor:
        """Block-diagonal (causal) boolean mask (B, 1, q_len, k_len); True where attention is allowed."""
        if not q_len == k_len == self.doc_ids.shape[1]:
            raise ValueError("document masks apply to whole sequences (no KV cache): "
                             f"q_len={q_len}, k_len={k_len}, tokens={self.doc_ids.shape[1]}")
        key = (q_len, k_len, causal)
        if key not in self._dense:
            mask = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
            if causal:
                mask = mask & causal_mask(q_len, k_len, self.doc_ids.device)
            self._dense[key] = mask[:, None]  # (B, 1, T, T)
        return self._dense[key]


@dataclass(eq=False)
class KeyMask:
    """Which keys are real (True) and which are padding (False), for a batch: (B, Tk) bool."""

    mask: torch.Tensor

    @classmethod
    def of(cls, key_mask: torch.Tensor | KeyMask | None) -> KeyMask | None:
        """A backend's `key_mask` argument as a KeyMask: a (B, Tk) tensor (True at real keys) is wrapped."""
        return key_mask if key_mask is None or isinstance(key_mask, KeyMask) else cls(key_mask.to(torch.bool))

    @classmethod
    def of_padding(cls, pad_mask: torch.Tensor | KeyMask | None) -> KeyMask | None:
        """From a pad mask (B, Tk) that is True at padding, as data loaders make them; a KeyMask passes through
        (a model's forward makes one per batch and hands it to every stack that reads the same keys)."""
        if pad_mask is None or isinstance(pad_mask, KeyMask):
            return pad_mask
        return cls(~pad_mask.to(torch.bool))

    @functools.cached_property
    def unpadded(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(indices of the real keys in the flattened B * Tk, cu_seqlens (B + 1,) int32, longest row).

        Computed on first use only (two host syncs), so backends that never unpad (SDPA, eager) pay nothing.
        """
        indices = self.mask.reshape(-1).nonzero(as_tuple=True)[0]  # (real keys,)
        lens = self.mask.sum(dim=1, dtype=torch.int32)  # (B,)
        cu_seqlens = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        return indices, cu_seqlens, int(lens.max())


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Causal mask aligned to the bottom right: query i sits at key position k_len - q_len + i.

    That is flash-attn's convention, and what incremental decoding with a KV cache needs (q_len < k_len).
    """
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)  # (q_len, k_len)


def dense_mask(q_len: int, k_len: int, device: torch.device, *, causal: bool, docs: DocumentMask | None = None,
               key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor | None:
    """The boolean mask (True where attention is allowed) for causal / document / key-padding masking, or None.

    Shapes: (q_len, k_len) for causal alone, (B, 1, q_len, k_len) with documents or a key mask. `key_mask` is
    (B, k_len), True for real keys and False for padding: padding is never attended to.
    """
    if docs is not None:
        mask = docs.dense(q_len, k_len, causal=causal)  # (B, 1, Tq, Tk)
    elif causal:
        mask = causal_mask(q_len, k_len, device)  # (Tq, Tk)
    else:
        mask = None
    if key_mask is not None:
        keys = KeyMask.of(key_mask).mask[:, None, None, :]  # (B, 1, 1, Tk)
        mask = keys if mask is None else mask & keys
    return mask
