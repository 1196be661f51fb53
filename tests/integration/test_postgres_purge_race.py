"""Two replicas' transactions at the same time. Issue 17 #1: an account purge and an older record of
the same DID, written by two replicas (the account topic and a collection topic), never leave the
record behind. And a job's low watermark, the minimum of its partitions' positions that both
replicas update, is the true minimum once both committed.

Replica B's purge transaction is held open just before its commit (a third connection holds the
row lock B's offsets need); replica A then writes an older post of the removed account. Under READ
COMMITTED, A's guard cannot see B's uncommitted removal and B's DELETE ran before A's row existed:
without a lock between them, the deleted account keeps that post for good.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumers.postgres.rows import TransformOptions
from runtime.contract.records import AccountEvent
from tests.integration.sink_support import A, B, post, posts, query, sink_for, write

pytestmark = pytest.mark.integration

PURGE = TransformOptions(removal_statuses=frozenset({"deleted"}))


def _count_waiting(pg_url: str, statement: str) -> int:
    """How many sessions of this database wait for a lock in a statement on ``statement``."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock' AND query LIKE %s", (f"%{statement}%",)).fetchone()
    return int(row[0]) if row else 0


def _waiting_on_lock(pg_url: str, statement: str) -> bool:
    """Whether a session of this database waits for a lock in a statement on ``statement``."""
    return _count_waiting(pg_url, statement) > 0


def _started(errors: list[BaseException], fn: Any) -> threading.Thread:
    """A started thread running ``fn``; what it raises goes to ``errors``."""
    def target() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _until(what: str, predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_purge_and_an_older_record_of_the_same_did_from_two_replicas(pg_url: str, schema: str) -> None:
    replica_b = sink_for(pg_url, schema, transform=PURGE)
    replica_a = sink_for(pg_url, schema, transform=PURGE)
    # A's account has a post, and so has another account; replica B's offsets row of the account
    # topic exists (so that it can be held).
    write(replica_a, [post("3k001", "a1", rkey="a1", cursor=10), post("3k002", "b1", rkey="b1", did=B, cursor=11)],
          0, group="ga")
    active = AccountEvent(did=B, active=True, status=None, seq=1, time="t", source="jetstream", cursor=20,
                          time_us=20, job="j1")
    write(replica_b, [active], 0, group="gb", topic="t.account")
    gone = AccountEvent(did=A, active=False, status="deleted", seq=2, time="t", source="jetstream", cursor=50,
                        time_us=50, job="j1")
    errors: list[BaseException] = []

    with psycopg.connect(pg_url) as holder:
        holder.execute(sql.SQL("SELECT 1 FROM {}.kafka_offsets WHERE group_id = 'gb' FOR UPDATE").format(
            sql.Identifier(schema)))
        # B: the purge of A's account, held open just before its offsets (and commit)
        purge = _started(errors, lambda: write(replica_b, [gone], 1, group="gb", topic="t.account"))
        _until("replica B to hold its purge open", lambda: _waiting_on_lock(pg_url, "kafka_offsets") or errors)
        assert not errors, errors
        # A: an older post of the removed account, from the posts topic
        older = _started(errors, lambda: write(replica_a, [post("3k000", "a0", rkey="a0", cursor=5)], 2, group="ga"))
        # A either commits at once (the race) or waits for B's exclusive lock on A's DID bucket
        _until("replica A to commit or wait",
               lambda: not older.is_alive() or _waiting_on_lock(pg_url, "pg_advisory_xact_lock"))
        holder.rollback()  # B goes on and commits
    purge.join(30)
    older.join(30)
    assert not errors, errors
    assert set(posts(pg_url, schema)) == {"b1"}  # nothing of the removed account is left
    assert query(pg_url, "SELECT removed_time_us FROM actors WHERE did = %s", schema, A) == [(50,)]
    replica_a.close()
    replica_b.close()


def test_two_replicas_committing_together_store_the_true_low_watermark(pg_url: str, schema: str) -> None:
    # A job's low watermark (firehose_cursor) is the minimum of its partitions' positions, which two
    # replicas update in transactions that overlap. Replica B is held just before it stores the
    # watermark (a third connection holds its row), replica A then commits its own partition's
    # position: without an order between them each computes the minimum without the other's
    # uncommitted position, and the job keeps a watermark below every partition's.
    replica_a = sink_for(pg_url, schema)
    replica_b = sink_for(pg_url, schema)
    write(replica_a, [post("3k001", "a1", rkey="a1", cursor=10)], 0, group="ga", topic="t.a")
    write(replica_b, [post("3k001", "b1", rkey="b1", cursor=10)], 0, group="gb", topic="t.b")
    assert query(pg_url, "SELECT cursor FROM firehose_cursor WHERE service = 'j1'", schema) == [("10",)]
    errors: list[BaseException] = []

    with psycopg.connect(pg_url) as holder:
        holder.execute(sql.SQL("SELECT 1 FROM {}.firehose_cursor WHERE service = 'j1' FOR UPDATE").format(
            sql.Identifier(schema)))
        later_b = _started(errors, lambda: write(replica_b, [post("3k002", "b2", rkey="b2", cursor=50)], 1, group="gb",
                                    topic="t.b"))
        _until("replica B to wait before its watermark", lambda: _waiting_on_lock(pg_url, "firehose_cursor") or errors)
        later_a = _started(errors, lambda: write(replica_a, [post("3k002", "a2", rkey="a2", cursor=40)], 1, group="ga",
                                    topic="t.a"))
        # A either waits for B (the order) or computes its minimum beside B's open transaction
        _until("replica A to wait", lambda: _waiting_on_lock(pg_url, "pg_advisory_xact_lock")
               or _count_waiting(pg_url, "firehose_cursor") >= 2 or errors)
        holder.rollback()
    later_b.join(30)
    later_a.join(30)
    assert not errors, errors
    positions = query(pg_url, "SELECT topic, cursor FROM job_partitions WHERE service = 'j1' ORDER BY topic", schema)
    assert positions == [("t.a", 40), ("t.b", 50)]
    assert query(pg_url, "SELECT cursor FROM firehose_cursor WHERE service = 'j1'", schema) == [("40",)]
    replica_a.close()
    replica_b.close()

