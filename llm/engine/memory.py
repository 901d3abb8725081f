"""Memory that model states (weights, gradients, optimizer) need per GPU under each ZeRO stage.

Mixed-precision AdamW, as the ZeRO paper counts it (Rajbhandari et al., 2020): 2 bytes of bf16 weights, 2 of bf16
gradients and 12 of optimizer state (fp32 master weights, momentum and variance) per parameter, 16 in all. ZeRO-1
partitions the optimizer state over the N data-parallel GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights too.
ZeRO-3 also gathers a whole layer's weights (and reduces its gradients) at a time: we add 4 bytes per parameter of
the largest single module, as DeepSpeed's own estimator does. In pure fp32 training the split is 4 + 4 + 8.

Not included: activations (they depend on micro batch, sequence length and checkpointing), the CUDA context
(~0.5-1 GB), communication buckets and allocator fragmentation. DeepSpeed's `estimate_zero*_model_states_mem_needs`
also counts an fp32 gradient copy (18 bytes per parameter) and a 1.5x CPU buffer factor, so it reads higher.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # (weights, gradients, optimizer state) per parameter


@dataclass
class StageMemory:
    name: str
    gpu_bytes: float  # per GPU
    cpu_bytes: float = 0.0  # per GPU's share of host memory (offload only)


def model_state_memory(params: int, largest_layer: int, gpus: int, precision: str = "bf16") -> list[StageMemory]:
    if precision not in BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(BYTES)}")
    if gpus < 1:
        raise ValueError(f"gpus = {gpus}: must be at least 1")
    w, g, o = (b * params for b in BYTES[precision])
    gathered = 4 * largest_layer
    return [
        StageMemory("ZeRO-0", w + g + o),
        StageMemory("ZeRO-1", w + g + o / gpus),
        StageMemory("ZeRO-2", w + (g + o) / gpus),
        StageMemory("ZeRO-3", (w + g + o) / gpus + gathered),
        StageMemory("ZeRO-3 + CPU offload", gathered, (w + g + o) / gpus),
    ]
