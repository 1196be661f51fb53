"""Benchmark: rows/s into PostgreSQL through Kafka per consumer, against a no-Kafka baseline, and live latency.

Run ``python bench/bench_postgres.py`` (``--quick`` for a short run). It

1. generates synthetic Jetstream events and produces them with the real producer path
   (``JobRunner``, Avro, one topic per collection) into a broker (Apache Kafka by default, ``--broker``);
2. **consumer**: times one ``GroupConsumer`` + ``PostgresSink`` draining those topics into a fresh
   schema, from the first message handed to the sink to the last committed batch;
3. **baseline**: in the same run, on the same events, times the sink's database path alone (COPY
   into staging + one upsert per table per batch, no Kafka, no Avro decoding);
4. **live**: produces events stamped with the current time at a fixed rate while a consumer writes
   them, and reports the latency from source event time to committed row.

Each throughput figure is the median of ``--repeat`` runs; the ratio is consumer / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from bench.brokers import add_broker_arguments, broker, describe
from consumers.base import TP, Consumed, ConsumerOptions, GroupConsumer
from consumers.postgres.rows import Batch, TransformOptions, add_event
from consumers.postgres.schema import migrate
from consumers.postgres.sink import (
    Committed,
    PostgresSettings,
    PostgresSink,
    Statements,
    Writer,
    prepare,
)
from producers.jetstream.decode import decode_message
from producers.job import JobOptions, JobRunner
from producers.source import End, SourceItem, StreamPosition
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event
from runtime.contract.topics import TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.offsets import UNKNOWN, Origin, StoredOffset
from runtime.kafka.settings import KafkaSettings, parse_kafka_config
from runtime.process.memory import tune_gc
from runtime.process.metrics import Metrics
from runtime.process.options import Secret
from runtime.simulator.jetstream import synthetic_events


class ListSource:
    """A bounded source over prepared events (optionally paced and re-stamped with the current time)."""

    name = "jetstream"

    def __init__(self, events: list[Event], *, rate: float = 0.0, restamp: bool = False,
                 stop: threading.Event | None = None) -> None:
        self.events = events
        self.rate = rate
        self.restamp = restamp
        self.stop = stop
        self._position = StreamPosition(rewind=0)

    @property
    def position(self) -> StreamPosition:
        """The resume position (highest cursor produced)."""
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        """Yield the events, then End."""
        t0 = time.monotonic()
        for i, original in enumerate(self.events):
            if self.stop is not None and self.stop.is_set():
                break
            if self.rate:
                due = t0 + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            event = original
            if self.restamp:
                now_us = int(time.time() * 1e6)
                event = dataclasses.replace(original, time_us=now_us, cursor=now_us)
            yield event
        yield End("exhausted")


def make_events(n: int, seed: int, job: str, start_us: int | None = None, accounts: int = 200) -> list[Event]:
    """``n`` synthetic Jetstream events of ``accounts`` accounts decoded into typed events."""
    return [decode_message(e.text, job=job)
            for e in synthetic_events(n, seed=seed, real_cids=False, start_us=start_us, accounts=accounts)]


def produce(kafka: KafkaSettings, events: list[Event], job: str) -> dict[str, dict[str, int]]:
    """Produce ``events`` as job ``job``; return the final offsets it recorded."""
    runner = JobRunner(kafka, JobOptions(job=job, source="jetstream", checkpoint_events=20000), Metrics(),
                       AvroCodec())
    try:
        state = asyncio.run(runner.run(lambda _prev: ListSource(events)))
    finally:
        runner.close()
    return state.offsets


@contextlib.contextmanager
def bench_schema(url: str) -> Iterator[str]:
    """A fresh schema, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


class TimedSink:
    """Wraps the sink to time the first message handed to it and the last commit."""

    name = "postgres"

    def __init__(self, inner: PostgresSink) -> None:
        self.inner = inner
        self.first: float | None = None
        self.messages = 0

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, StoredOffset]:
        return self.inner.load_offsets(group, partitions)

    def forget_offsets(self, group: str, partitions: list[TP]) -> None:
        self.inner.forget_offsets(group, partitions)

    def add(self, item: Consumed) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.messages += 1
        self.inner.add(item)

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        return self.inner.flush(group, offsets, origins)

    def discard(self) -> None:
        self.inner.discard()

    def close(self) -> None:
        self.inner.close()


