"""The fuzz targets: one per decoder of untrusted bytes, each driving it exactly as production does.

A target takes one input (bytes) and returns normally when the decoder either produced its typed
items or refused the input with the project's drop types (:class:`~runtime.errors.DropError` and the
``AtprotoFormatError`` a caller turns into one, at the same call sites as production). Anything else
that escapes (``IndexError``, ``TypeError``, ``RecursionError``, an ``AssertionError`` from a broken
invariant below...) is a crash: a bug to fix in the decoder.

Beyond "does not raise", the targets check what production relies on next:

* every decoded event goes through the producer's encoding (:meth:`JobRunner._emit`'s topic and
  Avro encoder), and its topic must be a legal Kafka topic name (with room for ``.dlq``);
* repository decoding gives the same items with the native fast path and without it
  (ARCHITECTURE invariant 9), and a native ``record_json`` never differs from its record.

Seeds are built from the simulators (Jetstream events, relay frames with real signed commits, repo
CARs, DID documents, Avro values of every schema) and, when ``../shared/fixtures`` is present
(``ATPROTO_FIXTURES``), from its captured frames, DID documents and ``getRepo`` CAR.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import libipld
import orjson
import zstandard

from consumers.postgres.rows import Batch, TransformOptions, add_event, naive_utc
from producers.firehose.decode import IDENTITY, KIND_SYNC, decode, parse_frame
from producers.firehose.verify import CommitVerifier, DictResolver
from producers.identity.resolver import DidResolutionError, parse_document_body
from producers.jetstream.decode import Decompressor, decode_event, decode_message
from producers.repos.decode import RecordFilter, RepoDecodeError, RepoDecoder
from producers.repos.worktopic import parse_work_value, work_value
from producers.source import Drop, Skip
from runtime.atproto import dagcbor, native
from runtime.atproto.capture import read_capture
from runtime.atproto.car import BlockStore, open_car, read_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import Commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.mst import build, iter_nodes_preorder
from runtime.atproto.repo import build_repo_blocks, read_commit
from runtime.atproto.tid import make_tid
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event, RecordEvent
from runtime.contract.topics import TopicMap, schema_name_for_collection
from runtime.contract.typed import event_from_datum
from runtime.errors import DropError
from runtime.simulator.jetstream import synthetic_events, train_dictionary
from runtime.simulator.plc import did_document
from runtime.simulator.relay import RelayGenerator, error_frame, info_frame
from runtime.simulator.synthetic import Generator

log = logging.getLogger(__name__)

#: The captured network corpus (optional; seeds come from it only when it is there).
FIXTURES: Final = Path(os.environ.get("ATPROTO_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures"))
#: A Kafka topic name: legal characters, and short enough that the consumers' ``<topic>.dlq`` is too.
_TOPIC_RE: Final = re.compile(r"[a-zA-Z0-9._-]{1,245}")
_T0: Final = 1_727_395_200_000_000
_REPO_DID: Final = "did:plc:fuzzrepoaaaaaaaaaaaaaaaa"
_KEY: Final = KeyPair.generate("k256", random.Random(13))


@dataclass(frozen=True)
class Target:
    """One fuzz target.

    Attributes:
        name: what the command line calls it.
        about: the decoder it drives.
        run: feeds one input to the decoder; returns normally unless the decoder misbehaved.
        seeds: builds the seed corpus (valid inputs from the simulators and the fixtures).
        structure: how the structure-aware mutator may parse an input (``json``, ``cbor``, ``frame``)
            to swap values inside it, or None for byte-level mutation only.
        max_len: the largest input the fuzzer makes.
    """

    name: str
    about: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    structure: str | None = None
    max_len: int = 64 * 1024


def fixture(name: str) -> Path | None:
    """A file of the captured corpus, or None when the corpus is absent."""
    path = FIXTURES / name
    return path if path.is_file() else None


# ------------------------------------------------------------------------------- the producer's side


class _Producer:
    """What :class:`producers.job.JobRunner` does with a decoded event before Kafka: its topic and its
    Avro value (``DropError``: dead-lettered by the runner)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.topics = TopicMap()
        self.codec = AvroCodec(None)
        self.routes: dict[str, tuple[str, Callable[[RecordEvent], bytes]]] = {}

    def emit(self, event: Event) -> None:
        try:
            if type(event) is RecordEvent:
                route = self.routes.get(event.collection)
                if route is None:
                    if len(self.routes) > 512:  # the harness's own caches stay small over millions of inputs
                        self._reset()
                    topic = self.topics.for_collection(event.collection)
                    route = (topic, self.codec.record_encoder_for(schema_name_for_collection(event.collection),
                                                                  topic))
                    self.routes[event.collection] = route
                topic, encode = route
                encode(event)
            else:
                topic = self.topics.for_event(event)
                self.codec.encode_event(event, topic)
        except DropError:
            return
        if _TOPIC_RE.fullmatch(topic) is None:
            raise AssertionError(f"an event would go to the illegal Kafka topic {topic[:300]!r}")


