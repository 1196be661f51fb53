"""Pure Jetstream decoding: every event kind, every malformed shape, compression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.jetstream import decode as dmod
from producers.jetstream.decode import Decompressor, decode_event, decode_message
from runtime.contract.nsid import is_collection
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, to_jetstream_json
from runtime.contract.typed import MAX_TIME_US
from runtime.errors import DecodeError, DropError, InvalidRecordError
from runtime.simulator.jetstream import synthetic_events, train_dictionary
from tests.native import missing_extension

LIKE = {
    "did": "did:plc:abc", "time_us": 1725911162329308, "kind": "commit",
    "commit": {"rev": "3l3qo2vutsw2b", "operation": "create", "collection": "app.bsky.feed.like",
               "rkey": "3l3qo2vuowo2b",
               "record": {"$type": "app.bsky.feed.like", "createdAt": "2024-09-09T19:46:02.102Z",
                          "subject": {"cid": "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4",
                                      "uri": "at://did:plc:x/app.bsky.feed.post/3l3pte3p2e325"}},
               "cid": "bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"},
}


def test_commit_create() -> None:
    ev = decode_message(orjson.dumps(LIKE), job="j")
    assert isinstance(ev, RecordEvent)
    assert (ev.did, ev.collection, ev.rkey, ev.operation, ev.rev) == (
        "did:plc:abc", "app.bsky.feed.like", "3l3qo2vuowo2b", "create", "3l3qo2vutsw2b")
    assert ev.cursor == ev.time_us == 1725911162329308
    assert ev.source == "jetstream" and ev.job == "j"
    assert ev.record == LIKE["commit"]["record"]
    assert to_jetstream_json(ev) == LIKE


def test_text_and_bytes_messages_decode_the_same() -> None:
    text = orjson.dumps(LIKE).decode()
    assert decode_message(text) == decode_message(text.encode())


def test_delete_has_no_record() -> None:
    msg = {"did": "did:plc:abc", "time_us": 5, "kind": "commit",
           "commit": {"rev": "r", "operation": "delete", "collection": "app.bsky.graph.follow", "rkey": "k"}}
    ev = decode_event(msg)
    assert isinstance(ev, RecordEvent)
    assert ev.record is None and ev.cid is None and ev.operation == "delete"
    assert to_jetstream_json(ev) == msg


def test_identity_and_account() -> None:
    ident = {"did": "did:plc:a", "time_us": 7, "kind": "identity",
             "identity": {"did": "did:plc:a", "handle": "a.test", "seq": 9, "time": "2024-01-01T00:00:00Z"}}
    acct = {"did": "did:plc:a", "time_us": 8, "kind": "account",
            "account": {"active": False, "did": "did:plc:a", "seq": 10, "time": "2024-01-01T00:00:00Z",
                        "status": "takendown"}}
    i = decode_event(ident)
    a = decode_event(acct)
    assert isinstance(i, IdentityEvent) and i.handle == "a.test" and i.seq == 9
    assert isinstance(a, AccountEvent) and a.active is False and a.status == "takendown"
    assert to_jetstream_json(i) == ident
    assert to_jetstream_json(a) == acct


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"[1,2", b"nul"])
def test_malformed_json(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(raw)
    assert info.value.reason == "malformed_json"


@pytest.mark.parametrize("mutate", [
    lambda m: m.pop("did"),
    lambda m: m.update(time_us="1"),
    lambda m: m.update(time_us=True),
    lambda m: m["commit"].update(operation="upsert"),
    lambda m: m["commit"].pop("collection"),
    lambda m: m["commit"].update(rkey=5),
    lambda m: m["commit"].pop("record"),
    lambda m: m["commit"].update(record="text"),
    lambda m: m["commit"].pop("cid"),
    lambda m: m["commit"].update(rev=1),
    lambda m: m.update(commit=[]),
])
def test_wrong_shapes_are_invalid(mutate) -> None:  # type: ignore[no-untyped-def]
    msg = orjson.loads(orjson.dumps(LIKE))
    mutate(msg)
    with pytest.raises(InvalidRecordError) as info:
        decode_event(msg)
    assert info.value.reason == "invalid_record"


def test_non_object_and_unknown_kind() -> None:
    with pytest.raises(InvalidRecordError):
        decode_message(b"[1]")
    with pytest.raises(DecodeError) as info:
        decode_message(b'{"did":"did:plc:a","time_us":1,"kind":"sync"}')
    assert info.value.reason == "unknown_event"


def test_account_without_active_is_invalid() -> None:
    with pytest.raises(InvalidRecordError):
        decode_event({"did": "did:plc:a", "time_us": 1, "kind": "account", "account": {}})


def test_compressed_with_a_trained_dictionary() -> None:
    events = synthetic_events(300, seed=2, real_cids=False)
    dictionary = train_dictionary(events, size=16 * 1024)
    cctx = zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(dictionary))
    dec = Decompressor(dictionary)
    for ev in events[:50]:
        got = decode_message(cctx.compress(ev.text.encode()), decompressor=dec)
        assert got == decode_message(ev.text)


def test_garbage_fails_to_decompress() -> None:
    events = synthetic_events(50, seed=2, real_cids=False)
    dec = Decompressor(train_dictionary(events, size=8 * 1024))
    with pytest.raises(DecodeError) as info:
        decode_message(b"\x00garbage{", decompressor=dec)
    assert info.value.reason == "decompress_failed"


def test_jetstream_real_dictionary(fixtures_dir: Path) -> None:
    """Jetstream's published dictionary (captured) compresses and decompresses our events."""
    dictionary = (fixtures_dir / "legacy_subscribe.zdict").read_bytes()
    cctx = zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(dictionary))
    dec = Decompressor(dictionary)
    raw = orjson.dumps(LIKE)
    compressed = cctx.compress(raw)
    assert len(compressed) < len(raw)
    assert decode_message(compressed, decompressor=dec) == decode_message(raw)


