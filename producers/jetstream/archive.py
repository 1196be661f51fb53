"""Pure decoding of Jetstream v2 archive rows (segment blocks) into the project's typed events.

A block from :mod:`runtime.atproto.segment` (a ``getSegment`` file or a ``getBlock`` frame) holds rows
of seven kinds. They become the same events the v1 and relay sources produce, so the consumers
cannot tell the sources apart:

* kinds 1, 2, 3, 7 (create, update, delete, resync-create): one
  :class:`~runtime.contract.records.RecordEvent`; a resync-create is shown as ``create`` (as Jetstream
  serves it). The record's JSON form comes from its DAG-CBOR payload and its CID is recomputed from
  the payload (CIDv1, dag-cbor, sha2-256), the native fast path first
  (:mod:`runtime.atproto.native`), else :func:`runtime.atproto.dagcbor.record_json_form`.
* kinds 4 and 5 (identity, account): the upstream ``subscribeRepos`` body's CBOR, decoded by the
  relay decoder (:func:`producers.firehose.decode.decode`) and turned into a Jetstream event:
  :class:`~runtime.contract.records.IdentityEvent` / :class:`~runtime.contract.records.AccountEvent`.
* kind 6 (sync): a :class:`~runtime.contract.records.SyncEvent` (the DID's repository was replaced at
  its ``rev``; the replacement records follow as resync-creates at that rev).

``source`` is ``jetstream2`` (:attr:`runtime.contract.records.Source.JETSTREAM2`); ``cursor`` is the
row's ``seq`` (local to the instance that served it); ``time_us`` is the row's ``indexed_at``, or
``witnessed_at`` when that is 0. The event also carries both row times as they are: ``witnessed_at``,
and ``indexed_at`` (None when the row's is 0, unknown). Filters are exact (the server's plan may
over-include): collections (exact or ``prefix.*``, commits only: DID-level markers pass every
collection filter), DIDs, kinds, and a seq window. A bad row becomes a
:class:`~producers.source.Drop` with a reason from :data:`runtime.errors.DROP_REASONS`; it never stops
the block. No sockets, no clock, no Kafka.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import libipld

from producers.firehose.decode import Frame
from producers.firehose.decode import decode as decode_relay_body
from producers.source import Drop
from runtime.atproto import native
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import DEFAULT_MAX_DEPTH, decode, encode, record_json_form
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_SYNC,
    KIND_UPDATE,
    Block,
    Row,
)
from runtime.contract.nsid import CollectionFilter, is_collection
from runtime.contract.records import (
    AccountEvent,
    Event,
    IdentityEvent,
    Operation,
    RecordEvent,
    Source,
    SyncEvent,
    to_jetstream_json,
)
from runtime.contract.typed import MAX_TIME_US
from runtime.errors import DropError

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "KIND_NAMES",
    "ORIGIN",
    "BlockResult",
    "RowFilter",
    "decode_block_rows",
    "decode_row",
    "event_json",
    "iter_block_chunks",
]

#: ``source`` of the events.
SOURCE: Final = Source.JETSTREAM2.value
#: ``Drop.origin`` of dead letters from the archive.
ORIGIN: Final = "jetstream2"
#: A record payload past this many bytes is dropped (``oversize``), as a repository's records are.
DEFAULT_MAX_RECORD_BYTES: Final = 1 << 20
#: Row kind -> the Jetstream ``kind`` it is served as (the ``kinds`` filter's names).
KIND_NAMES: Final = {KIND_CREATE: "commit", KIND_UPDATE: "commit", KIND_DELETE: "commit",
                     KIND_RESYNC_CREATE: "commit", KIND_IDENTITY: "identity", KIND_ACCOUNT: "account",
                     KIND_SYNC: "sync"}
_OPERATION: Final = {KIND_CREATE: Operation.CREATE.value, KIND_UPDATE: Operation.UPDATE.value,
                     KIND_DELETE: Operation.DELETE.value, KIND_RESYNC_CREATE: Operation.CREATE.value}
_MARKER_TYPE: Final = {KIND_IDENTITY: "#identity", KIND_ACCOUNT: "#account", KIND_SYNC: "#sync"}
#: Kinds about a whole DID: they pass every collection filter.
_DID_LEVEL: Final = frozenset(_MARKER_TYPE)


@dataclass(frozen=True, slots=True)
class RowFilter:
    """Which rows a job wants, exactly.

    Attributes:
        collections: commits of these collections only (exact NSIDs or ``prefix.*``); None = all.
        dids: rows of these DIDs only; None = all.
        kinds: these Jetstream kinds only (``commit``, ``identity``, ``account``, ``sync``); None = all.
        after_seq: rows with ``seq <= after_seq`` are skipped (a resume cursor, exclusive).
        before_seq: rows with ``seq > before_seq`` are skipped (a plan's pinned tip, inclusive).
    """

    collections: CollectionFilter | None = None
    dids: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    after_seq: int = -1
    before_seq: int | None = None

    @classmethod
    def of(cls, *, collections: Iterable[str] = (), dids: Iterable[str] = (), kinds: Iterable[str] = (),
           after_seq: int = -1, before_seq: int | None = None) -> RowFilter:
        """A filter from option values (empty = no restriction).

        Raises:
            ConfigError: a collection pattern that is not an NSID or ``prefix.*``.
            ValueError: an unknown kind name.
        """
        coll = CollectionFilter(collections)
        wanted_kinds = frozenset(kinds)
        unknown = wanted_kinds - set(KIND_NAMES.values())
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; expected commit, identity, account, sync")
        return cls(None if coll.matches_all else coll, frozenset(dids) or None, wanted_kinds or None,
                   after_seq, before_seq)

    def wants(self, row: Row) -> bool:
        """Whether ``row`` passes every restriction."""
        if row.seq <= self.after_seq or (self.before_seq is not None and row.seq > self.before_seq):
            return False
        if self.dids is not None and row.did not in self.dids:
            return False
        if self.kinds is not None and KIND_NAMES.get(row.kind) not in self.kinds:
            return False
        kind = row.kind
        if self.collections is not None and kind not in _DID_LEVEL:
            return self.collections(row.collection)
        return True


ALL: Final = RowFilter()


#: What a row decodes to (kept as a name: the archive's readers say ``Item``).
Item = Event


@dataclass(slots=True)
class BlockResult:
    """What one block decodes to.

    Attributes:
        items: the events, in seq order.
        drops: the bad rows (dead letters).
        skipped: rows left out, by reason (``filtered``, ``before_cursor``).
        last_seq: the highest seq of the block (filtered or not), or None for an empty block.
    """

    items: list[Item] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    last_seq: int | None = None


def _time_us(seq: int, indexed_at: int, witnessed_at: int) -> int:
    t = indexed_at or witnessed_at
    if not 0 <= t <= MAX_TIME_US:
        raise DropError("invalid_record", f"row {seq}: time {t} is out of range")
    return t


def _record(payload: bytes, max_depth: int, verify_cid: bool) -> tuple[str, dict[str, Any], bytes | None]:
    """``(CID string, JSON form, its JSON text or None)`` of a record payload.

    Raises:
        DropError: ``malformed_cbor`` (not a DAG-CBOR map), ``bad_cid`` (with ``verify_cid``: the payload
            is not the canonical encoding of its record, so the CID recomputed from it is not the CID
            of that record as a PDS would have hashed it).
    """
    cid = CID.for_dag_cbor(payload)
    try:
        if verify_cid:
            canonical = encode(decode(payload, max_depth=max_depth, strict=False))
            if canonical != payload:
                raise DropError("bad_cid", f"payload is not canonical DAG-CBOR: its CID {cid} is not the "
                                           f"record's {CID.for_dag_cbor(canonical)}")
        fast = native.NATIVE
        formed = None if fast is None else fast.record_form(payload, cid.raw, max_depth)
        if isinstance(formed, tuple):
            return formed
        return str(cid), record_json_form(payload, max_depth=max_depth), None
    except AtprotoFormatError as e:
        raise DropError(e.reason, f"record: {e}") from e


def _marker(row: Row, time_us: int, job: str) -> Item:
    """An identity, account or sync row from its upstream ``subscribeRepos`` body."""
    t = _MARKER_TYPE[row.kind]
    try:
        body = libipld.decode_dag_cbor(row.payload)
    except (ValueError, TypeError, RecursionError) as e:
        raise DropError("malformed_cbor", f"row {row.seq}: {t} body is not DAG-CBOR: {e}") from e
    if type(body) is not dict:
        raise DropError("malformed_cbor", f"row {row.seq}: {t} body is not a map")
    decoded = decode_relay_body(Frame(1, t, body), job=job)  # checks seq, did, time, fields
    if decoded.did != row.did:
        raise DropError("invalid_record", f"row {row.seq}: {t} body is about {decoded.did}, the row about {row.did}")
    if row.kind == KIND_SYNC:
        rev = body.get("rev")
        if type(rev) is not str or not rev:
            raise DropError("malformed_frame", f"row {row.seq}: #sync body has no rev")
        when = body.get("time")
        return SyncEvent(row.did, rev, decoded.seq, when if type(when) is str else None, SOURCE, row.seq, time_us,
                         job, witnessed_at=row.witnessed_at, indexed_at=row.indexed_at or None)
    event = decoded.events[0]
    assert isinstance(event, (IdentityEvent, AccountEvent))
    event.source = SOURCE
    event.cursor = row.seq
    event.time_us = time_us
    event.witnessed_at = row.witnessed_at
    event.indexed_at = row.indexed_at or None
    return event


def decode_row(row: Row, *, job: str = "", verify_cid: bool = False, max_depth: int = DEFAULT_MAX_DEPTH,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Item:
    """One row as an event, unfiltered.

    Raises:
        DropError: the row is bad; its ``reason`` is one of :data:`runtime.errors.DROP_REASONS`.
    """
    seq, kind, did = row.seq, row.kind, row.did
    time_us = _time_us(seq, row.indexed_at, row.witnessed_at)
    if not did.startswith("did:"):
        raise DropError("invalid_record", f"row {seq}: {did[:100]!r} is not a DID")
    op = _OPERATION.get(kind)
    if op is None:
        if kind in _MARKER_TYPE:
            return _marker(row, time_us, job)
        raise DropError("unknown_event", f"row {seq}: kind {kind}")
    collection, rkey = row.collection, row.rkey
    if not is_collection(collection):
        raise DropError("invalid_record", f"row {seq}: collection {collection[:100]!r} is not an NSID")
    if not rkey:
        raise DropError("invalid_record", f"row {seq}: commit without an rkey")
    rev = row.rev or None
    if kind == KIND_DELETE:
        return RecordEvent(did, collection, rkey, op, rev, None, None, SOURCE, seq, time_us, job,
                           witnessed_at=row.witnessed_at, indexed_at=row.indexed_at or None)
    payload = row.payload
    if not payload:
        raise DropError("missing_block", f"row {seq}: {op} of {collection}/{rkey} without a record")
    if len(payload) > max_record_bytes:
        raise DropError("oversize", f"row {seq}: record of {len(payload)} bytes (cap {max_record_bytes})")
    cid, record, text = _record(payload, max_depth, verify_cid)
    return RecordEvent(did, collection, rkey, op, rev, cid, record, SOURCE, seq, time_us, job, text,
                       row.witnessed_at, row.indexed_at or None)


def decode_block_rows(block: Block, *, job: str = "", flt: RowFilter = ALL, verify_cid: bool = False,
                      max_depth: int = DEFAULT_MAX_DEPTH, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                      origin: str = ORIGIN, start: int = 0, stop: int | None = None) -> BlockResult:
    """Every wanted row of ``block`` (of its rows ``start:stop``) as an event or marker, every bad one
    as a drop.

    The hot path: the common commit rows are decoded inline, the rest through :func:`decode_row`.
    A caller that turns events into bytes at once does better with a few hundred rows at a time
    (:func:`iter_block_chunks`): fewer live objects for the cyclic GC to walk.
    """
    out = BlockResult()
    if start or stop is not None:
        block = Block(block.seq[start:stop], block.witnessed_at[start:stop], block.indexed_at[start:stop],
                      block.kind[start:stop], block.collection[start:stop], block.did[start:stop],
                      block.rkey[start:stop], block.rev[start:stop], block.payload[start:stop])
    if not len(block):
        return out
    out.last_seq = block.seq[-1]
    items, drops, skipped = out.items, out.drops, out.skipped
    append = items.append
    restricted = flt is not ALL
    after, before = flt.after_seq, flt.before_seq
    want_dids, want_kinds, want_collections = flt.dids, flt.kinds, flt.collections
    kind_name, did_level = KIND_NAMES.get, _DID_LEVEL
    verdicts: dict[str, bool] = {}
    fast = native.NATIVE
    # the payload's own CID, hashed once (record_form would hash it again to check a given one)
    payload_form = None if fast is None or verify_cid else fast.payload_form
    operation = _OPERATION.get
    good_collections: set[str] = set()  # checked once per block: a block holds a handful of collections
    delete, max_time, source = KIND_DELETE, MAX_TIME_US, SOURCE
    for seq, witnessed, indexed, kind, collection, did, rkey, rev, payload in zip(
            block.seq, block.witnessed_at, block.indexed_at, block.kind, block.collection, block.did, block.rkey,
            block.rev, block.payload, strict=True):
        if restricted:
            if seq <= after or (before is not None and seq > before):
                skipped["before_cursor" if seq <= after else "after_end"] += 1
                continue
            # RowFilter.wants, inline: the collection verdict is cached per block (a handful of NSIDs)
            if ((want_dids is not None and did not in want_dids)
                    or (want_kinds is not None and kind_name(kind) not in want_kinds)):
                skipped["filtered"] += 1
                continue
            if want_collections is not None and kind not in did_level:
                verdict = verdicts.get(collection)
                if verdict is None:
                    verdict = verdicts[collection] = want_collections(collection)
                if not verdict:
                    skipped["filtered"] += 1
                    continue
        op = operation(kind)
        t = indexed or witnessed
        # the fast path: a well-formed create/update whose record the native code takes
        if (op is not None and kind != delete and payload_form is not None and 0 < len(payload) <= max_record_bytes
                and 0 <= t <= max_time and rkey and did[:4] == "did:"
                and (collection in good_collections or _good_collection(collection, good_collections))):
            formed = payload_form(payload, max_depth)
            if formed.__class__ is tuple:
                cid, record, text = formed
                append(RecordEvent(did, collection, rkey, op, rev or None, cid, record, source, seq, t, job, text,
                                   witnessed, indexed or None))
                continue
        try:
            append(decode_row(Row(seq, witnessed, indexed, kind, collection, did, rkey, rev, payload), job=job,
                              verify_cid=verify_cid, max_depth=max_depth, max_record_bytes=max_record_bytes))
        except DropError as e:
            raw = payload if len(payload) <= max_record_bytes else payload[:4096]
            drops.append(Drop(e.reason, e.detail, raw, origin, did or None, seq))
    return out


def iter_block_chunks(block: Block, size: int = 256, **options: Any) -> Iterator[BlockResult]:
    """:func:`decode_block_rows` of ``block`` in chunks of ``size`` rows, in order (``options`` are its
    keyword arguments)."""
    if size < 1:
        raise ValueError("size must be at least 1")
    for start in range(0, len(block), size):
        yield decode_block_rows(block, start=start, stop=start + size, **options)


def _good_collection(collection: str, good: set[str]) -> bool:
    if is_collection(collection):
        good.add(collection)
        return True
    return False


def event_json(item: Item) -> dict[str, Any]:
    """The Jetstream (v1) shape of an event plus its ``seq`` (a sync as Jetstream v2 shows it)."""
    line = to_jetstream_json(item)
    line["seq"] = item.cursor
    return line