def consumer_run(kafka: KafkaSettings, url: str, offsets: dict[str, dict[str, int]], args: argparse.Namespace
                 ) -> tuple[float, int, int]:
    """Drain the topics into a fresh schema; return (seconds, messages, rows written)."""
    with bench_schema(url) as schema:
        last = [0.0]

        def committed(_c: Committed) -> None:
            last[0] = time.perf_counter()

        metrics = Metrics()
        inner = PostgresSink(PostgresSettings(Secret(url), db_schema=schema, max_concurrent=args.max_concurrent,
                                              transform=transform(args)), metrics, on_commit=committed)
        sink = TimedSink(inner)
        opts = ConsumerOptions(group=f"bench-{schema}", batch_size=args.batch_size, linger=0.5,
                               until_offsets=offsets)
        consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec())
        try:
            consumer.run()
        finally:
            sink.close()
        assert sink.first is not None
        return last[0] - sink.first, sink.messages, inner.rows_written


def transform(args: argparse.Namespace) -> TransformOptions:
    """The consumer's transform: ``backfill consume postgres``'s defaults, with ``--resync`` as given."""
    return TransformOptions(resync_purge=args.resync == "purge")


def baseline_run(url: str, events: list[Event], batch_size: int) -> tuple[float, int, int]:
    """Write the same events with COPY + upsert only (no Kafka); return (seconds, rows staged, written)."""
    batches = []
    for i in range(0, len(events), batch_size):
        b = Batch()
        for e in events[i:i + batch_size]:
            add_event(b, e, TransformOptions())
        batches.append(b)
    with bench_schema(url) as schema:
        settings = PostgresSettings(Secret(url), db_schema=schema)
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, schema)
            statements = Statements(schema, flag_deletes=False, purge=False)
            writer = Writer(settings, statements)
            writer.connection()
            staged = written = 0
            t0 = time.perf_counter()
            for n, b in enumerate(batches):
                result = writer.write(prepare(b, conn.cursor(), statements), "baseline",
                                      {("baseline", 0): StoredOffset(n, UNKNOWN)})
                staged += len(b)
                written += result.total
            elapsed = time.perf_counter() - t0
            writer.close()
    return elapsed, staged, written


