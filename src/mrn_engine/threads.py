"""CPU thread defaults that do not oversubscribe a shared machine.

torch's default uses every core. On a 2-core machine where another job already keeps one core
busy, two torch threads fight that job for the same core and OpenMP's spinning threads slow a
training step several-fold (docs/performance.md). So, unless the user chose
(``OMP_NUM_THREADS`` or a command's ``--threads``), the engine uses the cores that are not
already busy: ``round(cores - load)``, where load is the 1-minute load average, and never more
than ``cores - 1`` (at least 1). The count is chosen once, at start-up; a neighbour that starts
later, or seconds before (the load average has not seen it yet), would otherwise meet every
core taken: on the 2-core VM a cpu-tiny training step then took 1.9-2.8 s with 2 threads
against 0.32 s with 1, while on an idle machine 2 threads save only 0.32 -> 0.23 s
(docs/performance.md).
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """The 1-minute load average (runnable processes), 0 where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for this process: the cores not already busy, one core left free, at least 1."""
    cores = available_cores() if cores is None else max(1, int(cores))
    load = busy_cores() if load is None else max(0.0, float(load))
    return max(1, min(cores - 1, int(cores - load + 0.5)))


def apply_default_threads() -> int | None:
    """Set the default thread count unless the user set ``OMP_NUM_THREADS``.

    Sets ``OMP_NUM_THREADS`` (read by torch and BLAS at import and inherited by worker
    processes) and, if torch is already imported, ``torch.set_num_threads``. Returns the
    count chosen, or None when the user's setting was kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    n = default_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def set_threads(n: int | None) -> None:
    """A command's ``--threads N``: torch's intra-op threads (nothing when ``n`` is None/0).

    torch is imported here, not at the top: this module sets ``OMP_NUM_THREADS`` before torch's
    first import.
    """
    if n:
        import torch

        torch.set_num_threads(int(n))
