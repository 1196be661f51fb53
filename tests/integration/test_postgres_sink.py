"""The PostgreSQL sink against a real server: migrations, revision rules, deletes, offsets, failures."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumers.base import Consumed
from consumers.postgres.rows import RECORD_TABLES, TransformOptions
from consumers.postgres.schema import CURRENT_VERSION, migrate
from consumers.postgres.sink import Committed, Statements
from runtime.contract.created_at import OutOfRange, TimestampPolicy
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent
from runtime.errors import CommitError, ConfigError, SinkUnavailableError
from runtime.kafka.offsets import StoredOffset
from runtime.process.metrics import Metrics
from tests.integration.sink_support import CID, POST, A, B, post, posts, query, sink_for, write

pytestmark = pytest.mark.integration


def test_migrations_run_once_from_concurrent_replicas(pg_url: str, schema: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[int]] = []
    barrier = threading.Barrier(6)

    def replica() -> None:
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                barrier.wait()
                applied.append(migrate(conn, schema))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(applied, key=len) == [[]] * 5 + [list(range(1, CURRENT_VERSION + 1))]
    assert query(pg_url, "SELECT version FROM schema_migrations", schema) == [(v,) for v in
                                                                           range(1, CURRENT_VERSION + 1)]
    columns = {(t, c) for t, c in query(
        pg_url, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
        schema, schema)}
    for table in RECORD_TABLES:
        for column in (*table.column_names, "deleted", "updated_at"):
            assert (table.name, column) in columns


def test_the_removal_time_lookup_can_use_the_index_of_removed_actors(pg_url: str, schema: str) -> None:
    # Purge mode looks up a batch's DIDs among the removed actors only; with millions of actors a
    # plan without the partial index scans the whole table (44 ms a batch at a million).
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn, schema)
        statements = Statements(schema, flag_deletes=False, purge=True)
        with conn.transaction():
            conn.execute("SET LOCAL enable_seqscan = off")
            conn.execute("SET LOCAL enable_bitmapscan = off")
            plan = "\n".join(str(r[0]) for r in conn.execute(
                sql.SQL("EXPLAIN ") + statements.removal_times, ([A, B],)).fetchall())
    assert "actors_removed" in plan, plan


def test_a_database_migrated_by_a_newer_tool_is_refused(pg_url: str, schema: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn, schema)
        conn.execute(sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (999, 'future')").format(
            sql.Identifier(schema)))
        with pytest.raises(ConfigError, match="newer"):
            migrate(conn, schema)


def test_firehose_cursor_is_seed_004s_table(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    sink.close()
    cols = query(pg_url, "SELECT column_name, data_type, character_maximum_length, is_nullable, column_default "
                 "FROM information_schema.columns WHERE table_schema = %s AND table_name = 'firehose_cursor' "
                 "ORDER BY ordinal_position", schema, schema)
    assert [(c[0], c[1], c[2], c[3]) for c in cols] == [
        ("id", "integer", None, "NO"), ("service", "character varying", 255, "NO"), ("cursor", "text", None, "YES"),
        ("last_event_time", "timestamp without time zone", None, "YES"),
        ("updated_at", "timestamp without time zone", None, "NO")]
    assert str(cols[0][4]).startswith("nextval(")
    assert str(cols[4][4]).lower() == "now()"
    unique = query(pg_url, "SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND tablename = 'firehose_cursor' "
                   "AND indexdef LIKE '%%UNIQUE%%(service)%%'", schema, schema)
    assert unique == [(1,)]


def test_only_a_newer_revision_replaces_and_tombstones_block_resurrection(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    write(sink, [post("3k002", "v2", cursor=2)], 0)
    write(sink, [post("3k001", "v1 (late, older)", cursor=1, op="update")], 1)
    assert posts(pg_url, schema) == {"p1": ("3k002", "v2", False)}
    write(sink, [post("3k003", "", cursor=3, op="delete")], 2)
    assert posts(pg_url, schema) == {}
    assert query(pg_url, "SELECT did, collection, rkey, rev FROM tombstones", schema) == [(A, POST, "p1", "3k003")]
    write(sink, [post("3k002", "v2 replayed", cursor=2)], 3)       # a late older create: stays deleted
    assert posts(pg_url, schema) == {}
    write(sink, [post("3k004", "re-created", cursor=4)], 4)         # a newer one: back
    assert posts(pg_url, schema) == {"p1": ("3k004", "re-created", False)}
    write(sink, [post("3k003", "", cursor=3, op="delete")], 5)      # an older delete: no effect
    assert posts(pg_url, schema) == {"p1": ("3k004", "re-created", False)}
    # a delete that arrives before its (older) create, and an unrelated record in the same batch
    write(sink, [post("3k006", "", rkey="p2", cursor=6, op="delete"), post("3k005", "x", rkey="p2", cursor=5),
                 post("3k007", "other", rkey="p3", cursor=7)], 6)
    assert set(posts(pg_url, schema)) == {"p1", "p3"}
    sink.close()


def test_flag_mode_keeps_deleted_rows_marked(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema, deletes="flag")
    write(sink, [post("3k001", "v1")], 0)
    write(sink, [post("3k002", "", op="delete", cursor=2)], 1)
    assert posts(pg_url, schema) == {"p1": ("3k002", "v1", True)}
    write(sink, [post("3k001", "v1 replayed")], 2)
    assert posts(pg_url, schema) == {"p1": ("3k002", "v1", True)}
    write(sink, [post("3k003", "v3", cursor=3)], 3)
    assert posts(pg_url, schema) == {"p1": ("3k003", "v3", False)}
    sink.close()


def test_offsets_and_cursor_move_only_forward(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    topic = "t.app.bsky.feed.post"
    write(sink, [post("3k001", "a", rkey="a", cursor=1_700_000_000_000_000)], 0)
    write(sink, [post("3k002", "b", rkey="b", cursor=1_700_000_000_500_000)], 10)
    assert sink.load_offsets("g", [(topic, 0), (topic, 1)]) == {(topic, 0): StoredOffset(11)}
    write(sink, [post("3k000", "z", rkey="z", cursor=1_600_000_000_000_000)], 3)  # a replayed, older batch
    assert sink.load_offsets("g", [(topic, 0)]) == {(topic, 0): StoredOffset(11)}
    assert sink.load_offsets("other", [(topic, 0)]) == {}
    rows = query(pg_url, "SELECT service, cursor, last_event_time FROM firehose_cursor", schema)
    assert rows == [("j1", "1700000000500000", datetime(2023, 11, 14, 22, 13, 20, 500000))]
    sink.close()


def test_identity_account_events_and_actors(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    ident_new = IdentityEvent(did=A, handle="new.test", seq=2, time="t2", source="jetstream", cursor=20, time_us=20,
                              job="j1")
    ident_old = IdentityEvent(did=A, handle="old.test", seq=1, time="t1", source="jetstream", cursor=10, time_us=10,
                              job="j1")
    account = AccountEvent(did=B, active=False, status="takendown", seq=3, time="t3", source="jetstream", cursor=30,
                           time_us=30, job="j1")
    write(sink, [ident_new, account], 0, topic="t.identity")
    write(sink, [ident_old, ident_new], 2, topic="t.identity")  # older handle arrives late; a replay
    assert query(pg_url, "SELECT did, handle, active, status FROM actors ORDER BY did", schema) == [
        (A, "new.test", None, None), (B, None, False, "takendown")]
    assert query(pg_url, "SELECT count(*) FROM identity_events", schema) == [(2,)]
    assert query(pg_url, "SELECT did, status FROM account_events", schema) == [(B, "takendown")]
    sink.close()


def test_account_removal_purges_and_keeps_older_records_out(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema, transform=TransformOptions(removal_statuses=frozenset({"deleted"})))
    write(sink, [post("3k001", "a1", rkey="a1", cursor=10), post("3k002", "b1", rkey="b1", did=B, cursor=11)], 0)
    gone = AccountEvent(did=A, active=False, status="deleted", seq=1, time="t", source="jetstream", cursor=50,
                        time_us=50, job="j1")
    write(sink, [gone], 0, topic="t.account")
    assert set(posts(pg_url, schema)) == {"b1"}
    write(sink, [post("3k000", "a0", rkey="a0", cursor=5), post("3k009", "a9", rkey="a9", cursor=90)], 2)
    assert set(posts(pg_url, schema)) == {"b1", "a9"}  # older rows of the removed account stay out
    assert query(pg_url, "SELECT removed_time_us FROM actors WHERE did = %s", schema, A) == [(50,)]
    sink.close()


def test_created_at_policy_and_metrics(pg_url: str, schema: str) -> None:
    metrics = Metrics()
    policy = TimestampPolicy(start=datetime(2024, 6, 1, tzinfo=UTC), out_of_range=OutOfRange.STANDARDIZE)
    sink = sink_for(pg_url, schema, transform=TransformOptions(policy=policy), metrics=metrics)
    write(sink, [post("3k001", "old")], 0)
    write(sink, [post("3k000", "older still")], 1)
    assert query(pg_url, "SELECT created_at FROM posts", schema) == [(datetime(2024, 5, 1, tzinfo=UTC),)]
    value = metrics.registry.get_sample_value
    assert value("atproto_backfill_consumer_created_at_records_total",
                 {"sink": "postgres", "outcome": "standardized"}) == 2
    assert value("atproto_backfill_consumer_messages_skipped_total", {"sink": "postgres", "reason": "stale_rev"}) == 1
    assert value("atproto_backfill_consumer_rows_written_total", {"sink": "postgres", "table": "posts"}) == 1
    sink.close()


def terminate_writer(pg_url: str) -> None:
    """Kill the sink's writer connection server-side, as a database restart would."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        n = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name = 'atproto-backfill-postgres' AND datname = current_database()"
                         ).fetchone()
        assert n is not None
        assert n[0] >= 1


