"""Thread counts come from the cores free to the process: affinity, other work's load, DataLoader workers, the
knob."""

import os

import pytest

from tarkit import threads


@pytest.fixture
def machine(monkeypatch):
    """A 4-core affinity, no thread variables set, and other work keeping ``machine.busy`` cores busy."""
    monkeypatch.delenv("TARKIT_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    state = {"busy": 0.0, "calls": 0}

    def cpu_times(cpus=None):
        assert cpus == {0, 1, 2, 3}  # only the cores this process may use are counted
        state["calls"] += 1
        if state["calls"] % 2:
            return 0, 0
        return round(100 * (4 - state["busy"])), 400  # one window: 100 ticks per core

    monkeypatch.setattr(threads, "cpu_times", cpu_times)
    monkeypatch.state = state
    return monkeypatch


def test_an_idle_machine_gets_one_thread_per_core_of_the_affinity(machine):
    assert threads.default_threads() == 4


def test_other_work_and_workers_take_their_cores(machine):
    machine.state["busy"] = 1.8
    assert threads.default_threads() == 2
    assert threads.default_threads(workers=1) == 1
    assert threads.default_threads(workers=8) == 1  # never below one
    machine.state["busy"] = 4.0
    assert threads.default_threads() == 1


def test_busy_cores_reads_proc_stat_where_there_is_one():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this OS; busy_cores then assumes free cores")
    idle, total = threads.cpu_times()
    assert 0 <= idle <= total and total > 0
    assert 0 <= threads.busy_cores(threads.usable_cores(), window=0.05) < max(threads.usable_cores(), 2)


def test_the_knob_wins_and_bad_values_are_one_line(machine):
    machine.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads(workers=2) == 3
    machine.setenv("TARKIT_NUM_THREADS", "2")
    assert threads.default_threads() == 2
    machine.setenv("TARKIT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match=r"^TARKIT_NUM_THREADS='many' is not a positive integer; set it"):
        threads.default_threads()
