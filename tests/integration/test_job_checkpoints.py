"""Running checkpoints commit on the checkpoint thread while the job goes on, on the real broker.

What the loop produces while a checkpoint commits waits for the next transaction; every event
still lands exactly once, each checkpoint covers exactly the events before it, and a commit that
fails stops the job loudly, after which a resume completes it exactly once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from confluent_kafka import Consumer, TopicPartition

from producers.job import JobOptions, JobRunner
from producers.source import End, Skip, SourceItem, StreamPosition
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event, RecordEvent
from runtime.contract.topics import TopicMap
from runtime.errors import CommitError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.eos import committed
from tests.integration.pg_pipeline import make_events

pytestmark = pytest.mark.integration


class Source:
    """The events in order, resumable from a checkpointed position; counts what it yields while
    ``busy`` is set."""

    name = "jetstream"

    def __init__(self, events: list[Event], previous: JobState | None, busy: threading.Event,
                 committed: Callable[[], int] | None = None, every: int = 0) -> None:
        self.events = events
        self._position = StreamPosition.restore(previous.position if previous else None, rewind=1_000_000)
        self.busy = busy
        self.yielded_while_busy = 0
        self.committed = committed
        self.every = every

    @property
    def position(self) -> StreamPosition:
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        checkpoints = self.committed() if self.committed else 0
        for i, event in enumerate(self.events):
            if self.committed is not None and i and i % self.every == 0:
                # Paced like a network source: each checkpoint commits before the next batch.
                checkpoints += 1
                while self.committed() < checkpoints:
                    await asyncio.sleep(0.01)
            if self._position.seen(event):
                yield Skip("duplicate")
                continue
            if self.busy.is_set():
                self.yielded_while_busy += 1
            yield event
            if self.yielded_while_busy and self.yielded_while_busy % 50 == 0:
                await asyncio.sleep(0)  # the ticker's turn
        yield End("exhausted")


class HeldCommit(JobRunner):
    """A runner whose checkpoint ``hold`` waits in its commit until released, and whose
    checkpoint ``fail`` fails to commit."""

    hold = 0
    fail = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.committing = threading.Event()
        self.release = threading.Event()
        self.commit_threads: set[str] = set()

    def _commit(self, state: JobState) -> None:
        self.commit_threads.add(threading.current_thread().name)
        if state.checkpoint == self.fail:
            raise CommitError(f"checkpoint {state.checkpoint}: the broker refused the commit (test)")
        if state.checkpoint == self.hold:
            self.committing.set()
            assert self.release.wait(60), "the test never released the commit"
        super()._commit(state)


def _topic_counts(kafka: KafkaSettings, events: list[Event]) -> Counter[tuple[str, str, str, str]]:
    """Every committed record message of the events' collections, counted by identity."""
    topics = TopicMap(kafka.topic_prefix)
    names = sorted({topics.for_collection(e.collection) for e in events if isinstance(e, RecordEvent)})
    return Counter((datum["did"], datum["collection"], datum["rkey"], str(datum["time_us"]))
                   for _, _, datum in committed(kafka, names))


def _expected(events: list[Event]) -> Counter[tuple[str, str, str, str]]:
    return Counter((e.did, e.collection, e.rkey, str(e.time_us)) for e in events if isinstance(e, RecordEvent))


def test_the_loop_goes_on_while_a_checkpoint_commits(kafka: KafkaSettings) -> None:
    events = make_events(3000, seed=11, job="bg")
    runner = HeldCommit(kafka, JobOptions(job="bg", source="jetstream", checkpoint_events=500,
                                          checkpoint_interval=3600), Metrics(), AvroCodec())
    runner.hold = 1
    busy = runner.committing
    sources: list[Source] = []

    def make(prev: JobState | None) -> Source:
        sources.append(Source(events, prev, busy))
        return sources[-1]

    async def release_later() -> None:
        # Checkpoint 1 stays held until the loop has produced 1,000 more events past it.
        while sources == [] or sources[0].yielded_while_busy < 1000:
            await asyncio.sleep(0.01)
        runner.release.set()

    async def main() -> JobState:
        releaser = asyncio.ensure_future(release_later())
        try:
            return await runner.run(make)
        finally:
            releaser.cancel()

    try:
        final = asyncio.run(main())
    finally:
        runner.release.set()
        runner.close()
    assert final.status == "finished"
    assert sources[0].yielded_while_busy >= 1000
    assert runner.commit_threads - {threading.main_thread().name}, "no checkpoint committed in the background"
    # Every event exactly once, and the final offsets cover every partition written.
    assert _topic_counts(kafka, events) == _expected(events)
    control = TopicMap(kafka.topic_prefix).control
    ends = {(topic, int(p)): offset for topic, parts in final.offsets.items() if topic != control
            for p, offset in parts.items()}
    assert len(ends) >= 6
    c = Consumer(kafka.consumer_config("t-offsets"))
    try:
        for (topic, p), offset in ends.items():
            _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            assert offset <= high
            assert offset >= high - 1  # the end, or the end before the commit marker
    finally:
        c.close()
    # Each checkpoint covers exactly the events before it: checkpoint 1 the first 500.
    states = [JobState.from_bytes(m.value()) for m in kafka_util.read_to_end(
        kafka.consumer_config("t-control"), control, settle=30)]
    mine = [s for s in states if s.job == "bg"]
    assert [s.checkpoint for s in mine] == list(range(1, len(mine) + 1))
    first = mine[0]
    assert first.counts["produced"] == 500
    assert first.cursor == max(e.cursor for e in events[:500])


def test_a_failed_background_commit_stops_the_job_and_a_resume_completes_it(kafka: KafkaSettings) -> None:
    events = make_events(2500, seed=12, job="fail")
    opts = JobOptions(job="fail", source="jetstream", checkpoint_events=400, checkpoint_interval=3600)
    runner = HeldCommit(kafka, opts, Metrics(), AvroCodec())
    runner.fail = 3
    idle = threading.Event()

    def committed() -> int:
        return runner.state.checkpoint if runner.state else 0

    try:
        with pytest.raises(CommitError):
            asyncio.run(runner.run(lambda prev: Source(events, prev, idle, committed, every=400)))
    finally:
        runner.close()
    assert runner.state is not None
    assert runner.state.checkpoint == 2
    # The data of the failed transaction is aborted; the resume starts from checkpoint 2.
    resumed = JobRunner(kafka, JobOptions(job="fail", source="jetstream", checkpoint_events=400,
                                          checkpoint_interval=3600, resume=True), Metrics(), AvroCodec())
    try:
        previous = resumed.prepare()
        assert previous is not None
        assert previous.checkpoint == 2
        final = asyncio.run(resumed.run(lambda prev: Source(events, prev, idle)))
    finally:
        resumed.close()
    assert final.status == "finished"
    # Every event exactly once: the failed transaction (events 800-1199) was aborted when the runner
    # closed, and the resume produced them again after checkpoint 2.
    assert _topic_counts(kafka, events) == _expected(events)