def test_lost_connection_is_retried_with_the_batch_kept(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    write(sink, [post("3k001", "a", rkey="a")], 0)
    terminate_writer(pg_url)
    sink.add(Consumed("t.app.bsky.feed.post", 0, 1, "x", post("3k002", "b", rkey="b"), 0))
    with pytest.raises(SinkUnavailableError):
        sink.flush("g", {("t.app.bsky.feed.post", 0): 2})
    assert sink.load_offsets("g", [("t.app.bsky.feed.post", 0)]) == {("t.app.bsky.feed.post", 0): StoredOffset(1)}
    assert sink.flush("g", {("t.app.bsky.feed.post", 0): 2}) >= 1  # GroupConsumer's retry: same batch
    assert set(posts(pg_url, schema)) == {"a", "b"}
    assert sink.load_offsets("g", [("t.app.bsky.feed.post", 0)]) == {("t.app.bsky.feed.post", 0): StoredOffset(2)}
    sink.close()


def test_background_writer_retries_and_commits_in_order(pg_url: str, schema: str) -> None:
    metrics = Metrics()
    committed: list[Committed] = []
    sink = sink_for(pg_url, schema, max_concurrent=3, metrics=metrics, on_commit=committed.append)
    write(sink, [post("3k001", "a", rkey="a", cursor=1)], 0)
    sink.load_offsets("g", [])  # waits for the background batch
    terminate_writer(pg_url)
    for i in range(1, 6):
        write(sink, [post(f"3k00{i + 1}", str(i), rkey=str(i), cursor=i + 1)], i)
    sink.close()
    assert set(posts(pg_url, schema)) == {"a", "1", "2", "3", "4", "5"}
    assert [c.event_times_us for c in committed] == [[1], [2], [3], [4], [5], [6]]
    assert metrics.registry.get_sample_value("atproto_backfill_consumer_sink_retries_total", {"sink": "postgres"}) >= 1
    check = sink_for(pg_url, schema)
    assert check.load_offsets("g", [("t.app.bsky.feed.post", 0)]) == {("t.app.bsky.feed.post", 0): StoredOffset(6)}
    check.close()


def test_connection_refused_at_first_is_retried(pg_url: str, schema: str) -> None:
    attempts = [0]

    def flaky(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        attempts[0] += 1
        if attempts[0] <= 2:
            raise psycopg.OperationalError("connection refused (simulated)")
        return psycopg.connect(*args, **kwargs)

    sink = sink_for(pg_url, schema, connect=flaky)
    write(sink, [post("3k001", "a")], 0)
    assert attempts[0] >= 3
    assert set(posts(pg_url, schema)) == {"p1"}
    sink.close()


def drop_posts(pg_url: str, schema: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}.posts").format(sql.Identifier(schema)))


@pytest.mark.parametrize("max_concurrent", [1, 2])
def test_a_refused_batch_is_fatal_and_stores_no_later_offsets(pg_url: str, schema: str,
                                                              max_concurrent: int) -> None:
    sink = sink_for(pg_url, schema, max_concurrent=max_concurrent)
    write(sink, [post("3k001", "a", rkey="a")], 0)
    sink.load_offsets("g", [])
    drop_posts(pg_url, schema)
    def keep_writing() -> None:
        for i in range(1, 4):
            write(sink, [post(f"3k00{i + 1}", "x", rkey=str(i))], i)
        sink.close()

    with pytest.raises(CommitError):
        keep_writing()
    assert sink.load_offsets("g", [("t.app.bsky.feed.post", 0)]) == {("t.app.bsky.feed.post", 0): StoredOffset(1)}
    with pytest.raises(CommitError):
        sink.flush("g", {("t.app.bsky.feed.post", 0): 9})
    sink.close()


def test_replicas_racing_on_new_actors_neither_fail_nor_deadlock(pg_url: str, schema: str) -> None:
    sink_for(pg_url, schema).close()
    dids = [f"did:plc:{i:024d}" for i in range(60)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def replica(n: int, order: Callable[[list[str]], list[str]]) -> None:
        sink = sink_for(pg_url, schema)
        try:
            barrier.wait()
            for batch in range(5):
                events: list[Event] = []
                for i, did in enumerate(order(dids)):
                    events.append(RecordEvent(
                        did=did, collection="app.bsky.graph.follow", rkey=f"r{n}-{batch}-{i}", operation="create",
                        rev="3k001", cid=CID, record={"$type": "app.bsky.graph.follow", "subject": dids[-1 - i],
                                                      "createdAt": "2024-01-01T00:00:00Z"},
                        source="jetstream", cursor=1, time_us=1, job="j"))
                write(sink, events, batch * 100, group=f"g{n}")
        except BaseException as e:
            errors.append(e)
        finally:
            sink.close()

    threads = [threading.Thread(target=replica, args=(n, (lambda d: d) if n % 2 else (lambda d: d[::-1])))
               for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert query(pg_url, "SELECT count(*) FROM actors", schema) == [(60,)]
    assert query(pg_url, "SELECT count(*) FROM follows", schema) == [(4 * 5 * 60,)]


def test_cli_migrate_only_never_prints_the_password(pg_url: str, schema: str) -> None:
    scheme, _, rest = pg_url.partition("://")
    user, _, host = rest.partition("@")
    with_password = f"{scheme}://{user}:sekret-pw@{host}"  # trust auth ignores it
    done = subprocess.run([sys.executable, "-m", "consumers.postgres", "--migrate-only", "--db-schema", schema,
                           "--log-level", "DEBUG"], env={"DATABASE_URL": with_password, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "sekret-pw" not in done.stdout + done.stderr
    assert "PostgreSQL sink on postgres@" in done.stderr  # the connection is described, not printed
    assert query(pg_url, "SELECT max(version) FROM schema_migrations", schema) == [(CURRENT_VERSION,)]


def test_firehose_cursor_is_a_low_watermark_over_partitions_and_replicas(pg_url: str, schema: str) -> None:
    """Issue 17 #5: a lagging partition (another replica's) holds the job's cursor back."""
    fast, slow = sink_for(pg_url, schema), sink_for(pg_url, schema)
    topic = "t.app.bsky.feed.post"
    for i, cursor in enumerate((100, 200, 300)):
        fast.add(Consumed(topic, 0, i, "x", post(f"3k00{i}", "a", rkey=f"a{i}", cursor=cursor), 0))
    fast.flush("g", {(topic, 0): 3})
    slow.add(Consumed(topic, 1, 0, "x", post("3k009", "b", rkey="b", did=B, cursor=150), 0))
    slow.flush("g", {(topic, 1): 1})
    assert query(pg_url, "SELECT service, cursor FROM firehose_cursor", schema) == [("j1", "150")]
    fast.add(Consumed(topic, 0, 3, "x", post("3k004", "a", rkey="a4", cursor=400), 0))
    fast.flush("g", {(topic, 0): 4})
    assert query(pg_url, "SELECT cursor FROM firehose_cursor", schema) == [("150",)]  # still the slow partition
    slow.add(Consumed(topic, 1, 1, "x", post("3k010", "b", rkey="b2", did=B, cursor=350), 0))
    slow.flush("g", {(topic, 1): 2})
    assert query(pg_url, "SELECT cursor FROM firehose_cursor", schema) == [("350",)]
    assert query(pg_url, "SELECT partition, cursor FROM job_partitions ORDER BY partition", schema) == [
        (0, 400), (1, 350)]
    fast.close()
    slow.close()


def test_a_delete_wins_a_tie_with_a_snapshot_row_of_its_rev(pg_url: str, schema: str) -> None:
    sink = sink_for(pg_url, schema)
    write(sink, [post("3k005", "x")], 0)
    write(sink, [post("3k005", "", op="delete", cursor=2)], 1)  # the same rev: the delete wins
    assert posts(pg_url, schema) == {}
    sink.close()


def _relay_time(second: int) -> str:
    return f"2024-01-01T00:00:{second:02d}Z"


def _us(second: int) -> int:
    return 1_704_067_200_000_000 + second * 1_000_000


def test_removals_compare_relay_and_revision_times_never_receive_clocks(pg_url: str, schema: str) -> None:
    """Issue 17 #3: the purge compares the relay's status time with the rows' as-of times.

    Jetstream's time_us is its own receive clock (here: far in the future for the account event,
    far in the past for the records): comparing them would purge a record written after the
    deletion, and keep one written before it.
    """
    from runtime.atproto.tid import make_tid

    sink = sink_for(pg_url, schema, transform=TransformOptions(removal_statuses=frozenset({"takendown"})))
    before = RecordEvent(did=A, collection=POST, rkey="old", operation="create", rev=make_tid(_us(5)), cid=CID,
                         record={"$type": POST, "text": "old", "createdAt": "2024-01-01T00:00:05Z"},
                         source="jetstream", cursor=_us(50), time_us=_us(50), job="j1")
    after = RecordEvent(did=A, collection=POST, rkey="new", operation="create", rev=make_tid(_us(30)), cid=CID,
                        record={"$type": POST, "text": "new", "createdAt": "2024-01-01T00:00:30Z"},
                        source="jetstream", cursor=_us(1), time_us=_us(1), job="j1")
    takedown = AccountEvent(did=A, active=False, status="takendown", seq=7, time=_relay_time(10),
                            source="jetstream", cursor=_us(40), time_us=_us(40), job="j1")
    reversal = AccountEvent(did=A, active=True, status=None, seq=8, time=_relay_time(20),
                            source="jetstream", cursor=_us(2), time_us=_us(2), job="j1")
    write(sink, [reversal], 0, topic="t.account")            # the reversal arrives first
    write(sink, [after, before], 0)
    write(sink, [takedown], 1, topic="t.account")
    assert set(posts(pg_url, schema)) == {"new"}             # written after the takedown: kept
    assert query(pg_url, "SELECT active, status, removed_time_us FROM actors WHERE did = %s", schema, A) == [
        (True, None, _us(10))]                               # the reversal is the newer status
    # A getRepo snapshot requested after the reversal (its head commit older than the takedown)
    # shows the repository as it is now: its rows come back.
    snapshot = RecordEvent(did=A, collection=POST, rkey="old", operation="create", rev=make_tid(_us(5)),
                           cid=CID, record={"$type": POST, "text": "old", "createdAt": "2024-01-01T00:00:05Z"},
                           source="repo", cursor=1, time_us=_us(25), job="r1")
    write(sink, [snapshot], 2)
    assert set(posts(pg_url, schema)) == {"new", "old"}
    sink.close()
