"""Every fuzz target, briefly, in the default test run: its seeds, then deterministic mutants of them.

A target crashes when its decoder lets anything but the project's drop types escape (or breaks an
invariant the target checks); the test then fails with the input. The long, coverage-guided runs
are ``python -m tests.fuzz <target|all> --seconds N`` (atheris); one short run of it is checked here.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuzz.mutate import Mutator
from tests.fuzz.targets import TARGETS, Target

#: Mutants per target, and a time cap per target (whichever comes first); seeds always all run.
MUTANTS = int(os.environ.get("BACKFILL_FUZZ_MUTANTS", "4000"))
SECONDS = float(os.environ.get("BACKFILL_FUZZ_SECONDS", "4"))
ROOT = Path(__file__).resolve().parents[2]


def _run(target: Target, data: bytes) -> None:
    try:
        target.run(data)
    except Exception as e:
        pytest.fail(f"{target.name} crashed with {type(e).__name__}: {e}\ninput: {data[:4000]!r}")


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_survives_seeds_and_mutants(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds, "every target has seeds"
    for seed in seeds:
        _run(target, seed)
    mutator = Mutator(random.Random(f"fuzz:{name}"))
    deadline = time.monotonic() + SECONDS
    for _ in range(MUTANTS):
        if time.monotonic() > deadline:
            break
        base = mutator.rng.choice(seeds)
        data = mutator.structured(base, target.structure) if mutator.rng.random() < 0.4 else None
        if data is None:
            data = mutator.bytes_(base, seeds, target.max_len)
        _run(target, data)


def test_fuzz_command_runs_a_target() -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz", "work_item", "--seconds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(li for li in proc.stdout.splitlines() if li.startswith("work_item"))
    _, executions, _, crashes = line.split()
    assert int(executions) > 0
    assert crashes == "0"
