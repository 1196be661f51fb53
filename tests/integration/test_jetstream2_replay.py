"""``backfill jetstream --protocol v2`` against the v2 simulator, on the real broker (issue 14's "Done
means"): a start older than the live window, an end inside the live tail, one collection; exactly the
matching rows of the archive and the tail, in per-DID seq order; a kill -9 in a transaction and
``--resume`` lose and repeat nothing; PostgreSQL ends with exactly what the fold of those rows says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from producers.jetstream.archive import RowFilter, decode_row
from runtime.atproto.segment import Row
from runtime.contract.records import RecordEvent, SyncEvent, event_key
from runtime.contract.timeparse import us_to_iso
from runtime.contract.typed import event_from_datum
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream2 import Faults, Jetstream2Simulator, build_simulator
from tests.integration.eos import committed, event_topics, kill_in_transaction

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
LIKE = "app.bsky.feed.like"
EVENTS = 3000
TAIL = 300
RATE = 100.0  # rows per second of witnessed time in the generated history


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_", "JETSTREAM_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _args(sim: Jetstream2Simulator, kafka: KafkaSettings, job: str, start_us: int, end_us: int,
          *extra: str) -> list[str]:
    return [sys.executable, "-m", "producers.jetstream", "--protocol", "v2", "--instance", sim.url,
            "-s", us_to_iso(start_us), "-e", us_to_iso(end_us), "-c", LIKE, "-n", "0", "-t", "120",
            "--consumer", "none", "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
            kafka.topic_prefix, "--topic-partitions", "3", "--job", job, "--progress", "none",
            "--checkpoint-interval", "0.3", *extra]


def _run(args: list[str], log: Path, timeout: float = 180) -> None:
    with log.open("ab") as out:
        proc = subprocess.run(args, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                              check=False)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _expected(rows: list[Row], job: str, start_us: int, end_us: int, tip: int) -> list[RecordEvent | object]:
    """The events a replay of ``rows`` must produce, in seq order: the like commits and the DID-level
    identity, account and sync events witnessed at or after the start,
    until the end: in the archive (seq <= ``tip``) the first row witnessed at or after it; in the
    live tail, whose frames carry only the event time, the first wanted row timed at or after it."""
    flt = RowFilter.of(collections=[LIKE])
    out: list[RecordEvent | object] = []
    for row in rows:
        if row.witnessed_at < start_us:
            continue
        if row.seq <= tip and row.witnessed_at >= end_us:
            break
        if not flt.wants(row):
            continue
        item = decode_row(row, job=job)
        if row.seq > tip and item.time_us >= end_us:
            break
        out.append(item)
    return out


@pytest.fixture
def sim() -> Iterator[Jetstream2Simulator]:
    now = time.time()
    s = build_simulator(seed=33, accounts=25, events=EVENTS, tail=TAIL, rows_per_segment=400, rows_per_block=50,
                        start_us=int((now - (EVENTS + TAIL) / RATE) * 1e6), rate=RATE, live_rate=150.0,
                        plan_page_size=2).start_in_thread()
    yield s
    s.stop_thread()


def _committed_events(kafka: KafkaSettings) -> list[tuple[str, object]]:
    return [(topic, event_from_datum(name, datum)) for topic, name, datum in committed(kafka, event_topics(kafka))]


@pytest.mark.slow
def test_archive_then_live_with_a_kill_9_and_resume_is_exact_and_the_fold_matches(
        sim: Jetstream2Simulator, kafka: KafkaSettings, pg_url: str, schema: str, tmp_path: Path) -> None:
    rows = sim.rows
    start_us = rows[500].witnessed_at  # deep in the sealed archive
    end_us = int((time.time() + 12.0) * 1e6)  # inside the live tail, still to come (slow machines too)
    job = "v2-exact"
    log = tmp_path / "producer.log"
    args = _args(sim, kafka, job, start_us, end_us)

    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=ROOT)
    control = f"{kafka.topic_prefix}.control.jobs"

    def checkpointed_live() -> bool:
        # killed in the live tail, after the killed run checkpointed (so the resume continues it)
        if sim.frames_sent < 100:
            return False
        state = load_job(kafka.consumer_config("v2-probe"), control, job)
        return state is not None and state.checkpoint >= 2 and state.position.get("live") is True

    try:
        held = kill_in_transaction(proc, kafka, group=True, timeout=90, ready=checkpointed_live)
        assert held, "the kill left no open transaction"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    killed = load_job(kafka.consumer_config("v2-reader"), control, job)
    assert killed is not None and killed.status == "running" and killed.position["live"] is True
    _run([*args, "--resume"], log)

    want = _expected(list(sim.rows), job, start_us, end_us, sim.sealed_tip)
    assert want and any(isinstance(e, RecordEvent) for e in want)
    got = _committed_events(kafka)
    got_keys = Counter(event_key(e) for _, e in got)  # type: ignore[arg-type]
    assert got_keys == Counter(event_key(e) for e in want)  # type: ignore[arg-type]
    assert all(c == 1 for c in got_keys.values())
    assert all(getattr(e, "source", None) == "jetstream2" for _, e in got)

    # per DID (the Kafka key), each topic partition holds the DID's rows in seq order
    by_did: dict[tuple[str, str], list[int]] = {}
    for topic, e in got:
        by_did.setdefault((topic, e.did), []).append(e.cursor)  # type: ignore[attr-defined]
    assert all(seqs == sorted(seqs) for seqs in by_did.values())

    state = load_job(kafka.consumer_config("v2-reader"), control, job)
    assert state is not None and state.status == "finished" and state.stop_reason == "end_cursor_reached"
    assert state.position["protocol"] == "v2" and state.position["instance"] == sim.url
    # the resume continued the killed run from its checkpoint
    assert state.run == killed.run and state.checkpoint > killed.checkpoint
    assert state.position["seq"] > killed.position["seq"]

    # PostgreSQL: the likes table holds exactly the likes whose last row (by seq) is not a delete and
    # that no later #sync of their DID removed
    # the session's database is shared with other tests (the demo writes public.likes): a schema of its own
    cmd = [sys.executable, "-m", "runtime", "consume", "postgres", "--until-done", job, "--database-url", pg_url,
           "--db-schema", schema, "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    _run(cmd, tmp_path / "consumer.log")
    # (the map's rule, in seq order: a #sync removes every record of the DID with a lower seq; the
    # consumer's default --resync purge applies it by rev, whatever order the topics are read in)
    assert any(isinstance(e, SyncEvent) for e in want)
    last: dict[tuple[str, str], RecordEvent] = {}
    for e in want:
        if isinstance(e, SyncEvent):
            for key in [k for k in last if k[0] == e.did]:
                del last[key]
        elif isinstance(e, RecordEvent):
            last[(e.did, e.rkey)] = e
    alive = {k for k, e in last.items() if e.operation != "delete"}
    with psycopg.connect(pg_url) as conn:
        table = {(r[0], r[1]) for r in conn.execute(
            sql.SQL("SELECT did, rkey FROM {}.likes").format(sql.Identifier(schema)))}
    assert table == alive


@pytest.mark.slow
def test_workers_replay_parts_in_parallel_and_a_kill_9_of_all_then_resume_is_exact(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    """``--workers 2`` over an archive-only window ending at a seq: the parts run as their own jobs;
    killing every process in a transaction and resuming commits every row exactly once."""
    s = build_simulator(seed=44, accounts=30, events=12000, tail=0, rows_per_segment=1500, rows_per_block=200,
                        start_us=1_760_000_000_000_000, rate=1000.0,
                        faults=Faults(rate_limit_fraction=0.25, retry_after=1)).start_in_thread()
    try:
        end_seq = 11000
        job = "v2-parts"
        args = [sys.executable, "-m", "producers.jetstream", "--protocol", "v2", "--instance", s.url, "--cursor", "1",
                "-e", str(end_seq), "-c", "app.bsky.*", "-n", "0", "-t", "120", "--consumer", "none",
                "--workers", "2", "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
                kafka.topic_prefix, "--topic-partitions", "3", "--job", job, "--progress", "none",
                "--checkpoint-interval", "0.2"]
        log = tmp_path / "parts.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(args, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=ROOT)
        try:
            held = kill_in_transaction(proc, kafka, group=True, timeout=90)
            assert held, "the kill left no open transaction"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        _run([*args, "--resume"], log)
        assert "2 parts" in log.read_text()

        flt = RowFilter.of(collections=["app.bsky.*"])
        want: Counter[str] = Counter()
        for row in s.rows:
            if row.seq <= end_seq and flt.wants(row):
                want[event_key(decode_row(row, job=job))] += 1
        got = Counter(event_key(e) for _, e in _committed_events(kafka))  # type: ignore[arg-type]
        assert got == want
        control = f"{kafka.topic_prefix}.control.jobs"
        states = [load_job(kafka.consumer_config("v2-parts-reader"), control, f"{job}.part{i}") for i in (0, 1)]
        assert all(st is not None and st.status == "finished" for st in states)
        assert states[0] is not None and states[0].filters["parts"] == states[1].filters["parts"]  # type: ignore[union-attr]
    finally:
        s.stop_thread()
