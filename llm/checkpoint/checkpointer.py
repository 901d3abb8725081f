"""Complete, atomic training checkpoints.

Layout of `OUTPUT_DIR/checkpoints/`:

    step-00000100/            one complete checkpoint
      deepspeed/              DeepSpeed's own files: model and optimizer state, sharded per rank
      rng/rank-00000.pt       each rank's RNG states (tensors and plain numbers only: loads with weights_only)
      trainer_state.json      step (the LR schedule is a function of it), tokens seen, loader state, world size
      config.yaml             the resolved run config
    latest                    the name of the newest complete checkpoint
    .tmp-step-00000200/       a save in progress; never read, removed at the next start

Every rank writes its shards into the temporary folder; rank 0 then fsyncs everything, renames the folder into
place and only then rewrites `latest` (itself via a temporary file and a rename). A process killed at any moment
therefore leaves either the previous checkpoint or the new one, never a half-written one that could be resumed.
Old checkpoints beyond `keep_last` are deleted only after the new one is complete.
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

from llm.checkpoint.safety import vet_deepspeed_folder
from llm.config import RunConfig, save_config, to_dict

STEP_RE = re.compile(r"^step-(\d{8})$")
# Settings a resumed run may not change: they define the model and the data order.
FROZEN = {"model": None, "train": ("seed",)}
FROZEN_DATA = {"lm": ("datasets", "seq_len", "seed", "document_masking"),
               "translation": ("path", "max_tokens", "max_sentences", "seed")}


class CheckpointError(RuntimeError):
    pass


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        """Rank 0, at start: folders of saves that were interrupted are garbage."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()

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
        self.accelerator.wait_for_everyone()
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state | {"step": step}, indent=2))
            save_config(cfg, tmp / "config.yaml")
            _fault_point(f"before_rename:{name}")
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", name)
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    # ---- load ------------------------------------------------------------------------------------------------

    def load(self, path: Path, engine, cfg: RunConfig) -> dict:
        """Restore model, optimizer, scheduler and RNG from `path`; return the trainer state."""
        import yaml

        saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
        diffs = frozen_differences(saved_cfg, cfg)
        if diffs:
            raise CheckpointError(f"cannot resume from {path}: the config changes what a resumed run must keep:\n  "
                                  + "\n  ".join(diffs) + "\nUse a new train.output_dir to start a new run.")
        vet_deepspeed_folder(path / "deepspeed")
        load_path, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
        state = json.loads((path / "trainer_state.json").read_text())
        rng_file = path / "rng" / f"rank-{self.rank:05d}.pt"
        if rng_file.is_file() and state.get("world_size") == self.accelerator.num_processes:
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state


def _fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: LLM_FAULT=<name> kills this process with SIGKILL here
    (e.g. LLM_FAULT=before_rename:step-00000004: all shards of that checkpoint written, not yet renamed)."""
    if os.environ.get("LLM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
