"""Jetstream v2 archive decode throughput (the CPU part of ``backfill jetstream`` over v2), rows/s.

Segments are written to local disk by the project's own writer (``runtime.atproto.segment``) from
the synthetic generator's accounts and records (real DAG-CBOR payloads, every kind), then read back
in the same run, three ways, each the median of ``--repeats`` runs:

(a) baseline: read the file + zstd-decompress + column parse of every block, nothing else;
(b) ours: the same, then rows -> typed events (``producers.jetstream.archive``) -> Avro values
    (``AvroCodec.encode_event``, as the job encodes them);
(c) the SDK: ``atproto_jetstream.archive`` (0.0.73) ``decode_block`` on the same frames, then its
    ``to_message`` (the SDK's own typed events, with CIDs), i.e. the SDK's equivalent of (b) minus Avro.

Each figure is rows per second of the process's CPU time (the machine may be shared) and of wall
time. The three run twice: with Python's default cyclic GC, then with it tuned as every service
process (a v2 producer too) tunes it: ``runtime.process.memory.tune_gc`` (``gc.freeze()`` of the
start-up heap, first-generation threshold 50,000); decoding allocates millions of short-lived acyclic
containers.

Targets (issue 14): (b) >= 100,000 rows/s per process and >= 3x (c).

End to end (``--e2e``; the default run does both parts): an in-process v2 simulator
(``runtime.simulator.jetstream2.build_simulator``, the same row count, 4,096-row blocks, segments of
``--per-segment`` rows, one unsealed row after them) served from a thread, a real Apache Kafka started
as the other benchmarks start it (``bench/brokers.py``: ``--broker``, ``--bootstrap-servers`` /
``KAFKA_BOOTSTRAP_SERVERS`` for an existing cluster), and four subprocesses per repeat, each timed from
outside (wall time, and CPU time from ``getrusage(RUSAGE_CHILDREN)`` deltas, start-up included):

* ours: ``python -m producers.jetstream --protocol v2`` over the whole archive (``--cursor 1``, ``-e`` one
  microsecond after the last sealed row's ``witnessed_at``: the unsealed row ends it), every collection,
  no consumer, topics created first (as ``bench_jetstream.py`` does) and the broker given
  ``TOPIC_SETTLE_S`` to create their partitions; ``--workers 2`` too when the
  producer has that flag;
* bare: ``getSegment`` of every segment over HTTP (httpx, one request each) + zstd + column parse;
* bare + produce: the same, then each row's raw payload produced to one topic keyed by DID with a plain
  ``confluent_kafka.Producer`` (the job's producer settings: linger, zstd, idempotent; no transactions);
* SDK: the same HTTP fetch, then (c) on the fetched bytes.

Ratios are the medians of each repeat's own ratios (a repeat measures all of them back to back).
Before the repeats, ``--warmup`` untimed runs (default 2) of the producer and of bare + produce warm a
broker the run started: a fresh broker's JIT compiler otherwise takes most of its CPU in the first runs.
With a broker the run started, each path's broker CPU time (``/proc``, per row) is printed too: on a
two-core machine the broker shares the cores with the producer, so its work per row bounds the wall rate.
Targets (issue 14): end to end >= 0.5 of bare, >= 3x the SDK's reader.

    python bench/bench_jetstream2.py [--rows N] [--repeats K] [--quick] [--cpu | --e2e]
                                     [--broker kafka|tansu] [--bootstrap-servers HOST:PORT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_jetstream import service_gc  # noqa: E402
from producers.jetstream.archive import iter_block_chunks  # noqa: E402
from runtime.atproto import native  # noqa: E402
from runtime.atproto.dagcbor import encode, from_json_form  # noqa: E402
from runtime.atproto.segment import (  # noqa: E402
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_UPDATE,
    Row,
    Segment,
    SegmentWriter,
)
from runtime.contract.codec import AvroCodec  # noqa: E402
from runtime.contract.records import RecordEvent  # noqa: E402
from runtime.contract.topics import TopicMap, schema_name_for_collection  # noqa: E402
from runtime.simulator.synthetic import Generator  # noqa: E402

_OPS = {"create": KIND_CREATE, "update": KIND_UPDATE, "delete": KIND_DELETE}


def synthetic_rows(n: int, seed: int = 7) -> list[Row]:
    """``n`` rows of realistic shapes: the generator's events as archive rows (seq from 1)."""
    gen = Generator(seed=seed, accounts=2000, real_cids=False)
    rows = []
    for seq, ev in enumerate(gen.events(n), start=1):
        t = ev["time_us"]
        did = ev["did"]
        kind = ev["kind"]
        if kind == "commit":
            c = ev["commit"]
            op = _OPS[c["operation"]]
            if op == KIND_CREATE and seq % 97 == 0:
                op = KIND_RESYNC_CREATE
            payload = b"" if op == KIND_DELETE else encode(from_json_form(c["record"]))
            rows.append(Row(seq, t, 0, op, c["collection"], did, c["rkey"], c["rev"], payload))
        else:
            body = dict(ev[kind])
            body["time"] = body.get("time") or "2026-01-01T00:00:00.000Z"
            rows.append(Row(seq, t, 0, KIND_IDENTITY if kind == "identity" else KIND_ACCOUNT, "", did, "", "",
                            encode(body)))
    return rows


