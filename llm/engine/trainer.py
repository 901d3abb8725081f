"""The training loop: `llm train CONFIG` under `accelerate launch` (any number of processes and machines) or alone.

One optimizer step = `grad_accum` micro-batches per process. DeepSpeed reduces gradients at the accumulation
boundary; before the optimizer step, one small all-gather tells every rank each rank's loss and whether a stop
signal arrived, so that a non-finite loss anywhere stops the run before the weights change, and every rank saves
the same step when one of them is signalled. What differs between language modelling and translation (model,
batches, loss, evaluation) is in `llm.engine.tasks`.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm.attention import describe
from llm.checkpoint import Checkpointer, CheckpointError
from llm.config import RunConfig, save_config
from llm.engine.build import build_for_training
from llm.engine.distributed import (
    is_collective_timeout,
    make_accelerator,
    print0,
    sequence_parallel_group,
    write_deepspeed_config,
)
from llm.engine.metrics import Metrics, device_peak_tflops
from llm.engine.optim import build_optimizer, lr_factor, set_lr
from llm.engine.signals import PREEMPTED_EXIT_CODE, StopFlag, clear_preempted_marker, write_preempted_marker
from llm.engine.tasks import make_task


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them. Parameter names are kept
    (no wrapper module), so checkpoints and exports do not depend on this setting."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kw: checkpoint(_forward, *args, use_reentrant=False, **kw)


def _grad_norm(engine) -> float | None:
    """Global gradient norm of this step. DeepSpeed reports it, except for ZeRO-0 in fp32 where it clips
    without keeping the norm: then the (already all-reduced) gradients are measured before the step."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item() if grads else None
    return None


@dataclass
class Run:
    """Everything a training loop needs, set up: the engine (resumed, when the output folder has a checkpoint)."""

    cfg: RunConfig
    accelerator: Any
    precision: str
    task: Any
    train_loader: Any
    val_loader: Any
    engine: Any
    optimizer: Any
    checkpointer: Checkpointer
    flops_per_token: float
    step: int = 0
    tokens: int = 0
    attention: tuple[str, str] = ("", "")  # the attention backend and why it was chosen


def start(cfg: RunConfig, accelerator, precision: str) -> Run:
    """Build data, model, optimizer and engine, and resume from the output folder's latest checkpoint."""
    rank, world = accelerator.process_index, accelerator.num_processes
    out = cfg.train.output_dir
    seed_everything(cfg.train.seed)
    # First: an attention backend that cannot run here fails before data and model are built.
    lm, dtype = cfg.task == "lm", torch.bfloat16 if precision == "bf16" else torch.float32
    attention = describe(cfg.model.attention, accelerator.device, dtype,
                         document_masking=lm and cfg.data.document_masking, padding=not lm)
    checkpointer = Checkpointer(out, accelerator, cfg.train.keep_last)
    checkpointer.remove_unfinished()
    # Before the engine exists: a checkpoint from another world size (or ZeRO stage) loads as a universal
    # checkpoint, which DeepSpeed must be told when it builds the engine; a config that cannot resume fails here.
    resume = checkpointer.plan_resume(cfg)
    if resume is not None and resume.universal:
        accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True

    # Sequence parallelism: each group of `sp` consecutive ranks trains on the same samples, a slice each.
    sp = cfg.train.sequence_parallel
    sp_group = sequence_parallel_group(sp)
    task = make_task(cfg)
    train_loader, val_loader = task.loaders(rank // sp, world // sp)  # first: bad data fails before the model
    model = build_for_training(task, cfg, accelerator)  # partitioned under ZeRO-3, same weights on any world size
    if sp_group is not None:
        from llm.engine.sequence import SequenceParallel

        sequence = SequenceParallel(sp_group)
        sequence.apply(model)
        task.use_sequence_parallel(sequence)
    flops_per_token, flops_at = task.flops_per_token(model)
    n_params = model.num_params()
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    optimizer = build_optimizer(model, cfg.optim, offload=cfg.train.offload)
    if resume is not None and resume.universal:
        print0(f"resuming {resume.path.name} on a different number of processes or ZeRO stage: converting it to a "
               f"universal checkpoint (once; kept in {resume.path / 'universal'})")
        checkpointer.prepare_universal(resume)  # rank 0 converts; the others wait on the file system
    engine, optimizer = accelerator.prepare(model, optimizer)
    run = Run(cfg, accelerator, precision, task, train_loader, val_loader, engine, optimizer, checkpointer,
              flops_per_token, attention=attention)
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        write_deepspeed_config(accelerator, os.path.join(out, "deepspeed_config.json"))
        clear_preempted_marker(out)
    if resume is not None:
        state = checkpointer.load(resume, engine)
        run.step, run.tokens = state["step"], state["tokens"]
        train_loader.load_state_dict(state["loader"])
        print0(f"resumed from {resume.path} at step {run.step}{resume.describe(world, cfg.train.zero_stage)}")
        saved_batch, batch = state.get("global_batch"), getattr(train_loader, "global_batch_size", None)
        if saved_batch is not None and saved_batch != batch:
            print0(f"note: the global batch changes from {saved_batch} to {batch} sequences per micro-step "
                   f"(train.micro_batch_size x processes)")
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(out, "config.yaml"))
    print0(f"model: {n_params:,} parameters, {flops_per_token:.3e} training FLOPs/token {flops_at}")
    print0(f"attention: {attention[0]} ({attention[1]})")
    return run


