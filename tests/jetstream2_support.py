"""What the Jetstream v2 tests share: a simulator served from a thread for a module, handed to each test
without faults (a test sets the faults it wants; they are undone after it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from runtime.simulator.jetstream2 import Faults, Jetstream2Simulator, build_simulator

START_US = 1_760_000_000_000_000


def served(**options: Any) -> Iterator[Jetstream2Simulator]:
    """A module fixture's body: ``build_simulator(start_us=START_US, **options)`` served until the end."""
    sim = build_simulator(**{"start_us": START_US, **options}).start_in_thread()
    try:
        yield sim
    finally:
        sim.stop_thread()


def without_faults(sim: Jetstream2Simulator) -> Iterator[Jetstream2Simulator]:
    """A test fixture's body: ``sim`` with no faults, and none left after the test."""
    sim.faults = Faults()
    try:
        yield sim
    finally:
        sim.faults = Faults()
