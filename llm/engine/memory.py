"""Memory that model states (weights, gradients, optimizer) need per GPU under each ZeRO stage.

Mixed-precision AdamW, as the ZeRO paper counts it (Rajbhandari et al., 2020): 2 bytes of bf16 weights, 2 of bf16
gradients and 12 of optimizer state (fp32 master weights, momentum and variance) per parameter, 16 in all. ZeRO-1
partitions the optimizer state over the N data-parallel GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights too.
ZeRO-3 also gathers a whole layer's weights (and reduces its gradients) at a time: we add 4 bytes per parameter of
the largest single module, as DeepSpeed's own estimator does. In pure fp32 training the split is 4 + 4 + 8.

Not included here: activations (below: they depend on micro batch, sequence length, sequence parallelism and
checkpointing), the CUDA context (~0.5-1 GB), communication buckets and allocator fragmentation. DeepSpeed's
`estimate_zero*_model_states_mem_needs` also counts an fp32 gradient copy (18 bytes per parameter) and a 1.5x CPU
buffer factor, so it reads higher.

`build_host_memory` is the host memory a process needs to build the model, before DeepSpeed's `prepare`
(`llm.engine.build`). ZeRO-0/1/2 build the whole model in fp32 on every process: 4 bytes per parameter. ZeRO-3 builds
it partitioned (deepspeed.zero.Init): each process keeps 1/N of every parameter, in the training dtype, and holds one
whole parameter for a moment while it is being partitioned, so 4 (fp32) or 2 (bf16) bytes x (params / N + the largest
single parameter). On GPUs those ZeRO-3 partitions are made on the GPU and the host needs almost none of it, unless
parameters are offloaded (`offload_param`) or training runs on the CPU. Not counted: the ~0.3 GB of a process that has
imported torch, DeepSpeed and Accelerate, and what `prepare` allocates next (on the CPU, in fp32, under ZeRO-3: a
contiguous copy of the partitions, an fp32 master copy and a gradient buffer, ~12 more bytes x params / N, measured
in docs/BENCHMARKS.md).

Activations (`activation_memory`): the bytes autograd keeps for the backward of one micro-batch of a decoder, per
GPU. Under sequence parallelism of N a GPU holds the activations of its slice of each sequence, micro_batch x seq_len
/ N tokens (attention sees the whole sequence but 1/N of the heads: the same number of values). Per token and layer,
with p bytes per element of the training dtype (2 in bf16), d = d_model, dq and dkv the widths of all query and all
key/value heads, f the feed-forward hidden size:

    2 x (4 d + p d)        each RMSNorm: its input in fp32 and its normalised output
  + 2 x p d                the inputs of the q/k/v and gate/up projections
  + p (dq + 2 dkv)         the q/k/v projection's output (attention keeps its v); under sequence parallelism the
                           all-to-all's q, k, v instead
  + p (dq + dkv)           the rotated q and k, which attention keeps (none under sequence parallelism: the
                           all-to-all's are the ones above)
  + p dq + 4 heads         attention's output and log-sum-exp (flash kernels keep no score matrix)
  (+ p dq                  under sequence parallelism: the output projection's input, the all-to-all's output)
  + 4 p f                  SwiGLU: gate/up output (2f), silu(gate), the down projection's input
  (+ (4 + p)(dq + dkv)     with q/k norms)

and once per token the final norm and the output head's input (4 d + 2 p d); the chunked loss head keeps no logits.
With activation checkpointing each layer keeps only its input (p d per token) and one layer at a time is recomputed
with its full activations during the backward. Not counted: transient buffers (the all-to-alls', a loss chunk's
logits), allocator fragmentation, and what does not grow with the tokens. tests/engine/test_memory.py checks it per
token against the storages autograd saves (fp32 and bf16, on the CPU).
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


def build_host_memory(params: int, largest_param: int, processes: int, precision: str = "bf16") -> dict[str, float]:
    """Host bytes per process to build the model: {"ZeRO-0/1/2": whole fp32 model, "ZeRO-3": partitioned}."""
    if precision not in BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(BYTES)}")
    if processes < 1:
        raise ValueError(f"processes = {processes}: must be at least 1")
    weight = 2 if precision == "bf16" else 4  # zero.Init creates the parameters in the training dtype
    return {"ZeRO-0/1/2": 4.0 * params, "ZeRO-3": weight * (params / processes + largest_param)}


def activation_memory(model, seq_len: int, micro_batch: int = 1, sequence_parallel: int = 1,
                      precision: str = "bf16", checkpointing: bool = False) -> float:
    """Bytes per GPU that autograd keeps for the backward of one micro-batch of a decoder (`model`: its
    ModelConfig), as the module docstring counts them."""
    if precision not in BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(BYTES)}")
    p = BYTES[precision][0]  # bytes per element of the training dtype: the weights'
    d, dq, dkv, f = model.d_model, model.n_heads * model.head_dim, model.kv_heads * model.head_dim, model.ffn_hidden
    attention = p * (dq + 2 * dkv) + (p * dq if sequence_parallel > 1 else p * (dq + dkv)) + p * dq + 4 * model.n_heads
    layer = 2 * (4 * d + p * d) + 2 * p * d + attention + 4 * p * f
    if model.qk_norm:
        layer += (4 + p) * (dq + dkv)
    tokens = micro_batch * seq_len / sequence_parallel
    kept = p * d if checkpointing else layer  # per layer
    recomputed = layer if checkpointing else 0  # one layer's, during the backward
    return tokens * (model.n_layers * kept + recomputed + 4 * d + 2 * p * d)