def live_run(kafka: KafkaSettings, url: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Produce at ``--live-rate`` with current timestamps while one consumer writes.

    Returns:
        ``(seconds since the producer started, latency in seconds)`` of every event committed after
        the first second.
    """
    n = int(args.live_rate * args.live_seconds)
    events = make_events(n, seed=99, job="live")
    topics = TopicMap(kafka.topic_prefix)
    admin = kafka_util.admin(kafka.client_config())
    kafka_util.ensure_topics(admin, {topics.for_event(e) for e in events}, partitions=kafka.topic_partitions,
                             replication=1)
    latencies: list[tuple[float, float]] = []
    started = [0.0]
    with bench_schema(url) as schema:
        def committed(c: Committed) -> None:
            since = c.committed_at - started[0]
            if since >= 1.0:
                latencies.extend((since, c.committed_at - t / 1e6) for t in c.event_times_us)

        metrics = Metrics()
        stop = threading.Event()
        sink = PostgresSink(PostgresSettings(Secret(url), db_schema=schema, max_concurrent=args.max_concurrent,
                                             transform=transform(args)), metrics, on_commit=committed)
        opts = ConsumerOptions(group=f"bench-live-{schema}", batch_size=args.batch_size, linger=args.live_linger,
                               topic_refresh=1.0)
        consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec(), stop_event=stop)
        thread = threading.Thread(target=consumer.run, name="consumer")
        thread.start()
        deadline = time.monotonic() + 30
        while not consumer.health.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        started[0] = time.time()
        runner = JobRunner(kafka, JobOptions(job="live", source="jetstream", checkpoint_events=1_000_000,
                                             checkpoint_interval=args.live_checkpoint), Metrics(), AvroCodec())
        try:
            asyncio.run(runner.run(lambda _prev: ListSource(events, rate=args.live_rate, restamp=True)))
        finally:
            runner.close()
            del runner
        time.sleep(2.0)
        stop.set()
        thread.join(60)
        sink.close()
    return latencies


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument("--events", type=int, default=200_000, help="events per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs of each kind (median)")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--max-concurrent", type=int, default=2, help="BACKFILL_MAX_CONCURRENT of the sink")
    parser.add_argument("--resync", choices=("purge", "keep"), default="purge",
                        help="the consumer's --resync (purge, its default, locks and guards every write)")
    parser.add_argument("--accounts", type=int, default=200,
                        help="distinct accounts (DIDs) of the generated events")
    parser.add_argument("--live-rate", type=float, default=2000.0, help="events/s in live mode")
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--live-warmup", type=float, default=3.0,
                        help="seconds of live mode before the steady-state latency is measured")
    parser.add_argument("--live-checkpoint", type=float, default=0.1,
                        help="producer checkpoint (transaction) interval in live mode, seconds")
    parser.add_argument("--live-linger", type=float, default=0.05, help="consumer linger in live mode")
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a librdkafka setting for the consumers, over the defaults (repeatable)")
    add_broker_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.events = min(args.events, 40_000)
        args.repeat = 1
        args.live_seconds = min(args.live_seconds, 6.0)
        args.live_warmup = min(args.live_warmup, 2.0)

    print(f"generating {args.events} synthetic events ...", flush=True)
    events = make_events(args.events, seed=7, job="bench", accounts=args.accounts)
    print(f"broker: {describe(args)}", flush=True)
    with broker(args) as bootstrap:
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:6]}",
                              topic_partitions=6, extra=parse_kafka_config(args.kafka_config))
        # Live mode first: a live tail is measured on a broker and database that are not still
        # absorbing the throughput runs' bursts (after them, the producer's first transactions
        # commit in 0.2-0.5 s for a few seconds, whatever the consumer does).
        live_kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"live{uuid.uuid4().hex[:6]}",
                                   topic_partitions=6, extra=parse_kafka_config(args.kafka_config))
        print(f"live mode: {args.live_rate:.0f} events/s for {args.live_seconds:.0f} s ...", flush=True)
        lat = live_run(live_kafka, args.database_url, args)
        t0 = time.perf_counter()
        offsets = produce(kafka, events, "bench")
        print(f"produced {len(events)} events in {time.perf_counter() - t0:.1f} s", flush=True)
        # The process setting `backfill consume postgres` applies; it also freezes the events this
        # bench holds in memory (a consumer never does), so the GC does not bill their rescans.
        tune_gc()
        consumer_rates: list[float] = []
        baseline_rates: list[float] = []
        for r in range(args.repeat):
            secs, _staged, written = baseline_run(args.database_url, events, args.batch_size)
            baseline_rates.append(len(events) / secs)
            print(f"  run {r + 1} baseline : {len(events)} events ({written} rows written) in {secs:.2f} s "
                  f"= {len(events) / secs:,.0f} rows/s", flush=True)
            secs, msgs, written = consumer_run(kafka, args.database_url, offsets, args)
            consumer_rates.append(msgs / secs)
            print(f"  run {r + 1} consumer : {msgs} events ({written} rows written) in {secs:.2f} s "
                  f"= {msgs / secs:,.0f} rows/s", flush=True)
        gc.collect()  # release the Kafka clients (they hold reference cycles) before the broker goes

    base = statistics.median(baseline_rates)
    cons = statistics.median(consumer_rates)
    print()
    print(f"{'':34}{'median rows/s':>15}")
    print(f"{'baseline (COPY + upsert, no Kafka)':34}{base:>15,.0f}")
    print(f"{'consumer (Kafka -> PostgreSQL)':34}{cons:>15,.0f}")
    print(f"{'ratio consumer / baseline':34}{cons / base:>15.2f}")
    print(f"consumer --resync {args.resync}, {args.accounts:,} accounts; target (issue 16): >= 0.9 of the "
          f"baseline: {'met' if cons / base >= 0.9 else 'NOT met'}")
    steady = [x for since, x in lat if since >= args.live_warmup]
    if steady:
        every = [x for _since, x in lat]
        p50, p99 = percentile(steady, 0.5), percentile(steady, 0.99)
        print(f"live at {args.live_rate:.0f} events/s after {args.live_warmup:.0f} s: {len(steady)} rows, latency "
              f"source event -> committed row p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(steady) * 1000:.0f} ms (target p99 < 500 ms: {'met' if p99 < 0.5 else 'NOT met'})")
        print(f"  from the first second on: {len(every)} rows, p50 {percentile(every, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(every, 0.99) * 1000:.0f} ms, max {max(every) * 1000:.0f} ms")
    else:
        print("live mode: no rows committed after the warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
