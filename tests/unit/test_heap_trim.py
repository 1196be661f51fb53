"""The heap trimmer: a daemon thread calling the trim every interval, nothing where it cannot; and the
cyclic GC a service process runs with."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.process.memory import GC_THRESHOLD, HeapTrimmer, _libc_trim, start_heap_trimmer
from runtime.process.options import OBSERVABILITY_OPTIONS, ObservabilitySettings


def test_trims_every_interval_until_stopped() -> None:
    calls = threading.Semaphore(0)

    def trim() -> int:
        calls.release()
        return 1

    trimmer = HeapTrimmer(0.001, trim).start()
    thread = trimmer._thread
    assert thread is not None and thread.daemon  # never keeps a finished process alive
    try:
        for _ in range(3):
            assert calls.acquire(timeout=10)
    finally:
        trimmer.stop()
    assert not thread.is_alive() and trimmer.trims >= 3


def test_trim_once_without_a_thread() -> None:
    seen: list[int] = []

    def trim() -> int:
        seen.append(1)
        return 0

    trimmer = HeapTrimmer(60, trim)
    trimmer.trim_once()
    trimmer.trim_once()
    assert seen == [1, 1] and trimmer.trims == 2


def test_a_c_library_without_malloc_trim_starts_no_thread() -> None:
    trimmer = HeapTrimmer(0.001, None)
    trimmer._trim = None  # what _libc_trim() gives on musl or macOS
    assert not trimmer.available
    trimmer.start()
    assert trimmer._thread is None
    trimmer.trim_once()
    assert trimmer.trims == 0
    trimmer.stop()


def test_off_and_bad_intervals() -> None:
    assert start_heap_trimmer(0) is None
    with pytest.raises(ValueError, match="positive"):
        HeapTrimmer(-1, lambda: 0)


def test_glibc_trim_runs_here() -> None:
    trim = _libc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim")
    assert trim() in (0, 1)


def test_the_option_reaches_the_settings() -> None:
    assert any(o.dest == "heap_trim_interval" and o.env == "BACKFILL_HEAP_TRIM_INTERVAL"
               for o in OBSERVABILITY_OPTIONS)
    assert ObservabilitySettings().heap_trim_interval == 5.0


_GC_PROBE = """
import gc, sys
from runtime.commands import cli
before = gc.get_threshold()[0]
in_process = cli.main(["consume", "postgres"])  # a caller's own process (a test's): left as it is
kept = (gc.get_threshold()[0], gc.get_freeze_count())
if sys.argv[1] == "command-line":  # the backfill console script, python -m runtime
    sys.argv = ["backfill", "consume", "postgres"]
    own = cli.main()
else:  # python -m consumers.postgres and the other modules' own __main__
    own = cli.main(["consume", "postgres"], own_process=True)
print(before, in_process, *kept, own, gc.get_threshold()[0], gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize("started", ["command-line", "module-main"])
def test_a_service_in_its_own_process_tunes_the_gc(started: str) -> None:
    # Each call stops at once (no database: exit status 2), after the process is set up. In a child
    # process: tuning the GC of the test process would change every test after this one.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run([sys.executable, "-c", _GC_PROBE, started], capture_output=True, text=True, env=env,
                         timeout=120, check=True, cwd=Path(__file__).resolve().parents[2])
    before, in_process, kept_threshold, kept_frozen, own, threshold, frozen = out.stdout.split()
    assert (in_process, own) == ("2", "2")
    assert (kept_threshold, kept_frozen) == (before, "0")
    assert (int(threshold), frozen) == (GC_THRESHOLD, "True")


def test_tune_gc_freezes_the_start_up_heap_and_raises_the_threshold() -> None:
    code = ("import gc; from runtime.process.memory import tune_gc; tune_gc(); "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == [str(GC_THRESHOLD), "True"]
