"""The producer -> typed topics -> PostgreSQL pipeline in process, for the integration tests: an in-test
source over a list of events, the producer and consumer runs, the expected-table model and the table snapshot."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from consumers.base import ConsumerOptions, ConsumerStats, GroupConsumer
from consumers.postgres.rows import RECORD_TABLES, TABLE_FOR_COLLECTION, TransformOptions
from consumers.postgres.sink import PostgresSettings, PostgresSink
from producers.jetstream.decode import decode_message
from producers.job import JobOptions, JobRunner
from producers.source import End, SourceItem, StreamPosition
from runtime.contract.codec import AvroCodec
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import Secret
from runtime.simulator.jetstream import synthetic_events

START_US = 1_700_000_000_000_000


class ListSource:
    """A bounded producer source over a list of events."""

    name = "jetstream"

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self._position = StreamPosition(rewind=0)

    @property
    def position(self) -> StreamPosition:
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        for event in self.events:
            yield event
        yield End("exhausted")


def make_events(n: int, *, seed: int, job: str, accounts: int = 40) -> list[Event]:
    """Synthetic Jetstream events (posts, replies, quotes, likes, deletes, updates, identity, account)."""
    return [decode_message(e.text, job=job)
            for e in synthetic_events(n, seed=seed, accounts=accounts, start_us=START_US, real_cids=False)]


def replayed(events: list[Event], job: str, seed: int) -> list[Event]:
    """The same events, shuffled (older revisions after newer ones), as another job."""
    out = [replace(e, job=job) for e in events]
    random.Random(seed).shuffle(out)
    return out


def produce(kafka: KafkaSettings, events: list[Event], job: str) -> dict[str, dict[str, int]]:
    """Run a producer job over ``events``; return the final offsets it recorded."""
    runner = JobRunner(kafka, JobOptions(job=job, source="jetstream", checkpoint_events=1000), Metrics(),
                       AvroCodec())
    try:
        state = asyncio.run(runner.run(lambda _prev: ListSource(events)))
    finally:
        runner.close()
    assert state.status == "finished"
    return state.offsets


def _uri_did(uri: Any) -> str | None:
    if isinstance(uri, str) and uri.startswith("at://did:"):
        return uri[5:].split("/", 1)[0]
    return None


@dataclass
class Tables:
    """What the tables hold (or should hold)."""

    records: dict[str, dict[tuple[str, ...], tuple[Any, ...]]] = field(default_factory=dict)
    identities: set[tuple[Any, ...]] = field(default_factory=set)
    accounts: set[tuple[Any, ...]] = field(default_factory=set)
    actors: set[str] = field(default_factory=set)
    cursors: dict[str, str] = field(default_factory=dict)


def expected(events: list[Event]) -> Tables:
    """The rows the sink must end with: per record key, the change with the highest revision."""
    best: dict[tuple[str, str, str], RecordEvent] = {}
    out = Tables(records={t.name: {} for t in RECORD_TABLES})
    for e in events:
        out.actors.add(e.did)
        job_cursor = int(out.cursors.get(e.job, "-1"))
        out.cursors[e.job] = str(max(job_cursor, e.cursor))
        if isinstance(e, IdentityEvent):
            out.identities.add((e.did, e.source, e.cursor, e.time_us))
            continue
        if isinstance(e, AccountEvent):
            out.accounts.add((e.did, e.source, e.cursor, e.time_us))
            continue
        key = (e.did, e.collection, e.rkey)
        if key not in best or (e.rev or "") > (best[key].rev or ""):
            best[key] = e
        rec = e.record or {}
        refs: list[Any] = []
        if e.collection in ("app.bsky.graph.follow", "app.bsky.graph.block"):
            refs.append(rec.get("subject") if str(rec.get("subject", "")).startswith("did:") else None)
        if e.collection in ("app.bsky.feed.like", "app.bsky.feed.repost"):
            refs.append(_uri_did((rec.get("subject") or {}).get("uri")))
        if e.collection == "app.bsky.feed.post":
            reply = rec.get("reply") or {}
            refs += [_uri_did((reply.get("root") or {}).get("uri")), _uri_did((reply.get("parent") or {}).get("uri"))]
            embed = rec.get("embed") or {}
            quoted = embed.get("record") or {}
            if embed.get("$type") == "app.bsky.embed.recordWithMedia":
                quoted = quoted.get("record") or {}
            if embed.get("$type") in ("app.bsky.embed.record", "app.bsky.embed.recordWithMedia"):
                refs.append(_uri_did(quoted.get("uri")))
        out.actors.update(r for r in refs if r)
    for (did, collection, rkey), e in best.items():
        if e.operation == "delete":
            continue
        table = TABLE_FOR_COLLECTION.get(collection)
        name = table.name if table is not None else "records"
        out.records[name][(did, collection, rkey)] = (e.rev, e.cid, e.record)
    return out


def record_rows(conn: psycopg.Connection[Any], schema: str) -> dict[str, dict[tuple[str, ...], tuple[Any, ...]]]:
    """Every record table's live rows: table -> (did, collection, rkey) -> (rev, cid, record)."""
    out: dict[str, dict[tuple[str, ...], tuple[Any, ...]]] = {t.name: {} for t in RECORD_TABLES}
    s = sql.Identifier(schema)
    for table in RECORD_TABLES:
        coll = sql.Literal(table.collection) if table.collection else sql.SQL("collection")
        for did, collection, rkey, rev, cid, record in conn.execute(sql.SQL(
                "SELECT did, {coll}, rkey, rev, cid, record FROM {s}.{t} WHERE NOT deleted").format(
                coll=coll, s=s, t=sql.Identifier(table.name))):
            out[table.name][(did, collection, rkey)] = (rev, cid, record)
    return out


