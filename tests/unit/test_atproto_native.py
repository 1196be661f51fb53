"""The native fast path (``_fastrepo.c``) against the pure-Python reference path it stands in for.

The rule under test: a native function returns what the Python path returns for the same input, or
None ("use the Python path"); it never accepts what the Python path refuses. Checked on generated
repositories, the captured repository, and thousands of mutated blocks and CARs.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import orjson
import pytest

from producers.repos.decode import RecordFilter, RepoDecoder
from producers.source import Drop, Skip
from runtime.atproto import native
from runtime.atproto.car import Car, read_car
from runtime.atproto.cid import CID
from runtime.atproto.crypto import KeyPair
from runtime.atproto.dagcbor import encode, record_json_form
from runtime.atproto.errors import AtprotoFormatError, CBORError
from runtime.atproto.mst import walk
from runtime.atproto.repo import build_repo_blocks, read_commit
from runtime.atproto.tid import make_tid
from runtime.contract.records import RecordEvent
from tests.native import missing_extension

from .atproto_corpus import record_blocks, repo_car_bytes
from .native_compare import Outcomes, mutated_node

NATIVE = native.NATIVE
needs_native = pytest.mark.skipif(NATIVE is None, reason="the native extension is not built")
KEY = KeyPair.generate("k256", random.Random(3))
LINK = CID.from_str("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")
BLOB = CID.from_str("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")


def test_the_native_extension_is_built() -> None:
    # `pip install .` builds it wherever a C compiler and OpenSSL's headers exist (as in CI); the
    # benchmark figures in the README depend on it.
    if NATIVE is None:
        missing_extension("runtime/atproto/_fastrepo.c", openssl=True)
    assert NATIVE is not None


def _records(rng: random.Random, n: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i in range(n):
        t = 1_700_000_000_000_000 + i * 7_000_000 + rng.randrange(1000)
        kind = rng.randrange(5)
        if kind == 0:
            rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": f"post {i} é🙂", "langs": ["en"],
                                   "createdAt": "2024-10-01T00:00:00.000Z"}
        elif kind == 1:
            rec = {"$type": "app.bsky.feed.like", "createdAt": "2024-10-01T00:00:00.000Z",
                   "subject": {"uri": f"at://did:plc:x/app.bsky.feed.post/{i}", "cid": str(LINK)}}
        elif kind == 2:
            rec = {"$type": "app.bsky.feed.post", "text": "", "createdAt": "2024-10-01T00:00:00Z",
                   "embed": {"$type": "app.bsky.embed.images", "images": [
                       {"alt": "", "image": {"$type": "blob", "ref": BLOB, "mimeType": "image/jpeg", "size": 5}}]}}
        elif kind == 3:
            rec = {"$type": "com.example.thing", "n": -rng.randrange(1 << 40), "f": 1.5, "ok": True, "no": None,
                   "sig": bytes(rng.randrange(256) for _ in range(rng.randrange(70))), "ref": LINK}
        else:
            rec = {"$type": "app.bsky.graph.follow", "subject": "did:plc:abc", "createdAt": "2024-10-01T00:00:00Z"}
        coll = rec["$type"]
        out[f"{coll}/{make_tid(t)}"] = rec
    return out


def _built(seed: int, n: int) -> Any:
    rng = random.Random(seed)
    return build_repo_blocks(f"did:plc:native{seed:019d}", KEY, _records(rng, n), make_tid(1_800_000_000_000_000))


# ------------------------------------------------------------------------------------------- CAR


@needs_native
def test_car_index_equals_the_python_reader() -> None:
    assert NATIVE is not None
    datas = [_built(s, n).to_car() for s, n in ((1, 0), (2, 1), (3, 300))]
    with contextlib.suppress(pytest.skip.Exception):
        datas.append(repo_car_bytes())
    for data in datas:
        indexed = NATIVE.car_index(data, True, -1)
        assert indexed is not None
        _header, raw = indexed
        car = read_car(data)
        assert car.blocks == {CID.from_bytes(k): v for k, v in raw.items()}
        assert car.raw_lookup() == raw


@needs_native
def test_car_index_bails_wherever_the_python_reader_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NATIVE is not None
    data = _built(4, 20).to_car()
    rng = random.Random(4)
    cases = [data[:cut] for cut in range(len(data))]
    for _ in range(1000):
        b = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    accepted = 0
    for case in cases:
        for verify in (True, False):
            accepted += NATIVE.car_index(case, verify, -1) is not None
            fast = _read_outcome(case, verify)
            monkeypatch.setattr(native, "NATIVE", None)
            slow = _read_outcome(case, verify)
            monkeypatch.setattr(native, "NATIVE", NATIVE)
            assert fast == slow
    assert accepted > 100  # mutations inside block bytes with verify off are still canonical


def _read_outcome(data: bytes, verify: bool) -> tuple[Any, ...]:
    try:
        car = read_car(data, verify=verify)
    except AtprotoFormatError as e:
        return ("error", type(e), str(e))
    return ("ok", car.roots, car.raw_lookup())


@needs_native
def test_car_index_caps_blocks() -> None:
    assert NATIVE is not None
    built = _built(5, 10)
    data = built.to_car()
    n = sum(1 for _ in built.car_blocks())  # sections, duplicates included
    assert NATIVE.car_index(data, True, n) is not None
    assert NATIVE.car_index(data, True, n - 1) is None
    with pytest.raises(AtprotoFormatError, match="more than"):
        read_car(data, max_blocks=n - 1)


# ------------------------------------------------------------------------------------------- MST


def _python_walk(root: CID, blocks: dict[CID, bytes]) -> list[tuple[str, bytes]] | None:
    try:
        return [(k, c.raw) for k, c in walk(root, blocks, verify=False)]
    except AtprotoFormatError:
        return None


@needs_native
@pytest.mark.parametrize(("seed", "n"), [(1, 0), (2, 1), (6, 7), (7, 300), (8, 2000)])
def test_mst_walk_equals_the_python_walk(seed: int, n: int) -> None:
    assert NATIVE is not None
    built = _built(seed, n)
    raw = {c.raw: b for c, b in built.blocks.items()}
    got = NATIVE.mst_walk(built.commit.data.raw, raw, True, 64, 1 << 30)
    assert got == [(k, c.raw) for k, c in walk(built.commit.data, built.blocks)]
    assert len(got) == n
    # past the limit: the whole tree is still checked, only the count comes back
    if n > 3:
        assert NATIVE.mst_walk(built.commit.data.raw, raw, True, 64, n - 1) == n
    # a callable lookup (the on-disk CAR) gives the same
    assert NATIVE.mst_walk(built.commit.data.raw, raw.get, True, 64, 1 << 30) == got


@needs_native
def test_mst_walk_on_the_captured_repository() -> None:
    assert NATIVE is not None
    car = read_car(repo_car_bytes())
    commit = read_commit(car)
    got = NATIVE.mst_walk(commit.data.raw, car.raw_lookup(), True, 64, 1 << 30)
    assert got is not None and len(got) == 23
    assert got == [(k, c.raw) for k, c in walk(commit.data, car)]


@needs_native
def test_mst_walk_never_accepts_what_the_python_walk_refuses() -> None:
    assert NATIVE is not None
    built = _built(9, 150)
    record_cids = set(built.record_cids.values())
    nodes = [c for c in built.blocks if c not in record_cids and c != built.commit_cid]
    rng = random.Random(9)
    outcomes = Outcomes()
    for _ in range(3000):
        blocks = dict(built.blocks)
        victim = rng.choice(nodes)
        blocks[victim] = mutated_node(rng, blocks[victim])
        if rng.randrange(10) == 0:
            del blocks[rng.choice(nodes)]
        expected = _python_walk(built.commit.data, blocks)
        got = NATIVE.mst_walk(built.commit.data.raw, {c.raw: v for c, v in blocks.items()}, False, 64, 1 << 30)
        outcomes.add(expected, got)
    assert outcomes["both_refuse"] > 1000 and outcomes["both_accept"] > 50, outcomes
    # with verify on, any changed node is refused (its CID no longer matches)
    blocks = {c.raw: v for c, v in built.blocks.items()}
    blocks[nodes[0].raw] = blocks[nodes[0].raw] + b"\x00"
    assert NATIVE.mst_walk(built.commit.data.raw, blocks, True, 64, 1 << 30) is None


@needs_native
def test_mst_walk_errors_of_the_lookup_propagate() -> None:
    assert NATIVE is not None
    built = _built(10, 5)

    def broken(raw: bytes) -> bytes | None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        NATIVE.mst_walk(built.commit.data.raw, broken, True, 64, 100)
    with pytest.raises(TypeError):
        NATIVE.mst_walk(built.commit.data.raw, 5, True, 64, 100)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- records


def _exact(value: Any) -> Any:
    """A value with its types and key order spelled out (True == 1 and dicts ignore order otherwise)."""
    if type(value) is dict:
        return ("dict", [(k, _exact(v)) for k, v in value.items()])
    if type(value) is list:
        return ("list", [_exact(v) for v in value])
    if type(value) is float:
        return ("float", repr(value))
    return (type(value).__name__, value)


def _python_form(block: bytes) -> Any:
    try:
        return _exact(record_json_form(block))
    except CBORError:
        return None


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(11 if depth < 5 else 7)
    if kind == 0:
        return rng.choice([LINK, BLOB])
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 2:
        return rng.choice(["", "s", "é🙂", "x" * 30, "\x00\n\"\\", "a" * 300])
    if kind == 3:
        return rng.choice([0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**63 - 1, 2**64 - 1, -1, -24, -25, -(2**63)])
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return rng.choice([1.5, -0.0, 1e300, -2.25])
    if kind == 6:
        return rng.randrange(-(2**40), 2**40)
    if kind < 9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["a", "b", "ab", "zz", "$type", "é", "k" * 30]) + str(i): _random_value(rng, depth + 1)
            for i in range(rng.randrange(5))}


def _random_records(rng: random.Random, count: int, max_fields: int) -> list[bytes]:
    return [encode({"$type": "x", **{f"f{i}": _random_value(rng, 1) for i in range(rng.randrange(1, max_fields))}})
            for _ in range(count)]


@needs_native
def test_record_form_equals_the_python_json_form() -> None:
    assert NATIVE is not None
    blocks = _random_records(random.Random(11), 3000, 6)
    with contextlib.suppress(pytest.skip.Exception):
        blocks += record_blocks()
    floats = 0
    for block in blocks:
        cid = CID.for_dag_cbor(block)
        got = NATIVE.record_form(block, cid.raw, 64)
        assert got is not None and got is not False and not isinstance(got, bool)
        assert got[0] == str(cid)
        # the same values of the same types in the same key order, and orjson's very text
        assert _exact(got[1]) == _python_form(block)
        if got[2] is None:
            floats += 1
        else:
            assert got[2] == orjson.dumps(got[1]), block.hex()
    assert floats > 100  # a float leaves the text to orjson


@needs_native
def test_record_form_never_accepts_what_the_python_path_refuses() -> None:
    assert NATIVE is not None
    rng = random.Random(12)
    sources = _random_records(rng, 300, 4)
    accepted = refused = 0
    for _ in range(6000):
        b = bytearray(rng.choice(sources))
        how = rng.randrange(3)
        if how == 0:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:
            del b[rng.randrange(len(b)):]
        else:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        block = bytes(b)
        cid = CID.for_dag_cbor(block)
        got = NATIVE.record_form(block, cid.raw, 64)
        expected = _python_form(block)
        if expected is None:
            assert got is None, block.hex()
            refused += 1
        elif got is not None:
            assert not isinstance(got, bool)
            assert _exact(got[1]) == expected, block.hex()
            assert got[2] is None or got[2] == orjson.dumps(got[1]), block.hex()
            accepted += 1
    assert refused > 1000 and accepted > 1000, (refused, accepted)


@needs_native
def test_record_form_checks_the_cid_and_the_depth() -> None:
    assert NATIVE is not None
    block = encode({"$type": "x", "a": 1})
    assert NATIVE.record_form(block, CID.for_dag_cbor(block + b"x").raw, 64) is False
    assert NATIVE.record_form(block, b"\x01\x71", 64) is None  # not the common CID form: Python decides
    deep: Any = 1
    for _ in range(80):
        deep = [deep]
    nested = encode({"d": deep}, max_depth=200)
    assert NATIVE.record_form(nested, CID.for_dag_cbor(nested).raw, 64) is None
    with pytest.raises(CBORError, match="deeper"):
        record_json_form(nested)
    assert NATIVE.record_form(b"\x01", CID.for_dag_cbor(b"\x01").raw, 64) is None  # not a map
    assert NATIVE.cid_str(LINK.raw) == str(LINK)
    assert NATIVE.cid_str(b"\x00") is None


@needs_native
def test_payload_form_is_record_form_under_the_blocks_own_cid() -> None:
    """The archive's path (a row's CID is its payload's): hashed once, the same answer as record_form
    with the CID computed in Python, for well-formed, mutated, too deep and non-map blocks."""
    assert NATIVE is not None
    rng = random.Random(13)
    blocks = _random_records(rng, 500, 5)
    for source in list(blocks):
        b = bytearray(source)
        b[rng.randrange(len(b))] = rng.randrange(256)
        blocks.append(bytes(b))
    deep: Any = 1
    for _ in range(80):
        deep = [deep]
    blocks += [encode({"d": deep}, max_depth=200), b"\x01", b""]
    formed = 0
    for block in blocks:
        got = NATIVE.payload_form(block, 64)
        assert got == NATIVE.record_form(block, CID.for_dag_cbor(block).raw, 64), block.hex()
        formed += got is not None
    assert 500 <= formed < len(blocks)


# --------------------------------------------------------------------------------- whole decoder


def _summary(items: list[RecordEvent | Drop | Skip]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in items:
        if isinstance(i, RecordEvent):
            out.append(("event", i.collection, i.rkey, i.cid, _exact(i.record), i.rev, i.time_us))
            assert i.record_json is None or i.record_json == orjson.dumps(i.record)
        elif isinstance(i, Drop):
            out.append(("drop", i.reason, i.detail, i.payload, i.origin))
        else:
            out.append(("skip", i.reason, i.count))
    return out


def _decode(car: Car, did: str, flt: RecordFilter) -> tuple[list[tuple[Any, ...]], Any]:
    decoder = RepoDecoder(car, did, flt, max_cached_entries=64)
    return _summary(list(decoder.items())), decoder.summary


@needs_native
def test_the_decoder_gives_the_same_items_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    cases: list[tuple[Car, str]] = []
    for seed, n in ((20, 0), (21, 50), (22, 400)):
        built = _built(seed, n)
        cases.append((Car(roots=[built.commit_cid], blocks=dict(built.blocks)), built.commit.did))
        # damaged records: missing, not matching the CID, not DAG-CBOR
        if n:
            blocks = dict(built.blocks)
            cids = sorted(built.record_cids.values())
            del blocks[cids[0]]
            blocks[cids[1]] = b"\xa1\x61x\x01junk"
            bad = b"\xa1\x61x\xff"
            bad_cid = CID.for_dag_cbor(bad)
            blocks[bad_cid] = bad
            cases.append((Car(roots=[built.commit_cid], blocks=blocks), built.commit.did))
    try:
        data = repo_car_bytes()
        cases.append((read_car(data), read_commit(read_car(data)).did))
    except pytest.skip.Exception:
        pass
    filters = [RecordFilter(), RecordFilter(types=frozenset({"post", "like"})),
               RecordFilter(collections=("com.example.*",), max_record_bytes=100)]
    for car, did in cases:
        for flt in filters:
            fast = _decode(car, did, flt)
            monkeypatch.setattr(native, "NATIVE", None)
            slow = _decode(car, did, flt)
            monkeypatch.setattr(native, "NATIVE", NATIVE)
            assert fast == slow


def test_the_python_path_alone_decodes(python_only: None) -> None:
    built = _built(23, 100)
    car = read_car(built.to_car())
    items = list(RepoDecoder(car, built.commit.did, RecordFilter()).items())
    events = [i for i in items if isinstance(i, RecordEvent)]
    assert len(events) == 100
    assert {f"{e.collection}/{e.rkey}": e.cid for e in events} == {k: str(c) for k, c in built.record_cids.items()}