_PRODUCER = _Producer()


# ---------------------------------------------------------------------------------------- Jetstream


@functools.cache
def _jetstream_texts() -> list[bytes]:
    return [e.text.encode() for e in synthetic_events(300, seed=3, start_us=_T0, accounts=40)]


@functools.cache
def _decompressor_and_dictionary() -> tuple[Decompressor, bytes]:
    dictionary = train_dictionary(synthetic_events(2000, seed=5, start_us=_T0, accounts=100),
                                  size=16 * 1024)
    return Decompressor(dictionary), dictionary


def _jetstream_emit(data: bytes | str, decompressor: Decompressor | None) -> None:
    try:
        event = decode_message(data, job="fuzz", decompressor=decompressor)
    except DropError:
        return
    _PRODUCER.emit(event)


def run_jetstream_json(data: bytes) -> None:
    """A websocket message without compression: a text frame (str) when it is UTF-8, else binary."""
    _jetstream_emit(data, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    _jetstream_emit(text, None)


def run_jetstream_zstd(data: bytes) -> None:
    """A binary message of a ``compress=true`` connection."""
    decompressor, _ = _decompressor_and_dictionary()
    _jetstream_emit(data, decompressor)


def seeds_jetstream_json() -> list[bytes]:
    texts = _jetstream_texts()
    return [*texts[:120], b'{"did":"did:plc:a","time_us":1,"kind":"identity","identity":{}}',
            b'{"did":"did:plc:a","time_us":1,"kind":"account","account":{"active":false,"status":"deleted"}}']


def seeds_jetstream_zstd() -> list[bytes]:
    _, dictionary = _decompressor_and_dictionary()
    cctx = zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(dictionary))
    return [cctx.compress(t) for t in _jetstream_texts()[:80]]


# ---------------------------------------------------------------------------------- relay firehose


@functools.cache
def _relay() -> tuple[list[bytes], dict[str, Any]]:
    gen = RelayGenerator(seed=2, accounts=6, start_us=_T0)
    frames = [f.data for f in gen.frames(60)]
    documents: dict[str, Any] = dict(gen.did_documents())
    docs_path = fixture("did_docs.json.zst")
    if docs_path is not None:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(docs_path.read_bytes())
        documents.update(orjson.loads(raw))
    return frames, documents


@functools.cache
def _verifier() -> tuple[CommitVerifier, asyncio.AbstractEventLoop]:
    _, documents = _relay()
    return CommitVerifier(DictResolver(documents), invert=True), asyncio.new_event_loop()


def run_firehose_frame(data: bytes) -> None:
    """One relay frame as :class:`producers.firehose.source.FrameHandler` takes it: parse, decode,
    verify (signature, Sync 1.1 inversion) when it would, then produce the events."""
    try:
        frame = parse_frame(data)
    except DropError:
        return
    _ = (frame.seq, frame.did)  # the handler's DID filter and dead letters read these
    try:
        decoded = decode(frame, job="fuzz")
    except DropError:
        return
    if decoded.events or decoded.kind == KIND_SYNC or decoded.type == IDENTITY:
        verifier, loop = _verifier()
        try:
            loop.run_until_complete(verifier.check(decoded))
        except DropError:
            return
    for event in decoded.events:
        _PRODUCER.emit(event)


def seeds_firehose_frame() -> list[bytes]:
    frames, _ = _relay()
    out = [*frames, info_frame("OutdatedCursor", "cursor too old"), error_frame("FutureCursor")]
    capture = fixture("frames.bin.zst")
    if capture is not None:
        out.extend(read_capture(capture))
    return out


