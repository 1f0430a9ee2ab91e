"""torch's CPU thread count and OpenMP wait policy, set before torch is imported (`configure_environment`).

torch's default (one busy-waiting thread per core) stalls when other processes hold cores. Default here: idle
threads sleep (OMP_WAIT_POLICY=PASSIVE) and `auto_threads()` = the CPUs this process may use (affinity, cgroup quota)
less the busy ones (/proc/loadavg), at least 1. `--threads N`, AID_THREADS, or the user's own OMP_* variables win.
"""

from __future__ import annotations

import math
import os

from .errors import UserError

CHOSEN: str | None = None  # how configure_environment chose (for `aid env`)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers, CI runners)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def runnable_now(samples: int = 5, interval: float = 0.004) -> float | None:
    """Processes runnable right now besides this one (the median of a few reads of /proc/loadavg's running count, which
    includes the reader); None where there is no /proc/loadavg. Unlike the load average, it does not lag: the runs of a
    serial shell loop do not see their predecessors, while jobs started together with `xargs -P` see each other."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if i < samples - 1:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def busy_cpus() -> int:
    """Cores other processes keep busy: runnable processes besides this one (Linux), else the 1-minute load average, in
    whole cores, less the host's cores this process cannot use (a container on a busy many-core host is not starved by
    load it does not share)."""
    busy = runnable_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0
    spare = (os.cpu_count() or 1) - usable_cpus()
    return max(0, int(round(busy - spare)))


def auto_threads() -> int:
    """The default: usable CPUs less busy ones, at least 1."""
    return max(1, usable_cpus() - busy_cpus())


def parse_threads(value: str | int | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{what} must be a whole number of threads, got {value!r}") from None
    if n < 1:
        raise UserError(f"{what} must be at least 1, got {n}")
    return n


def configure_environment(environ=os.environ) -> str:
    """Set OpenMP's thread count and wait policy for torch, unless the user did; returns how the count was chosen.

    Call before torch is imported (later it has no effect on the thread pool torch already made)."""
    global CHOSEN
    CHOSEN = _configure(environ)
    return CHOSEN


def _configure(environ) -> str:
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    requested = parse_threads(environ.get("AID_THREADS"), "AID_THREADS")
    if requested is not None:
        environ["OMP_NUM_THREADS"] = str(requested)
        return f"{requested} (AID_THREADS)"
    if environ.get("OMP_NUM_THREADS"):
        return f"{environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS)"
    usable, busy = usable_cpus(), busy_cpus()
    n = max(1, usable - busy)
    environ["OMP_NUM_THREADS"] = str(n)
    return f"{n} (auto: {usable} usable CPUs, {busy} busy)"


def apply_threads(threads: int | None) -> None:
    """A command's --threads N: torch's intra-op threads for the rest of the process (None: keep the default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