def write_segments(rows: list[Row], folder: Path, per_segment: int) -> list[Path]:
    """The rows as sealed segment files of ``per_segment`` rows (4,096-row blocks)."""
    paths = []
    for i in range(0, len(rows), per_segment):
        path = folder / f"seg_{i // per_segment:010d}.jss"
        with open(path, "wb") as f:
            writer = SegmentWriter(f)
            for row in rows[i:i + per_segment]:
                writer.append(row)
            writer.close()
        paths.append(path)
    return paths


def baseline(paths: list[Path]) -> int:
    """(a) read + decompress + column parse; returns rows."""
    n = 0
    for path in paths:
        seg = Segment(path.read_bytes())
        for info in seg.blocks:
            n += len(seg.block(info.index))
    return n


def ours(codec: AvroCodec, topics: TopicMap, chunk: int = 256) -> Callable[[list[Path]], int]:
    """(b) read + decode -> typed events -> Avro values, ``chunk`` rows of a block at a time; returns rows.

    Record events go through one cached value encoder per collection, as the job's publisher keeps
    one per route (``producers.publish``); identity and account events through ``encode_event``.
    """
    encoders: dict[str, Callable[[RecordEvent], bytes]] = {}

    def record_encoder(event: RecordEvent) -> Callable[[RecordEvent], bytes]:
        fn = encoders[event.collection] = codec.record_encoder_for(schema_name_for_collection(event.collection),
                                                                   topics.for_event(event))
        return fn

    def run(paths: list[Path]) -> int:
        n = 0
        get = encoders.get
        for path in paths:
            seg = Segment(path.read_bytes())
            for info in seg.blocks:
                for result in iter_block_chunks(seg.block(info.index), chunk):
                    for item in result.items:
                        if type(item) is RecordEvent:
                            (get(item.collection) or record_encoder(item))(item)
                        else:  # identity, account and sync events
                            codec.encode_event(item, topics.for_event(item))
                n += info.count
        return n
    return run


def sdk(paths: list[Path]) -> int:
    """(c) the SDK's archive reader on the same frames: decode_block, then to_message; returns rows."""
    from atproto_jetstream.archive import segment as sdk_segment  # type: ignore[import-untyped]  # noqa: PLC0415
    from atproto_jetstream.archive.events import to_message  # type: ignore[import-untyped]  # noqa: PLC0415

    return sum(sdk_segment_rows(path.read_bytes(), sdk_segment.decode_block, to_message) for path in paths)