# ---------------------------------------------------------------------------------- getRepo CARs


def _repo_records(n: int, seed: int) -> dict[str, dict[str, Any]]:
    gen = Generator(seed=seed, accounts=3, start_us=_T0, real_cids=False)
    out: dict[str, dict[str, Any]] = {}
    for i in range(n):
        t = _T0 + i * 3_600_000_000
        collection = gen.pick_collection()
        rkey = "self" if collection == "app.bsky.actor.profile" else make_tid(t, 7)
        out[f"{collection}/{rkey}"] = gen.record(collection, _REPO_DID, t)
    out["com.example.bytes/3kfuzzbytes22"] = {"$type": "com.example.bytes", "data": {"$bytes": "AAECAwQ"},
                                              "ref": {"$link": str(CID.for_raw(b"x"))}}
    return out


@functools.cache
def _seed_repos() -> list[bytes]:
    out = []
    for n, seed in ((0, 1), (1, 2), (40, 3)):
        built = build_repo_blocks(_REPO_DID, _KEY, _repo_records(n, seed), make_tid(_T0 + 10**12, 7))
        out.append(built.to_car())
    repo = fixture("repo.car")
    if repo is not None:
        out.append(repo.read_bytes())
    return out


@functools.cache
def _background() -> dict[bytes, bytes]:
    """Every block of the seed repositories by binary CID (what a fuzzed node or record links to)."""
    blocks: dict[bytes, bytes] = {}
    for data in _seed_repos():
        blocks.update(read_car(data, verify=True).raw_lookup())
    return blocks


def _summary(decoder: RepoDecoder) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for item in decoder.items():
        if isinstance(item, RecordEvent):
            if item.record_json is not None and item.record_json != orjson.dumps(item.record):
                raise AssertionError(f"record_json of {item.collection}/{item.rkey} differs from its record")
            out.append(("record", item.collection, item.rkey, item.cid, item.record, item.time_us, item.rev))
        elif isinstance(item, Drop):
            out.append(("drop", item.reason, item.origin))
        else:
            assert isinstance(item, Skip)
            out.append(("skip", item.reason, item.count))
    return out


def _decode_repo(open_store: Callable[[], BlockStore], did: str | None, *, use_native: bool,
                 emit: bool) -> tuple[Any, ...]:
    """What production gets from one repository: ``read_car`` (or ``open_car``) then RepoDecoder."""
    saved = native.NATIVE
    native.NATIVE = saved if use_native else None
    try:
        try:
            store = open_store()
        except AtprotoFormatError as e:  # producers/repos/source.py turns it into a dead letter
            return ("car", e.reason)
        if did is None:
            try:
                did = read_commit(store).did
            except AtprotoFormatError:
                did = _REPO_DID
        try:
            decoder = RepoDecoder(store, did, RecordFilter(), job="fuzz")
        except RepoDecodeError as e:
            return ("repo", e.reason)
        items = _summary(decoder)
        if emit:
            for item in items:
                if item[0] == "record":
                    _PRODUCER.emit(RecordEvent(did, item[1], item[2], "create", item[6], item[3], item[4], "repo",
                                               0, item[5], "fuzz"))
        return ("ok", decoder.summary.entries, items)
    finally:
        native.NATIVE = saved


def _differential(open_store: Callable[[], BlockStore], did: str | None = None) -> None:
    fast = _decode_repo(open_store, did, use_native=True, emit=True)
    if native.NATIVE is None:
        return
    slow = _decode_repo(open_store, did, use_native=False, emit=False)
    if fast != slow:
        raise AssertionError(f"native and Python repository decoding differ:\n native: {str(fast)[:2000]}\n"
                             f" python: {str(slow)[:2000]}")


_SCRATCH: Final = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def run_repo_car(data: bytes) -> None:
    """A ``getRepo`` body: held in memory (native and Python paths must agree), and indexed on disk
    as a large repository is."""
    _differential(lambda: read_car(data, verify=False))
    fd, name = tempfile.mkstemp(prefix="fuzz-repo-", suffix=".car", dir=_SCRATCH)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        holder: list[Any] = []

        def on_disk() -> BlockStore:
            car = open_car(name, verify=False, max_bytes=1 << 30)
            holder.append(car)
            return car

        try:
            _decode_repo(on_disk, None, use_native=True, emit=False)
        finally:
            for car in holder:
                car.close()
    finally:
        os.unlink(name)


