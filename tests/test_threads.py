"""Thread counts come from the cores free to the process: affinity, other load, DataLoader workers, the knob."""

import os

import pytest

from tarkit import threads


@pytest.fixture
def machine(monkeypatch):
    """A 4-core affinity with no other load and no thread variables set; tests change what they need."""
    monkeypatch.delenv("TARKIT_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    return monkeypatch


def test_an_idle_machine_gets_one_thread_per_core_of_the_affinity(machine):
    assert threads.default_threads() == 4


def test_other_load_and_workers_take_their_cores(machine):
    machine.setattr(os, "getloadavg", lambda: (2.7, 0.0, 0.0))
    assert threads.default_threads() == 2
    assert threads.default_threads(workers=1) == 1
    assert threads.default_threads(workers=8) == 1  # never below one
    machine.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1


def test_the_knob_wins_and_bad_values_are_one_line(machine):
    machine.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads(workers=2) == 3
    machine.setenv("TARKIT_NUM_THREADS", "2")
    assert threads.default_threads() == 2
    machine.setenv("TARKIT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match=r"^TARKIT_NUM_THREADS='many' is not a positive integer; set it"):
        threads.default_threads()
