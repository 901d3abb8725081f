"""Complete, atomic training checkpoints.

Layout of `OUTPUT_DIR/checkpoints/`:

    step-00000100/            one complete checkpoint
      deepspeed/              DeepSpeed's own files: model and optimizer state, sharded per rank
      rng/rank-00000.pt       each rank's RNG states (tensors and plain numbers only: loads with weights_only)
      trainer_state.json      step (the LR schedule is a function of it), tokens seen, loader state, world size
      config.yaml             the resolved run config
      universal/              written on first resume on another number of processes (see universal.py)
    latest                    the name of the newest complete checkpoint
    .tmp-step-00000200/       a save in progress; never read, removed at the next start
    .old-step-00000200/       the previous copy of a step being saved again; restored if the new one never landed

Every rank writes its shards into the temporary folder and fsyncs the files it wrote (on a cluster they sit in that
node's cache until then); after a barrier, rank 0 fsyncs the folder's own files, renames the folder into place and
only then rewrites `latest` (itself via a temporary file and a rename). A process killed at any moment therefore
leaves either the previous checkpoint or the new one, never a half-written one that could be resumed. Saving a step
that exists (a signal right after a periodic save) moves the old copy aside first and deletes it only once the new
one is in place. Old checkpoints beyond `keep_last` are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from llm.checkpoint import universal
from llm.checkpoint.safety import vet_deepspeed_folder
from llm.config import RunConfig, save_config, to_dict

STEP_RE = re.compile(r"^step-(\d{8})$")
RANK_FILE_RE = re.compile(r"(?:zero_pp_rank_|rank-)0*(\d+)[_.]")  # DeepSpeed's and our per-rank file names
# Settings a resumed run may not change: they define the model and the data order.
FROZEN = {"model": None, "train": ("seed",)}
FROZEN_DATA = {"lm": ("datasets", "seq_len", "seed", "document_masking"),
               "translation": ("path", "max_tokens", "max_sentences", "seed")}


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, keep=lambda name: True) -> None:
    """fsync the files under `root` whose name `keep` accepts, and every folder."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            if keep(name):
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(dirpath)


