"""Preemption: SIGTERM or SIGUSR1 sets a flag; the trainer all-reduces it so every rank saves the same step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

# Exit code of a run that saved a checkpoint because it was asked to stop (Slurm wrappers requeue on it).
# 75 is EX_TEMPFAIL in sysexits.h: "try again later". Under `accelerate launch` (torchrun) the launcher turns any
# non-zero exit of its workers into 1, so rank 0 also leaves OUTPUT_DIR/PREEMPTED: a wrapper that sees the launcher
# fail and that file present knows the run stopped cleanly and should be requeued. The next start removes it.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_MARKER = "PREEMPTED"


def write_preempted_marker(output_dir: str, step: int) -> None:
    Path(output_dir, PREEMPTED_MARKER).write_text(json.dumps({"step": step, "exit_code": PREEMPTED_EXIT_CODE}))


def clear_preempted_marker(output_dir: str) -> None:
    Path(output_dir, PREEMPTED_MARKER).unlink(missing_ok=True)


class StopFlag:
    """Records that a stop signal arrived. The handler only sets a flag: the save happens between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def set(self) -> bool:
        return self.received is not None
