"""Job checkpoints in the compacted control topic ``<prefix>.control.jobs``, keyed by job name.

A producer run is a named job. Its state (source, filters, resume position, end watermark,
counts, status, and the next offset of every partition it wrote) is written only together with
(transactionally) or after (flushed) the data it covers. Consumers read it to know when a finished
job is fully consumed; ``backfill status`` prints it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from runtime.errors import CursorRegressionError
from runtime.kafka import read_to_end

log = logging.getLogger(__name__)

RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"


@dataclass
class JobState:
    """Everything needed to resume a job and to tell how far it is.

    Attributes:
        position: the source's resume state (JSON; see the source's position class).
        cursor: the headline source cursor of ``position`` (Jetstream time_us, relay seq, DIDs done).
        offsets: topic -> partition (as a string) -> next offset after the last record written.
        checkpoint: increases by one with every write; a lower one is never written after a higher.
    """

    job: str
    source: str
    status: str = RUNNING
    filters: dict[str, Any] = field(default_factory=dict)
    start_cursor: int | None = None
    end_time_us: int | None = None
    position: dict[str, Any] = field(default_factory=dict)
    cursor: int | None = None
    cursor_time_us: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    started_at_us: int = 0
    updated_at_us: int = 0
    finished_at_us: int | None = None
    stop_reason: str | None = None
    checkpoint: int = 0
    runs: int = 1

    def to_bytes(self) -> bytes:
        """JSON encoding for the control topic."""
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> JobState:
        """Parse a control-topic value (unknown fields are ignored, missing ones defaulted)."""
        raw = orjson.loads(data)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def merge_offsets(self, written: dict[tuple[str, int], int]) -> None:
        """Raise each partition's next offset to cover ``written`` ((topic, partition) -> last offset)."""
        for (topic, partition), last in written.items():
            parts = self.offsets.setdefault(topic, {})
            key = str(partition)
            if last + 1 > parts.get(key, 0):
                parts[key] = last + 1

    def check_forward(self, previous: JobState | None) -> None:
        """Refuse to write a checkpoint that moves backwards.

        Raises:
            CursorRegressionError: the cursor or the checkpoint number decreased.
        """
        if previous is None:
            return
        if self.checkpoint <= previous.checkpoint:
            raise CursorRegressionError(
                f"job {self.job}: checkpoint {self.checkpoint} after {previous.checkpoint}")
        if previous.cursor is not None and self.cursor is not None and self.cursor < previous.cursor:
            raise CursorRegressionError(
                f"job {self.job}: cursor {self.cursor} is behind the checkpointed {previous.cursor}")


def load_jobs(consumer_conf: dict[str, Any], control_topic: str) -> dict[str, JobState]:
    """The latest state of every job in the control topic (last value per key wins)."""
    jobs: dict[str, JobState] = {}
    for msg in read_to_end(consumer_conf, control_topic):
        key = msg.key()
        value = msg.value()
        if key is None or value is None:
            continue
        try:
            state = JobState.from_bytes(value)
        except (orjson.JSONDecodeError, TypeError) as e:
            log.warning("ignoring an unreadable checkpoint for %r at offset %d: %s", key, msg.offset(), e)
            continue
        prev = jobs.get(state.job)
        # Compaction may not have run; with retries a stale record can follow a newer one.
        if prev is None or state.checkpoint >= prev.checkpoint:
            jobs[state.job] = state
    return jobs


def load_job(consumer_conf: dict[str, Any], control_topic: str, job: str) -> JobState | None:
    """The latest state of ``job``, or None if it never checkpointed."""
    return load_jobs(consumer_conf, control_topic).get(job)
