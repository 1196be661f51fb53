"""Benchmark of the firehose producer on the captured real frames, each figure beside a same-run baseline.

The baseline is the atproto SDK's own parse path on the same frames:
``firehose_models.MessageFrame.from_bytes`` + ``parse_subscribe_repos_message`` + ``CAR.from_bytes``
and the op's block from the CAR (its records come back with links and byte strings both as
``bytes``; the baseline converts them with ``to_json_form``, the same amount of work, although that
renders links wrongly as ``$bytes``). Levels, all single-process:

1. decode: frame bytes to typed events (``decode_frame``) vs the SDK path to the same events.
2. + Avro: the events' Avro values (``AvroCodec.encode_event``, as the job encodes them), both sides.
3. + produce: the values produced to a real broker (Apache Kafka by default, ``--broker``) and flushed, both sides.
4. job: the whole ``JobRunner`` (transactions, checkpoints, position, dedup) fed frames from memory
   through the firehose ``FrameHandler``, vs the same runner fed by the SDK path.
5. verify: decode + ``--verify`` (signature and Sync 1.1 MST proof per commit) + Avro vs decode +
   Avro without it (ours both), the paths taking turns in every round; verified as the source
   does it by default (signatures in native batches on a thread, ``--verify-batch``), and also
   frame by frame (``--verify-batch 0``); the ratio is the median
   of the rounds' own ratios, checked against the targets of issue 16 (>= 15,000 frames/s and >= 0.3
   of the unverified rate). Also the verified rate on the pure-Python path (native extension off),
   and where a verified frame's time goes.

Medians of ``--repeats`` runs; ratios are ours / baseline. Run ``python bench/bench_firehose.py``
(``--quick`` for a short run, ``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libipld
from atproto import CAR, firehose_models, models, parse_subscribe_repos_message
from confluent_kafka import KafkaError, Message, Producer

from bench.brokers import add_broker_arguments, broker, describe
from producers.firehose.decode import decode_frame, parse_frame
from producers.firehose.source import FirehosePosition, FrameHandler
from producers.firehose.verify import DEFAULT_BATCH, CommitVerifier, DictResolver
from producers.job import JobOptions, JobRunner
from producers.source import End, SourceItem, StreamPosition
from runtime.atproto import native
from runtime.atproto.capture import read_capture
from runtime.atproto.crypto import clear_verifier_cache, verify_signature
from runtime.atproto.dagcbor import decode, encode, to_json_form
from runtime.atproto.repo import check_commit_event
from runtime.contract.codec import AvroCodec
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent
from runtime.contract.topics import TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
_COMMIT = models.ComAtprotoSyncSubscribeRepos.Commit
_IDENTITY = models.ComAtprotoSyncSubscribeRepos.Identity
_ACCOUNT = models.ComAtprotoSyncSubscribeRepos.Account


def _time_us(text: str) -> int:
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp() * 1_000_000)


def sdk_events(data: bytes) -> list[Event]:
    """The baseline: the SDK's parse path to the same typed events."""
    msg = parse_subscribe_repos_message(firehose_models.MessageFrame.from_bytes(data))
    if isinstance(msg, _COMMIT):
        car = CAR.from_bytes(msg.blocks)
        t = _time_us(msg.time)
        out: list[Event] = []
        for op in msg.ops:
            collection, _, rkey = op.path.partition("/")
            record = None
            cid = None
            if op.cid is not None:
                block = car.blocks.get(op.cid)
                record = to_json_form(block) if block is not None else None
                cid = str(op.cid)
            out.append(RecordEvent(msg.repo, collection, rkey, op.action, msg.rev, cid, record, "firehose",
                                   msg.seq, t, ""))
        return out
    if isinstance(msg, _IDENTITY):
        return [IdentityEvent(msg.did, msg.handle, msg.seq, msg.time, "firehose", msg.seq, _time_us(msg.time))]
    if isinstance(msg, _ACCOUNT):
        return [AccountEvent(msg.did, msg.active, msg.status, msg.seq, msg.time, "firehose", msg.seq,
                             _time_us(msg.time))]
    return []


def ours_events(data: bytes) -> list[Event]:
    """Our decoder."""
    return decode_frame(data).events


