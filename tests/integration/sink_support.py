"""A PostgresSink over a test schema, and the events and queries the sink tests write and read with
(test_postgres_sink, test_postgres_purge_race)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from tenacity import wait_none

from consumers.base import Consumed
from consumers.postgres.rows import TransformOptions
from consumers.postgres.sink import PostgresSettings, PostgresSink
from runtime.contract.records import Event, RecordEvent
from runtime.process.metrics import Metrics
from runtime.process.options import Secret

A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
B = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
CID = "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4"
POST = "app.bsky.feed.post"


def sink_for(pg_url: str, schema: str, **kw: Any) -> PostgresSink:
    transform = kw.pop("transform", TransformOptions())
    settings = PostgresSettings(Secret(pg_url), db_schema=schema, transform=transform,
                                deletes=kw.pop("deletes", "delete"), max_concurrent=kw.pop("max_concurrent", 1),
                                retries=kw.pop("retries", 5))
    return PostgresSink(settings, kw.pop("metrics", Metrics()), retry_wait=wait_none(), **kw)


def post(rev: str, text: str, *, rkey: str = "p1", did: str = A, cursor: int = 1, op: str = "create",
         job: str = "j1") -> RecordEvent:
    record = None if op == "delete" else {"$type": POST, "text": text, "createdAt": "2024-05-02T00:00:00Z"}
    return RecordEvent(did=did, collection=POST, rkey=rkey, operation=op, rev=rev,
                       cid=None if record is None else CID, record=record, source="jetstream", cursor=cursor,
                       time_us=cursor, job=job)


def write(sink: PostgresSink, events: list[Event], offset: int = 0, group: str = "g",
          topic: str = "t.app.bsky.feed.post") -> None:
    for i, e in enumerate(events):
        sink.add(Consumed(topic, 0, offset + i, "x", e, 0))
    sink.flush(group, {(topic, 0): offset + len(events)})


def query(pg_url: str, statement: str, schema: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(statement, params).fetchall()


def posts(pg_url: str, schema: str) -> dict[str, tuple[Any, ...]]:
    return {r[0]: r[1:] for r in query(pg_url, "SELECT rkey, rev, record->>'text', deleted FROM posts", schema)}
