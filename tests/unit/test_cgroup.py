"""consumers.cgroup: the container's memory limit from cgroup v2 and v1 files, and the guard from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.cgroup import default_memory_guard_mb, memory_limit_bytes

GIB = 2**30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="ascii")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return tmp_path / "proc-self-cgroup"


def test_v2_container_sees_its_limit_at_the_namespace_root(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cg"
    write(proc, "0::/")
    write(root / "memory.max", str(2 * GIB))
    assert memory_limit_bytes(root, proc) == 2 * GIB
    assert default_memory_guard_mb(75, root, proc) == 1536


def test_v2_process_reads_its_own_cgroup_before_the_root(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cg"
    write(proc, "0::/kubepods/pod1/ctr")
    write(root / "memory.max", "max")
    write(root / "kubepods/pod1/ctr/memory.max", str(512 * 2**20))
    assert memory_limit_bytes(root, proc) == 512 * 2**20
    assert default_memory_guard_mb(50, root, proc) == 256


def test_v2_max_means_no_limit_and_no_guard(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cg"
    write(proc, "0::/")
    write(root / "memory.max", "max")
    assert memory_limit_bytes(root, proc) is None
    assert default_memory_guard_mb(75, root, proc) == 0


def test_v1_limit_and_its_unlimited_sentinel(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cg"
    write(proc, "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc")
    write(root / "memory/docker/abc/memory.limit_in_bytes", str(GIB))
    assert memory_limit_bytes(root, proc) == GIB
    write(root / "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712")
    assert memory_limit_bytes(root, proc) is None


def test_v1_falls_back_to_the_controller_root(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cg"
    write(proc, "4:memory:/not/mounted/here")
    write(root / "memory/memory.limit_in_bytes", str(3 * GIB))
    assert memory_limit_bytes(root, proc) == 3 * GIB


def test_nothing_readable_is_no_limit(tmp_path: Path, proc: Path) -> None:
    assert memory_limit_bytes(tmp_path / "absent", proc) is None
    root = tmp_path / "cg"
    write(proc, "0::/")
    write(root / "memory.max", "garbage")
    assert memory_limit_bytes(root, proc) is None
    assert default_memory_guard_mb(75, root, proc) == 0


@pytest.mark.parametrize("percent", [0, 100, -5])
def test_percent_out_of_range_is_refused(tmp_path: Path, proc: Path, percent: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 99"):
        default_memory_guard_mb(percent, tmp_path, proc)