def renumber(frames: list[bytes], passes: int) -> list[bytes]:
    """``passes`` copies of the frames with fresh, increasing seqs (the job's position drops replays)."""
    span = 10 * len(frames)
    out = []
    for k in range(passes):
        for data in frames:
            header = libipld.decode_dag_cbor_multi(data)[0]
            body = decode(data[len(encode(header)):])
            if "seq" in body:
                body["seq"] = body["seq"] + k * span
            out.append(encode(header) + encode(body))
    return out


def median_rate(run: Callable[[], float], n: int, repeats: int) -> float:
    """Median items/s of ``repeats`` timed runs of ``run`` (which returns seconds for ``n`` items)."""
    rates = []
    for _ in range(repeats):
        gc.collect()
        rates.append(n / run())
    return statistics.median(rates)


def timed(fn: Callable[[bytes], Any], frames: list[bytes]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        for data in frames:
            fn(data)
        return time.perf_counter() - t0
    return run


def avro_of(events_fn: Callable[[bytes], list[Event]], codec: AvroCodec,
            topics: TopicMap) -> Callable[[bytes], list[tuple[str, bytes, bytes]]]:
    def encode_frame_events(data: bytes) -> list[tuple[str, bytes, bytes]]:
        out = []
        for ev in events_fn(data):
            topic = topics.for_event(ev)
            out.append((topic, ev.did.encode(), codec.encode_event(ev, topic)))
        return out
    return encode_frame_events


def produce_run(kafka: KafkaSettings, events_fn: Callable[[bytes], list[Event]], frames: list[bytes],
                prefix: str) -> Callable[[], float]:
    codec = AvroCodec()
    topics = TopicMap(prefix)
    encode_fn = avro_of(events_fn, codec, topics)

    # Every topic exists before the clock starts (a broker need not create topics on first use).
    wanted = {topic for data in frames[:2000] for topic, _key, _value in encode_fn(data)}
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), wanted, partitions=kafka.topic_partitions,
                             replication=1)
    failed: list[str] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append(f"{msg.topic()}: {err}")

    def run() -> float:
        producer = Producer(kafka.producer_config(on_delivery=report))
        t0 = time.perf_counter()
        n = 0
        for data in frames:
            for topic, key, value in encode_fn(data):
                while True:
                    try:
                        producer.produce(topic, value, key)
                        break
                    except BufferError:
                        producer.poll(0.01)
                n += 1
                if n & 1023 == 0:
                    producer.poll(0)
        remaining = producer.flush(120)
        elapsed = time.perf_counter() - t0
        assert remaining == 0, "undelivered messages"
        assert not failed, f"{len(failed)} messages refused, e.g. {failed[:3]}"
        return elapsed
    return run


class MemorySource:
    """Frames from memory through the firehose frame handler (ours), or through the SDK path."""

    name = "firehose"

    def __init__(self, frames: list[bytes], sdk: bool) -> None:
        self.frames = frames
        self.sdk = sdk
        self._position = FirehosePosition()
        self.handler = FrameHandler(self._position, job="bench")

    @property
    def position(self) -> StreamPosition:
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        handler = self.handler
        position = self._position
        for data in self.frames:
            if self.sdk:
                events = sdk_events(data)
                for ev in events:
                    yield ev
                if events:
                    position.frame_done(events[0].cursor)
                continue
            frame = parse_frame(data)
            handled = await handler.handle(data, frame, None, "memory")
            for item in handled.items:
                yield item
            if handled.seq is not None:
                position.frame_done(handled.seq)
        yield End("exhausted")


def job_run(kafka: KafkaSettings, frames: list[bytes], sdk: bool) -> Callable[[], float]:
    def run() -> float:
        k = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=f"b{uuid.uuid4().hex[:8]}",
                          topic_partitions=6)
        runner = JobRunner(k, JobOptions(job="bench", source="firehose", checkpoint_events=5000,
                                         checkpoint_interval=2.0), Metrics(), AvroCodec())
        runner.prepare()
        source = MemorySource(frames, sdk)
        # Warm the topics so topic creation is not timed.
        for ev in (e for d in frames[:300] for e in ours_events(d)):
            runner.publisher.ensure([runner.topics.for_event(ev)])
        t0 = time.perf_counter()
        final = asyncio.run(runner.run(lambda _prev: source))
        elapsed = time.perf_counter() - t0
        runner.close()
        assert final.status == "finished", final
        return elapsed
    return run


