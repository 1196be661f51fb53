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
time. The three run twice: with Python's default cyclic GC, then with it tuned as the PostgreSQL
consumer tunes it (``gc.freeze()`` of the start-up heap, first-generation threshold 50,000), which a
v2 producer process would do too: decoding allocates millions of short-lived acyclic containers.

Targets (issue 14): (b) >= 100,000 rows/s per process and >= 3x (c).

    python bench/bench_jetstream2.py [--rows N] [--repeats K] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producers.jetstream.archive import SyncMarker, iter_block_chunks  # noqa: E402
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
                        elif not isinstance(item, SyncMarker):
                            codec.encode_event(item, topics.for_event(item))
                n += info.count
        return n
    return run


def sdk(paths: list[Path]) -> int:
    """(c) the SDK's archive reader on the same frames: decode_block, then to_message; returns rows."""
    from atproto_jetstream.archive import segment as sdk_segment  # type: ignore[import-untyped]  # noqa: PLC0415
    from atproto_jetstream.archive.events import to_message  # type: ignore[import-untyped]  # noqa: PLC0415

    n = 0
    for path in paths:
        data = path.read_bytes()
        seg = Segment(data)  # only for the frame offsets (the SDK walks length prefixes the same way)
        for info in seg.blocks:
            for event in sdk_segment.decode_block(data[info.frame_start:info.frame_end]):
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


def main() -> int:
    """Run the benchmark and print rows/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows written (default 200,000)")
    parser.add_argument("--per-segment", type=int, default=50_000, help="rows per segment file")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 3 repeats")
    parser.add_argument("--skip-sdk", action="store_true", help="leave out (c)")
    ns = parser.parse_args()
    if ns.quick:
        ns.rows, ns.repeats = 20_000, 3
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
        # the same three with the cyclic GC tuned as consumers/postgres/app.py tune_gc() does (start-up
        # objects frozen, first-generation threshold 50,000): what a v2 producer process would run with
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 50)
        base_t, _, _ = median_rate(baseline, paths, ns.repeats)
        tuned, tuned_wall, _ = median_rate(ours(codec, topics), paths, ns.repeats)
        print(f"GC tuned: (a) {base_t:,.0f}   (b) {tuned:,.0f} rows/s CPU ({tuned_wall:,.0f} wall)   "
              f"{tuned / base_t:.2f} of (a)   target >= 100,000: {'met' if tuned >= 100_000 else 'NOT met'}",
              flush=True)
        if not ns.skip_sdk:
            theirs_tuned, _, _ = median_rate(sdk, paths, ns.repeats)
            print(f"GC tuned: (c) {theirs_tuned:,.0f} rows/s CPU   (b)/(c) = {tuned / theirs_tuned:.2f}x   "
                  f"target >= 3x: {'met' if tuned >= 3 * theirs_tuned else 'NOT met'}", flush=True)
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        assert n == total
    return 0


if __name__ == "__main__":
    sys.exit(main())
