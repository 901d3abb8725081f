"""Parameter initialisation as data, with values that do not depend on how the parameters are laid out.

A model describes its initialisation as one `InitRule` per parameter name: normal(0, std), uniform(-bound, bound),
ones or zeros (`Decoder.init_rules`). The values a rule gives a parameter are a function of (seed, parameter name)
alone: the flattened parameter is cut into `CHUNK`-element chunks, and chunk c is drawn from a generator of its own,
seeded by hashing (seed, name, c). Any slice [start, end) of a parameter can then be made by drawing only the chunks
it overlaps, bit-identical to the same slice of a whole-tensor fill. That is what lets a ZeRO-3 rank initialise its
partition alone and get exactly the weights a ZeRO-0 or ZeRO-2 build gets, on any number of processes (the engine
does the partition bookkeeping; this file knows nothing of DeepSpeed).

Chunks are drawn in a thread pool: torch releases the GIL in its kernels, and as every chunk has its own generator
the result does not depend on the number of threads, nor on the device the parameter lives on (values are drawn on
the CPU in fp32 and then copied, so a bf16 parameter gets the fp32 values rounded).

`no_init()` builds modules without initialising them: torch's own init of Linear, Embedding and LayerNorm
(single-threaded, and overwritten anyway) is skipped, and our models leave `init_weights` to the caller, who then
fills whole tensors (`init_parameters`) or partitions (`fill_slices`). `transformers`' `no_init_weights` does the
same for its models.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

CHUNK = 2**20  # elements drawn from one generator: 4 MB of fp32, small enough to share out among threads


@dataclass(frozen=True)
class InitRule:
    kind: Literal["normal", "uniform", "ones", "zeros"]
    scale: float = 0.0  # the std of "normal", the bound of "uniform"


def normal(std: float) -> InitRule:
    return InitRule("normal", std)


def uniform(bound: float) -> InitRule:
    return InitRule("uniform", bound)


ONES, ZEROS = InitRule("ones"), InitRule("zeros")


@dataclass
class Slice:
    """Fill `out` (1-D) with elements [start, start + out.numel()) of the flattened parameter `name` of `numel`."""

    name: str
    rule: InitRule
    numel: int
    start: int
    out: torch.Tensor


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A 63-bit generator seed for chunk `chunk` of parameter `name`; a hash, so neighbouring chunks are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_seed() -> int:
    """A seed taken from torch's global generator, for builds that are given none (reproducible after
    `torch.manual_seed`, different from one build to the next)."""
    return int(torch.randint(0, 2**62, ()).item())


def _draw_chunk(rule: InitRule, seed: int, name: str, chunk: int, n: int) -> torch.Tensor:
    """All `n` values of one chunk: always drawn whole, because torch's CPU normal sampler does not give the first k
    values of n draws when asked for k (it works in blocks), so a slice must come from the full chunk."""
    g = torch.Generator().manual_seed(chunk_seed(seed, name, chunk))
    values = torch.empty(n, dtype=torch.float32)
    if rule.kind == "normal":
        return values.normal_(0.0, rule.scale, generator=g)
    return values.uniform_(-rule.scale, rule.scale, generator=g)


def _fill_chunk(s: Slice, chunk: int, seed: int) -> None:
    c0, c1 = chunk * CHUNK, min((chunk + 1) * CHUNK, s.numel)  # this chunk's elements of the parameter
    a, b = max(c0, s.start), min(c1, s.start + s.out.numel())  # the part of it that the slice wants
    values = _draw_chunk(s.rule, seed, s.name, chunk, c1 - c0)
    s.out[a - s.start:b - s.start].copy_(values[a - c0:b - c0])


def fill_slices(slices: Iterable[Slice], seed: int, threads: int | None = None) -> None:
    """Fill every slice as its rule says; chunks in `threads` threads (default: torch's intra-op thread count)."""
    jobs = []
    for s in slices:
        end = s.start + s.out.numel()
        if s.out.dim() != 1 or not 0 <= s.start <= end <= s.numel:
            raise ValueError(f"{s.name}: slice [{s.start}, {end}) of a 1-D view is not within its {s.numel} elements")
        if s.out.numel() == 0:
            continue
        if s.rule.kind in ("ones", "zeros"):
            s.out.fill_(1.0 if s.rule.kind == "ones" else 0.0)
        elif s.rule.kind in ("normal", "uniform"):
            jobs += [(s, c) for c in range(s.start // CHUNK, math.ceil(end / CHUNK))]
        else:
            raise ValueError(f"{s.name}: unknown init rule {s.rule.kind!r}")
    threads = threads or torch.get_num_threads()
    if threads <= 1 or len(jobs) <= 1:
        for s, c in jobs:
            _fill_chunk(s, c, seed)
        return
    with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        for _ in pool.map(lambda job: _fill_chunk(job[0], job[1], seed), jobs):
            pass  # re-raises a worker's exception here


def check_rules(names: Iterable[str], rules: dict[str, InitRule]) -> None:
    """Every parameter has exactly one rule, and every rule a parameter."""
    names = list(names)
    missing, unused = [n for n in names if n not in rules], sorted(set(rules) - set(names))
    if missing or unused:
        raise ValueError(f"init rules do not match the parameters: no rule for {missing}, no parameter for {unused}")


@torch.no_grad()
def init_parameters(model: nn.Module, rules: dict[str, InitRule], seed: int | None = None,
                    threads: int | None = None) -> None:
    """Fill every parameter of `model` whole (meta tensors have no values and are left alone). Without a `seed`, one
    is drawn from torch's global generator (not for a model wholly on meta, which then leaves that generator alone)."""
    params = dict(model.named_parameters())  # a tied parameter once, under its first name
    check_rules(params, rules)
    slices = [Slice(name, rules[name], p.numel(), 0, p.data.view(-1)) for name, p in params.items() if not p.is_meta]
    if slices:
        fill_slices(slices, draw_seed() if seed is None else seed, threads)


# ---- building without initialising ---------------------------------------------------------------------------

_DEFERRED = 0  # depth of no_init() contexts
_SKIPPED = (nn.Linear, nn.Embedding, nn.LayerNorm)


def _no_reset(self) -> None:
    pass


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build modules with uninitialised parameters: skip torch's per-module init and our models' `init_weights`."""
    global _DEFERRED
    saved = {cls: cls.reset_parameters for cls in _SKIPPED}
    for cls in _SKIPPED:
        cls.reset_parameters = _no_reset
    _DEFERRED += 1
    try:
        yield
    finally:
        _DEFERRED -= 1
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def init_deferred() -> bool:
    """True inside `no_init()`: a model's constructor then leaves its parameters to the caller."""
    return _DEFERRED > 0


def construct(cls: type, cfg, device: str | torch.device | None = None, seed: int | None = None) -> nn.Module:
    """`cls(cfg)` on `device` (meta: nothing allocated), initialised from `seed` (without one, from a seed drawn from
    torch's global generator); inside `no_init()` left uninitialised for the caller."""
    with contextlib.nullcontext() if device is None else torch.device(device):
        if seed is None or init_deferred():
            return cls(cfg)
        with no_init():
            model = cls(cfg)
    model.init_weights(seed)
    return model


def sized(model: nn.Module) -> nn.Module:
    """A model whose tensors have their shapes: `model`, or, where its parameters are held elsewhere (ZeRO-3 leaves
    each rank empty local tensors), a meta-device twin built from the same config."""
    if all(p.numel() > 0 for p in model.parameters()):
        return model
    with torch.device("meta"), no_init():
        return type(model)(model.cfg)
