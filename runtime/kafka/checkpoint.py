"""Job checkpoints in the compacted control topic ``<prefix>.control.jobs``, keyed by job name.

A producer run is a named job. Its state (source, filters, resume position, end watermark,
counts, status, and the next offset of every partition it wrote) is written only together with
(transactionally) or after (flushed) the data it covers. Consumers read it to know when a finished
job is fully consumed; ``backfill status`` prints it.

Each checkpoint is a whole state under the job's name, so the log cleaner keeps exactly the newest
checkpoint of every job and drops the older ones (``runtime.contract.topics.CONTROL_TOPIC_CONFIG`` makes it
run). A reader takes the last record of each key in offset order, which is what the cleaner
keeps: the answer is the same before and after compaction.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

from runtime.errors import CursorRegressionError
from runtime.kafka.clients import read_to_end
from runtime.kafka.settings import DEFAULT_CONTROL_TIMEOUT

log = logging.getLogger(__name__)

RUNNING = "running"
FINISHED = "finished"
#: A job stopped before its end (interrupted, a limit reached); ``--resume`` continues it.
STOPPED = "stopped"


@dataclass
class JobState:
    """Everything needed to resume a job and to tell how far it is.

    Attributes:
        position: the source's resume state (JSON; see the source's position class).
        cursor: the headline source cursor of ``position`` (Jetstream time_us, relay seq, DIDs done).
        offsets: topic -> partition (as a string) -> next offset after the last record written.
        checkpoint: increases by one with every write; a lower one is never written after a higher.
        run: the run of the job name this state belongs to: 1 for the first, one more for each run
            started without ``--resume`` (which starts anew wherever it is asked to); a resume
            continues the run of its checkpoint.
        runs: how many processes the run took (1, plus one per resume).
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
    run: int = 1

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

        Checkpoint numbers grow across the runs of a job name; the cursor only within one run (a
        new run starts wherever it was asked to, an earlier start included).

        Raises:
            CursorRegressionError: the checkpoint number, the run, or the cursor within the run
                decreased.
        """
        if previous is None:
            return
        if self.checkpoint <= previous.checkpoint:
            raise CursorRegressionError(
                f"job {self.job}: checkpoint {self.checkpoint} after {previous.checkpoint}")
        if self.run < previous.run:
            raise CursorRegressionError(f"job {self.job}: run {self.run} after run {previous.run}")
        if self.run != previous.run:
            return
        if previous.cursor is not None and self.cursor is not None and self.cursor < previous.cursor:
            raise CursorRegressionError(
                f"job {self.job}: cursor {self.cursor} is behind the checkpointed {previous.cursor}")


#: Seconds a resume waits for transactions open in the control topic to end: above the producers'
#: transaction timeout (60 s), after which the broker aborts a dead producer's transaction.
RESUME_SETTLE: Final = 75.0


def load_jobs(consumer_conf: dict[str, Any], control_topic: str, *, settle: float = RESUME_SETTLE,
              max_wait: float = DEFAULT_CONTROL_TIMEOUT, must_exist: bool = False) -> dict[str, JobState]:
    """The latest state of every job in the control topic: the last value of each key, as compaction keeps.

    ``settle``: see :func:`runtime.kafka.clients.read_to_end`. A resume needs it: the control topic has one
    partition, and another job's transaction left open there (a producer killed mid-checkpoint)
    hides every checkpoint committed after it from read_committed readers until it ends. Readers
    that look again soon (a consumer waiting for a job to finish) pass 0. ``max_wait``: seconds to
    read to the end (``--control-timeout``). ``must_exist``: the caller made sure the topic exists,
    so a broker that does not know it yet is asked again rather than the topic read as empty.

    Raises:
        SourceError: the control topic could not be read to its end (never a partial answer: a
            missing checkpoint would make ``--resume`` start over).
    """
    jobs: dict[str, JobState] = {}
    for msg in read_to_end(consumer_conf, control_topic, settle=settle, max_wait=max_wait,
                           missing_ok=not must_exist):
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
        if prev is not None and state.checkpoint < prev.checkpoint:
            # Writers number checkpoints upwards (JobState.check_forward); the idempotent producer
            # keeps their order, so only a second writer of the same job gets here.
            log.warning("job %s: checkpoint %d at offset %d follows checkpoint %d; the later one counts",
                        state.job, state.checkpoint, msg.offset() or 0, prev.checkpoint)
        jobs[state.job] = state
    return jobs


def load_job(consumer_conf: dict[str, Any], control_topic: str, job: str, *,
             settle: float = RESUME_SETTLE, max_wait: float = DEFAULT_CONTROL_TIMEOUT,
             must_exist: bool = False) -> JobState | None:
    """The latest state of ``job``, or None if it never checkpointed (see :func:`load_jobs`).

    Raises:
        SourceError: the control topic could not be read to its end.
    """
    return load_jobs(consumer_conf, control_topic, settle=settle, max_wait=max_wait, must_exist=must_exist).get(job)