def seeds_repo_car() -> list[bytes]:
    return list(_seed_repos())


class _Overlay:
    """A block store: a few blocks of the input over the seed repositories' blocks."""

    def __init__(self, root: CID, extra: dict[bytes, bytes]) -> None:
        self._roots = [root]
        self._extra = extra
        self._base = _background()

    @property
    def roots(self) -> list[CID]:
        return list(self._roots)

    def get(self, cid: CID) -> bytes | None:
        return self.get_raw(cid.raw)

    def get_raw(self, raw: bytes) -> bytes | None:
        hit = self._extra.get(raw)
        return hit if hit is not None else self._base.get(raw)

    def raw_lookup(self) -> Callable[[bytes], bytes | None]:
        return self.get_raw


def _commit_over(data_root: CID) -> tuple[CID, bytes]:
    block = Commit(did=_REPO_DID, version=3, data=data_root, rev=make_tid(_T0 + 10**12, 7), prev=None,
                   sig=bytes(64)).to_block()
    return CID.for_dag_cbor(block), block


def run_repo_mst(data: bytes) -> None:
    """An MST node as the root of a repository whose other blocks are real (the input's links into
    the seed repositories resolve, so the walk goes deep); native and Python walks must agree."""
    node_cid = CID.for_dag_cbor(data)
    commit_cid, commit_block = _commit_over(node_cid)
    extra = {node_cid.raw: data, commit_cid.raw: commit_block}
    _differential(lambda: _Overlay(commit_cid, extra), _REPO_DID)


def seeds_repo_mst() -> list[bytes]:
    out: list[bytes] = []
    base = {CID.from_bytes(k): v for k, v in _background().items()}
    for data in _seed_repos():
        commit = read_commit(read_car(data))
        out.extend(block for _, block, _ in iter_nodes_preorder(commit.data, base))
    return out


_RECORD_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9-]*(\.[a-z0-9-]+)+")


def run_repo_record(data: bytes) -> None:
    """A record block as the one record of a repository (its collection is its ``$type``, so the
    typed extractors run); native and Python decoding must agree, then the event is produced."""
    collection = "app.bsky.feed.post"
    try:
        value = libipld.decode_dag_cbor(data)
    except (ValueError, RecursionError, TypeError, OverflowError):
        value = None
    if isinstance(value, dict):
        rtype = value.get("$type")
        if isinstance(rtype, str) and len(rtype) < 120 and _RECORD_TYPE_RE.fullmatch(rtype):
            collection = rtype
    record_cid = CID.for_dag_cbor(data)
    root, nodes = build([(f"{collection}/3kfuzzrecord2", record_cid)])
    commit_cid, commit_block = _commit_over(root)
    extra = {c.raw: b for c, b in nodes.items()}
    extra[record_cid.raw] = data
    extra[commit_cid.raw] = commit_block
    _differential(lambda: _Overlay(commit_cid, extra), _REPO_DID)


def seeds_repo_record() -> list[bytes]:
    out: list[bytes] = []
    for data in _seed_repos():
        car = read_car(data)
        commit = read_commit(car)
        for _, block, _ in iter_nodes_preorder(commit.data, car.blocks):
            node = dagcbor.decode(block)
            for entry in node.get("e", []):
                record = car.get(entry["v"])
                if record is not None:
                    out.append(record)
    return out


# --------------------------------------------------------------------------------- DID documents


_DOC_DID: Final = "did:plc:fuzzdocaaaaaaaaaaaaaaaa"


def run_did_document(data: bytes) -> None:
    """A PLC directory / did:web response body, parsed for the DID that was asked for (the document's
    own ``id`` when it has one, so that the rest of the document is reached)."""
    did = _DOC_DID
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("id"), str):
        did = doc["id"]
    try:
        parse_document_body(did, data)
    except DidResolutionError:
        return


