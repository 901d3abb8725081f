"""EleutherAI's lm-evaluation-harness on our models: `OurLM` wraps a Decoder (no export), `Harness` runs tasks.

`OurLM` is an lm-eval `TemplateLM` whose tokenisation, context truncation and prefix token follow lm-eval's own
`HFLM` (transformers), so a checkpoint and its export score the same requests to float precision:
- loglikelihood: requests sorted by length (longest first), right-padded batches of `batch_size`; the causal mask
  keeps real positions off the padding; log-softmax in fp32.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens (perplexity of whole documents).
- generate_until: greedy decoding with our KV cache, stopped by the task's stop strings or EOS.

Distributed: with `distributed`, the rank and world size are torch.distributed's, and lm-eval deals each rank its
share of the requests and gathers the results on rank 0. With `lockstep` (ZeRO-3, where every forward is a
collective that gathers the parameters), every rank runs the same number of forwards: before each forward the
ranks agree whether any of them still has work, and a rank that is done runs a one-token forward until none has.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # the [eval] extra
    raise ImportError(f"evaluation needs lm-evaluation-harness: pip install 'llm[eval]' ({e})") from None

HUB_HINT = ("Data on a hub cannot be read from here: copy the task's YAML, set `dataset_path: json` (or csv, "
            "parquet) and `dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}` with files you downloaded "
            "elsewhere (e.g. `datasets.load_dataset(...).to_json(...)`), and pass the YAML's path to --tasks / "
            "train.eval_tasks")


class HubTaskError(RuntimeError):
    """A task whose data would come from the Hugging Face Hub, which this machine cannot reach."""


class OurLM(TemplateLM):
    """lm-eval's model interface over our Decoder (fp32 or bf16, on one device, partitioned or not)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, distributed: bool = False, lockstep: bool = False,
                 progress: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self._max_length = max_length or model.cfg.context
        self.max_gen_toks = max_gen_toks
        self._device = model.tok_embeddings.weight.device
        if distributed:
            import torch.distributed as dist

            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.lockstep = lockstep and self._world_size > 1

    # --- what lm-eval asks of a model ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # as HFLM: BOS where the tokenizer has one, else EOS
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos is not None and string.startswith(bos):
            add_special_tokens = False  # the text already starts with BOS (as HFLM)
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist

        flat = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # --- scoring ------------------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request of
        (key, context tokens, continuation tokens)."""
        return self._in_lockstep(self._score(requests))

    def _score(self, requests) -> Generator[None, None, list[tuple[float, bool]]]:
        # As HFLM: the last max_length + 1 tokens, the final one only a target.
        rows = [((ctx + cont)[-(self.max_length + 1):][:-1], len(cont), cont) for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), desc="scoring", unit="batch",
                          disable=not self.progress or len(order) <= self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = len(rows[chunk[0]][0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, i in enumerate(chunk):
                ids[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
            yield
            logits = self.model(ids.to(self._device))
            for b, i in enumerate(chunk):
                inp, n, cont = rows[i]
                logp = F.log_softmax(logits[b, len(inp) - n:len(inp)].float(), dim=-1)  # (n, V)
                target = torch.tensor(cont, device=logp.device)
                results[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: lm-eval's disjoint windows of max_length tokens, each scored in full."""
        flat, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for window in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                flat.append((None, *window))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._loglikelihood_tokens(flat), strict=True):
            totals[k] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._in_lockstep(self._generate(requests))

    def _generate(self, requests) -> Generator[None, None, list[str]]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
                raise ValueError("llm eval decodes greedily; the task asks for sampling (do_sample: true)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            if budget >= self.max_length:
                raise ValueError(f"the task generates up to {budget} tokens; the model's context is {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - budget):]
            cache = self.model.new_cache(1, len(prompt) + budget)
            yield
            logits = self.model(torch.tensor([prompt], device=self._device), cache=cache)[0, -1]
            tokens: list[int] = []
            while len(tokens) < budget:
                token = int(logits.argmax())
                if token == self.eot_token_id:
                    break
                tokens.append(token)
                text = self.tok_decode(tokens)
                if any(stop and stop in text for stop in until) or len(tokens) == budget:
                    break
                yield
                logits = self.model(torch.tensor([[token]], device=self._device), cache=cache)[0, -1]
            out.append(postprocess_generated_text(self.tok_decode(tokens), until, None))
        return out

    def _in_lockstep(self, work: Generator):
        """Run `work` (a generator that yields just before each forward) to its return value; in lockstep, keep
        every rank's forwards in step (see the module's docstring): each round, the ranks agree (all-reduce) whether
        any is still busy, then each runs one forward, its own or a one-token one, so the collectives inside the
        forwards (ZeRO-3's parameter gathers) and the agreement alternate in the same order on every rank."""
        result, done = None, False
        while True:
            if not done:
                try:
                    next(work)
                except StopIteration as stop:
                    result, done = stop.value, True
            if not self.lockstep:
                if done:
                    return result
                continue
            import torch.distributed as dist

            busy = torch.tensor([0 if done else 1], device=self._device)
            dist.all_reduce(busy)
            if busy.item() == 0:
                return result
            if done:  # the others still run forwards, which gather parameters collectively: join them
                self.model(torch.zeros(1, 1, dtype=torch.long, device=self._device))


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context, continuation) that predict every token of `tokens` once, the
    first from `prefix`."""
    from lm_eval import utils

    return [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1)]


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec


class Harness:
    """Tasks (lm-eval names or YAML paths) loaded once, scored on any LM; hub data refused with how to go local."""

    def __init__(self, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                 log_samples: bool = False, bootstrap_iters: int = 0):
        from lm_eval.tasks import TaskManager

        specs = []
        for spec in tasks:
            if is_task_file(spec):
                path = Path(spec)
                if not path.is_file():
                    raise FileNotFoundError(f"task file {spec} does not exist")
                spec = str(path.resolve())
            specs.append(spec)
        self.specs, self.limit, self.num_fewshot, self.log_samples = specs, limit, num_fewshot, log_samples
        self.bootstrap_iters = bootstrap_iters  # standard errors (closed-form for means; bootstrap for others)
        # Indexing lm-eval's own thousands of task files takes ~10 s: only when a task is named, not a file.
        named = any(not is_task_file(s) for s in specs)
        self.manager = TaskManager(include_defaults=named)
        for spec in specs:  # unknown names fail here, before any model time is spent
            if not is_task_file(spec) and spec not in self.manager.all_tasks:
                raise ValueError(f"unknown lm-eval task {spec!r} (a task, group or tag name, or a task YAML path)")

    def run(self, lm) -> dict | None:
        """lm-eval's results dict on rank 0 (None elsewhere)."""
        from lm_eval.evaluator import simple_evaluate

        try:
            return simple_evaluate(model=lm, tasks=list(self.specs), task_manager=self.manager, limit=self.limit,
                                   num_fewshot=self.num_fewshot, log_samples=self.log_samples,
                                   bootstrap_iters=self.bootstrap_iters,
                                   verbosity="WARNING")
        except ConnectionError as e:
            if "Hub" not in str(e):
                raise
            raise HubTaskError(f"{e}. {HUB_HINT}") from None

    def scores(self, lm) -> dict:
        """Flat metrics {"<task>/<metric>": value} on rank 0 ({} elsewhere), training's RNG state untouched."""
        import lm_eval.api.task as task_module

        bar = task_module.tqdm
        task_module.tqdm = partial(tqdm, disable=True)  # lm-eval's per-task bars, between the training log's lines
        try:
            with preserved_rng():
                results = self.run(lm)
        finally:
            task_module.tqdm = bar
        return flat_scores(results) if results is not None else {}


def flat_scores(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} of lm-eval's results (stderr entries and filters' ",none" suffixes dropped)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, comma, _ = key.partition(",")  # metrics are "<metric>,<filter>"; "alias", "sample_len" are not
            if comma and isinstance(value, (int, float)) and not name.endswith("_stderr"):
                flat[f"{task}/{name}"] = float(value)
    return flat


class preserved_rng:
    """Restore Python's, numpy's and torch's global random state afterwards (lm-eval seeds all three)."""

    def __enter__(self):
        import random

        import numpy as np

        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np

        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

