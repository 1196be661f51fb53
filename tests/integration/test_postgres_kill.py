"""``backfill consume postgres`` as real processes: kill -9 mid-batch (frozen while it holds its
database transaction open, then killed), SIGTERM, three replicas with one killed. After every
interruption the tables and the stored offsets must end identical to the expected ones."""

from __future__ import annotations

import signal
import time

import pytest

from runtime.kafka.settings import KafkaSettings
from tests.integration.pg_pipeline import (
    assert_tables_equal,
    expected,
    make_events,
    produce,
    replayed,
    snapshot,
    stored_offsets,
)
from tests.integration.replicas import SLOW, Replicas, data_offsets

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def total(offsets: dict[str, dict[str, int]]) -> int:
    return sum(sum(p.values()) for p in offsets.values())


#: For the classic group protocol: a killed member's partitions move to the others 6 s after its
#: last heartbeat (the default session is 45 s).
FAST_EVICTION = ("--kafka-config", "session.timeout.ms=6000")


def test_sigterm_and_repeated_kill_9_neither_lose_nor_duplicate(
        kafka: KafkaSettings, pg_url: str, schema: str, replicas: Replicas) -> None:
    events = make_events(3000, seed=21, job="k1")
    produce(kafka, events, "k1")
    replay = replayed(events, "k2", seed=22)
    final = data_offsets(produce(kafka, replay, "k2"))  # it wrote every partition: its offsets are the ends
    end = total(final)

    # a graceful stop: the batch is finished, committed, and the group left
    proc = replicas.start("term", *SLOW, *FAST_EVICTION, "--until-done", "k2")
    seen = replicas.wait_progress(0, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, replicas.log("term")
    assert 0 < replicas.progress() < end

    # kill -9 in the middle of a batch: while the consumer holds its database transaction open
    kills = 0
    for round_ in range(3):
        seen = replicas.progress()
        proc = replicas.start(f"kill{round_}", *SLOW, *FAST_EVICTION, "--max-concurrent", str(1 + round_ % 2),
                              "--until-done", "k2")
        now = replicas.wait_progress(seen, proc)
        kills += replicas.kill_mid_batch(proc)
        proc.wait(10)
        assert replicas.progress() >= now
    assert kills >= 2
    assert replicas.progress() < end, "the kills came too late to interrupt anything"

    proc = replicas.start("final", *FAST_EVICTION, "--batch-size", "500", "--until-done", "k2")
    assert proc.wait(120) == 0, replicas.log("final")
    assert stored_offsets(pg_url, schema, replicas.group) == final
    assert_tables_equal(snapshot(pg_url, schema), expected(events + replay))


def test_three_replicas_one_killed_end_exact(
        kafka: KafkaSettings, pg_url: str, schema: str, replicas: Replicas) -> None:
    events = make_events(4000, seed=31, job="r3")
    final = data_offsets(produce(kafka, events, "r3"))
    procs = [replicas.start(f"r{i}", *SLOW, *FAST_EVICTION, "--until-done", "r3") for i in range(3)]
    deadline = time.monotonic() + 60
    while not all("assigned" in replicas.log(f"r{i}") for i in range(3)):
        assert time.monotonic() < deadline, "the replicas never all got partitions"
        time.sleep(0.05)
    replicas.wait_progress(replicas.progress(), procs[1])
    assert procs[1].poll() is None
    procs[1].kill()
    procs[1].wait(10)
    assert replicas.progress() < total(final), "the kill came too late to matter"
    for i in (0, 2):
        assert procs[i].wait(120) == 0, replicas.log(f"r{i}")
    assert stored_offsets(pg_url, schema, replicas.group) == final
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
