"""Giving freed heap memory back to the operating system.

A producer at full speed allocates in bursts: librdkafka copies every message into its local
queue from the thread that produces it (the main thread's heap), and the queue fills while a
broker is slow, then drains. glibc keeps the freed pages in the heap for reuse, so the resident
size after one burst stays at the burst's peak for the rest of the run (measured on ``backfill
jetstream`` at 23,000 events/s: 180 MB of main heap of which 100 MB free). ``malloc_trim(0)``
returns the free pages inside the heap to the system (``madvise``), not only the top.

A :class:`HeapTrimmer` thread calls it every ``interval`` seconds. Where the C library has no
``malloc_trim`` (musl, macOS) it does nothing. The call takes the allocator's locks for the time
of a heap walk (a few milliseconds for a few hundred MB), every few seconds: nothing to see
next to a produce call's cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

#: Default of ``--heap-trim-interval`` (seconds).
DEFAULT_INTERVAL: Final = 5.0
#: First-generation threshold of the cyclic GC in a service process (Python's default is 700).
GC_THRESHOLD: Final = 50_000


def _libc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))


class HeapTrimmer:
    """A daemon thread that gives the heap's free pages back every ``interval`` seconds.

    Args:
        interval: seconds between two trims (> 0).
        trim: the trim call (default: glibc's ``malloc_trim(0)``; tests pass their own).
    """

    def __init__(self, interval: float, trim: Callable[[], int] | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.interval = interval
        self._trim = trim if trim is not None else _libc_trim()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.trims = 0

    @property
    def available(self) -> bool:
        """Whether this C library can trim."""
        return self._trim is not None

    def trim_once(self) -> None:
        """Trim now."""
        if self._trim is not None:
            self._trim()
            self.trims += 1

    def start(self) -> HeapTrimmer:
        """Start the thread (nothing when the C library cannot trim)."""
        if self._trim is None:
            log.debug("no malloc_trim in this C library: freed heap memory stays with the process")
            return self
        self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.trim_once()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def start_heap_trimmer(interval: float) -> HeapTrimmer | None:
    """A started :class:`HeapTrimmer`, or None when ``interval`` is 0 (off)."""
    if interval <= 0:
        return None
    return HeapTrimmer(interval).start()


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a service's loop (every producer and consumer).

    Objects alive at start-up (modules, schemas, settings) are frozen out of collection, and the
    first-generation threshold is raised to :data:`GC_THRESHOLD`. The loops allocate short-lived,
    acyclic containers by the hundred thousand (decoded events, records, batches) that reference
    counting frees anyway; at the default threshold (700) the collector rescanned every live one many
    times a second: about 15% of the PostgreSQL consumer's throughput (``bench/bench_postgres.py``)
    and of the Jetstream v2 decode (``bench/bench_jetstream2.py --cpu``). Cyclic garbage is still
    collected, after 50,000 allocations instead of 700: a few megabytes at most.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 50)


def set_up_service(heap_trim_interval: float, *, tune: bool = True) -> HeapTrimmer | None:
    """What a service process does for its memory at start: the heap trimmer every
    ``heap_trim_interval`` seconds (0: none) and, when ``tune``, :func:`tune_gc`."""
    trimmer = start_heap_trimmer(heap_trim_interval)
    if tune:
        tune_gc()
    return trimmer
