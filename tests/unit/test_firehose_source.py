"""The firehose source's pure parts: relay URLs, the resume position, the frame handler, pipe records."""

from __future__ import annotations

import asyncio

import pytest

from producers.firehose.decode import parse_frame
from producers.firehose.source import FirehosePosition, FrameHandler, relay_url
from producers.firehose.verify import CommitVerifier, DictResolver
from producers.firehose.workers import decode_records, encode_records, shard_of, worker_job
from producers.source import Drop, End, Skip, SourceItem
from runtime.contract.records import RecordEvent
from runtime.errors import ConfigError, DropError, FatalError
from runtime.simulator.relay import RelayGenerator, StoredFrame, encode_frame

PATH = "/xrpc/com.atproto.sync.subscribeRepos"


@pytest.mark.parametrize(("given", "expected"), [
    ("wss://bsky.network", f"wss://bsky.network{PATH}"),
    ("wss://bsky.network/", f"wss://bsky.network{PATH}"),
    (f"wss://bsky.network{PATH}", f"wss://bsky.network{PATH}"),
    ("bsky.network", f"wss://bsky.network{PATH}"),
    ("ws://127.0.0.1:6009", f"ws://127.0.0.1:6009{PATH}"),
    ("https://relay.example.com", f"wss://relay.example.com{PATH}"),
])
def test_relay_url_accepts_the_path_or_not(given: str, expected: str) -> None:
    assert relay_url(given) == expected


@pytest.mark.parametrize("bad", ["", "ftp://x", "wss://x/other/path", "wss://"])
def test_relay_url_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        relay_url(bad)


def _record(seq: int, rkey: str) -> RecordEvent:
    return RecordEvent("did:plc:a", "app.bsky.feed.like", rkey, "create", "3k", "bafy", {}, "firehose", seq, 1)


def test_a_partial_frame_resumes_one_seq_earlier_and_dedups() -> None:
    pos = FirehosePosition()
    assert pos.resume_cursor is None
    a, b = _record(10, "a"), _record(10, "b")
    pos.advance(a)
    assert (pos.cursor, pos.complete, pos.resume_cursor) == (10, False, 9)
    restored = FirehosePosition.restore(pos.snapshot())
    assert restored.resume_cursor == 9
    assert restored.seen(a)
    assert not restored.seen(b)
    assert restored.seen(_record(9, "z"))
    pos.advance(b)
    pos.frame_done(10)
    assert (pos.complete, pos.resume_cursor) == (True, 10)
    pos.frame_done(12)  # a frame without events moves the position too
    assert (pos.cursor, pos.resume_cursor) == (12, 12)
    assert pos.seen(a)
    pos.frame_done(11)  # an older frame never moves it back
    assert pos.cursor == 12
    assert FirehosePosition.restore(None).cursor is None


def _items(handler: FrameHandler, data: bytes) -> list[SourceItem]:
    try:
        frame, error = parse_frame(data), None
    except DropError as e:
        frame, error = None, e
    return asyncio.run(handler.handle(data, frame, error, "test")).items


@pytest.fixture(scope="module")
def generated() -> tuple[RelayGenerator, list[StoredFrame]]:
    gen = RelayGenerator(seed=4, accounts=6, start_us=1_700_000_000_000_000, rate=10)
    return gen, gen.frames(60)


def _commits(frames: list[StoredFrame]) -> list[StoredFrame]:
    return [f for f in frames if parse_frame(f.data).type == "#commit"]


def test_handler_filters_by_did_and_collection(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    commit = _commits(frames)[0]
    assert _items(FrameHandler(FirehosePosition(), dids=["did:plc:nobody"]), commit.data) == [Skip("did_filter", 1)]
    items = _items(FrameHandler(FirehosePosition(), collections=["com.nothing.*"]), commit.data)
    assert items == [Skip("collection_filter", 1)]
    events = _items(FrameHandler(FirehosePosition(), dids=[commit.did or ""], job="j"), commit.data)
    assert len(events) == 1
    assert isinstance(events[0], RecordEvent)
    assert events[0].job == "j"


def test_handler_time_window(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    f = _commits(frames)[5]
    t = f.time_us
    assert _items(FrameHandler(FirehosePosition(), start_us=t + 1), f.data) == [Skip("before_start", 1)]
    # a resumed position ignores the start time
    resumed = FirehosePosition()
    resumed.frame_done(1)
    assert isinstance(_items(FrameHandler(resumed, start_us=t + 1), f.data)[0], RecordEvent)
    assert _items(FrameHandler(FirehosePosition(), end_us=t, lateness_us=10), f.data) == [Skip("after_end", 1)]
    assert _items(FrameHandler(FirehosePosition(), end_us=t - 10, lateness_us=10), f.data) == [
        End("end_cursor_reached")]


def test_handler_drops_replayed_events(generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    _, frames = generated
    f = _commits(frames)[3]
    pos = FirehosePosition()
    handler = FrameHandler(pos)
    (ev,) = _items(handler, f.data)
    assert isinstance(ev, RecordEvent)
    pos.advance(ev)
    assert _items(handler, f.data) == [Skip("duplicate", 1)]
    pos.frame_done(f.seq + 5)
    assert _items(handler, f.data) == [Skip("duplicate", 1)]


def test_handler_dead_letters_bad_frames_and_failed_verification(
        generated: tuple[RelayGenerator, list[StoredFrame]]) -> None:
    gen, frames = generated
    (drop,) = _items(FrameHandler(FirehosePosition()), b"\x00garbage")
    assert isinstance(drop, Drop)
    assert (drop.reason, drop.payload, drop.origin) == ("malformed_cbor", b"\x00garbage", "test")
    commit = _commits(frames)[0]
    handler = FrameHandler(FirehosePosition(), verifier=CommitVerifier(DictResolver({})))
    (drop,) = _items(handler, commit.data)
    assert isinstance(drop, Drop)
    assert (drop.reason, drop.payload, drop.did, drop.cursor) == ("repo_unavailable", commit.data, commit.did,
                                                                  commit.seq)
    ok = FrameHandler(FirehosePosition(), verifier=CommitVerifier(DictResolver(gen.did_documents())))
    assert isinstance(_items(ok, commit.data)[0], RecordEvent)


def test_handler_counts_other_frame_types() -> None:
    sync = encode_frame({"op": 1, "t": "#sync"}, {"seq": 9, "did": "did:plc:x", "blocks": b"", "rev": "3k",
                                                  "time": "2024-01-01T00:00:00Z"})
    assert _items(FrameHandler(FirehosePosition()), sync) == [Skip("sync_frame")]
    unknown = encode_frame({"op": 1, "t": "#migrate"}, {"seq": 10, "did": "did:plc:x"})
    assert _items(FrameHandler(FirehosePosition()), unknown) == [Skip("unknown_type")]


def test_pipe_records_round_trip_and_shards_are_stable() -> None:
    records = [(0x46, b"frame"), (0x4D, b"\x01" * 8), (0x45, b"")]
    assert decode_records(encode_records(records)) == records
    with pytest.raises(FatalError):
        decode_records(encode_records(records)[:-3] + b"\x46\x09")
    assert shard_of("did:plc:abc", 4) == shard_of("did:plc:abc", 4)
    assert {shard_of(f"did:plc:{i}", 4) for i in range(50)} == {0, 1, 2, 3}
    assert shard_of(None, 4) == 0
    assert worker_job("firehose", 2) == "firehose.w2"
