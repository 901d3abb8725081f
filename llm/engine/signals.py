"""Preemption: SIGTERM or SIGUSR1 sets a flag; the trainer all-reduces it so every rank saves the same step."""

from __future__ import annotations

import signal

# Exit code of a run that saved a checkpoint because it was asked to stop (Slurm wrappers requeue on it).
# 75 is EX_TEMPFAIL in sysexits.h: "try again later".
PREEMPTED_EXIT_CODE = 75


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
