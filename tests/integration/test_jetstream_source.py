"""The Jetstream source against the Jetstream simulator on loopback: filters, cursors, the
event-time watermark, reconnects with de-duplication, faults, compression, options_update."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from producers.jetstream.source import MAX_URL_DIDS, JetstreamOptions, JetstreamSource
from producers.source import Drop, End, Skip
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, event_key
from runtime.kafka.broker import free_port
from runtime.simulator.jetstream import Faults, JetstreamSimulator, StoredEvent, synthetic_events

START = 1_700_000_000_000_000
EVENTS = synthetic_events(4000, seed=11, accounts=60, start_us=START, rate=1000, real_cids=False)
END = START + 3_000_000  # the log spans ~4 s of event time


async def no_wait(_: float) -> None:
    await asyncio.sleep(0)


def expected(events: list[StoredEvent], *, collections: list[str] | None = None, dids: set[str] | None = None,
             start: int = START, end: int = END) -> list[str]:
    f = CollectionFilter(collections or [])
    out = []
    for ev in events:
        if not (start <= ev.time_us < end):
            continue
        if dids and ev.did not in dids:
            continue
        if ev.collection is not None and not f(ev.collection):
            continue
        out.append(ev.text)
    return out


def as_json(event: RecordEvent | IdentityEvent | AccountEvent) -> str:
    from runtime.contract.records import to_jetstream_json

    return orjson.dumps(to_jetstream_json(event), option=orjson.OPT_SORT_KEYS).decode()


async def collect(source: JetstreamSource, timeout: float = 30) -> dict[str, list[Any]]:
    got: dict[str, list[Any]] = {"events": [], "drops": [], "skips": [], "end": []}

    async def run() -> None:
        async for item in source.items():
            if isinstance(item, (RecordEvent, IdentityEvent, AccountEvent)):
                got["events"].append(item)
                source.position.advance(item)
            elif isinstance(item, Drop):
                got["drops"].append(item)
            elif isinstance(item, Skip):
                got["skips"].append(item)
            elif isinstance(item, End):
                got["end"].append(item)
                return

    await asyncio.wait_for(run(), timeout)
    return got


def source_for(sim: JetstreamSimulator | list[str], **kw: Any) -> JetstreamSource:
    urls = sim if isinstance(sim, list) else [sim.url]
    opts = JetstreamOptions(instances=urls, start_us=kw.pop("start_us", START), end_us=kw.pop("end_us", END),
                            lateness_us=kw.pop("lateness_us", 100_000), backoff_initial=0.01, **kw)
    return JetstreamSource(opts, sleep=no_wait)


def assert_exactly(got: dict[str, list[Any]], want: list[str]) -> None:
    texts = [as_json(e) for e in got["events"]]
    assert len(texts) == len(set(texts)), "an event was delivered twice"
    assert sorted(texts) == sorted(orjson.dumps(orjson.loads(t), option=orjson.OPT_SORT_KEYS).decode() for t in want)
    assert got["end"] and got["end"][0].reason == "end_cursor_reached"


async def test_replay_filters_and_watermark() -> None:
    colls = ["app.bsky.feed.*", "app.bsky.graph.follow"]
    async with JetstreamSimulator(EVENTS) as sim:
        got = await collect(source_for(sim, collections=colls))
        assert sim.requests[0]["wantedCollections"] == colls
        assert sim.requests[0]["cursor"] == [str(START)]
    assert_exactly(got, expected(EVENTS, collections=colls))
    assert any(isinstance(e, IdentityEvent) for e in got["events"]), "identity events ignore the collection filter"
    assert any(s.reason == "after_end" for s in got["skips"]), "events inside the lateness window are skipped"


async def test_reconnects_after_disconnects_without_loss_or_duplicates() -> None:
    async with JetstreamSimulator(EVENTS, faults=Faults(disconnect_after=400, disconnect_times=4)) as sim:
        source = source_for(sim, lateness_us=200_000)
        got = await collect(source)
        assert sim.disconnects_done == 4 and source.reconnects == 4
        # every reconnect resumed from the delivered position minus the lateness
        cursors = [int(r["cursor"][0]) for r in sim.requests[1:]]
        assert all(c > START for c in cursors) and cursors == sorted(cursors)
    assert_exactly(got, expected(EVENTS))
    assert any(s.reason == "duplicate" for s in got["skips"]), "the overlap brought duplicates that were dropped"


async def test_stall_triggers_a_reconnect() -> None:
    async with JetstreamSimulator(EVENTS[:1500], faults=Faults(stall_after=300, stall_seconds=1.5)) as sim:
        source = source_for(sim, stall_timeout=0.5, end_us=EVENTS[1200].time_us)
        got = await collect(source)
        assert source.reconnects >= 1
    assert_exactly(got, expected(EVENTS[:1500], end=EVENTS[1200].time_us))


async def test_garbage_frames_are_dropped_not_fatal() -> None:
    async with JetstreamSimulator(EVENTS, faults=Faults(garbage_every=500)) as sim:
        got = await collect(source_for(sim))
    assert got["drops"] and {d.reason for d in got["drops"]} == {"malformed_json"}
    assert got["drops"][0].payload == b"{not json"
    assert_exactly(got, expected(EVENTS))


async def test_oversize_frames_are_counted() -> None:
    async with JetstreamSimulator(EVENTS[:800], faults=Faults(oversize_every=300, oversize_bytes=300_000)) as sim:
        got = await collect(source_for(sim, max_message_size=100_000, end_us=EVENTS[500].time_us))
    assert any(d.reason == "oversize" for d in got["drops"])
    assert_exactly(got, expected(EVENTS[:800], end=EVENTS[500].time_us))


async def test_compressed_stream_with_the_simulators_dictionary() -> None:
    async with JetstreamSimulator(EVENTS) as sim:
        got = await collect(source_for(sim, compress=True, zstd_dictionary=sim.dictionary))
        assert sim.requests[0]["compress"] == ["true"]
    assert_exactly(got, expected(EVENTS))


async def test_compressed_stream_with_jetstreams_dictionary(fixtures_dir: Path) -> None:
    dictionary = (fixtures_dir / "legacy_subscribe.zdict").read_bytes()
    async with JetstreamSimulator(EVENTS, dictionary=dictionary) as sim:
        got = await collect(source_for(sim, compress=True, zstd_dictionary=dictionary))
    assert_exactly(got, expected(EVENTS))


async def test_many_dids_go_in_an_options_update() -> None:
    dids = sorted({e.did for e in EVENTS})[:20] + [f"did:plc:fake{i:04d}" for i in range(MAX_URL_DIDS)]
    async with JetstreamSimulator(EVENTS) as sim:
        got = await collect(source_for(sim, dids=dids))
        assert sim.requests[0].get("requireHello") == ["true"] and "wantedDids" not in sim.requests[0]
        assert sorted(sim.options_updates[0]["wantedDids"]) == sorted(dids)
    assert_exactly(got, expected(EVENTS, dids=set(dids)))


async def test_too_many_collections_are_filtered_on_the_client() -> None:
    colls = ["app.bsky.feed.like"] + [f"com.example.c{i}" for i in range(150)]
    async with JetstreamSimulator(EVENTS) as sim:
        got = await collect(source_for(sim, collections=colls))
        assert "wantedCollections" not in sim.requests[0], "the server takes at most 100: none sent"
    assert_exactly(got, expected(EVENTS, collections=colls))
    assert any(s.reason == "collection_filter" for s in got["skips"])


async def test_update_filters_sends_options_update() -> None:
    async with JetstreamSimulator(EVENTS, rate_limit=2000) as sim:
        source = source_for(sim, collections=["app.bsky.feed.like"])
        seen: list[str] = []

        async def run() -> None:
            async for item in source.items():
                if isinstance(item, RecordEvent):
                    seen.append(item.collection)
                    source.position.advance(item)
                    if len(seen) == 50:
                        await source.update_filters(collections=["app.bsky.graph.follow"])
                if isinstance(item, End):
                    return

        await asyncio.wait_for(run(), 30)
        assert sim.options_updates[-1]["wantedCollections"] == ["app.bsky.graph.follow"]
    assert set(seen[:50]) == {"app.bsky.feed.like"}
    assert seen[-1] == "app.bsky.graph.follow"


async def test_moves_to_the_next_instance_on_failure() -> None:
    dead = f"ws://127.0.0.1:{free_port()}/subscribe"
    async with JetstreamSimulator(EVENTS[:500]) as sim:
        source = source_for([dead, sim.url], end_us=EVENTS[250].time_us)
        got = await collect(source)
    assert source.url == sim.url
    assert_exactly(got, expected(EVENTS[:500], end=EVENTS[250].time_us))


def identity_of(event: RecordEvent | IdentityEvent | AccountEvent) -> tuple[str, ...]:
    """What makes an event the same on every instance (the instance's time_us is not part of it)."""
    if isinstance(event, RecordEvent):
        return (event.did, event.collection, event.rkey, event.rev or "")
    return (event.did, type(event).__name__, str(event.seq))


@pytest.mark.parametrize(("offset_a", "offset_b"), [(-600_000, 600_000), (600_000, -600_000)],
                         ids=["to-an-instance-ahead", "to-an-instance-behind"])
async def test_failover_to_an_instance_with_another_clock_neither_duplicates_nor_drops(
        offset_a: int, offset_b: int) -> None:
    """Two instances of one stream whose receive clocks differ by 1.2 s (far more than the 0.1 s
    lateness); the first stops in the middle of the stream and the source fails over to the other.
    Every event is delivered exactly once; the other instance's replay of what was delivered is
    dropped as duplicates; nothing is taken for late."""
    from producers.jetstream.decode import decode_message

    async with JetstreamSimulator(EVENTS, clock_offset_us=offset_a, rate_limit=4000) as first, \
            JetstreamSimulator(EVENTS, clock_offset_us=offset_b) as second:
        source = source_for([first.url, second.url], start_us=START + offset_a, end_us=START + 3600 * 10**6,
                            end_idle=0.5)
        got: list[RecordEvent | IdentityEvent | AccountEvent] = []
        skips: list[str] = []

        async def run() -> None:
            async for item in source.items():
                if isinstance(item, (RecordEvent, IdentityEvent, AccountEvent)):
                    got.append(item)
                    source.position.advance(item)
                    if len(got) == 1500:
                        await first.stop()  # the first instance goes away mid-stream
                elif isinstance(item, Skip):
                    skips.append(item.reason)
                elif isinstance(item, End):
                    return

        await asyncio.wait_for(run(), 60)
        assert source.url == second.url and second.connections == 1
    want = Counter(identity_of(decode_message(e.text)) for e in EVENTS)
    assert Counter(identity_of(e) for e in got) == want
    assert skips.count("duplicate") >= 1000, "the other instance's replay of what was delivered is dropped"
    assert source.position.late == 0


async def test_a_resume_that_rewinds_before_the_start_delivers_nothing_before_it() -> None:
    """A resume rewinds by the lateness; within the lateness of the start that reaches events
    before it, which were skipped (never delivered): they must be skipped again, not let through
    as "not seen" (the kill storm found them in the topics)."""
    from producers.jetstream.position import JetstreamPosition

    start = START + 300_000
    async with JetstreamSimulator(EVENTS) as sim:
        first = JetstreamSource(JetstreamOptions(instances=[sim.url], start_us=start, end_us=END,
                                                 lateness_us=500_000, backoff_initial=0.01), sleep=no_wait)
        got: list[RecordEvent | IdentityEvent | AccountEvent] = []

        async def some() -> None:
            async for item in first.items():
                if isinstance(item, (RecordEvent, IdentityEvent, AccountEvent)):
                    got.append(item)
                    first.position.advance(item)
                    if len(got) == 50:
                        return

        await asyncio.wait_for(some(), 30)
        state = first.position.snapshot()
        assert first.position.cursor is not None and first.position.cursor - 500_000 < start
        resumed = JetstreamSource(JetstreamOptions(instances=[sim.url], start_us=start, end_us=END,
                                                   lateness_us=500_000, backoff_initial=0.01),
                                  JetstreamPosition.restore(state, 500_000), sleep=no_wait)
        rest = await collect(resumed)
    assert_exactly({"events": got + rest["events"], "end": rest["end"]}, expected(EVENTS, start=start))
    assert Counter(s.reason for s in rest["skips"])["before_start"] > 0


def test_event_keys_are_unique_in_the_synthetic_log() -> None:
    from producers.jetstream.decode import decode_message

    keys = [event_key(decode_message(e.text)) for e in EVENTS]
    assert len(keys) == len(set(keys))




def test_handles_resolve_through_resolve_handle_on_the_simulated_appview() -> None:
    from producers.identity.handles import resolve_handles
    from runtime.errors import HandleResolutionError
    from runtime.simulator.pds import PdsNetwork

    net = PdsNetwork(accounts=3, hosts=1, records_mean=2).start_in_thread()
    try:
        handle, did = next(iter(net.handles.items()))
        assert resolve_handles([f"@{handle.upper()}"], net.relay_url) == {handle: did}
        with pytest.raises(HandleResolutionError, match="does not resolve"):
            resolve_handles(["nobody.invalid"], net.relay_url)
    finally:
        net.stop_thread()


@pytest.mark.integration
def test_cli_adds_resolved_handles_to_the_did_filter(kafka_bootstrap: str, tmp_path: Path) -> None:
    from runtime.commands.cli import main
    from runtime.simulator.pds import PdsNetwork

    net = PdsNetwork(accounts=2, hosts=1, records_mean=2).start_in_thread()
    sim = JetstreamSimulator(EVENTS[:300]).start_in_thread()
    try:
        handle, did = next(iter(net.handles.items()))
        code = main(["jetstream", "-u", handle, "--handle-resolver", net.relay_url, "--instance", sim.url,
                     "--cursor", str(START), "-e", "2023-11-14T22:13:20.100Z", "--end-idle", "0.5", "-n", "0",
                     "--consumer", "none", "--bootstrap-servers", kafka_bootstrap, "--topic-prefix",
                     f"h{uuid.uuid4().hex[:8]}", "--progress", "none"])
        assert code == 0
        assert sim.requests[0]["wantedDids"] == [did]
    finally:
        sim.stop_thread()
        net.stop_thread()
