"""The CLI entry points of the repo producer, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)


def test_inspect_car_lists_the_fixture(fixtures_dir: Path) -> None:
    proc = _cli("inspect", "car", str(fixtures_dir / "repo.car"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 23
    assert all("\t" in line for line in lines)
    commit = _cli("inspect", "car", "--commit", str(fixtures_dir / "repo.car"))
    assert "did\tdid:plc:53iucmf5ldftgqyf2ac7hmhd" in commit.stdout
    assert "rev\t3migo7fijwi2k" in commit.stdout


def test_help_of_every_repo_command() -> None:
    for words, env in ((("repos",), "BACKFILL_PLC_URL"), (("discover-dids",), "DATABASE_URL"),
                       (("simulate", "pds"), "SIM_RATE_LIMIT"), (("simulate", "plc"), "SIM_PLC_DOCUMENTS")):
        proc = _cli(*words, "--help")
        assert proc.returncode == 0, proc.stderr
        assert env in proc.stdout
    module = subprocess.run([sys.executable, "-m", "producers.repos", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=False)
    assert module.returncode == 0
    assert "--from-topic" in module.stdout


def test_no_dids_is_a_usage_error() -> None:
    proc = _cli("repos", "--bootstrap-servers", "127.0.0.1:1")
    assert proc.returncode == 2
    assert "no DIDs" in proc.stderr