def sdk_segment_rows(data: bytes, decode_block: Callable[[bytes], Any], to_message: Callable[[Any], Any]) -> int:
    """(c) on one segment's bytes: the SDK's ``decode_block`` of each frame, then ``to_message``; returns rows."""
    n = 0
    seg = Segment(data)  # only for the frame offsets (the SDK walks length prefixes the same way)
    for info in seg.blocks:
        for event in decode_block(data[info.frame_start:info.frame_end]):
            if event.kind != KIND_RESYNC_CREATE:  # the SDK raises on kind 7 ("Unknown row kind")
                to_message(event)
            n += 1
    return n


def median_rate(fn: Callable[[list[Path]], int], paths: list[Path], repeats: int) -> tuple[float, float, int]:
    """Median rows/s over ``repeats`` runs, per second of the process's CPU time and of wall time.

    The CPU figure is the per-process throughput (a shared machine's other load does not count); the
    wall figure is what this run saw.
    """
    cpu, wall = [], []
    n = 0
    for _ in range(repeats):
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        n = fn(paths)
        cpu.append(n / (time.process_time() - c0))
        wall.append(n / (time.perf_counter() - w0))
    return statistics.median(cpu), statistics.median(wall), n


def cpu_part(ns: argparse.Namespace) -> None:
    """(a), (b), (c) on local segment files, with the default GC, then tuned."""
    t0 = time.perf_counter()
    rows = synthetic_rows(ns.rows)
    total = len(rows)
    with tempfile.TemporaryDirectory(prefix="bench-jss-") as tmp:
        paths = write_segments(rows, Path(tmp), ns.per_segment)
        del rows  # the bench's own data is no part of the measured heap
        size = sum(p.stat().st_size for p in paths)
        print(f"{total:,} rows in {len(paths)} segments ({size / 1e6:.1f} MB) written in "
              f"{time.perf_counter() - t0:.1f}s; median of {ns.repeats}; python {sys.version.split()[0]}; "
              f"native record path: {'yes' if native.NATIVE is not None else 'no'}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        codec, topics = AvroCodec(), TopicMap("bench")
        first = ours(codec, topics)(paths)  # warm the codec's per-collection writers
        assert first == total
        base, base_wall, n = median_rate(baseline, paths, ns.repeats)
        print(f"(a) baseline read+zstd+columns   {base:>10,.0f} rows/s CPU ({base_wall:,.0f} wall)", flush=True)
        mine, mine_wall, _ = median_rate(ours(codec, topics), paths, ns.repeats)
        print(f"(b) ours decode->events->Avro    {mine:>10,.0f} rows/s CPU ({mine_wall:,.0f} wall)   "
              f"{mine / base:.2f} of (a)   target >= 100,000: {'met' if mine >= 100_000 else 'NOT met'}", flush=True)
        if not ns.skip_sdk:
            theirs, theirs_wall, _ = median_rate(sdk, paths, ns.repeats)
            print(f"(c) SDK decode_block+to_message  {theirs:>10,.0f} rows/s CPU ({theirs_wall:,.0f} wall)   "
                  f"(b)/(c) = {mine / theirs:.2f}x   target >= 3x: {'met' if mine >= 3 * theirs else 'NOT met'}",
                  flush=True)
        # the same three with the cyclic GC tuned as a v2 producer process runs (tune_gc: start-up
        # objects frozen, first-generation threshold 50,000), then Python's defaults again
        with service_gc():
            base_t, _, _ = median_rate(baseline, paths, ns.repeats)
            tuned, tuned_wall, _ = median_rate(ours(codec, topics), paths, ns.repeats)
            print(f"GC tuned: (a) {base_t:,.0f}   (b) {tuned:,.0f} rows/s CPU ({tuned_wall:,.0f} wall)   "
                  f"{tuned / base_t:.2f} of (a)   target >= 100,000: {'met' if tuned >= 100_000 else 'NOT met'}",
                  flush=True)
            if not ns.skip_sdk:
                theirs_tuned, _, _ = median_rate(sdk, paths, ns.repeats)
                print(f"GC tuned: (c) {theirs_tuned:,.0f} rows/s CPU   (b)/(c) = {tuned / theirs_tuned:.2f}x   "
                      f"target >= 3x: {'met' if tuned >= 3 * theirs_tuned else 'NOT met'}", flush=True)
        assert n == total


# ------------------------------------------------------------------------------------------ end to end

#: witnessed_at of the end-to-end archive's first row (fixed: the run does not depend on the clock).
E2E_START_US = 1_750_000_000_000_000
E2E_BLOCK_ROWS = 4096
XRPC_PREFIX = "/xrpc/network.bsky.jetstream."
#: Seconds to wait after creating a run's topics: the broker answers at once but creates the partitions
#: in the next second (about 0.6-0.9 CPU-s for the 13 collection topics of 6 partitions each, measured
#: with /proc; idle it uses about 0.05 CPU-s a second), which would otherwise run beside the path timed.
TOPIC_SETTLE_S = 1.0
_STAT = re.compile(r"^\W*(events_produced|records_produced|messages_received|total_time)\W+([\d][\d,.]*)", re.MULTILINE)


def fetched_segments(url: str) -> Iterator[bytes]:
    """Every sealed segment of the instance at ``url``: ``listSegments`` pages, then one ``getSegment`` each."""
    import httpx  # noqa: PLC0415 - only the end-to-end children need it

    with httpx.Client(timeout=120) as client:
        names: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            resp = client.get(f"{url}{XRPC_PREFIX}listSegments", params=params)
            resp.raise_for_status()
            body = resp.json()
            names += [s["name"] for s in body["segments"]]
            cursor = body.get("cursor")
            if not cursor:
                break
        for name in names:
            resp = client.get(f"{url}{XRPC_PREFIX}getSegment", params={"name": name})
            resp.raise_for_status()
            yield resp.content


def child_bare(url: str) -> int:
    """bare: fetch + zstd + column parse; returns rows."""
    n = 0
    for data in fetched_segments(url):
        seg = Segment(data)
        for info in seg.blocks:
            n += len(seg.block(info.index))
    return n


def child_produce(url: str, bootstrap: str, topic: str) -> int:
    """bare + produce: bare, then each row's raw payload to ``topic`` keyed by DID, flushed; returns rows."""
    from confluent_kafka import Producer  # noqa: PLC0415

    from runtime.kafka.settings import KafkaSettings  # noqa: PLC0415

    # the job's producer settings (idempotent, linger, batching, zstd), minus transactions
    producer = Producer(KafkaSettings(bootstrap_servers=bootstrap).producer_config())
    produce, poll = producer.produce, producer.poll
    n = 0
    for data in fetched_segments(url):
        seg = Segment(data)
        for info in seg.blocks:
            block = seg.block(info.index)
            for did, payload in zip(block.did, block.payload, strict=True):
                try:
                    produce(topic, payload, did.encode())
                except BufferError:
                    poll(0.05)
                    produce(topic, payload, did.encode())
            poll(0)
            n += len(block)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} messages not delivered")
    return n