#: Issue 16's targets for the verified firehose, per process.
VERIFY_TARGET_RATE = 15_000
VERIFY_TARGET_RATIO = 0.3


def verify_run(frames: list[bytes], docs: Path, codec: AvroCodec, topics: TopicMap,
               batch: int = DEFAULT_BATCH) -> Callable[[], float]:
    """decode + ``--verify`` + Avro, as the source does it; every run starts with cold caches.

    ``batch`` > 0: as ``FirehoseSource`` with ``--verify-batch``: frames are begun in groups of
    ``batch`` and a group is finished (verdicts awaited, events encoded) once the next one is begun,
    so one thread verifies signatures while the interpreter decodes; 0: each frame checked whole.
    """

    def run() -> float:
        verifier = CommitVerifier(DictResolver.from_file(docs), batch_size=batch)
        clear_verifier_cache()

        def encode(decoded: Any) -> None:
            out = []  # what avro_of does for the unverified side
            for ev in decoded.events:
                topic = topics.for_event(ev)
                out.append((topic, ev.did.encode(), codec.encode_event(ev, topic)))

        async def go() -> None:
            if not verifier.batching:
                for data in frames:
                    decoded = decode_frame(data)
                    await verifier.check(decoded)
                    encode(decoded)
                return
            groups: list[list[Any]] = []
            group: list[Any] = []
            for data in frames:
                group.append(await verifier.begin(decode_frame(data)))
                if len(group) >= batch:
                    verifier.flush()
                    groups.append(group)
                    group = []
                    while len(groups) > 1:
                        for pending in groups.pop(0):
                            await verifier.finish(pending)
                            encode(pending.decoded)
            verifier.flush()
            for g in [*groups, group]:
                for pending in g:
                    await verifier.finish(pending)
                    encode(pending.decoded)

        t0 = time.perf_counter()
        asyncio.run(go())
        elapsed = time.perf_counter() - t0
        verifier.close()
        assert verifier.stats.failed == {}, verifier.stats.failed
        return elapsed
    return run


