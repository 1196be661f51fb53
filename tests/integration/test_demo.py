"""The README's first command: ``backfill demo`` on the embedded broker (Tansu), end to end.

The demo starts its own embedded broker whatever broker the suite runs on, so this test also runs
in the Tansu smoke subset (``BACKFILL_TEST_BROKER=tansu``).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import psycopg
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.tansu_smoke]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("always::RuntimeWarning")  # a crash's report (below) shows in the summary
def test_the_demo_runs_end_to_end_on_the_embedded_broker(pg_url: str, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "backfill"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime"]
    argv = [*cmd, "demo", "--events", "3000", "--seed", "7", "--database-url", pg_url]
    proc = subprocess.run([*argv, "--data-dir", str(tmp_path / "first")], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, check=False)
    if proc.returncode < 0:
        # Killed by a signal: once, in CI, the demo died of SIGSEGV inside native code with no trace
        # (not reproduced in 39 runs under load since). The CLI now enables faulthandler, so such a
        # crash prints every thread's stack: shown here as a warning, and the demo runs once more
        # (a second crash fails the test). An exit with a status is never retried.
        warnings.warn(f"backfill demo died of signal {-proc.returncode}; its stderr:\n{proc.stderr[-6000:]}",
                      RuntimeWarning, stacklevel=1)
        proc = subprocess.run([*argv, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=240,
                              cwd=ROOT, check=False)
    else:
        tmp_path = tmp_path / "first"
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "simulated Jetstream events over the last hour" in out
    assert "finished (end_cursor_reached)" in out  # the job's row in the status table

    # The summary's queue length is the queue file's, and the job's consumers have nothing left.
    m = re.search(r"queue 'demo' in .*: ([\d,]+) items", out)
    assert m is not None, out[-2000:]
    queued = int(m.group(1).replace(",", ""))
    with sqlite3.connect(tmp_path / "queues.sqlite") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert tables, "the demo wrote no queue"
    assert queued > 1000
    # the "records left of each job, by consumer group" table: job, group, records left
    left = re.findall(r"^\s*demo\s+atproto-backfill-(?:postgres|queue)-[\w-]+\s+(\d+)\s*$", out, re.MULTILINE)
    assert left and all(n == "0" for n in left), out[-3000:]

    # The PostgreSQL stage ran into the given database and agrees with the printed counts.
    with psycopg.connect(pg_url) as conn:
        likes = conn.execute("SELECT count(*) FROM public.likes").fetchone()
    assert likes is not None and likes[0] > 0
    printed = re.search(r"^\s+likes\s+([\d,]+)$", out, re.MULTILINE)
    assert printed is not None and int(printed.group(1).replace(",", "")) == likes[0]
