"""Jetstream producer throughput: simulator -> Kafka, events/s, against a same-run baseline.

The baseline reads the same events from the same simulator and does only the bare work: JSON parse,
Avro encode (the generic schema) and produce to a topic per collection keyed by DID, then flush. The
measured path is the real job: ``JetstreamSource`` (filters, de-duplication, watermark) ->
``JobRunner`` (typed Avro per collection, transactions, checkpoints), in a process set up as
``backfill jetstream`` sets itself up (the cyclic GC tuned: ``runtime.process.memory.tune_gc``); the
baseline runs with Python's defaults, as naive code does. Runs alternate; medians are reported.
The simulator runs in its own process, sharing the machine's cores.

    python bench/bench_jetstream.py [--events N] [--runs K] [--quick] [--broker kafka|tansu]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fastavro
import orjson
from confluent_kafka import Producer
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.brokers import add_broker_arguments, broker, describe  # noqa: E402
from producers.jetstream.position import JetstreamPosition  # noqa: E402
from producers.jetstream.source import JetstreamOptions, JetstreamSource  # noqa: E402
from producers.job import JobOptions, JobRunner  # noqa: E402
from runtime.contract.codec import SINGLE_OBJECT_MAGIC, AvroCodec, shipped  # noqa: E402
from runtime.contract.topics import TYPED_COLLECTIONS  # noqa: E402
from runtime.kafka.broker import free_port, port_open  # noqa: E402
from runtime.kafka.clients import admin, ensure_topics  # noqa: E402
from runtime.kafka.settings import KafkaSettings  # noqa: E402
from runtime.process.memory import tune_gc  # noqa: E402
from runtime.process.metrics import Metrics  # noqa: E402
from runtime.simulator.synthetic import OTHER_COLLECTIONS  # noqa: E402

START = 1_700_000_000_000_000


def create_topics(bootstrap: str, prefix: str) -> None:
    """Create every collection topic first, so both paths measure steady-state producing."""
    topics = [f"{prefix}.{c}" for c in (*TYPED_COLLECTIONS, *OTHER_COLLECTIONS, "identity", "account")]
    ensure_topics(admin({"bootstrap.servers": bootstrap}), topics, partitions=6, replication=1)


def baseline(url: str, bootstrap: str, n: int, prefix: str) -> float:
    """Bare parse + Avro + produce of ``n`` events to the topics of ``prefix``; returns events/s."""
    generic = shipped()["generic"]
    header = SINGLE_OBJECT_MAGIC + generic.fingerprint
    # The same producer settings as the job's (idempotent, batching, compression), minus transactions.
    holder = [Producer(KafkaSettings(bootstrap_servers=bootstrap).producer_config())]
    buf = io.BytesIO()

    async def run() -> float:
        producer = holder[0]
        got = 0
        t0 = time.perf_counter()
        # close_timeout as the job's own: the simulator keeps streaming, so the closing handshake
        # would otherwise wait the library's default 10 s and count it as work.
        async with connect(f"{url}?cursor={START}", max_size=2**24, compression=None, close_timeout=0.5) as ws:
            async for raw in ws:
                ev = orjson.loads(raw)
                commit = ev.get("commit") or {}
                record = commit.get("record")
                datum = {"did": ev["did"], "collection": commit.get("collection", ev["kind"]),
                         "rkey": commit.get("rkey", ""), "operation": commit.get("operation", "create"),
                         "rev": commit.get("rev"), "cid": commit.get("cid"), "source": "jetstream",
                         "cursor": ev["time_us"], "time_us": ev["time_us"], "job": "",
                         "record_json": orjson.dumps(record).decode() if record is not None else None}
                buf.seek(0)
                buf.truncate()
                buf.write(header)
                fastavro.schemaless_writer(buf, generic.parsed, datum)
                while True:
                    try:
                        producer.produce(f"{prefix}.{datum['collection']}", buf.getvalue(), ev["did"].encode())
                        break
                    except BufferError:
                        producer.poll(0.01)
                producer.poll(0)
                got += 1
                if got >= n:
                    break
        producer.flush(60)
        return got / (time.perf_counter() - t0)

    try:
        return asyncio.run(run())
    finally:
        holder.clear()
        gc.collect()  # the producer's threads end before the broker of this run goes away


@contextlib.contextmanager
def service_gc() -> Iterator[None]:
    """The cyclic GC as a service process runs with it (``tune_gc``), then Python's defaults again."""
    before = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def ours(url: str, bootstrap: str, n: int, prefix: str, job: str) -> float:
    """The real Jetstream job ``job`` (producer only) for ``n`` records into the topics of ``prefix``;
    returns events/s."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    opts = JobOptions(job=job, source="jetstream", num_records=n, checkpoint_events=20000,
                      checkpoint_interval=2.0)
    runner = JobRunner(kafka, opts, Metrics(), AvroCodec())
    runner.prepare()

    def make(_prev: object) -> JetstreamSource:
        return JetstreamSource(JetstreamOptions(instances=[url], start_us=START, job="bench"),
                               JetstreamPosition(1_000_000))

    with service_gc():
        t0 = time.perf_counter()
        asyncio.run(runner.run(make))
        elapsed = time.perf_counter() - t0
    runner.close()
    rate = runner.stats.messages_received / elapsed
    del runner
    gc.collect()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20,000 events, 2 runs")
    add_broker_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.events, args.runs = 20000, 2
    print(f"broker: {describe(args)}", flush=True)
    with broker(args) as bootstrap:
        return run(args, bootstrap)


def run(args: argparse.Namespace, bootstrap: str) -> int:
    """Both paths against the simulator, alternating, on ``bootstrap``."""
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "runtime", "simulate", "jetstream", "--synthetic",
                            str(int(args.events * 1.1)), "--start", "2023-11-14T22:13:20Z", "--event-rate", "2000",
                            "--port", str(port), "--log-level", "WARNING"],
                           cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if port_open("127.0.0.1", port):
                break
            time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/subscribe"
        # One set of topics per path for every run, as a deployment writes to the same topics: new
        # topics each run (180 partitions a run) slowed both paths by a third from the third run on.
        base_prefix, our_prefix = f"base{uuid.uuid4().hex[:8]}", f"ours{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, base_prefix)
        create_topics(bootstrap, our_prefix)
        base_rates, our_rates, ratios = [], [], []
        for i in range(args.runs):
            base_rates.append(baseline(url, bootstrap, args.events, base_prefix))
            our_rates.append(ours(url, bootstrap, args.events, our_prefix, f"bench{i}"))
            ratios.append(our_rates[-1] / base_rates[-1])
            print(f"run {i + 1}: baseline {base_rates[-1]:,.0f} ev/s   ours {our_rates[-1]:,.0f} ev/s   "
                  f"ratio {ratios[-1]:.2f}", flush=True)
        b, o = statistics.median(base_rates), statistics.median(our_rates)
        print(f"\nJetstream producer, {args.events:,} events, median of {args.runs}:")
        print(f"  baseline (parse + Avro + produce): {b:,.0f} events/s")
        print(f"  atproto-backfill job:              {o:,.0f} events/s")
        # Each run measures the two back to back, so a run's ratio sees the same machine speed; on a
        # noisy machine the median of those is steadier than the ratio of the two medians.
        print(f"  ratio: median of the runs' ratios {statistics.median(ratios):.2f}, ratio of the medians "
              f"{o / b:.2f}  (target, issue 16: >= 1.0)")
    finally:
        sim.terminate()
        sim.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