def seeds_did_document() -> list[bytes]:
    rng = random.Random(4)
    out = [orjson.dumps(did_document(_DOC_DID, KeyPair.generate(curve, rng).multikey(), "https://pds.example.com",
                                     "alice.example.com")) for curve in ("k256", "p256")]
    _, documents = _relay()
    out.extend(orjson.dumps(doc) for doc in list(documents.values())[:60])
    # the legacy key form: the compressed public key in base58btc, without a multicodec prefix
    raw_key = libipld.encode_multibase("z", KeyPair.generate("k256", rng).public_key_bytes())
    legacy = did_document(_DOC_DID, raw_key, "https://pds.example")
    legacy["verificationMethod"][0]["type"] = "EcdsaSecp256k1VerificationKey2019"
    out.append(orjson.dumps(legacy))
    return out


# ----------------------------------------------------------------------------- Avro (consumer side)


@functools.cache
def _codecs() -> tuple[AvroCodec, AvroCodec]:
    return AvroCodec(None), AvroCodec.from_config({"url": "mock://fuzz-avro"})


def run_avro_value(data: bytes) -> None:
    """A message value on one of our topics, as :meth:`consumers.base.GroupConsumer._handle` takes it
    (another tool may write anything there), then the PostgreSQL sink's transform of its event."""
    for codec in _codecs():
        try:
            schema, datum = codec.decode(data)
            event = event_from_datum(schema, datum)
        except DropError:
            continue
        except (KeyError, TypeError):
            continue  # consumers/base.py dead-letters these too ("datum misses fields")
        batch = Batch()
        try:
            add_event(batch, event, TransformOptions(), datum, schema)
        except DropError:
            continue
        for _, time_us in batch.progress.values():  # what the sink's prepare() makes of the batch
            naive_utc(time_us)


def _seed_events() -> Iterator[Event]:
    for text in _jetstream_texts()[:150]:
        yield decode_event(orjson.loads(text), job="fuzz")


def seeds_avro_value() -> list[bytes]:
    topics = TopicMap()
    out: list[bytes] = []
    for codec in _codecs():
        for event in _seed_events():
            try:
                out.append(codec.encode_event(event, topics.for_event(event)))
            except DropError:
                continue
    return out


# ------------------------------------------------------------------------------ DID work topic


def run_work_item(data: bytes) -> None:
    """A message of the DID work topic: the first byte is the key's length, the key, then the value."""
    n = data[0] if data else 0
    key = data[1:1 + n] or None
    value = data[1 + n:] or None
    try:
        parse_work_value(key, value)
    except DropError:
        return


def seeds_work_item() -> list[bytes]:
    did = "did:plc:fuzzworkaaaaaaaaaaaaaaa"
    value = work_value(did, "relay", _T0)
    return [bytes([len(did)]) + did.encode() + value, b"\x00" + value, bytes([len(did)]) + did.encode()]


# ---------------------------------------------------------------------------------------- registry


TARGETS: Final[dict[str, Target]] = {t.name: t for t in (
    Target("jetstream_json", "producers.jetstream.decode.decode_message (text/binary JSON)", run_jetstream_json,
           seeds_jetstream_json, "json"),
    Target("jetstream_zstd", "producers.jetstream.decode.Decompressor + decode_message (compress=true)",
           run_jetstream_zstd, seeds_jetstream_zstd),
    Target("firehose_frame", "producers.firehose.decode.parse_frame/decode + verify.CommitVerifier",
           run_firehose_frame, seeds_firehose_frame, "frame", 256 * 1024),
    Target("repo_car", "runtime.atproto.car.read_car/open_car + producers.repos.decode.RepoDecoder",
           run_repo_car, seeds_repo_car, None, 256 * 1024),
    Target("repo_mst", "runtime.atproto.mst walk (native and Python) via RepoDecoder", run_repo_mst,
           seeds_repo_mst, "cbor"),
    Target("repo_record", "record blocks: dagcbor.record_json_form / native record_form via RepoDecoder",
           run_repo_record, seeds_repo_record, "cbor"),
    Target("did_document", "producers.identity.resolver.parse_document_body + atproto.identity.parse_did_document",
           run_did_document, seeds_did_document, "json"),
    Target("avro_value", "runtime.contract.codec.AvroCodec.decode + typed.event_from_datum + postgres rows.add_event",
           run_avro_value, seeds_avro_value),
    Target("work_item", "producers.repos.worktopic.parse_work_value", run_work_item, seeds_work_item),
)}
