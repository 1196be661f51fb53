"""A Jetstream v2 ("Network Replay") simulator: sealed segments over XRPC HTTP, the tip over a websocket.

The archive is made of real ``.jss`` segments written with :class:`runtime.atproto.segment.SegmentWriter`
from generated activity (:class:`RowFactory`: kinds 1-7, identity/account/sync rows carrying the
upstream ``subscribeRepos`` event's DAG-CBOR, resync-creates, deletes, imported ``indexed_at`` times,
empty blocks as compaction leaves them). Rows past the sealed tip are the live, unsealed tail: they
exist only on the websocket, and ``live_rate`` keeps adding to it.

Endpoints (``/xrpc/network.bsky.jetstream.*``, one port; a websocket upgrade is routed to the
websocket server, anything else to the HTTP server):

* ``listSegments`` (``limit`` 1..1000, opaque ``cursor``), ``planSnapshot`` (POST; see :func:`plan_page`),
  ``getSegment`` (ETag = quoted checksum, ``Range``, ``If-Range``, ``If-None-Match``), ``getBlock``
  (the stored zstd frame, ETag ``"<checksum>:<I>"``), ``getZstdDictionary``;
* ``subscribeEvents`` (subprotocol ``xrpc.v1.json``; ``cursor`` inclusive, a value >= 1e15 being unix
  microseconds of ``witnessed_at``; ``kinds``, ``dids``, ``collections``, ``maxMessageSizeBytes``,
  ``zstdDictionary``); pre-upgrade 400s ``CursorTooOld``, ``UnknownZstdDictionary``, ``InvalidRequest``.

Faults on demand (:class:`Faults`), deterministic for a seed; the clock is injected.
``backfill simulate jetstream2`` runs it; tests use it in-process.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
import zstandard
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from runtime.atproto import dagcbor
from runtime.atproto.car import write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import UnsignedCommit, sign_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.mst import encode_node
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_SYNC,
    KIND_UPDATE,
    BlockInfo,
    Bloom,
    Row,
    Segment,
    SegmentHeader,
    SegmentWriter,
    zstd_dictionary_id,
)
from runtime.contract.timeparse import us_to_iso
from runtime.simulator.httpd import HttpServer, Request, Response, ThreadServed
from runtime.simulator.synthetic import Generator
from runtime.simulator.wsserver import close, listen, live_ticks

log = logging.getLogger(__name__)

NSID_PREFIX: Final = "network.bsky.jetstream."
XRPC: Final = "/xrpc/" + NSID_PREFIX
SUBPROTOCOL: Final = "xrpc.v1.json"
#: Values of ``cursor`` at or above this are unix microseconds of ``witnessed_at``, not seqs.
TIME_CURSOR_MIN: Final = 10**15
KIND_NAMES: Final = {KIND_CREATE: "commit", KIND_UPDATE: "commit", KIND_DELETE: "commit",
                     KIND_RESYNC_CREATE: "commit", KIND_IDENTITY: "identity", KIND_ACCOUNT: "account",
                     KIND_SYNC: "sync"}
OPERATIONS: Final = {KIND_CREATE: "create", KIND_UPDATE: "update", KIND_DELETE: "delete",
                     KIND_RESYNC_CREATE: "create"}
ALL_KINDS: Final = frozenset(("commit", "identity", "account", "sync"))
#: Parameter names of Jetstream v1's ``/subscribe``: a 400 ``InvalidRequest`` on ``subscribeEvents``.
V1_PARAMS: Final = frozenset(("wantedCollections", "wantedDids", "compress", "requireHello"))
MAX_DIDS: Final = 10_000
MAX_COLLECTIONS: Final = 100
#: Where a real dictionary captured from the hosted service may be (used when present, never copied).
FIXTURE_DICTIONARY: Final = Path("/work/shared/fixtures/subscribe_events_20260811.zdict")
_SENTINEL_KIND: Final = {"$identity": "identity", "$account": "account", "$sync": "sync"}


def segment_name(index: int) -> str:
    """The file name of segment ``index`` (``seg_000000002a.jss``: ten hex digits, as the service names them)."""
    return f"seg_{index:010x}.jss"


def rfc3339_us(time_us: int) -> str:
    """RFC 3339 with six fractional digits and ``Z``."""
    return us_to_iso(time_us)


def dictionary_id(data: bytes) -> int:
    """The id of a zstd dictionary (little-endian u32 after the magic).

    Raises:
        ValueError: not a zstd dictionary.
    """
    found = zstd_dictionary_id(data)
    if found is None:
        raise ValueError("not a zstd dictionary (bad magic)")
    return found


# ------------------------------------------------------------------------------------------ rows


class RowFactory:
    """Generates archive rows deterministically from a seed, with seqs from ``first_seq`` and strictly
    increasing ``witnessed_at``.

    Args:
        seed: the random seed.
        accounts: how many accounts act.
        start_us: witnessed time of the first row.
        rate: mean rows per second of witnessed time.
        first_seq: seq of the first row.
        marker_rate: fraction of extra identity/account/sync rows. A sync row (the repository replaced)
            is followed by resync-creates (kind 7) at its rev of the records the repository keeps
            (at most ``resync_keep``); its other records are gone.
        resync_rate: fraction of other creates stored as resync-creates (kind 7).
        imported_rate: fraction of commit rows whose ``indexed_at`` is an imported, older time (the
            rest have 0: use ``witnessed_at``).
    """

    def __init__(self, *, seed: int = 1, accounts: int = 50, start_us: int = 1_750_000_000_000_000,
                 rate: float = 1000.0, first_seq: int = 1, marker_rate: float = 0.03,
                 resync_rate: float = 0.02, imported_rate: float = 0.3, resync_keep: int = 3) -> None:
        self.gen = Generator(seed=seed, accounts=accounts, start_us=start_us, rate=rate, real_cids=False)
        self.rng = random.Random(seed ^ 0x5EED5)  # noqa: S311 - synthetic data
        self.seq = first_seq - 1
        self.witnessed = start_us - 1
        self.marker_rate = marker_rate
        self.resync_rate = resync_rate
        self.imported_rate = imported_rate
        self.resync_keep = resync_keep
        #: replacement rows still to come after a sync row: (collection, did, rkey, rev, payload)
        self._pending: list[tuple[str, str, str, str, bytes]] = []
        self._relay_seq = 100_000
        self._keys: dict[str, KeyPair] = {}

    def _next_witnessed(self, at_least: int | None) -> int:
        self.witnessed = max(self.witnessed + 1, at_least if at_least is not None else self.gen.t)
        return self.witnessed

    def _relay(self) -> int:
        self._relay_seq += 1
        return self._relay_seq

    def _marker(self, kind: int, did: str, handle: str, w: int) -> bytes:
        when = us_to_iso(w)[:-4] + "Z"
        if kind == KIND_IDENTITY:
            return dagcbor.encode({"seq": self._relay(), "did": did, "time": when, "handle": handle})
        if kind == KIND_ACCOUNT:
            body: dict[str, Any] = {"seq": self._relay(), "did": did, "time": when}
            active = self.rng.random() < 0.5
            body["active"] = active
            if not active:
                body["status"] = self.rng.choice(("deactivated", "takendown", "deleted"))
            return dagcbor.encode(body)
        key = self._keys.get(did)
        if key is None:
            key = self._keys[did] = KeyPair.generate("k256", self.rng)
        rev, kept = self.gen.resync(did, self.resync_keep)
        self._pending.extend((collection, did, rkey, rev, dagcbor.encode(dagcbor.from_json_form(record)))
                             for collection, rkey, record in kept)
        data = CID.for_dag_cbor(encode_node(None, []))
        cid, block = sign_commit(UnsignedCommit(did=did, data=data, rev=rev), key)
        car = write_car([cid], [(cid, block)])
        return dagcbor.encode({"seq": self._relay(), "did": did, "time": when, "blocks": car, "rev": rev})

    def next_row(self, witnessed_at: int | None = None) -> Row:
        """The next row (``witnessed_at``: at least this witnessed time, for a live tail on a clock)."""
        rng = self.rng
        self.seq += 1
        if self._pending:
            collection, did, rkey, rev, payload = self._pending.pop(0)
            w = self._next_witnessed(witnessed_at)
            return Row(self.seq, w, 0, KIND_RESYNC_CREATE, collection, did, rkey, rev, payload)
        roll = rng.random()
        if roll < self.marker_rate:
            acct = rng.choice(self.gen.accounts)
            kind = (KIND_IDENTITY, KIND_ACCOUNT, KIND_SYNC)[int(roll / self.marker_rate * 3) % 3]
            w = self._next_witnessed(witnessed_at)
            return Row(self.seq, w, 0, kind, "", acct.did, "", "", self._marker(kind, acct.did, acct.handle, w))
        ev = self.gen.event()
        w = self._next_witnessed(witnessed_at)
        did = ev["did"]
        if ev["kind"] in ("identity", "account"):
            kind = KIND_IDENTITY if ev["kind"] == "identity" else KIND_ACCOUNT
            handle = ev.get("identity", {}).get("handle", "")
            return Row(self.seq, w, 0, kind, "", did, "", "", self._marker(kind, did, handle, w))
        c = ev["commit"]
        indexed = 0
        if rng.random() < self.imported_rate:
            indexed = max(1, ev["time_us"] - rng.randrange(1, 10**9))
        op = c["operation"]
        if op == "delete":
            return Row(self.seq, w, indexed, KIND_DELETE, c["collection"], did, c["rkey"], c["rev"], b"")
        kind = KIND_UPDATE if op == "update" else KIND_CREATE
        if kind == KIND_CREATE and rng.random() < self.resync_rate:
            kind = KIND_RESYNC_CREATE
        payload = dagcbor.encode(dagcbor.from_json_form(c["record"]))
        return Row(self.seq, w, indexed, kind, c["collection"], did, c["rkey"], c["rev"], payload)

    def rows(self, n: int) -> list[Row]:
        """The next ``n`` rows."""
        return [self.next_row() for _ in range(n)]


def row_payload_json(row: Row) -> dict[str, Any]:
    """The ``subscribeEvents`` message payload of a row (without the envelope)."""
    name = KIND_NAMES[row.kind]
    out: dict[str, Any] = {"$type": f"{NSID_PREFIX}subscribeEvents#{name}", "seq": row.seq, "did": row.did}
    if name == "commit":
        out["time"] = rfc3339_us(row.indexed_at or row.witnessed_at)
        out.update(rev=row.rev, operation=OPERATIONS[row.kind], collection=row.collection, rkey=row.rkey)
        if row.kind != KIND_DELETE and row.payload:
            out["record"] = dagcbor.record_json_form(row.payload)
            out["cid"] = str(CID.for_dag_cbor(row.payload))
    else:
        out["time"] = rfc3339_us(row.witnessed_at)
        out[name] = dagcbor.to_json_form(dagcbor.decode(row.payload))
    return out


def row_frame(row: Row) -> str:
    """The ``xrpc.v1.json`` text frame of a row."""
    return orjson.dumps({"$type": "message", "payload": row_payload_json(row)}).decode()


def train_dictionary(rows: Sequence[Row], size: int = 64 * 1024, dict_id: int = 20_260_811) -> bytes:
    """A real zstd dictionary trained on the JSON frames of ``rows`` (at most 20,000 of them).

    Raises:
        zstandard.ZstdError: too few samples to train on.
    """
    samples: list[bytes | bytearray | memoryview] = [row_frame(r).encode() for r in rows[:20_000]]
    return bytes(zstandard.train_dictionary(size, samples, dict_id=dict_id).as_bytes())


# -------------------------------------------------------------------------------------- segments


@dataclass
class SealedSegment:
    """One sealed segment as served: its bytes and what the planner needs of its footer."""

    index: int
    rows: list[Row] = field(repr=False)
    data: bytes = field(repr=False)
    header: SegmentHeader
    blocks: list[BlockInfo] = field(repr=False)
    block_names: list[frozenset[str]] = field(repr=False)
    block_blooms: list[Bloom] = field(repr=False)
    rows_per_block: int
    empty_block: bool
    version: int = 0

    @property
    def name(self) -> str:
        """Its file name."""
        return segment_name(self.index)

    @property
    def checksum(self) -> str:
        """The checksum as 16 hex digits."""
        return f"{self.header.checksum:016x}"

    @property
    def etag(self) -> str:
        """The ``getSegment`` ETag: the quoted checksum."""
        return f'"{self.checksum}"'

    @property
    def min_seq(self) -> int:
        """The first seq."""
        return self.header.min_seq

    @property
    def max_seq(self) -> int:
        """The last seq."""
        return self.header.max_seq

    def listing(self) -> dict[str, Any]:
        """Its ``listSegments`` item."""
        h = self.header
        return {"name": self.name, "index": self.index, "sizeBytes": len(self.data), "checksum": self.checksum,
                "eventCount": h.event_count, "minSeq": h.min_seq, "maxSeq": h.max_seq,
                "minWitnessedAt": h.min_witnessed_at, "maxWitnessedAt": h.max_witnessed_at}


def seal_segment(index: int, rows: Sequence[Row], *, rows_per_block: int, empty_block: bool = False,
                 version: int = 0) -> SealedSegment:
    """Write ``rows`` as sealed segment ``index``.

    ``empty_block`` puts an empty block after the first one; ``version`` > 0 is a rewrite (as compaction
    does): the same rows with ``version`` more empty blocks at the end, so the checksum changes.
    """
    if not rows:
        raise ValueError("a sealed segment holds at least one row")
    buf = io.BytesIO()
    writer = SegmentWriter(buf, max_rows_per_block=rows_per_block)
    for i, row in enumerate(rows):
        writer.append(row)
        if empty_block and i == rows_per_block - 1:
            writer.append_empty_block()
    for _ in range(version):
        writer.append_empty_block()
    writer.close()
    data = buf.getvalue()
    seg = Segment(data)
    index_blocks = seg.collection_index()
    names = [frozenset(index_blocks.names[i] for i in ids) for ids in index_blocks.blocks]
    return SealedSegment(index, list(rows), data, seg.header, seg.blocks, names, seg.block_blooms(),
                         rows_per_block, empty_block, version)


class Archive:
    """The sealed segments, in index (= seq) order."""

    def __init__(self, segments: list[SealedSegment]) -> None:
        self.segments = segments
        self._by_name = {s.name: s for s in segments}

    @classmethod
    def from_rows(cls, rows: Sequence[Row], *, rows_per_segment: int, rows_per_block: int,
                  empty_block_every: int = 3) -> Archive:
        """Seal ``rows`` into segments of ``rows_per_segment`` (every ``empty_block_every``-th segment
        gets an empty block; 0 = none)."""
        if rows_per_segment < 1 or rows_per_block < 1:
            raise ValueError("rows per segment and per block must be positive")
        segments = []
        for i, start in enumerate(range(0, len(rows), rows_per_segment)):
            empty = bool(empty_block_every) and i % empty_block_every == empty_block_every - 1
            segments.append(seal_segment(i, rows[start:start + rows_per_segment], rows_per_block=rows_per_block,
                                         empty_block=empty))
        return cls(segments)

    @property
    def sealed_tip(self) -> int:
        """The highest sealed seq (0 with no segment)."""
        return self.segments[-1].max_seq if self.segments else 0

    def get(self, name: str) -> SealedSegment | None:
        """The segment named ``name``."""
        return self._by_name.get(name)

    def rewrite(self, name: str) -> SealedSegment:
        """Rewrite a segment in place (same rows, another layout: its checksum and ETag change)."""
        old = self._by_name[name]
        new = seal_segment(old.index, old.rows, rows_per_block=old.rows_per_block, empty_block=old.empty_block,
                           version=old.version + 1)
        self.segments[old.index] = new
        self._by_name[name] = new
        return new


# -------------------------------------------------------------------------------------- planning


class InvalidRequestError(ValueError):
    """A request the server refuses with 400 ``InvalidRequest``."""


def _collection_ok(pattern: str) -> bool:
    body = pattern[:-2] if pattern.endswith(".*") else pattern
    parts = body.split(".")
    return len(parts) >= (1 if pattern.endswith(".*") else 3) and all(parts) and len(pattern) <= 317


def collection_matches(collection: str, patterns: Iterable[str]) -> bool:
    """Whether ``collection`` matches one of the exact NSIDs or ``prefix.*`` patterns."""
    for p in patterns:
        if p.endswith(".*"):
            if collection.startswith(p[:-1]):
                return True
        elif collection == p:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Selection:
    """The ``kinds``/``dids``/``collections`` filter of a plan or a subscription (None = all)."""

    kinds: frozenset[str] | None = None
    dids: frozenset[str] | None = None
    collections: tuple[str, ...] | None = None

    @classmethod
    def of(cls, kinds: Iterable[str] | None, dids: Iterable[str] | None,
           collections: Iterable[str] | None) -> Selection:
        """Validate and build (empty lists mean all).

        Raises:
            InvalidRequestError: an unknown kind, too many DIDs or collections, a bad pattern, or
                collections with kinds that exclude commit.
        """
        k = frozenset(kinds or ())
        d = frozenset(dids or ())
        c = tuple(collections or ())
        if not k <= ALL_KINDS:
            raise InvalidRequestError(f"unknown kinds {sorted(k - ALL_KINDS)}")
        if len(d) > MAX_DIDS:
            raise InvalidRequestError(f"{len(d)} dids (at most {MAX_DIDS})")
        if any(not isinstance(x, str) or not x.startswith("did:") for x in d):
            raise InvalidRequestError("dids must be DIDs")
        if len(c) > MAX_COLLECTIONS:
            raise InvalidRequestError(f"{len(c)} collections (at most {MAX_COLLECTIONS})")
        if any(not isinstance(x, str) or not _collection_ok(x) for x in c):
            raise InvalidRequestError("collections must be NSIDs or prefix.* patterns")
        if c and k and "commit" not in k:
            raise InvalidRequestError("collections constrain commits only: kinds excludes commit")
        return cls(k or None, d or None, c or None)

    def wants(self, row: Row) -> bool:
        """Whether ``row`` passes the filter exactly."""
        name = KIND_NAMES[row.kind]
        if self.kinds is not None and name not in self.kinds:
            return False
        if self.dids is not None and row.did not in self.dids:
            return False
        if name == "commit" and self.collections is not None:
            return collection_matches(row.collection, self.collections)
        return True

    def block_may_match(self, names: frozenset[str], bloom: Bloom) -> bool:
        """Whether a block tagged with ``names`` (collections and ``$`` sentinels) and ``bloom`` may hold a
        wanted row (may over-include, never misses)."""
        if self.dids is not None and not any(d in bloom for d in self.dids):
            return False
        kinds = self.kinds
        for name in names:
            kind = _SENTINEL_KIND.get(name)
            if kind is not None:
                if kinds is None or kind in kinds:
                    return True
            elif (kinds is None or "commit" in kinds) and (
                    self.collections is None or collection_matches(name, self.collections)):
                return True
        return False


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """A ``planSnapshot`` body."""

    selection: Selection = Selection()
    after_seq: int = 0
    before_seq: int | None = None

    @classmethod
    def from_json(cls, body: bytes) -> PlanRequest:
        """Parse a request body (empty = everything).

        Raises:
            InvalidRequestError: not a JSON object, wrong types or values.
        """
        try:
            obj = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise InvalidRequestError(f"body is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InvalidRequestError("body must be a JSON object")
        lists = {}
        for key in ("kinds", "dids", "collections"):
            value = obj.get(key)
            if value is not None and not isinstance(value, list):
                raise InvalidRequestError(f"{key} must be an array")
            lists[key] = value
        after = obj.get("afterSeq", 0)
        before = obj.get("beforeSeq")
        if type(after) is not int or after < 0 or (before is not None and (type(before) is not int or before < 0)):
            raise InvalidRequestError("afterSeq and beforeSeq must be non-negative integers")
        return cls(Selection.of(lists["kinds"], lists["dids"], lists["collections"]), after, before)


def _ranges(seg: SealedSegment, matched: set[int]) -> list[dict[str, int]]:
    """Inclusive ranges of the matched block indices (empty blocks between two matches are bridged)."""
    out: list[dict[str, int]] = []
    cur: dict[str, int] | None = None
    for b in seg.blocks:
        if b.index in matched:
            if cur is None:
                cur = {"first": b.index, "last": b.index}
                out.append(cur)
            else:
                cur["last"] = b.index
        elif b.count:
            cur = None
    return out


def plan_page(segments: Sequence[SealedSegment], req: PlanRequest, *, max_entries: int = 100) -> dict[str, Any]:
    """One ``planSnapshot`` page over the sealed ``segments`` (in index order).

    The page covers ``(afterSeq, plannedThroughSeq]``: every segment of that range that may hold a wanted
    row is listed, whole (``segment``: every non-empty block matches and the segment is inside the range)
    or as inclusive block ranges (``blocks``). ``sealedTipSeq`` is the sealed tip capped by ``beforeSeq``.
    A page ends at a segment boundary once ``max_entries`` segments are listed; ``plannedThroughSeq`` is
    then the last listed segment's ``maxSeq``, otherwise ``sealedTipSeq``.
    """
    real_tip = segments[-1].max_seq if segments else 0
    tip = real_tip if req.before_seq is None else min(real_tip, req.before_seq)
    after = req.after_seq
    sel = req.selection
    units: list[dict[str, Any]] = []
    examined = matched_blocks = 0
    through = max(after, tip)
    start = bisect.bisect_right([s.max_seq for s in segments], after)
    for seg in segments[start:]:
        if seg.min_seq > tip:
            break
        examined += 1
        live = [b for b in seg.blocks if b.count and b.max_seq > after and b.min_seq <= tip]
        matched = {b.index for b in live if sel.block_may_match(seg.block_names[b.index], seg.block_blooms[b.index])}
        if not matched:
            continue
        matched_blocks += len(matched)
        unit: dict[str, Any] = {"name": seg.name, "index": seg.index, "checksum": seg.checksum,
                                "minSeq": seg.min_seq, "maxSeq": seg.max_seq}
        every = sum(1 for b in seg.blocks if b.count)
        if len(matched) == every and seg.min_seq > after and seg.max_seq <= tip:
            unit["mode"] = "segment"
        else:
            unit["mode"] = "blocks"
            unit["blocks"] = _ranges(seg, matched)
        units.append(unit)
        if len(units) >= max_entries and seg.max_seq < tip:
            through = seg.max_seq
            break
    return {"segments": units, "sealedTipSeq": tip, "plannedThroughSeq": through,
            "stats": {"segmentsExamined": examined, "segmentsMatched": len(units), "blocksMatched": matched_blocks,
                      "entries": len(units)}}


# ---------------------------------------------------------------------------------------- ranges


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` of a single ``bytes=`` range over ``size`` bytes; None when the header
    is not one satisfiable range we serve (the caller then answers 416 or the whole body).

    Raises:
        ValueError: a well-formed range that does not overlap the body (416).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if not first:
            n = int(last)
            a, b = max(0, size - n), size - 1
            if n > 0:
                return a, b
            raise ValueError("empty suffix range")  # noqa: TRY301 - one error for every bad range
        a = int(first)
        b = int(last) if last else size - 1
    except ValueError as e:
        raise ValueError(f"bad range {value!r}") from e
    if a >= size or b < a:
        raise ValueError(f"range {value!r} outside the {size}-byte body")
    return a, min(b, size - 1)


# ---------------------------------------------------------------------------------------- faults


@dataclass
class Faults:
    """Injected misbehaviour. The ``*_next`` counters are consumed as the faults fire (set them any time).

    Args:
        unready_requests: archive requests answered 503 ``NotReady`` before the instance is ready.
        unready_seconds: answer 503 until this many seconds (on the simulator's clock) after start.
        rate_limit_fraction: fraction of archive requests answered 429 (with ``Retry-After``).
        rate_limit_next: the next N archive requests are answered 429.
        retry_after: the ``Retry-After`` seconds of a 429.
        error_fraction: fraction of archive requests answered ``error_status``.
        error_next: the next N archive requests are answered ``error_status``.
        error_status: the 5xx status of the error faults.
        etag_change_after: after this many ``getSegment`` answers (0 = never), the segment of the last one
            is rewritten: its checksum and ETag change (``etag_change_times`` times).
        etag_change_times: how many rewrites.
        truncate_block_next: the next N ``getBlock`` answers are cut in half (the connection drops).
        corrupt_block_next: the next N ``getBlock`` answers have a byte flipped (zstd checksum fails).
        stall_plan_next: the next N ``planSnapshot`` pages do not advance (no segments, through = afterSeq).
        cursor_too_old_next: the next N ``subscribeEvents`` opens are refused ``CursorTooOld``.
        unknown_dictionary_next: the next N compressed opens are refused ``UnknownZstdDictionary``.
        drop_after_frames: drop the websocket abruptly after N frames (0 = never) ...
        drop_times: ... on this many connections (0 = every one).
        error_frame_after: send a terminal error frame after N frames (0 = never) ...
        error_frame: ... ``ConsumerTooSlow`` or ``InternalError``, on ``error_frame_times`` connections.
        error_frame_times: how many connections get it (0 = every one).
    """

    unready_requests: int = 0
    unready_seconds: float = 0.0
    rate_limit_fraction: float = 0.0
    rate_limit_next: int = 0
    retry_after: int = 1
    error_fraction: float = 0.0
    error_next: int = 0
    error_status: int = 503
    etag_change_after: int = 0
    etag_change_times: int = 1
    truncate_block_next: int = 0
    corrupt_block_next: int = 0
    stall_plan_next: int = 0
    cursor_too_old_next: int = 0
    unknown_dictionary_next: int = 0
    drop_after_frames: int = 0
    drop_times: int = 1
    error_frame_after: int = 0
    error_frame: str = "ConsumerTooSlow"
    error_frame_times: int = 1
    #: What has fired so far (reset with a new ``Faults``).
    segment_answers: int = field(default=0, init=False)
    rewrites: int = field(default=0, init=False)
    drops: int = field(default=0, init=False)
    error_frames: int = field(default=0, init=False)


# ------------------------------------------------------------------------------------- simulator


@dataclass
class _Sub:
    """One subscription's parameters."""

    selection: Selection
    start: int | None
    max_size: int
    compress: bool
    info: str | None


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> WsResponse:
    body = orjson.dumps(obj)
    h = Headers({"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"})
    for k, v in (headers or {}).items():
        h[k] = v
    return WsResponse(status, "Bad Request" if status == 400 else "Error", h, body)


class Jetstream2Simulator(ThreadServed):
    """The simulator. Use as ``async with`` or :meth:`start_in_thread`.

    Args:
        archive: the sealed segments.
        tail: unsealed rows after the sealed tip (websocket only), in seq order.
        factory: makes the live rows (``live_rate``); it must continue after the last row.
        dictionary: the zstd dictionary (default: the fixture when present, else trained on the rows).
        api_key: when set, ``planSnapshot``, ``getSegment`` and ``getBlock`` need ``Authorization: Bearer``.
        faults: injected faults.
        live_rate: live rows per second (0 = none).
        cursor_floor: the retention floor seq of ``subscribeEvents`` (a lower seq cursor: ``CursorTooOld``).
        plan_page_size: segments per ``planSnapshot`` page.
        seed: the fault randomness.
        clock: seconds (``unready_seconds``, live witnessed times).
    """

    thread_name = "jetstream2-sim"
    start_timeout = 30.0

    def __init__(self, archive: Archive, tail: Sequence[Row] = (), *, factory: RowFactory | None = None,
                 dictionary: bytes | None = None, api_key: str | None = None, faults: Faults | None = None,
                 live_rate: float = 0.0, cursor_floor: int = 0, plan_page_size: int = 100,
                 host: str = "127.0.0.1", port: int = 0, seed: int = 7,
                 clock: Callable[[], float] = time.time) -> None:
        self.archive = archive
        self.rows: list[Row] = [r for s in archive.segments for r in s.rows] + list(tail)
        self._seqs = [r.seq for r in self.rows]
        self._witnessed = [r.witnessed_at for r in self.rows]
        self.factory = factory
        self.api_key = api_key
        self.faults = faults or Faults()
        self.live_rate = live_rate
        self.cursor_floor = cursor_floor
        self.plan_page_size = plan_page_size
        self.host = host
        self.port = port
        self.rng = random.Random(seed)  # noqa: S311 - fault injection
        self._clock = clock
        if dictionary is None and FIXTURE_DICTIONARY.is_file():
            dictionary = FIXTURE_DICTIONARY.read_bytes()
        self._dictionary = dictionary
        self._cctx: zstandard.ZstdCompressor | None = None
        self._http = HttpServer(self._handle, "127.0.0.1", 0, name="jetstream2-http")
        self._ws: Server | None = None
        self._ws_port = 0
        self._front: asyncio.Server | None = None
        self._front_tasks: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._cond: asyncio.Condition | None = None
        self._live_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self.requests: list[tuple[str, str]] = []
        self.ws_requests: list[dict[str, list[str]]] = []
        self.frames_sent = 0

    # -------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """``http://host:port``: the instance's base URL (HTTP and the websocket upgrade)."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port/xrpc/network.bsky.jetstream.subscribeEvents``."""
        return f"ws://{self.host}:{self.port}{XRPC}subscribeEvents"

    @property
    def dictionary(self) -> bytes:
        """The zstd dictionary served by ``getZstdDictionary``."""
        if self._dictionary is None:
            self._dictionary = train_dictionary(self.rows)
        return self._dictionary

    @property
    def dictionary_id(self) -> int:
        """Its id."""
        return dictionary_id(self.dictionary)

    @property
    def sealed_tip(self) -> int:
        """The highest sealed seq."""
        return self.archive.sealed_tip

    def _compressor(self) -> zstandard.ZstdCompressor:
        if self._cctx is None:
            self._cctx = zstandard.ZstdCompressor(level=3, dict_data=zstandard.ZstdCompressionDict(self.dictionary))
        return self._cctx

    # -------------------------------------------------------------- HTTP

    def _gate(self, req: Request, method: str) -> Response | None:
        """The ready/auth/rate-limit/5xx faults of an archive request (None: serve it)."""
        f = self.faults
        if f.unready_requests > 0:
            f.unready_requests -= 1
            return Response.xrpc_error(503, "NotReady", "instance is bootstrapping", {"Retry-After": "1"})
        if f.unready_seconds and self._clock() - self._started_at < f.unready_seconds:
            return Response.xrpc_error(503, "NotReady", "instance is bootstrapping", {"Retry-After": "1"})
        if self.api_key is not None and method in ("planSnapshot", "getSegment", "getBlock") \
                and req.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return Response.xrpc_error(401, "AuthenticationRequired", "a valid API key is required")
        if f.rate_limit_next > 0 or (f.rate_limit_fraction and self.rng.random() < f.rate_limit_fraction):
            f.rate_limit_next = max(0, f.rate_limit_next - 1)
            return Response.xrpc_error(429, "RateLimitExceeded", "slow down",
                                       {"Retry-After": str(f.retry_after)})
        if f.error_next > 0 or (f.error_fraction and self.rng.random() < f.error_fraction):
            f.error_next = max(0, f.error_next - 1)
            return Response.xrpc_error(f.error_status, "InternalServerError", "injected failure")
        return None

    async def _handle(self, req: Request) -> Response:
        self.requests.append((req.method, req.target))
        if not req.path.startswith(XRPC):
            return Response.xrpc_error(404, "NotFound", f"no route {req.path}")
        method = req.path[len(XRPC):]
        posts = {"planSnapshot"}
        gets = {"listSegments", "getSegment", "getBlock", "getZstdDictionary"}
        if method not in posts | gets:
            if method == "subscribeEvents":
                return Response.xrpc_error(400, "InvalidRequest", "subscribeEvents is a websocket subscription")
            return Response.xrpc_error(404, "MethodNotImplemented", f"method {method} is not implemented")
        if (method in posts) != (req.method == "POST") or req.method not in ("GET", "POST"):
            return Response.xrpc_error(405, "InvalidRequest", f"{method} does not take {req.method}")
        if method == "getZstdDictionary":  # exempt from readiness, auth and rate limits
            return self._get_dictionary(req)
        gated = self._gate(req, method)
        if gated is not None:
            return gated
        try:
            if method == "listSegments":
                return self._list_segments(req)
            if method == "planSnapshot":
                return self._plan(req)
            if method == "getSegment":
                return self._get_segment(req)
            return self._get_block(req)
        except InvalidRequestError as e:
            return Response.xrpc_error(400, "InvalidRequest", str(e))

    def _get_dictionary(self, req: Request) -> Response:
        did = self.dictionary_id
        wanted = req.arg("id")
        if wanted is not None and wanted != str(did):
            return Response.xrpc_error(404, "DictionaryNotFound", f"no dictionary {wanted}; current is {did}")
        return Response(200, self.dictionary, {"X-Zstd-Dictionary-Id": str(did)},
                        content_type="application/octet-stream")

    @staticmethod
    def _int_arg(req: Request, name: str, default: int | None = None) -> int:
        raw = req.arg(name)
        if raw is None:
            if default is None:
                raise InvalidRequestError(f"{name} is required")
            return default
        try:
            return int(raw)
        except ValueError as e:
            raise InvalidRequestError(f"{name} must be an integer") from e

    def _list_segments(self, req: Request) -> Response:
        limit = self._int_arg(req, "limit", 100)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be 1..1000")
        cursor = req.arg("cursor")
        start = 0
        if cursor:
            try:
                start = int(cursor, 16) + 1
            except ValueError as e:
                raise InvalidRequestError("bad cursor") from e
        page = self.archive.segments[start:start + limit]
        out: dict[str, Any] = {"segments": [s.listing() for s in page]}
        if page and page[-1].index < len(self.archive.segments) - 1:
            out["cursor"] = f"{page[-1].index:x}"
        return Response.json(200, out)

    def _plan(self, req: Request) -> Response:
        plan = PlanRequest.from_json(req.body)
        f = self.faults
        if f.stall_plan_next > 0:
            f.stall_plan_next -= 1
            tip = min(self.sealed_tip, plan.before_seq if plan.before_seq is not None else self.sealed_tip)
            return Response.json(200, {"segments": [], "sealedTipSeq": tip, "plannedThroughSeq": plan.after_seq,
                                       "stats": {"segmentsExamined": 0, "segmentsMatched": 0, "blocksMatched": 0,
                                                 "entries": 0}})
        return Response.json(200, plan_page(self.archive.segments, plan, max_entries=self.plan_page_size))

    def _segment(self, req: Request, param: str) -> SealedSegment:
        name = req.arg(param)
        if not name:
            raise InvalidRequestError(f"{param} is required")
        seg = self.archive.get(name)
        if seg is None:
            raise _NotFoundError("SegmentNotFound", f"no sealed segment {name}")
        return seg

    def _get_segment(self, req: Request) -> Response:
        try:
            seg = self._segment(req, "name")
        except _NotFoundError as e:
            return Response.xrpc_error(404, e.error, str(e))
        etag = seg.etag
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        inm = req.headers.get("if-none-match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return Response(304, b"", headers, content_type="application/octet-stream")
        body = seg.data
        resp = Response(200, body, headers, content_type="application/octet-stream")
        rng = req.headers.get("range")
        if_range = req.headers.get("if-range")
        if rng is not None and (if_range is None or if_range.strip() == etag):
            try:
                span = parse_range(rng, len(body))
            except ValueError as e:
                return Response(416, orjson.dumps({"error": "InvalidRange", "message": str(e)}),
                                {**headers, "Content-Range": f"bytes */{len(body)}"})
            if span is not None:
                a, b = span
                resp = Response(206, body[a:b + 1], {**headers, "Content-Range": f"bytes {a}-{b}/{len(body)}"},
                                content_type="application/octet-stream")
        self._after_segment_answer(seg)
        return resp

    def _after_segment_answer(self, seg: SealedSegment) -> None:
        f = self.faults
        f.segment_answers += 1
        if f.etag_change_after and f.segment_answers >= f.etag_change_after and f.rewrites < f.etag_change_times:
            f.rewrites += 1
            f.segment_answers = 0
            self.archive.rewrite(seg.name)
            log.info("rewrote %s (fault): its ETag changes", seg.name)

    def _get_block(self, req: Request) -> Response:
        try:
            seg = self._segment(req, "segment")
        except _NotFoundError as e:
            return Response.xrpc_error(404, e.error, str(e))
        index = self._int_arg(req, "blockIndex")
        if not 0 <= index < len(seg.blocks):
            return Response.xrpc_error(404, "BlockNotFound", f"{seg.name} has {len(seg.blocks)} blocks")
        info = seg.blocks[index]
        frame = seg.data[info.frame_start:info.frame_end]
        headers = {"ETag": f'"{seg.checksum}:{index}"'}
        f = self.faults
        if f.corrupt_block_next > 0:
            f.corrupt_block_next -= 1
            pos = len(frame) - 5 if len(frame) > 8 else len(frame) - 1
            frame = frame[:pos] + bytes([frame[pos] ^ 0xFF]) + frame[pos + 1:]
        resp = Response(200, frame, headers, content_type="application/octet-stream")
        if f.truncate_block_next > 0:
            f.truncate_block_next -= 1
            resp.truncate_to = len(frame) // 2
        return resp

    # -------------------------------------------------------------- websocket

    def _subscription(self, query: dict[str, list[str]]) -> _Sub:
        """Validate the ``subscribeEvents`` parameters.

        Raises:
            _RefusedError: a pre-upgrade 400.
        """
        v1 = sorted(V1_PARAMS & query.keys())
        if v1:
            raise _RefusedError("InvalidRequest", f"Jetstream v1 parameters {v1} are not accepted: use kinds, "
                                                  "dids, collections, zstdDictionary")
        try:
            sel = Selection.of(query.get("kinds"), query.get("dids"), query.get("collections"))
            max_size = int(query.get("maxMessageSizeBytes", ["0"])[0] or 0)
            raw_cursor = query.get("cursor", [None])[0]
            cursor = int(raw_cursor) if raw_cursor else None
            raw_dict = query.get("zstdDictionary", [None])[0]
            dict_id = int(raw_dict) if raw_dict else None
        except ValueError as e:
            raise _RefusedError("InvalidRequest", str(e)) from e
        if max_size < 0 or (cursor is not None and cursor < 0):
            raise _RefusedError("InvalidRequest", "cursor and maxMessageSizeBytes must be non-negative")
        f = self.faults
        if dict_id is not None and (f.unknown_dictionary_next > 0 or dict_id != self.dictionary_id):
            f.unknown_dictionary_next = max(0, f.unknown_dictionary_next - 1)
            raise _RefusedError("UnknownZstdDictionary", f"unknown zstd dictionary {dict_id}; current is "
                                                         f"{self.dictionary_id}")
        start: int | None = None
        info: str | None = None
        floor = self.cursor_floor
        if cursor is not None and cursor >= TIME_CURSOR_MIN:
            i = bisect.bisect_left(self._witnessed, cursor)
            start = self._seqs[i] if i < len(self._seqs) else (self._seqs[-1] + 1 if self._seqs else 1)
            if start < floor:
                info = f"cursor clamped to the retention floor: resuming from seq {floor}"
                start = floor
        elif cursor is not None:
            if f.cursor_too_old_next > 0 or cursor < self.cursor_floor:
                f.cursor_too_old_next = max(0, f.cursor_too_old_next - 1)
                raise _RefusedError("CursorTooOld", f"cursor {cursor} is below the retention floor seq {floor}")
            start = cursor
        return _Sub(sel, start, max_size, dict_id is not None, info)

    def _process_request(self, connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        parts = urlsplit(request.path)
        if parts.path != f"{XRPC}subscribeEvents":
            return _json_response(404, {"error": "MethodNotImplemented", "message": f"no websocket at {parts.path}"})
        query = parse_qs(parts.query)
        self.ws_requests.append(query)
        try:
            self._subscription(query)
        except _RefusedError as e:
            return _json_response(400, {"error": e.error, "message": str(e)})
        return None

    async def _ws_handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            query = parse_qs(urlsplit(ws.request.path).query)
            sub = self._sub_after_upgrade(query)
            await self._stream(ws, sub)
        except ConnectionClosed:
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)

    def _sub_after_upgrade(self, query: dict[str, list[str]]) -> _Sub:
        """The subscription of an accepted upgrade (its one-shot faults were consumed before)."""
        f = self.faults
        saved = (f.cursor_too_old_next, f.unknown_dictionary_next)
        f.cursor_too_old_next = f.unknown_dictionary_next = 0
        try:
            return self._subscription(query)
        finally:
            f.cursor_too_old_next, f.unknown_dictionary_next = saved

    async def _stream(self, ws: ServerConnection, sub: _Sub) -> None:
        f = self.faults
        drop_this = f.drop_after_frames and (f.drop_times == 0 or f.drops < f.drop_times)
        error_this = f.error_frame_after and (f.error_frame_times == 0 or f.error_frames < f.error_frame_times)
        cctx = self._compressor() if sub.compress else None
        sent = 0

        async def send_text(text: str) -> None:
            if cctx is not None:
                await ws.send(cctx.compress(text.encode()))
            else:
                await ws.send(text)

        if sub.info is not None:
            await send_text(orjson.dumps({"$type": "message", "payload": {
                "$type": f"{NSID_PREFIX}subscribeEvents#info", "name": "OutdatedCursor",
                "message": sub.info}}).decode())
        i = len(self.rows) if sub.start is None else bisect.bisect_left(self._seqs, sub.start)
        while True:
            while i < len(self.rows):
                row = self.rows[i]
                i += 1
                if not sub.selection.wants(row):
                    continue
                text = row_frame(row)
                if sub.max_size and len(text.encode()) > sub.max_size:
                    continue
                if drop_this and sent >= f.drop_after_frames:
                    f.drops += 1
                    ws.transport.abort()
                    return
                if error_this and sent >= f.error_frame_after:
                    f.error_frames += 1
                    await send_text(orjson.dumps({"$type": "error", "error": f.error_frame,
                                                  "message": f"injected; reconnect with cursor={row.seq}"}).decode())
                    await ws.close(1011 if f.error_frame == "InternalError" else 1008)
                    return
                await send_text(text)
                sent += 1
                self.frames_sent += 1
                if sent & 127 == 0:
                    await asyncio.sleep(0)
            if self._cond is None:
                await ws.wait_closed()
                return
            async with self._cond:
                while i >= len(self.rows):
                    await self._cond.wait()

    def append_live(self, rows: Iterable[Row]) -> None:
        """Add unsealed rows to the tail (seqs above the last one); call on the serving loop."""
        for row in rows:
            if self._seqs and row.seq <= self._seqs[-1]:
                raise ValueError(f"live row seq {row.seq} is not above {self._seqs[-1]}")
            self.rows.append(row)
            self._seqs.append(row.seq)
            self._witnessed.append(row.witnessed_at)
        if self._cond is not None:
            cond = self._cond

            async def notify() -> None:
                async with cond:
                    cond.notify_all()

            task = asyncio.ensure_future(notify())
            self._front_tasks.add(task)
            task.add_done_callback(self._front_tasks.discard)

    async def _generate_live(self) -> None:
        factory = self.factory
        assert factory is not None
        async for k in live_ticks(self.live_rate):
            now = int(self._clock() * 1e6)
            self.append_live([factory.next_row(now) for _ in range(k)])

    # -------------------------------------------------------------- front door

    async def _front_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Route a connection by its first request: a websocket upgrade to the websocket server, the rest to
        the HTTP server (bytes are spliced both ways)."""
        task = asyncio.current_task()
        if task is not None:
            self._front_tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            upgrade = b"\nupgrade: websocket" in head.lower().replace(b"\r\n", b"\n")
            port = self._ws_port if upgrade else self._http.port
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            up_writer.write(head)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    while chunk := await src.read(1 << 16):
                        dst.write(chunk)
                        await dst.drain()
                if not dst.is_closing():
                    dst.transport.abort()

            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if up_writer is not None:
                up_writer.close()
            writer.close()
            if task is not None:
                self._front_tasks.discard(task)

    async def start(self) -> None:
        """Start listening (on a free port when ``port`` is 0)."""
        self._started_at = self._clock()
        await self._http.start()
        self._ws, self._ws_port = await listen(self._ws_handler, "127.0.0.1", 0, self._process_request,
                                               subprotocols=[SUBPROTOCOL], max_size=1 << 20)
        self._cond = asyncio.Condition()
        if self.live_rate and self.factory is not None:
            self._live_task = asyncio.ensure_future(self._generate_live())
        self._front = await asyncio.start_server(self._front_conn, self.host, self.port)
        self.port = self._front.sockets[0].getsockname()[1]
        log.info("Jetstream v2 simulator on %s (%d segments, sealed tip %d, %d rows)", self.url,
                 len(self.archive.segments), self.sealed_tip, len(self.rows))

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._live_task is not None:
            self._live_task.cancel()
        if self._front is not None:
            self._front.close()
        for t in list(self._front_tasks):
            t.cancel()
        await close(self._ws, list(self._handlers))
        await self._http.stop()
        if self._front is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._front.wait_closed(), 2)


class _NotFoundError(LookupError):
    """A 404 with an XRPC error name."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class _RefusedError(Exception):
    """A pre-upgrade 400 with an XRPC error name."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


def build_simulator(*, seed: int = 1, accounts: int = 50, events: int = 2000, tail: int = 100,
                    rows_per_segment: int = 500, rows_per_block: int = 64, empty_block_every: int = 3,
                    start_us: int | None = None, rate: float = 1000.0, **options: Any) -> Jetstream2Simulator:
    """A simulator over ``events`` generated rows sealed into segments plus ``tail`` unsealed rows; the
    same factory makes the live rows. ``options`` go to :class:`Jetstream2Simulator`."""
    if start_us is None:
        start_us = int(time.time() * 1e6) - int((events + tail) / rate * 1e6)
    factory = RowFactory(seed=seed, accounts=accounts, start_us=start_us, rate=rate)
    sealed = factory.rows(events)
    unsealed = factory.rows(tail)
    archive = Archive.from_rows(sealed, rows_per_segment=rows_per_segment, rows_per_block=rows_per_block,
                                empty_block_every=empty_block_every)
    return Jetstream2Simulator(archive, unsealed, factory=factory, seed=seed, **options)