# Regressions found by the fuzz targets (tests/fuzz): each input once crashed the producer.


def _commit(**changes: object) -> dict[str, object]:
    event = orjson.loads(orjson.dumps(LIKE))
    event["commit"].update(changes)
    return event


def test_fuzz_time_us_beyond_an_avro_long_is_invalid() -> None:
    # 2**64 - 1 decoded, then crashed the Avro encoder with OverflowError
    raw = orjson.dumps({**LIKE, "time_us": 18446744073709551615})
    with pytest.raises(InvalidRecordError):
        decode_message(raw)
    with pytest.raises(InvalidRecordError):
        decode_message(orjson.dumps({**LIKE, "time_us": -1}))
    with pytest.raises(InvalidRecordError):  # past year 9999: no sink could store it
        decode_message(orjson.dumps({**LIKE, "time_us": 253_402_300_800_000_000}))


def test_fuzz_identity_seq_beyond_an_avro_long_is_dropped_to_none() -> None:
    raw = orjson.dumps({"did": "did:plc:a", "time_us": 5, "kind": "identity",
                        "identity": {"seq": 18446744073709551615, "handle": "a.test"}})
    ev = decode_message(raw)
    assert isinstance(ev, IdentityEvent)
    assert ev.seq is None


def test_fuzz_unhashable_operation_is_invalid() -> None:
    # {"operation": {...}} raised TypeError (unhashable type: 'dict') from the set lookup
    with pytest.raises(InvalidRecordError):
        decode_message(orjson.dumps(_commit(operation={"at://did:plc:x/app.bsky.feed.post/3k": {"$bytes": "AAEC"}})))
    with pytest.raises(InvalidRecordError):
        decode_message(orjson.dumps(_commit(operation=["create"])))


@pytest.mark.parametrize("collection", ["#account", "}tat.bsky.actor.declaration", "a b.c", "app.bsky.feed.like/x",
                                        "", "x" * 400])
def test_fuzz_a_collection_that_is_not_an_nsid_is_invalid(collection: str) -> None:
    # it decoded, and the producer then asked Kafka for the illegal topic "atproto.#account"
    with pytest.raises(InvalidRecordError):
        decode_message(orjson.dumps(_commit(collection=collection)))


def test_fuzz_a_frame_declaring_a_huge_size_is_oversize() -> None:
    # zstd allocates the content size a frame header declares: 2**62 bytes raised MemoryError
    dec = Decompressor(train_dictionary(synthetic_events(50, seed=2, real_cids=False), size=8 * 1024))
    header = b"\x28\xb5\x2f\xfd" + b"\xc0" + b"\x00" + (1 << 62).to_bytes(8, "little")
    with pytest.raises(DecodeError) as info:
        decode_message(header + b"\x01\x00\x00", decompressor=dec)
    assert info.value.reason == "oversize"