def snapshot(pg_url: str, schema: str) -> Tables:
    """What the tables in ``schema`` hold."""
    out = Tables()
    s = sql.Identifier(schema)
    with psycopg.connect(pg_url) as conn:
        out.records = record_rows(conn, schema)
        out.identities = set(conn.execute(sql.SQL(
            "SELECT did, source, cursor, time_us FROM {}.identity_events").format(s)).fetchall())
        out.accounts = set(conn.execute(sql.SQL(
            "SELECT did, source, cursor, time_us FROM {}.account_events").format(s)).fetchall())
        out.actors = {r[0] for r in conn.execute(sql.SQL("SELECT did FROM {}.actors").format(s))}
        # firehose_cursor is the low watermark over the job's partitions; compare the high mark
        # (the newest position committed anywhere) with the events, and the low one with the rows.
        marks = conn.execute(sql.SQL(
            "SELECT service, min(cursor)::text, max(cursor)::text FROM {}.job_partitions GROUP BY service").format(
                s)).fetchall()
        low = dict(conn.execute(sql.SQL("SELECT service, cursor FROM {}.firehose_cursor").format(s)).fetchall())
        assert low == {service: lo for service, lo, _ in marks}
        out.cursors = {service: hi for service, _, hi in marks}
    return out


def assert_tables_equal(got: Tables, want: Tables) -> None:
    """Compare table by table (a readable diff for the first mismatch)."""
    for name in want.records:
        g, w = got.records[name], want.records[name]
        missing, extra = w.keys() - g.keys(), g.keys() - w.keys()
        assert not missing, f"{name}: {len(missing)} rows missing"
        assert not extra, f"{name}: {len(extra)} unexpected rows"
        wrong = [k for k in w if g[k] != w[k]]
        assert not wrong, f"{name}: {len(wrong)} rows differ, e.g. {wrong[0]}: {g[wrong[0]]} != {w[wrong[0]]}"
    assert got.identities == want.identities
    assert got.accounts == want.accounts
    assert got.actors == want.actors
    assert got.cursors == want.cursors


def stored_offsets(pg_url: str, schema: str, group: str) -> dict[str, dict[str, int]]:
    """The offsets the sink stored for ``group`` in the job-state shape (topic -> partition -> next)."""
    out: dict[str, dict[str, int]] = {}
    with psycopg.connect(pg_url) as conn:
        try:
            rows = conn.execute(sql.SQL("SELECT topic, partition, next_offset FROM {}.kafka_offsets "
                                        "WHERE group_id = %s").format(sql.Identifier(schema)), (group,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    for topic, partition, nxt in rows:
        out.setdefault(topic, {})[str(partition)] = nxt
    return out


def consume(kafka: KafkaSettings, pg_url: str, schema: str, *, metrics: Metrics | None = None,
            **options: Any) -> tuple[ConsumerStats, Metrics]:
    """Run one in-process consumer group member into ``schema`` until it stops."""
    metrics = metrics or Metrics()
    sink = PostgresSink(PostgresSettings(Secret(pg_url), db_schema=schema,
                                         max_concurrent=options.pop("max_concurrent", 2),
                                         transform=options.pop("transform", TransformOptions())), metrics)
    opts = ConsumerOptions(group=options.pop("group", f"g-{schema}"), linger=0.2, **options)
    consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec(), stop_event=options.get("stop_event"))
    try:
        stats = consumer.run()
    finally:
        sink.close()
    return stats, metrics
