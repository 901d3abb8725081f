"""How busy the machine is: benchmarks on a shared machine wait for it to be idle before each run and record how much
CPU other processes used meanwhile, so that a run measured under load can be told apart (Linux /proc)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


def _cpu_fields() -> list[int]:
    return list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))


def busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (user + nice + system + irq + softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = _cpu_fields()[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this VM wanted to run (0 on bare metal)."""
    fields = _cpu_fields()
    return (fields[7] if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                             resource.RUSAGE_CHILDREN)))


def wait_for_quiet(seconds: float, busy: float = 0.15) -> None:
    """Wait (up to `seconds`) until other processes use less than `busy` of a CPU for a second."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        before, own = busy_seconds(), own_cpu_seconds()
        time.sleep(1.0)
        if (busy_seconds() - before) - (own_cpu_seconds() - own) < busy:
            return
