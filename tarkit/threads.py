"""How many intra-op threads torch gets: the cores actually free to this process, never more.

On a shared machine, torch's default (one thread per core) oversubscribes: measured on the 2-core machine,
a 4-prompt T2I call took 0.5 s alone, 23-34 s while another job shared the cores, and 0.6 s under the
same load with one thread. So the default counts only the cores this process may run on (its affinity),
minus the ones other work keeps busy (the 1-minute load average) and the DataLoader workers it will start
(each worker runs one torch thread of its own).

Knob: ``TARKIT_NUM_THREADS=N`` (or ``OMP_NUM_THREADS=N``) sets the count outright.
"""

from __future__ import annotations

import math
import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(cores: int) -> int:
    """Cores other work keeps busy right now: the 1-minute load average, rounded down, leaving one free."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this OS
        return 0
    return min(cores - 1, math.floor(load))


def default_threads(workers: int = 0) -> int:
    """The thread count tarkit uses: ``TARKIT_NUM_THREADS`` or ``OMP_NUM_THREADS`` if set, else the free cores
    minus ``workers`` DataLoader processes, at least 1."""
    for variable in ("TARKIT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{variable}={value!r} is not a positive integer; set it to a thread count like 2")
            return int(value)
    cores = usable_cores()
    return max(1, cores - busy_cores(cores) - max(0, workers))


_configured: int | None = None


def configure_threads(workers: int = 0) -> int:
    """Set torch's intra-op threads to :func:`default_threads` once per process; returns the count.

    Later calls keep the first count: a process that runs several stages (``tarkit demo``) would otherwise
    read its own load as other work's and shrink itself.
    """
    global _configured
    if _configured is None:
        import torch

        _configured = default_threads(workers)
        torch.set_num_threads(_configured)
    return _configured
