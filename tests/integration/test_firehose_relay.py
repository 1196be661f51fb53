"""The relay simulator on loopback and the firehose stream/source against it (no Kafka needed).

Cursor semantics, byte-exact replay of the captured frames, OutdatedCursor / FutureCursor, and the
faults (mid-frame disconnects, ConsumerTooSlow, garbage, oversize, sequence gaps) with the
client's reaction to each: reconnect at the last fully handled seq, count, dead-letter, step over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_none
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from producers.firehose.decode import decode_frame, parse_frame
from producers.firehose.source import (
    FirehosePosition,
    FirehoseSource,
    FrameHandler,
    RawFrame,
    RelayStream,
    StreamOptions,
    relay_url,
    seek_time,
)
from producers.firehose.verify import CommitVerifier, DictResolver
from producers.source import Drop, End, SourceItem
from runtime.atproto.capture import read_capture
from runtime.contract.records import Event, RecordEvent
from runtime.errors import SourceError
from runtime.process.metrics import Metrics
from runtime.simulator import relay_cli
from runtime.simulator.relay import RelayFaults, RelayGenerator, RelaySimulator, StoredFrame, stored_from_bytes

pytestmark = pytest.mark.integration


async def _nosleep(_: float) -> None:
    await asyncio.sleep(0)


def _stream(sim: RelaySimulator, cursor: int | None, metrics: Metrics | None = None, **opts: Any) -> RelayStream:
    return RelayStream(StreamOptions(relay_url(sim.url), **opts), cursor, metrics=metrics, sleep=_nosleep,
                       wait=wait_none())


async def _recv_all(url: str, n: int, timeout: float = 10.0) -> list[bytes]:
    out: list[bytes] = []
    async with connect(url, max_size=None, close_timeout=0.2) as ws:
        async with asyncio.timeout(timeout):
            while len(out) < n:
                msg = await ws.recv()
                assert isinstance(msg, bytes)
                out.append(msg)
    return out


@pytest.fixture(scope="module")
def generated() -> tuple[RelayGenerator, list[StoredFrame]]:
    gen = RelayGenerator(seed=21, accounts=10, start_us=1_760_000_000_000_000, rate=100)
    return gen, gen.frames(200)


def test_capture_replay_is_byte_exact(fixtures_dir: Path) -> None:
    raw = read_capture(fixtures_dir / "frames.bin.zst")
    stored = stored_from_bytes(raw)

    async def scenario() -> None:
        async with RelaySimulator(stored) as sim:
            got = await _recv_all(f"{sim.subscribe_url}?cursor={stored[0].seq - 1}", len(raw))
            assert got == raw
            later = await _recv_all(f"{sim.subscribe_url}?cursor={stored[99].seq}", 50)
            assert later == raw[100:]

    asyncio.run(scenario())


def test_cursor_semantics(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated

    async def scenario() -> None:
        async with RelaySimulator(frames[50:]) as sim:  # the relay keeps seq 51..200
            url = sim.subscribe_url
            # an old cursor: OutdatedCursor, then the oldest kept frame
            first, second = await _recv_all(f"{url}?cursor=10", 2)
            info = decode_frame(first)
            assert (info.kind, info.name) == ("info", "OutdatedCursor")
            assert parse_frame(second).seq == 51
            # cursor 50 is exactly the one before the oldest: no info
            (nxt,) = await _recv_all(f"{url}?cursor=50", 1)
            assert parse_frame(nxt).seq == 51
            # a future cursor: an error frame, then the connection closes
            async with connect(f"{url}?cursor=999", close_timeout=0.2) as ws:
                err = decode_frame(await ws.recv())  # type: ignore[arg-type]
                assert (err.kind, err.name) == ("error", "FutureCursor")
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            # no cursor: only live frames
            async with connect(url, close_timeout=0.2) as ws:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await ws.recv()
            for bad in (f"{url}?cursor=abc", sim.url + "/subscribe"):
                with pytest.raises(InvalidStatus):
                    async with connect(bad):
                        pass
            assert sim.cursors[:3] == [10, 50, 999]

    asyncio.run(scenario())


def test_live_frames_follow_the_stored_ones(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    gen = RelayGenerator(seed=22, accounts=5, start_us=1_760_000_000_000_000)
    stored = gen.frames(20)

    async def scenario() -> None:
        async with RelaySimulator(stored, generator=gen, live_rate=200) as sim:
            got = [parse_frame(d).seq for d in await _recv_all(f"{sim.subscribe_url}?cursor=15", 20)]
            assert got == list(range(16, 36))

    asyncio.run(scenario())


async def _take(stream: RelayStream, n: int, timeout: float = 15.0) -> list[RawFrame | Drop]:
    out: list[RawFrame | Drop] = []
    async with asyncio.timeout(timeout):
        async for item in stream.frames():
            out.append(item)
            if isinstance(item, RawFrame) and item.frame is not None and item.frame.seq is not None:
                stream.done(item.frame.seq)
            if len([i for i in out if isinstance(i, RawFrame)]) >= n:
                break
    await stream.aclose()
    return out


def _seqs(items: list[RawFrame | Drop]) -> list[int]:
    return [i.frame.seq for i in items if isinstance(i, RawFrame) and i.frame is not None and i.frame.seq is not None]


@pytest.mark.parametrize("mid_frame", [False, True])
def test_disconnects_resume_after_the_last_handled_frame(
        generated: tuple[RelayGenerator, list[StoredFrame]], mid_frame: bool) -> None:
    _, frames = generated
    metrics = Metrics()

    async def scenario() -> None:
        faults = RelayFaults(disconnect_after=30, disconnect_times=2, mid_frame=mid_frame)
        async with RelaySimulator(frames, faults=faults) as sim:
            stream = _stream(sim, 0, metrics)
            reconnects: list[int] = []
            stream.on_reconnect = lambda: reconnects.append(1)
            items = await _take(stream, 100)
            assert _seqs(items) == list(range(1, 101))
            assert sim.cursors == [0, 30, 60]
            assert len(reconnects) == 2

    asyncio.run(scenario())


def test_consumer_too_slow_reconnects(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    metrics = Metrics()

    async def scenario() -> None:
        async with RelaySimulator(frames, faults=RelayFaults(too_slow_after=40)) as sim:
            items = await _take(_stream(sim, 0, metrics), 100)
            assert _seqs(items) == list(range(1, 101))
            assert sim.cursors[:3] == [0, 40, 80]

    asyncio.run(scenario())
    assert metrics.stream_notices.child("firehose", "consumer_too_slow")._value.get() >= 2


def test_garbage_frames_come_through_as_parse_errors(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated

    async def scenario() -> None:
        async with RelaySimulator(frames, faults=RelayFaults(garbage_every=10)) as sim:
            items = await _take(_stream(sim, 0), 50)
            bad = [i for i in items if isinstance(i, RawFrame) and i.frame is None]
            assert len(bad) == 4  # before frames 11, 21, 31 and 41
            assert all(i.error is not None and i.error.reason == "malformed_cbor" for i in bad)
            assert _seqs(items) == list(range(1, 47))

    asyncio.run(scenario())


def test_oversize_frames_are_dropped_and_stepped_over(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    metrics = Metrics()

    async def scenario() -> None:
        faults = RelayFaults(oversize_seqs=frozenset({20}), oversize_bytes=300_000)
        async with RelaySimulator(frames, faults=faults) as sim:
            items = await _take(_stream(sim, 0, metrics, max_frame_size=200_000), 40)
            drops = [i for i in items if isinstance(i, Drop)]
            assert [(d.reason, d.cursor, d.payload) for d in drops] == [("oversize", 20, b"")]
            assert _seqs(items) == [s for s in range(1, 42) if s != 20]
            assert sim.cursors == [0, 20]

    asyncio.run(scenario())
    assert metrics.stream_notices.child("firehose", "oversize_skip")._value.get() == 1


def test_gaps_and_outdated_cursors_are_counted(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    metrics = Metrics()
    holey = [f for f in frames if not 30 <= f.seq < 35]

    async def scenario() -> None:
        async with RelaySimulator(holey) as sim:
            stream = _stream(sim, 0, metrics)
            await _take(stream, 50)
            assert (stream.counters.gaps, stream.counters.missing, stream.counters.outdated) == (1, 5, 0)
        async with RelaySimulator(frames[100:]) as sim:
            stream = _stream(sim, 40, metrics)
            items = await _take(stream, 5)
            assert _seqs(items)[0] == 101
            assert (stream.counters.outdated, stream.counters.missing, stream.counters.gaps) == (1, 60, 0)

    asyncio.run(scenario())
    assert metrics.seq_gap_frames.child("firehose")._value.get() == 65
    assert metrics.stream_notices.child("firehose", "seq_gap")._value.get() == 1
    assert metrics.stream_notices.child("firehose", "outdated_cursor")._value.get() == 1


def test_future_cursor_stops_loudly(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated

    async def scenario() -> None:
        async with RelaySimulator(frames) as sim:
            with pytest.raises(SourceError, match="future"):
                await _take(_stream(sim, 10_000), 1)

    asyncio.run(scenario())


def test_an_unreachable_relay_gives_up_after_the_declared_attempts(
        generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    async def scenario() -> None:
        async with RelaySimulator(generated[1]) as sim:  # a 4xx answer is not retried
            bad = RelayStream(StreamOptions(sim.url + "/nowhere"), None, sleep=_nosleep, wait=wait_none())
            with pytest.raises(SourceError, match="404"):
                await _take(bad, 1, timeout=10)
        stream = RelayStream(StreamOptions("ws://127.0.0.1:1/xrpc/com.atproto.sync.subscribeRepos", max_attempts=3),
                             None, sleep=_nosleep, wait=wait_none())
        with pytest.raises(SourceError, match="cannot connect"):
            await _take(stream, 1, timeout=10)

    asyncio.run(scenario())


@pytest.mark.parametrize("batch", [0, 8, 64])
def test_the_source_yields_verified_events_until_the_end_watermark(
        generated: tuple[RelayGenerator, list[StoredFrame]], batch: int) -> None:
    gen, frames = generated
    end = frames[150].time_us

    async def scenario() -> list[SourceItem]:
        async with RelaySimulator(frames, faults=RelayFaults(disconnect_after=70)) as sim:
            position = FirehosePosition()
            handler = FrameHandler(position, end_us=end, lateness_us=50_000, job="t",
                                   verifier=CommitVerifier(DictResolver(gen.did_documents()), batch_size=batch))
            source = FirehoseSource(_stream(sim, 0), handler)
            items = []
            async with asyncio.timeout(20):
                async for item in source.items():
                    items.append(item)
            await source.aclose()
            assert position.cursor is not None
            return items

    items = asyncio.run(scenario())
    assert isinstance(items[-1], End)
    events = [i for i in items if not isinstance(i, (End, Drop)) and hasattr(i, "did")]
    expected: list[Event] = []
    for f in frames:
        if f.time_us >= end:
            continue
        expected.extend(decode_frame(f.data, job="t").events)
    assert events == expected


@pytest.mark.parametrize("fault", ["disconnect", "mid_frame", "oversize", "garbage", "too_slow"])
def test_batched_verification_delivers_what_frame_by_frame_does_through_stream_faults(
        generated: tuple[RelayGenerator, list[StoredFrame]], fault: str) -> None:
    """Signatures verified in batches on a thread (frames begun ahead of their verdicts): through
    reconnects, a frame cut mid-way, an oversize frame, garbage and ConsumerTooSlow, the source
    yields the same events, drops and skips, in the same order, as with every frame checked in
    turn; every event once."""
    gen, frames = generated
    end = frames[170].time_us
    faults = {"disconnect": RelayFaults(disconnect_after=45, disconnect_times=3),
              "mid_frame": RelayFaults(disconnect_after=33, disconnect_times=2, mid_frame=True),
              "oversize": RelayFaults(oversize_seqs=frozenset({57}), oversize_bytes=300_000),
              "garbage": RelayFaults(garbage_every=25),
              "too_slow": RelayFaults(too_slow_after=60)}[fault]

    def run(batch: int) -> list[SourceItem]:
        async def scenario() -> list[SourceItem]:
            async with RelaySimulator(frames, faults=faults) as sim:
                position = FirehosePosition()
                verifier = CommitVerifier(DictResolver(gen.did_documents()), batch_size=batch)
                handler = FrameHandler(position, end_us=end, lateness_us=50_000, job="t", verifier=verifier)
                source = FirehoseSource(_stream(sim, 0, max_frame_size=200_000), handler)
                items = []
                async with asyncio.timeout(30):
                    async for item in source.items():
                        items.append(item)
                await source.aclose()
                verifier.close()
                return items

        return asyncio.run(scenario())

    def shape(items: list[SourceItem]) -> list[object]:
        return [(type(i).__name__, getattr(i, "reason", None), getattr(i, "cursor", None),
                 getattr(i, "did", None), getattr(i, "rkey", None)) for i in items]

    one_by_one, batched = run(0), run(16)
    assert isinstance(batched[-1], End)
    assert shape(batched) == shape(one_by_one)
    events = [i for i in batched if isinstance(i, RecordEvent)]
    assert len({(e.did, e.collection, e.rkey, e.rev) for e in events}) == len(events)


def test_seek_time_finds_the_first_frame_at_the_start(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated

    async def scenario() -> None:
        async with RelaySimulator(frames[20:]) as sim:
            for i in (20, 21, 57, 120, 199):
                target = frames[i].time_us
                cursor = await seek_time(sim.subscribe_url, target, idle_timeout=0.3)
                first_after = next(f for f in frames[20:] if f.seq > cursor)
                assert first_after.time_us <= target
                assert all(f.time_us < target for f in frames[20:] if f.seq <= cursor)
            assert await seek_time(sim.subscribe_url, frames[0].time_us, idle_timeout=0.3) == 0
            assert await seek_time(sim.subscribe_url, frames[-1].time_us + 10**9, idle_timeout=0.3) >= frames[-1].seq

    asyncio.run(scenario())


def test_simulate_relay_cli_builds_a_servable_relay(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    relay_cli.add_arguments(parser)
    docs = tmp_path / "docs.json"
    ns = parser.parse_args(["--synthetic", "40", "--accounts", "4", "--port", "0", "--write-did-docs", str(docs),
                            "--oversize-seq", "3", "--oversize-seq", "5"])
    sim, gen = relay_cli.build(ns, now=1_760_000_000.0)
    assert gen is not None
    assert len(sim.frames) == 40
    assert sim.faults.oversize_seqs == {3, 5}
    assert set(json.loads(docs.read_text())) == set(gen.accounts)
    assert sim.frames[-1].time_us <= 1_760_000_000_000_000