def python_path(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with the native extension turned off."""
    def python_run() -> Any:
        saved, native.NATIVE = native.NATIVE, None
        try:
            return run()
        finally:
            native.NATIVE = saved
    return python_run


def verify_breakdown(base: list[bytes], docs: Path, repeats: int) -> None:
    """Microseconds per commit of each part of a verification (medians)."""
    resolver = DictResolver.from_file(docs)
    commits = []
    for data in base:
        decoded = decode_frame(data)
        if decoded.kind == "commit" and decoded.did is not None:
            key = asyncio.run(resolver.resolve(decoded.did)).signing_key
            assert key is not None
            commits.append((decoded.frame.body, key))
    fast = native.NATIVE

    def whole() -> None:
        for body, key in commits:
            check_commit_event(body, signing_key=key)

    parts: dict[str, Callable[[], Any]] = {}
    if fast is not None:
        sigs = []
        for body, key in commits:
            parsed = fast.commit_event(body["blocks"], body["commit"], body["ops"], True)
            assert parsed is not None
            sigs.append((key, parsed[2], parsed[3]))

        def signatures() -> None:
            for key, unsigned, sig in sigs:
                verify_signature(key, unsigned, sig)

        def proofs() -> None:
            for body, _ in commits:
                fast.commit_event(body["blocks"], body["commit"], body["ops"], True)

        parts["signature (ECDSA)"] = signatures
        parts["slice + commit + MST proof"] = proofs
        parts["whole check (native path)"] = whole
    parts["whole check (Python path)"] = python_path(whole)
    print(f"  where a commit's verification goes ({len(commits)} commits, median of {repeats}):", flush=True)
    for name, fn in parts.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / len(commits) * 1e6)
        print(f"    {name:<30} {statistics.median(times):9.1f} us", flush=True)


def verify_section(base: list[bytes], fixtures: Path, passes: int, repeats: int) -> None:
    docs = fixtures / "did_docs.json.zst"
    codec, topics = AvroCodec(), TopicMap("bench")
    vframes = base * passes
    n = len(vframes)
    paths = {"verified": verify_run(vframes, docs, codec, topics),
             "plain": timed(avro_of(ours_events, codec, topics), vframes),
             "one by one": verify_run(vframes, docs, codec, topics, batch=0)}
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # the paths take turns, so a slow spell of the machine falls on both
        for name, run in paths.items():
            gc.collect()
            rounds[name].append(n / run())
    verified, plain = (statistics.median(rounds[k]) for k in ("verified", "plain"))
    ratio = statistics.median(v / p for v, p in zip(rounds["verified"], rounds["plain"], strict=True))
    line("5 decode + verify + Avro", verified, plain, base_name="no verify")
    print(f"  median of the rounds' ratios {ratio:.3f}; targets: >= {VERIFY_TARGET_RATE:,} frames/s "
          f"{'met' if verified >= VERIFY_TARGET_RATE else 'NOT met'}, >= {VERIFY_TARGET_RATIO} of unverified "
          f"{'met' if ratio >= VERIFY_TARGET_RATIO else 'NOT met'}", flush=True)
    one = statistics.median(rounds["one by one"])
    print(f"  signatures in native batches of {DEFAULT_BATCH} on a thread (--verify-batch, the default) against "
          f"each frame checked whole in turn: {verified:,.0f} / {one:,.0f} frames/s = {verified / one:.2f}x",
          flush=True)
    if native.NATIVE is not None:
        small = base * max(1, passes // 10)
        py = median_rate(python_path(verify_run(small, docs, codec, topics)), len(small), max(1, repeats // 2))
        print(f"  pure-Python path (native extension off): {py:,.0f} frames/s verified "
              f"(native / Python: {verified / py:.1f}x)", flush=True)
    verify_breakdown(base, docs, repeats)


def line(name: str, ours: float, base: float, unit: str = "frames/s", base_name: str = "SDK") -> None:
    print(f"{name:<28} ours {ours:>10,.0f} {unit}   {base_name} {base:>10,.0f} {unit}   ratio {ours / base:5.2f}x",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fixtures", default=str(FIXTURES), help="folder with frames.bin.zst and did_docs.json.zst")
    parser.add_argument("--passes", type=int, default=100, help="times the 150 frames are repeated per run")
    parser.add_argument("--job-passes", type=int, default=150, help="renumbered passes for the job level")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    parser.add_argument("--skip-kafka", action="store_true", help="only the CPU levels (1, 2, 5)")
    add_broker_arguments(parser)
    ns = parser.parse_args()
    if ns.quick:
        ns.passes, ns.job_passes, ns.repeats = 20, 10, 3
    fixtures = Path(ns.fixtures)
    base = read_capture(fixtures / "frames.bin.zst")
    frames = base * ns.passes
    n = len(frames)
    assert [len(ours_events(d)) for d in base] == [len(sdk_events(d)) for d in base]
    print(f"{len(base)} captured frames x {ns.passes} passes = {n:,} frames per run, median of {ns.repeats}; "
          f"python {sys.version.split()[0]}", flush=True)

    ours = median_rate(timed(ours_events, frames), n, ns.repeats)
    sdk = median_rate(timed(sdk_events, frames), n, ns.repeats)
    line("1 decode", ours, sdk)

    codec, topics = AvroCodec(), TopicMap("bench")
    ours = median_rate(timed(avro_of(ours_events, codec, topics), frames), n, ns.repeats)
    sdk = median_rate(timed(avro_of(sdk_events, codec, topics), frames), n, ns.repeats)
    line("2 decode + Avro", ours, sdk)

    verify_section(base, fixtures, max(1, ns.passes // 5), ns.repeats)

    if ns.skip_kafka:
        return 0
    print(f"broker: {describe(ns)}", flush=True)
    with broker(ns) as servers:
        kafka = KafkaSettings(bootstrap_servers=servers, topic_prefix="bench", topic_partitions=6)
        prefix = f"b{uuid.uuid4().hex[:8]}"
        ours = median_rate(produce_run(kafka, ours_events, frames, prefix), n, ns.repeats)
        sdk = median_rate(produce_run(kafka, sdk_events, frames, prefix), n, ns.repeats)
        line("3 decode + Avro + produce", ours, sdk)
        jframes = renumber(base, ns.job_passes)
        ours = median_rate(job_run(kafka, jframes, sdk=False), len(jframes), ns.repeats)
        sdk = median_rate(job_run(kafka, jframes, sdk=True), len(jframes), ns.repeats)
        line("4 job (JobRunner, txns)", ours, sdk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
