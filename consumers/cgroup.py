"""The memory limit of the container a process runs in, from its cgroup (v2 or v1).

A consumer's memory guard (``BACKFILL_MAX_MEMORY_MB``) pauses partitions while RSS is above it; set
below the container's limit, it turns memory pressure into back-pressure instead of an OOM kill.
:func:`default_memory_guard_mb` derives such a guard from the limit the kernel enforces, for a
process started without an explicit one (the Helm chart sets one from the pod's limit itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP: Final = Path("/proc/self/cgroup")
#: cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
UNLIMITED_FROM: Final = 2**60
#: The share of the limit the guard allows by default: headroom for the batch in flight, librdkafka's
#: buffers and the allocator's slack above the RSS at which partitions pause.
DEFAULT_GUARD_PERCENT: Final = 75


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _limit(text: str | None) -> int | None:
    """A limit file's value in bytes; None for no limit or an unreadable value."""
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < UNLIMITED_FROM else None


def _own_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """The process's cgroup paths: (v2 unified path, v1 memory controller path)."""
    unified = memory = None
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, path = parts
        if controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            memory = path
    return unified, memory


def memory_limit_bytes(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when there is none.

    Reads cgroup v2's ``memory.max`` (the process's own cgroup, then the namespace root a container
    sees), else cgroup v1's ``memory/memory.limit_in_bytes``. Nothing readable means no limit.

    Args:
        root: where the cgroup filesystem is mounted.
        proc_cgroup: the process's cgroup membership file.
    """
    unified, memory = _own_paths(proc_cgroup)
    candidates: list[Path] = []
    if unified is not None:
        candidates.append(root / unified.lstrip("/") / "memory.max")
    candidates.append(root / "memory.max")
    for path in candidates:
        if path.is_file():
            return _limit(_read(path))
    v1 = root / "memory"
    if memory is not None and (own := v1 / memory.lstrip("/") / "memory.limit_in_bytes").is_file():
        return _limit(_read(own))
    return _limit(_read(v1 / "memory.limit_in_bytes"))


def default_memory_guard_mb(percent: int = DEFAULT_GUARD_PERCENT, root: Path = CGROUP_ROOT,
                            proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """``percent`` of the cgroup's memory limit in MiB; 0 (no guard) when there is no limit.

    Raises:
        ValueError: ``percent`` is not between 1 and 99.
    """
    if not 0 < percent < 100:
        raise ValueError(f"percent must be between 1 and 99, not {percent}")
    limit = memory_limit_bytes(root, proc_cgroup)
    if limit is None:
        return 0
    return limit * percent // 100 // 2**20