# ---------------------------------------------------------------- the native commit decoder

_ODD = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=5),
                 st.lists(st.integers(-5, 5), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
                 st.sampled_from(["commit", "identity", "account", "create", "update", "delete", "app.bsky.feed.like",
                                  "com.example.new", "not an nsid", "x" * 400, "did:plc:abc"]))
_FIELDS = [("did",), ("time_us",), ("kind",), ("commit",), ("commit", "operation"), ("commit", "collection"),
           ("commit", "rkey"), ("commit", "rev"), ("commit", "record"), ("commit", "cid")]


def _outcome(raw: bytes, job: str) -> object:
    try:
        event = decode_message(raw, job=job)
    except DropError as e:
        return (type(e), e.reason, str(e))
    assert isinstance(event, (RecordEvent, IdentityEvent, AccountEvent))
    return (type(event), event, getattr(event, "record_json", None), event.source, event.job)


@given(data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_native_decoder_gives_what_the_python_one_gives(data: st.DataObject,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain commits, and commits with fields removed or of other types (or JSON cut short): the same
    event or the same error with the native decoder and without it."""
    if dmod.FAST is None:
        missing_extension("producers/jetstream/_fastevent.c")
    message: dict[str, Any] = orjson.loads(orjson.dumps(data.draw(st.sampled_from(_SAMPLES), label="sample")))
    for _ in range(data.draw(st.integers(0, 3), label="changes")):
        path = data.draw(st.sampled_from(_FIELDS), label="field")
        holder: Any = message
        for part in path[:-1]:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        if data.draw(st.booleans(), label="remove"):
            holder.pop(path[-1], None)
        elif path[-1] == "time_us":
            holder["time_us"] = data.draw(st.sampled_from([-1, 0, MAX_TIME_US, MAX_TIME_US + 1, 2**63, 2**64 - 1,
                                                           True]))
        else:
            holder[path[-1]] = data.draw(_ODD, label="value")
    raw = orjson.dumps(message)
    if data.draw(st.booleans(), label="cut"):
        raw = raw[: data.draw(st.integers(0, len(raw)), label="at")]
    job = data.draw(st.sampled_from(["", "j"]), label="job")
    messages = (raw, raw.decode(errors="replace"))  # a binary frame, a text frame
    native = [_outcome(m, job) for m in messages]
    with monkeypatch.context() as m:
        m.setattr(dmod, "FAST", None)
        assert [_outcome(m, job) for m in messages] == native


def test_the_native_decoder_decodes_plain_commits() -> None:
    if dmod.FAST is None:
        missing_extension("producers/jetstream/_fastevent.c")
    is_collection("app.bsky.feed.like")
    event = dmod.FAST(orjson.dumps(LIKE), "j")
    assert event == decode_event(LIKE, job="j") and type(event) is RecordEvent
    assert dmod.FAST(orjson.dumps({**LIKE, "kind": "identity"}), "j") is None  # left to the Python code
    assert dmod.FAST(b"{", "j") is None


_SAMPLES = [LIKE, *(e for e in (orjson.loads(m.text) for m in synthetic_events(60, seed=3))
                   if e.get("kind") == "commit")]


def test_the_native_decoder_fills_record_events_as_their_init_does() -> None:
    if dmod.FAST is None:
        missing_extension("producers/jetstream/_fastevent.c")
    assert dmod._slots_filled() is not None  # RecordEvent is a plain slotted dataclass: no __init__ call
    is_collection("app.bsky.feed.like")
    event = dmod.FAST(orjson.dumps(LIKE), "j")
    assert type(event) is RecordEvent
    assert {f: getattr(event, f) for f in RecordEvent.__slots__} == {
        f: getattr(decode_event(LIKE, job="j"), f) for f in RecordEvent.__slots__}
    import producers.jetstream._fastevent as fast
    with pytest.raises(ValueError):  # not a slot: refused before anything changes
        fast.configure(orjson.loads, RecordEvent, set(), MAX_TIME_US, "jetstream", ("nope",) * 11)
    assert dmod.FAST(orjson.dumps(LIKE), "j") == event
