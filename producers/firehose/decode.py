"""Pure decoding of relay firehose frames (``com.atproto.sync.subscribeRepos``): bytes in, typed events out.

A frame is one binary websocket message holding two DAG-CBOR objects back to back: a header
``{op: 1, t: "#commit"}`` (or ``{op: -1}`` for an error) and the body of that message type.
:func:`parse_frame` splits and checks the two; :func:`decode_frame` turns a frame into the same
typed events Jetstream's decoder yields (``source="firehose"``, ``cursor`` = the frame's ``seq``,
``time_us`` = the frame's ``time``), so the consumers cannot tell the sources apart:

* ``#commit``: one :class:`~runtime.contract.records.RecordEvent` per op; creates and updates carry the
  record in its atproto JSON form (``$link`` / ``$bytes``, via
  :func:`runtime.atproto.dagcbor.record_json_form`) and its CID string; the record block is taken
  from the commit's CAR slice and must hash to the op's CID.
* ``#identity`` / ``#account``: one :class:`~runtime.contract.records.IdentityEvent` /
  :class:`~runtime.contract.records.AccountEvent`.
* ``#sync``, ``#info``, error frames and unknown types carry no events; the caller decides (count,
  log, reconnect).

No sockets, no clock, no Kafka. Bad bytes raise :class:`~runtime.errors.DecodeError` with a reason
from :data:`runtime.errors.DROP_REASONS`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import libipld

from runtime.atproto.car import Car, read_car
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import record_json_form
from runtime.atproto.errors import AtprotoFormatError
from runtime.contract.nsid import is_collection
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, Source
from runtime.errors import DecodeError

#: Message types of ``subscribeRepos`` that this decoder understands.
COMMIT: Final = "#commit"
IDENTITY: Final = "#identity"
ACCOUNT: Final = "#account"
SYNC: Final = "#sync"
INFO: Final = "#info"
KNOWN_TYPES: Final = frozenset((COMMIT, IDENTITY, ACCOUNT, SYNC, INFO))

#: ``Decoded.kind`` values.
KIND_COMMIT: Final = "commit"
KIND_IDENTITY: Final = "identity"
KIND_ACCOUNT: Final = "account"
KIND_SYNC: Final = "sync"
KIND_INFO: Final = "info"
KIND_ERROR: Final = "error"
KIND_UNKNOWN: Final = "unknown"

_KIND_OF: Final = {COMMIT: KIND_COMMIT, IDENTITY: KIND_IDENTITY, ACCOUNT: KIND_ACCOUNT, SYNC: KIND_SYNC,
                   INFO: KIND_INFO}
_ACTIONS: Final = frozenset(("create", "update", "delete"))
_FIREHOSE: Final = Source.FIREHOSE.value
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Binary CIDv1 of a sha2-256 DAG-CBOR block: the only kind a record block has in practice.
_DAG_CBOR_SHA256: Final = b"\x01\x71\x12\x20"
_CID_LEN: Final = 36
#: Integers travel as Avro longs (signed 64-bit); DAG-CBOR holds up to 2**64 - 1.
_LONG_END: Final = 1 << 63


@dataclass(slots=True)
class Frame:
    """A frame split into its header and body.

    Attributes:
        op: 1 for a message, -1 for an error.
        type: the message type (``#commit``, ...), or None for an error frame.
        body: the body as libipld decodes it (links and byte strings are both ``bytes``).
    """

    op: int
    type: str | None
    body: dict[str, Any]

    @property
    def seq(self) -> int | None:
        """The body's ``seq`` when it is an integer."""
        seq = self.body.get("seq")
        return seq if type(seq) is int else None

    @property
    def did(self) -> str | None:
        """The account the frame is about (``repo`` of a commit, ``did`` of the others)."""
        did = self.body.get("repo") if self.type == COMMIT else self.body.get("did")
        return did if type(did) is str else None


@dataclass(slots=True)
class Decoded:
    """What one frame decodes to.

    Attributes:
        kind: ``commit``, ``identity``, ``account``, ``sync``, ``info``, ``error`` or ``unknown``.
        frame: the parsed frame (for verification and diagnostics).
        seq: the frame's sequence number (None for info/error frames).
        did: the account (None for info/error frames).
        time_us: the frame's ``time`` in unix microseconds (None when the type has no time).
        events: the typed events, in op order.
        filtered: ops left out by the collection filter.
        too_big: ops of a ``tooBig`` commit whose record block is not in the slice.
        name: ``#info`` name (``OutdatedCursor``) or error name (``FutureCursor``, ``ConsumerTooSlow``).
        message: the optional human-readable message of an info or error frame.
        type: the raw message type (useful for unknown types).
    """

    kind: str
    frame: Frame
    seq: int | None = None
    did: str | None = None
    time_us: int | None = None
    events: list[Event] = field(default_factory=list)
    filtered: int = 0
    too_big: int = 0
    name: str | None = None
    message: str | None = None
    type: str | None = None


def _malformed(detail: str) -> DecodeError:
    return DecodeError("malformed_frame", detail)


def parse_frame(data: bytes) -> Frame:
    """Split a frame into header and body and check the header.

    Raises:
        DecodeError: ``malformed_cbor`` (not DAG-CBOR) or ``malformed_frame`` (not exactly a header
            map and a body map, an unknown ``op``, a message header without a string ``t``).
    """
    if type(data) is not bytes:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        else:
            raise _malformed(f"frame is {type(data).__name__}, expected bytes")
    if not data:
        raise _malformed("empty frame")
    try:
        items = libipld.decode_dag_cbor_multi(data)
    except (ValueError, RecursionError, TypeError, OverflowError) as e:
        raise DecodeError("malformed_cbor", f"frame is not DAG-CBOR: {e}") from e
    if len(items) != 2:
        raise _malformed(f"frame holds {len(items)} DAG-CBOR objects, expected a header and a body")
    header, body = items
    if type(header) is not dict:
        raise _malformed("frame header is not a map")
    if type(body) is not dict:
        raise _malformed("frame body is not a map")
    op = header.get("op")
    if op == 1 and type(op) is int:
        t = header.get("t")
        if type(t) is not str:
            raise _malformed("message header has no string 't'")
        return Frame(1, t, body)
    if op == -1 and type(op) is int:
        return Frame(-1, None, body)
    raise _malformed(f"frame header op is {op!r}, expected 1 or -1")


_time_cache: dict[str, int] = {}


def parse_time_us(value: Any) -> int:
    """A frame's ``time`` (RFC 3339, e.g. ``2026-07-04T14:38:07.517Z``) in unix microseconds.

    Raises:
        DecodeError: ``malformed_frame`` when it is not a datetime string with a time zone.
    """
    if type(value) is not str:
        raise _malformed(f"time is {type(value).__name__}, expected a datetime string")
    hit = _time_cache.get(value)
    if hit is not None:
        return hit
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as e:
        raise _malformed(f"time {value[:40]!r} is not an RFC 3339 datetime") from e
    if dt.tzinfo is None:
        raise _malformed(f"time {value[:40]!r} has no time zone")
    delta = dt - _EPOCH
    us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if len(_time_cache) >= 4096:
        _time_cache.clear()
    _time_cache[value] = us
    return us


def _int(body: dict[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    if type(value) is not int or not 0 <= value < _LONG_END:
        raise _malformed(f"{what}.{key} is {type(value).__name__}, expected a non-negative 64-bit integer")
    return value


def _did(body: dict[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if type(value) is not str or not value.startswith("did:"):
        raise _malformed(f"{what}.{key} is not a DID")
    return value


def _opt_str(body: dict[str, Any], key: str, what: str) -> str | None:
    value = body.get(key)
    if value is not None and type(value) is not str:
        raise _malformed(f"{what}.{key} is {type(value).__name__}, expected a string")
    return value


def _section_lengths(data: bytes, end: int) -> list[int]:
    """Every section length whose 1-3 byte varint could end right before ``end``.

    A varint is continuation bytes (>= 0x80) and a last byte (< 0x80); which byte starts it is
    unknown when reading backwards, so each length is a candidate (the hash decides).
    """
    out: list[int] = []
    if end < 1:
        return out
    last = data[end - 1]
    if last >= 0x80 or last == 0:
        return out  # a varint ends below 0x80, and a section is never empty
    value = last
    out.append(value)
    pos = end - 2
    while pos >= 0 and pos >= end - 3 and data[pos] >= 0x80:
        value = (value << 7) | (data[pos] & 0x7F)
        out.append(value)
        pos -= 1
    return out


def find_block(blocks: bytes, cid_raw: bytes) -> bytes | None:
    """The block stored under ``cid_raw`` in a CAR slice, found by its hash, or None.

    The fast path of record lookup: instead of indexing every section (MST nodes included), look
    for the CID bytes, read the section length that precedes them, and accept the slice only if it
    hashes to the CID. A link to the same CID inside another block is preceded by the ``0x00``
    multibase byte, never by a section length, and any false candidate fails the hash. Only
    sha2-256 DAG-CBOR CIDs take this path; None sends the caller to the authoritative CAR reader,
    and so does a slice whose false candidates would take more than :func:`hash_budget` bytes of
    hashing (a hostile slice repeating the CID before long fake lengths).
    """
    return _find_block(blocks, cid_raw, hash_budget(blocks))[0]


def hash_budget(blocks: bytes) -> int:
    """How many bytes the fast path may hash in one slice: twice the slice, plus 1 MiB."""
    return 2 * len(blocks) + (1 << 20)


def _find_block(blocks: bytes, cid_raw: bytes, budget: int) -> tuple[bytes | None, int]:
    """:func:`find_block` hashing at most ``budget`` bytes: ``(block or None, bytes hashed)``."""
    if len(cid_raw) != _CID_LEN or cid_raw[:4] != _DAG_CBOR_SHA256:
        return None, 0
    digest = cid_raw[4:]
    size = len(blocks)
    spent = 0
    start = blocks.find(cid_raw)
    while start >= 0:
        for length in _section_lengths(blocks, start):
            block_end = start + length
            if length > _CID_LEN and block_end <= size:
                spent += length
                if spent > budget:
                    return None, spent
                block = blocks[start + _CID_LEN:block_end]
                if hashlib.sha256(block).digest() == digest:
                    return block, spent
        start = blocks.find(cid_raw, start + 1)
    return None, spent


class _Slice:
    """The record blocks of one commit's CAR slice, for all of its ops.

    Blocks are found by hash (:func:`find_block`) while the slice's hashing budget lasts; the first
    op the fast path cannot serve reads the CAR once, and every later op is looked up in it (each
    block checked against its CID once). A frame's work stays linear in its size whatever its ops.
    """

    __slots__ = ("_budget", "_car", "_checked", "blocks")

    def __init__(self, blocks: bytes) -> None:
        self.blocks = blocks
        self._budget = hash_budget(blocks)
        self._car: Car | None = None
        self._checked: set[bytes] = set()

    def record(self, cid_raw: bytes, path: str) -> bytes | None:
        """The record block for an op, or None when the slice does not hold it.

        Raises:
            DecodeError: ``malformed_car`` (the slice does not parse), ``bad_cid`` (a block stored
                under the CID does not hash to it, or the CID does not parse).
        """
        car = self._car
        if car is None and self._budget > 0:
            block, spent = _find_block(self.blocks, cid_raw, self._budget)
            self._budget -= spent
            if block is not None:
                return block
        # Slow path: parse the slice to tell a missing block from a corrupt one or a broken CAR.
        try:
            if car is None:
                car = self._car = read_car(self.blocks, verify=False)
            cid = CID.from_bytes(cid_raw)
        except AtprotoFormatError as e:
            raise DecodeError(e.reason, f"commit blocks: {e}") from e
        found = car.get(cid)
        if found is None:
            return None
        if cid_raw not in self._checked:
            if not cid.matches(found):
                raise DecodeError("bad_cid", f"record block of {path[:100]} does not hash to {cid}")
            self._checked.add(cid_raw)
        return found


def _commit(frame: Frame, job: str, collections: Callable[[str], bool] | None) -> Decoded:
    body = frame.body
    seq = _int(body, "seq", "#commit")
    did = _did(body, "repo", "#commit")
    time_us = parse_time_us(body.get("time"))
    rev = body.get("rev")
    if type(rev) is not str:
        raise _malformed("#commit.rev is not a string")
    ops = body.get("ops")
    if type(ops) is not list:
        raise _malformed("#commit.ops is not a list")
    blocks = body.get("blocks")
    if type(blocks) is not bytes:
        raise _malformed("#commit.blocks is not bytes")
    too_big_flag = body.get("tooBig") is True
    records = _Slice(blocks)
    out = Decoded(KIND_COMMIT, frame, seq=seq, did=did, time_us=time_us, type=COMMIT)
    events = out.events
    for op in ops:
        if type(op) is not dict:
            raise _malformed("#commit op is not a map")
        action = op.get("action")
        path = op.get("path")
        if type(action) is not str or action not in _ACTIONS:
            raise _malformed(f"#commit op action is {str(action)[:100]!r}")
        if type(path) is not str:
            raise _malformed("#commit op path is not a string")
        collection, sep, rkey = path.partition("/")
        if not sep or not rkey or not is_collection(collection):
            raise _malformed(f"#commit op path {path[:100]!r} is not collection/rkey")
        if collections is not None and not collections(collection):
            out.filtered += 1
            continue
        if action == "delete":
            events.append(RecordEvent(did, collection, rkey, action, rev, None, None, _FIREHOSE, seq, time_us, job))
            continue
        cid_raw = op.get("cid")
        if type(cid_raw) is not bytes:
            raise _malformed(f"#commit {action} of {path[:100]} has no CID link")
        block = records.record(cid_raw, path)
        if block is None:
            if too_big_flag:
                out.too_big += 1
                continue
            raise DecodeError("missing_block", f"record block of {path[:100]} is not in the commit's blocks")
        try:
            record = record_json_form(block)
            cid_str = str(CID.from_bytes(cid_raw))
        except AtprotoFormatError as e:
            raise DecodeError(e.reason, f"record {path[:100]}: {e}") from e
        events.append(RecordEvent(did, collection, rkey, action, rev, cid_str, record, _FIREHOSE, seq, time_us, job))
    return out


def decode(frame: Frame, *, job: str = "", collections: Callable[[str], bool] | None = None) -> Decoded:
    """Turn a parsed frame into typed events.

    Args:
        frame: from :func:`parse_frame`.
        job: the job name written into each event.
        collections: keep only ops whose collection matches (None = all); the rest are counted in
            ``filtered`` and their records are not decoded.

    Raises:
        DecodeError: ``malformed_frame`` (a body without its required fields), ``malformed_car``,
            ``missing_block`` (a create/update whose record is not in a non-``tooBig`` commit),
            ``bad_cid`` (a record block that does not hash to its CID), ``malformed_cbor``.
    """
    t = frame.type
    body = frame.body
    if frame.op == -1:
        error = body.get("error")
        return Decoded(KIND_ERROR, frame, name=error if type(error) is str else None,
                       message=_opt_str(body, "message", "error"))
    if t == COMMIT:
        return _commit(frame, job, collections)
    if t == IDENTITY:
        seq = _int(body, "seq", t)
        did = _did(body, "did", t)
        when = body.get("time")
        time_us = parse_time_us(when)
        handle = _opt_str(body, "handle", t)
        ev: Event = IdentityEvent(did, handle, seq, when, _FIREHOSE, seq, time_us, job)
        return Decoded(KIND_IDENTITY, frame, seq=seq, did=did, time_us=time_us, events=[ev], type=t)
    if t == ACCOUNT:
        seq = _int(body, "seq", t)
        did = _did(body, "did", t)
        when = body.get("time")
        time_us = parse_time_us(when)
        active = body.get("active")
        if type(active) is not bool:
            raise _malformed("#account.active is not a boolean")
        status = _opt_str(body, "status", t)
        ev = AccountEvent(did, active, status, seq, when, _FIREHOSE, seq, time_us, job)
        return Decoded(KIND_ACCOUNT, frame, seq=seq, did=did, time_us=time_us, events=[ev], type=t)
    if t == SYNC:
        seq = _int(body, "seq", t)
        did = _did(body, "did", t)
        return Decoded(KIND_SYNC, frame, seq=seq, did=did, time_us=parse_time_us(body.get("time")), type=t)
    if t == INFO:
        name = body.get("name")
        if type(name) is not str:
            raise _malformed("#info.name is not a string")
        return Decoded(KIND_INFO, frame, name=name, message=_opt_str(body, "message", t), type=t)
    return Decoded(KIND_UNKNOWN, frame, seq=frame.seq, did=frame.did, type=t)


def decode_frame(data: bytes, *, job: str = "", collections: Callable[[str], bool] | None = None) -> Decoded:
    """:func:`parse_frame` then :func:`decode`; see both for the errors."""
    return decode(parse_frame(data), job=job, collections=collections)


__all__ = [
    "ACCOUNT",
    "COMMIT",
    "IDENTITY",
    "INFO",
    "KNOWN_TYPES",
    "SYNC",
    "Decoded",
    "Frame",
    "decode",
    "decode_frame",
    "find_block",
    "hash_budget",
    "parse_frame",
    "parse_time_us",
]
