"""Every benchmark under ``bench/`` still starts: its imports resolve and its options parse.

A benchmark is not run by the suite, so a rename in the code it measures could break it unseen
(``bench_jetstream2.py`` imported a class removed a day earlier). ``--help`` imports everything and
builds the parser without starting a broker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [*sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")), "kill_storm.py"]


def test_every_benchmark_is_listed() -> None:
    assert {"bench_firehose.py", "bench_jetstream.py", "bench_jetstream2.py", "bench_postgres.py",
            "bench_repos.py", "bench_memory.py", "bench_scale.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