def written_by(name: str, rank: int) -> bool:
    """Whether `rank` wrote checkpoint file `name`: per-rank files name their rank; rank 0 writes the others."""
    m = RANK_FILE_RE.search(name)
    return int(m.group(1)) == rank if m else rank == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    """Every RNG a step may draw from, as tensors and plain numbers (so it loads with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def frozen_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """Settings the resumed run changes but may not: `section.key: checkpoint has X, config has Y`."""
    now = to_dict(cfg)
    if saved.get("task", "lm") != cfg.task:
        return [f"task: checkpoint has {saved.get('task', 'lm')!r}, config has {cfg.task!r}"]
    diffs = []
    for section, keys in {**FROZEN, "data": FROZEN_DATA[cfg.task]}.items():
        for key in keys or now[section]:
            if section == "model" and key == "attention":
                continue  # the backend does not change the weights
            before, after = saved.get(section, {}).get(key), now[section][key]
            if before != after:
                diffs.append(f"{section}.{key}: checkpoint has {before!r}, config has {after!r}")
    return diffs


class Checkpointer:
    def __init__(self, output_dir: str | Path, accelerator, keep_last: int):
        self.dir = Path(output_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.rank = accelerator.process_index

    # ---- discovery -------------------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder named step-N with its trainer state)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if STEP_RE.match(p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; if that file is missing or stale, the newest complete one."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / "trainer_state.json").is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def remove_unfinished(self) -> None:
        """Rank 0, at start: folders of saves (and conversions) that were interrupted are garbage; the old copy of a
        step whose re-save was interrupted between its two renames is put back."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)
            for old in self.dir.glob(".old-step-*"):
                final = self.dir / old.name.removeprefix(".old-")
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(old, final)
            for step in self.complete():
                shutil.rmtree(step / f".tmp-{universal.UNIVERSAL}", ignore_errors=True)
                (step / universal.FAILED).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def plan_resume(self, cfg: RunConfig) -> universal.Resume | None:
        """Which checkpoint this run resumes from and how (None: a fresh start). Raises CheckpointError when the
        config changes what a resumed run must keep, or the checkpoint cannot be loaded on this world size."""
        import yaml

        path = self.latest()
        if path is None:
            return None
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
        diffs = frozen_differences(saved_cfg, cfg)
        if diffs:
            raise CheckpointError(f"cannot resume from {path}: the config changes what a resumed run must keep: "
                                  + "; ".join(diffs) + ". Use a new train.output_dir to start a new run.")
        state = json.loads((path / "trainer_state.json").read_text())
        saved_world, saved_stage = int(state["world_size"]), int(saved_cfg["train"]["zero_stage"])
        saved_sp = int(saved_cfg["train"].get("sequence_parallel", 1))
        sp, world = cfg.train.sequence_parallel, self.accelerator.num_processes
        if saved_sp != sp or (sp > 1 and saved_world != world):
            raise CheckpointError(f"cannot resume from {path}: it was saved with train.sequence_parallel = {saved_sp} "
                                  f"on {saved_world} process(es), now {sp} on {world}; a run resumes with the same "
                                  "sequence_parallel, and under sequence parallelism on the same number of processes")
        try:
            return universal.plan(path, saved_world, saved_stage, self.accelerator.num_processes,
                                  cfg.train.zero_stage)
        except universal.ResumeError as e:
            raise CheckpointError(str(e)) from None

    def prepare_universal(self, resume: universal.Resume) -> None:
        """Make sure `resume.path` has its universal checkpoint: rank 0 converts, the others wait on the files."""
        try:
            if self.rank == 0:
                universal.convert(resume.path)
            else:
                universal.wait_for(resume.path)
        except universal.ResumeError as e:
            raise CheckpointError(str(e)) from None

    # ---- save ------------------------------------------------------------------------------------------------

    def save(self, step: int, engine, trainer_state: dict, cfg: RunConfig) -> Path:
        """Collective: every rank calls it at the same step."""
        name = f"step-{step:08d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        # Each rank flushes what it wrote: rank 0's fsync reaches only its own node's cache.
        fsync_tree(tmp, keep=lambda n: written_by(n, self.rank))
        self.accelerator.wait_for_everyone()
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state | {"step": step}, indent=2))
            save_config(cfg, tmp / "config.yaml")
            _fault_point(f"before_rename:{name}")
            fsync_tree(tmp, keep=lambda n: n in ("trainer_state.json", "config.yaml"))
            old = self.dir / f".old-{name}"
            if final.exists():  # re-saving a step (e.g. a signal right after a periodic save): keep it until the
                os.replace(final, old)  # new copy is in place
                _fault_point(f"resave_between_renames:{name}")
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            _write_atomic(self.dir / "latest", name)
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    # ---- load ------------------------------------------------------------------------------------------------

    def load(self, resume: universal.Resume, engine) -> dict:
        """Restore model, optimizer and RNG from a planned resume (see `plan_resume`); return the trainer state."""
        path = resume.path
        tag = universal.UNIVERSAL if resume.universal else "deepspeed"
        vet_deepspeed_folder(path / tag)
        # The optimizer's hyperparameters come from the run config, not the checkpoint: DeepSpeed's ZeRO-3 universal
        # load copies the first parameter group's settings into every group, which would put weight decay on the
        # norms.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / tag}")
        for group, settings in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(settings)
        _unshare_step_counters(engine.optimizer)
        state = json.loads((path / "trainer_state.json").read_text())
        rng_file = path / "rng" / f"rank-{self.rank:05d}.pt"
        if rng_file.is_file() and state.get("world_size") == self.accelerator.num_processes:
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state


def _unshare_step_counters(optimizer) -> None:
    """Give every parameter's Adam step counter a tensor of its own. DeepSpeed's ZeRO-3 universal load puts one
    tensor object into every sub-group's state; torch's Adam increments it in place once per sub-group, so after the
    first resumed step the bias correction uses a step count too high by the number of groups (on the tiny preset,
    2 -> 1 processes: a loss 1.8e-3 (relative) off the uninterrupted run's two steps after the resume)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # Accelerate's and DeepSpeed's wrappers, down to torch's AdamW
    seen = set()
    for state in getattr(optimizer, "state", {}).values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def _fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: LLM_FAULT=<name> kills this process with SIGKILL here
    (e.g. LLM_FAULT=before_rename:step-00000004: all shards of that checkpoint written, not yet renamed)."""
    if os.environ.get("LLM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