def train(cfg: RunConfig, config_path: str = "") -> int:
    accelerator, precision = make_accelerator(cfg.train, cfg.optim.grad_clip)
    try:
        print0(f"llm train: {accelerator.num_processes} process(es), ZeRO-{cfg.train.zero_stage}, {precision}, "
               f"device {accelerator.device}, task {cfg.task}, output {cfg.train.output_dir}")
        return _loop(start(cfg, accelerator, precision), config_path)
    finally:
        # Take the process group down before the interpreter exits: left to interpreter teardown, gloo's threads
        # can abort a worker ("terminate called without an active exception") after all its work is done.
        accelerator.end_training()


def _loop(run: Run, config_path: str) -> int:
    cfg, accelerator, engine, optimizer, task = run.cfg, run.accelerator, run.engine, run.optimizer, run.task
    world, out, step, tokens = accelerator.num_processes, cfg.train.output_dir, run.step, run.tokens
    metrics = Metrics(out, cfg.train.steps, step, run.flops_per_token,
                      device_peak_tflops(run.precision, cfg.train.peak_tflops), world)
    metrics.reset_clock(tokens)
    metrics.log_info(step, {"attention": run.attention[0], "attention_reason": run.attention[1]})
    stop = StopFlag().install()
    batches = iter(run.train_loader)

    def trainer_state() -> dict:
        return {"tokens": tokens, "loader": run.train_loader.state_dict(), "world_size": world,
                "global_batch": getattr(run.train_loader, "global_batch_size", None), "config_path": config_path}

    def save(at_step: int) -> None:
        path = run.checkpointer.save(at_step, engine, trainer_state(), cfg)
        print0(f"saved checkpoint {path}")

    try:
        while step < cfg.train.steps:
            lr = cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.optim)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=accelerator.device)
            micro_batches, step_tokens = task.next_step(batches, accelerator)
            for micro, batch in enumerate(micro_batches):
                loss = task.loss(engine, batch, accelerator.device, step_tokens)
                engine.backward(loss)
                if micro < cfg.train.grad_accum - 1:
                    engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                loss_sum += loss.detach()
            # One collective per step: every rank's mean loss and stop flag.
            local = torch.stack([loss_sum / cfg.train.grad_accum,
                                 torch.tensor(float(stop.set), device=accelerator.device)])
            gathered = accelerator.gather(local[None]).view(world, 2)  # (world, [loss, stop])
            bad = [r for r in range(world) if not math.isfinite(gathered[r, 0].item())]
            if bad:
                raise NonFiniteLoss(f"step {step + 1}: non-finite loss on rank(s) {bad} "
                                    f"(losses {gathered[:, 0].tolist()}); stopped before the optimizer step")
            norm = _grad_norm(engine)
            engine.step()  # the boundary: clip, optimizer step
            step += 1
            tokens += step_tokens
            metrics.advance()

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                if norm is None:
                    ds_norm = engine.get_global_grad_norm()
                    norm = float(ds_norm) if ds_norm is not None else float("nan")
                metrics.log(step, tokens, {"loss": gathered[:, 0].mean().item(), "grad_norm": norm, "lr": lr})
            if run.val_loader is not None and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                metrics.log_eval(step, task.evaluate(engine, run.val_loader, accelerator))
                metrics.reset_clock(tokens)  # keep evaluation time out of tokens/s
            signalled = gathered[:, 1].sum().item() > 0
            last = step == cfg.train.steps and cfg.train.save_at_end
            if signalled or (cfg.train.save_every and step % cfg.train.save_every == 0) or last:
                save(step)
                metrics.reset_clock(tokens)
            if signalled:
                if accelerator.is_main_process:
                    write_preempted_marker(out, step)
                print0(f"stop signal received: checkpoint saved at step {step}; exiting with code "
                       f"{PREEMPTED_EXIT_CODE} so that the job can be requeued")
                metrics.close()
                accelerator.wait_for_everyone()  # exit together: a launcher stops the others at the first exit
                return PREEMPTED_EXIT_CODE
    finally:
        stop.restore()
        metrics.close()
    print0(f"done: {step} steps; checkpoint {run.checkpointer.latest()}")
    return 0


def main(cfg: RunConfig, config_path: str) -> int:
    try:
        return train(cfg, config_path)
    except NonFiniteLoss as e:
        print(f"llm train: {e}", file=sys.stderr, flush=True)
        return 3
    except CheckpointError as e:
        print(f"llm train: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        if not is_collective_timeout(e):
            raise
        print(f"llm train: a collective operation timed out after train.collective_timeout_s = "
              f"{cfg.train.collective_timeout_s:g} s: another rank stopped answering (hung, stopped or dead); "
              f"exiting. ({str(e).splitlines()[0][:300]})", file=sys.stderr, flush=True)
        return 1