def child_sdk(url: str) -> int:
    """SDK: fetch, then (c) on the fetched bytes; returns rows."""
    from atproto_jetstream.archive import segment as sdk_segment  # type: ignore[import-untyped]  # noqa: PLC0415
    from atproto_jetstream.archive.events import to_message  # type: ignore[import-untyped]  # noqa: PLC0415

    return sum(sdk_segment_rows(data, sdk_segment.decode_block, to_message) for data in fetched_segments(url))


def child_main(ns: argparse.Namespace) -> int:
    """A baseline as its own process (``--child``): prints its rows and its own wall and CPU seconds as JSON."""
    c0, w0 = time.process_time(), time.perf_counter()
    if ns.child == "bare":
        n = child_bare(ns.url)
    elif ns.child == "produce":
        n = child_produce(ns.url, ns.bootstrap_servers, ns.topic)
    else:
        n = child_sdk(ns.url)
    print(json.dumps({"rows": n, "wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}), flush=True)
    return 0


def timed_child(cmd: list[str], timeout: float = 1800) -> tuple[float, float, str]:
    """Run ``cmd``; returns (wall seconds, CPU seconds of the child and its threads, stdout).

    Raises:
        RuntimeError: it failed.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), proc.stdout


def producer_has_workers() -> bool:
    """Whether ``python -m producers.jetstream`` takes ``--workers``."""
    out = subprocess.run([sys.executable, "-m", "producers.jetstream", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False).stdout
    return "--workers" in out


class Figure:
    """One path's runs: rows/s of wall time and rows per CPU-second, from outside and from inside."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.inner: list[float] = []  # rows/s of the child's own measured span (start-up excluded)
        self.broker: list[float] = []  # the broker's CPU seconds during the run (a broker this run started)

    def add(self, rows: int, wall: float, cpu: float, inner: float | None) -> tuple[float, float]:
        self.wall.append(rows / wall)
        self.cpu.append(rows / cpu)
        if inner:
            self.inner.append(rows / inner)
        return self.wall[-1], self.cpu[-1]


def run_ours(url: str, bootstrap: str, end_iso: str, patterns: list[str],
             workers: int | None) -> tuple[float, float, dict[str, float]]:
    """The real producer over the whole archive; returns (wall, CPU, its final statistics)."""
    from bench.bench_jetstream import create_topics  # noqa: PLC0415 - the same topics, created first

    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, prefix)
    time.sleep(TOPIC_SETTLE_S)
    cmd = [sys.executable, "-m", "producers.jetstream", "--protocol", "v2", "--instance", url, "--cursor", "1",
           "-e", end_iso, *[a for c in patterns for a in ("-c", c)], "-n", "0", "--consumer", "none",
           "--bootstrap-servers", bootstrap, "--topic-prefix", prefix, "--job", f"bench-{prefix}",
           "--progress", "none", "--log-level", "WARNING"]
    if workers:
        cmd += ["--workers", str(workers)]
    wall, cpu, out = timed_child(cmd)
    stats = {k: float(v.replace(",", "")) for k, v in _STAT.findall(out)}
    if "events_produced" not in stats:
        raise RuntimeError(f"no final statistics in the producer's output:\n{out[-3000:]}")
    return wall, cpu, stats


def run_baseline(kind: str, url: str, bootstrap: str) -> tuple[float, float, dict[str, Any]]:
    """A baseline child; returns (wall, CPU, what it printed)."""
    topic = f"e2ebare{uuid.uuid4().hex[:8]}"
    if kind == "produce":
        from runtime.kafka.clients import admin, ensure_topics  # noqa: PLC0415

        ensure_topics(admin({"bootstrap.servers": bootstrap}), [topic], partitions=6, replication=1)
        time.sleep(TOPIC_SETTLE_S)
    wall, cpu, out = timed_child([sys.executable, str(Path(__file__).resolve()), "--child", kind, "--url", url,
                                  "--bootstrap-servers", bootstrap, "--topic", topic])
    return wall, cpu, json.loads(out.strip().splitlines()[-1])


def e2e_part(ns: argparse.Namespace, repeats: int) -> None:
    """The end-to-end section: simulator + Kafka + the producer process, against the baselines."""
    from bench.brokers import broker, broker_cpu_seconds, describe  # noqa: PLC0415
    from runtime.contract.timeparse import us_to_iso  # noqa: PLC0415
    from runtime.simulator.jetstream2 import build_simulator  # noqa: PLC0415

    t0 = time.perf_counter()
    # one unsealed row after the archive: the producer's -e (just past the last sealed row) ends on it
    sim = build_simulator(seed=11, accounts=2000, events=ns.rows, tail=1, rows_per_segment=ns.per_segment,
                          rows_per_block=E2E_BLOCK_ROWS, start_us=E2E_START_US)
    # a live frame carries the row's display time only: an imported (older) one would not show that the
    # unsealed row is past -e, and the producer would wait --end-idle seconds for the next
    sim.rows[-1] = sim.rows[-1]._replace(indexed_at=0)
    sealed = [r for s in sim.archive.segments for r in s.rows]
    total = len(sealed)
    expected = total  # every row is an event: records, identity, account and #sync (SyncEvent) alike
    end_iso = us_to_iso(sealed[-1].witnessed_at + 1)
    # -c: "<a>.<b>.*" prefixes covering every collection the archive holds (the shortest the CLI accepts)
    patterns = sorted({".".join(r.collection.split(".")[:2]) + ".*" for r in sealed if r.collection})
    size = sum(len(s.data) for s in sim.archive.segments)
    del sealed
    sim.start_in_thread()
    workers = producer_has_workers()
    print(f"\nEnd to end: {total:,} rows in {len(sim.archive.segments)} segments ({size / 1e6:.1f} MB, "
          f"{E2E_BLOCK_ROWS:,}-row blocks) served by the in-process simulator at {sim.url}, built in "
          f"{time.perf_counter() - t0:.1f}s; broker: {describe(ns)}; median of {repeats}; "
          f"producer --workers: {'present' if workers else 'absent (not measured)'}; "
          f"-e {end_iso}; -c {' -c '.join(patterns)}", flush=True)
    paths = ["ours", *(["ours2"] if workers else []), "bare", "produce", *([] if ns.skip_sdk else ["sdk"])]
    labels = {"ours": "ours: producer, 1 process", "ours2": "ours: producer --workers 2",
              "bare": "bare: HTTP+zstd+columns", "produce": "bare + produce (no decode)",
              "sdk": "SDK: HTTP+decode_block+to_message"}
    figs = {p: Figure(labels[p]) for p in paths}
    ratios: dict[str, list[float]] = {}
    try:
        with broker(ns) as bootstrap:
            for w in range(ns.warmup):
                # untimed: a broker the run started compiles its hot paths in the first runs (its JIT
                # compiler threads took 1.8, 1.45 and 0.93 CPU-s in three successive producer runs)
                t = time.perf_counter()
                run_ours(sim.url, bootstrap, end_iso, patterns, None)
                run_baseline("produce", sim.url, bootstrap)
                print(f"  warm-up {w + 1}: the producer and bare + produce once each, untimed "
                      f"({time.perf_counter() - t:.1f}s)", flush=True)
            for rep in range(repeats):
                now: dict[str, tuple[float, float]] = {}
                for p in paths:
                    b0 = broker_cpu_seconds()
                    if p.startswith("ours"):
                        wall, cpu, stats = run_ours(sim.url, bootstrap, end_iso, patterns, 2 if p == "ours2" else None)
                        got = int(stats["events_produced"])
                        if got != expected:
                            print(f"  WARNING: {p} produced {got:,} events, expected {expected:,}", flush=True)
                        now[p] = figs[p].add(total, wall, cpu, stats.get("total_time"))
                        extra = f"produced {got:,} events, job's own span {stats.get('total_time', 0):.1f}s"
                    else:
                        wall, cpu, out = run_baseline(p, sim.url, bootstrap)
                        if out["rows"] != total:
                            raise RuntimeError(f"{p} read {out['rows']:,} rows, expected {total:,}")
                        now[p] = figs[p].add(total, wall, cpu, out["wall"])
                        extra = f"own span {out['wall']:.1f}s, {out['cpu']:.1f} CPU-s"
                    b1 = broker_cpu_seconds()
                    if b0 is not None and b1 is not None:
                        figs[p].broker.append(b1 - b0)
                        extra += f"; broker {b1 - b0:.1f} CPU-s"
                    print(f"  run {rep + 1} {labels[p]:<36} {now[p][0]:>9,.0f} rows/s wall "
                          f"{now[p][1]:>9,.0f} rows/CPU-s   ({wall:.1f}s wall, {cpu:.1f} CPU-s; {extra})", flush=True)
                for o in [p for p in paths if p.startswith("ours")]:
                    for b in [p for p in paths if not p.startswith("ours")]:
                        ratios.setdefault(f"{o}/{b} wall", []).append(now[o][0] / now[b][0])
                        ratios.setdefault(f"{o}/{b} cpu", []).append(now[o][1] / now[b][1])
    finally:
        sim.stop_thread()
    med = statistics.median
    print(f"\nEnd to end, {total:,} rows, median of {repeats} (rows/s of wall time from the process's start "
          f"to its exit; rows per CPU-second of the process and its threads; start-up included)", flush=True)
    print(f"  {'path':<36} {'rows/s wall':>12} {'rows/CPU-s':>12} {'rows/s excl. start-up':>22} "
          f"{'broker us/row':>14}")
    for p in paths:
        f = figs[p]
        inner = f"{med(f.inner):>22,.0f}" if f.inner else f"{'-':>22}"
        brk = f"{med(f.broker) / total * 1e6:>14.1f}" if f.broker else f"{'-':>14}"
        print(f"  {f.label:<36} {med(f.wall):>12,.0f} {med(f.cpu):>12,.0f} {inner} {brk}")
    targets = {"bare": (0.5, ">= 0.5"), "sdk": (3.0, ">= 3x")}
    names = {"bare": "bare", "produce": "bare+produce", "sdk": "SDK"}
    print(f"  {'ratio (median of the runs ratios)':<36} {'wall':>12} {'CPU':>12}   target (issue 14)")
    for o in [p for p in paths if p.startswith("ours")]:
        for b in [p for p in paths if not p.startswith("ours")]:
            w, c = med(ratios[f"{o}/{b} wall"]), med(ratios[f"{o}/{b} cpu"])
            goal = targets.get(b)
            note = (f"{goal[1]}: {'met' if w >= goal[0] else 'NOT met'} (wall), "
                    f"{'met' if c >= goal[0] else 'NOT met'} (CPU)") if goal else "(no target)"
            print(f"  {o + '/' + names[b]:<36} {w:>12.2f} {c:>12.2f}   {note}")
    cpu_rate = med(figs["ours"].cpu)
    print(f"  ours end to end, per process: {cpu_rate:,.0f} rows/CPU-s (start-up, HTTP, librdkafka's threads and "
          f"checkpoints included); the per-process target >= 100,000 rows/s is the CPU part's: (b) above", flush=True)


def main() -> int:
    """Run the benchmark and print rows/s and ratios."""
    from bench.brokers import add_broker_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows (default 200,000)")
    parser.add_argument("--per-segment", type=int, default=50_000, help="rows per segment file")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per figure, the median is reported (default 5 for the CPU part, 3 end to end)")
    parser.add_argument("--quick", action="store_true", help="20,000 rows; 3 repeats (CPU part), 1 (end to end)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed end-to-end runs first, to warm the broker's JVM (default 2; 0 with "
                             "--bootstrap-servers)")
    parser.add_argument("--skip-sdk", action="store_true", help="leave out (c) and the SDK end to end")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--cpu", action="store_true", help="the CPU part only")
    only.add_argument("--e2e", action="store_true", help="the end-to-end part only")
    add_broker_arguments(parser)
    parser.add_argument("--child", choices=("bare", "produce", "sdk"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        return child_main(ns)
    if ns.quick:
        ns.rows = 20_000
    e2e_repeats = ns.repeats or (1 if ns.quick else 3)
    if ns.warmup is None:
        ns.warmup = 0 if ns.bootstrap_servers or ns.quick else 2
    ns.repeats = ns.repeats or (3 if ns.quick else 5)
    if not ns.e2e:
        cpu_part(ns)
    if not ns.cpu:
        e2e_part(ns, e2e_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
