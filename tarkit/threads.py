"""How many intra-op threads torch gets: the cores actually free to this process, never more.

On a shared machine, torch's default (one thread per core) oversubscribes: measured on the 2-core machine,
a 4-prompt T2I call took 0.5 s alone, 23-34 s while another job shared the cores, and 0.6 s under the
same load with one thread. So the default counts only the cores this process may run on (its affinity),
minus the ones other work keeps busy and the DataLoader workers it will start (each worker runs one torch
thread of its own). Busy cores are sampled from ``/proc/stat`` over a fifth of a second: the load average
lags by minutes, so right after a job ends it would still count that job's core as taken.

Knob: ``TARKIT_NUM_THREADS=N`` (or ``OMP_NUM_THREADS=N``) sets the count outright.
"""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_times(cpus: set[int] | None = None) -> tuple[int, int]:
    """``(idle, total)`` clock ticks since boot, summed over ``cpus`` (all when ``None``), from ``/proc/stat``."""
    idle = total = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                continue
            ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle, total = idle + ticks[3] + ticks[4], total + sum(ticks)
    return idle, total


def busy_cores(cores: int, window: float = 0.2) -> int:
    """Cores other work keeps busy right now (rounded), leaving at least one free; 0 where it cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        idle_before, total_before = cpu_times(cpus)
        time.sleep(window)
        idle_after, total_after = cpu_times(cpus)
    except (OSError, ValueError):  # no /proc (macOS, Windows): assume the cores are free
        return 0
    elapsed = total_after - total_before
    busy = cores * (1 - (idle_after - idle_before) / elapsed) if elapsed > 0 else 0.0
    return max(0, min(cores - 1, round(busy)))


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
