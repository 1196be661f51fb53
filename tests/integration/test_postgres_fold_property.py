"""The PostgreSQL fold is right in any consumption order (issue 17): a property test.

Hypothesis generates a few DIDs' histories across collections (tests/fold_history.py), splits each
into its per-topic streams, and delivers them to one to three real :class:`PostgresSink` replicas
in a random interleaving: each topic is owned by one replica at a time, replicas flush batches of
random sizes, topics move between replicas (after a flush, as a rebalance does), and replicas crash
(their unflushed batch is lost; they resume from the offsets the sink stored). The
tables must end equal to the in-order fold of :func:`tests.fold_history.reference_fold`, with
``--account-removal keep`` and ``purge``.

``BACKFILL_FOLD_EXAMPLES`` sets the number of examples (default 150); e.g.
``BACKFILL_FOLD_EXAMPLES=5000 .venv/bin/python -m pytest tests/integration/test_postgres_fold_property.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from tenacity import wait_none

from consumers.base import Consumed
from consumers.postgres.rows import RECORD_TABLES, TransformOptions
from consumers.postgres.schema import migrate
from consumers.postgres.sink import PostgresSettings, PostgresSink
from runtime.contract.records import Event
from runtime.process.metrics import Metrics
from runtime.process.options import Secret
from tests.fold_history import DEFAULT_REMOVAL_STATUSES, FoldState, describe, histories, reference_fold, split_by_topic

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("BACKFILL_FOLD_EXAMPLES", "150"))
GROUP = "g"
_TABLES = ("actors", "tombstones", "identity_events", "account_events", "sync_events", "kafka_offsets",
           "job_partitions", "firehose_cursor", *(t.name for t in RECORD_TABLES))


@pytest.fixture(scope="module")
def fold_db(pg_url: str) -> Iterator[tuple[str, str, dict[bool, list[PostgresSink]]]]:
    """One migrated schema for every example (emptied before each), and three sinks per removal
    mode, reused across examples (a sink's first batch on a connection creates its staging
    tables: a new sink per example would spend most of the test's time there)."""
    name = "fold_property"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        migrate(conn, name)
    sinks = {purge: [_sink(pg_url, name, DEFAULT_REMOVAL_STATUSES if purge else frozenset()) for _ in range(3)]
             for purge in (False, True)}
    try:
        yield pg_url, name, sinks
    finally:
        for pool in sinks.values():
            for sink in pool:
                sink.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _empty(pg_url: str, schema: str, sinks: list[PostgresSink]) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(
            sql.Identifier(schema, t) for t in _TABLES)))
    for sink in sinks:
        sink.discard()
        sink._writer.known_actors.clear()  # the tables were emptied under the sink's actor cache


def _sink(pg_url: str, schema: str, statuses: frozenset[str]) -> PostgresSink:
    settings = PostgresSettings(Secret(pg_url), db_schema=schema, retries=3,
                                transform=TransformOptions(removal_statuses=statuses, resync_purge=bool(statuses)))
    return PostgresSink(settings, Metrics(), retry_wait=wait_none(), migrate_schema=False)


class Replica:
    """One consumer replica: a sink, the topics it owns and its position in each."""

    def __init__(self, sink: PostgresSink) -> None:
        self.sink = sink
        self.next: dict[str, int] = {}   # owned topic -> next offset to read
        self.pending: dict[str, int] = {}  # owned topic -> offset past the buffered events

    def take(self, topic: str) -> None:
        stored = self.sink.load_offsets(GROUP, [(topic, 0)]).get((topic, 0))
        self.next[topic] = self.pending[topic] = stored.offset if stored is not None else 0

    def flush(self) -> None:
        self.sink.flush(GROUP, {(t, 0): o for t, o in self.pending.items()})
        self.next.update(self.pending)

    def crash(self) -> None:
        """Lose the unflushed batch and resume from the stored offsets."""
        self.sink.discard()
        for topic in list(self.next):
            self.take(topic)


def _snapshot(pg_url: str, schema: str) -> FoldState:
    s = sql.Identifier(schema)
    state = FoldState()
    with psycopg.connect(pg_url) as conn:
        for table in RECORD_TABLES:
            coll = sql.Literal(table.collection) if table.collection else sql.SQL("collection")
            for did, collection, rkey, rev, cid in conn.execute(sql.SQL(
                    "SELECT did, {c}, rkey, rev, cid FROM {s}.{t} WHERE NOT deleted").format(
                    c=coll, s=s, t=sql.Identifier(table.name))):
                state.records[(did, collection, rkey)] = (rev, cid)
        for did, active, status, handle, has_status, has_handle in conn.execute(sql.SQL(
                "SELECT did, active, status, handle, status_time_us IS NOT NULL, handle_time_us IS NOT NULL "
                "FROM {}.actors").format(s)):
            if has_status:
                state.accounts[did] = (active, status)
            if has_handle:
                state.handles[did] = handle
    return state


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
@given(events=histories(), data=st.data())
def test_any_interleaving_over_any_replicas_folds_to_the_in_order_state(
        fold_db: tuple[str, str, dict[bool, list[PostgresSink]]], events: list[Event], data: st.DataObject) -> None:
    pg_url, schema, sinks = fold_db
    purge = data.draw(st.booleans(), "purge")
    statuses = DEFAULT_REMOVAL_STATUSES if purge else frozenset()
    pool = sinks[purge]
    _empty(pg_url, schema, pool)
    streams = {f"t.{topic}": stream for topic, stream in split_by_topic(events).items()}
    topics = sorted(streams)
    replicas = [Replica(sink) for sink in pool[:data.draw(st.integers(1, 3), "replicas")]]
    owner: dict[str, Replica] = {}
    for topic in topics:
        owner[topic] = replicas[data.draw(st.integers(0, len(replicas) - 1))]
        owner[topic].take(topic)
    try:
        # Steps until every stream is consumed and flushed: deliver, flush, move a topic, or crash.
        for _ in range(10 * len(events) + 50):
            left = [t for t in topics if owner[t].pending[t] < len(streams[t])]
            if not left:
                break
            topic = data.draw(st.sampled_from(left))
            replica = owner[topic]
            for _ in range(data.draw(st.integers(1, 4))):
                offset = replica.pending[topic]
                if offset >= len(streams[topic]):
                    break
                replica.sink.add(Consumed(topic, 0, offset, "x", streams[topic][offset], 0))
                replica.pending[topic] = offset + 1
            step = data.draw(st.sampled_from(("go", "go", "flush", "move", "crash")))
            if step == "flush":
                replica.flush()
            elif step == "move" and len(replicas) > 1:
                replica.flush()
                target = replicas[data.draw(st.integers(0, len(replicas) - 1))]
                if target is not replica:
                    del replica.next[topic], replica.pending[topic]
                    owner[topic] = target
                    target.take(topic)
            elif step == "crash":
                replica.crash()
        for replica in replicas:
            replica.flush()
        # whatever the draws left undelivered (the step budget) is read to the end by its owner
        for topic in topics:
            replica = owner[topic]
            while replica.pending[topic] < len(streams[topic]):
                offset = replica.pending[topic]
                replica.sink.add(Consumed(topic, 0, offset, "x", streams[topic][offset], 0))
                replica.pending[topic] = offset + 1
            replica.flush()
    finally:
        for replica in replicas:
            replica.sink.discard()
    want = reference_fold(events, statuses, resync=purge)
    got = _snapshot(pg_url, schema)
    context: dict[str, Any] = {"history": "\n" + describe(events), "purge": purge}
    assert got.records == want.records, context
    assert got.accounts == want.accounts, context
    assert got.handles == want.handles, context
