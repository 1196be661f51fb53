"""Pure decoding of Jetstream messages: bytes (or text) in, a typed event out, or a DropError.

No sockets, no clock. Compressed messages (``compress=true``) are zstd frames made with
Jetstream's dictionary; :class:`Decompressor` undoes that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import orjson
import zstandard

from runtime.contract.nsid import is_collection, valid_collections
from runtime.contract.records import AccountEvent, Event, IdentityEvent, Operation, RecordEvent, Source
from runtime.contract.typed import MAX_TIME_US
from runtime.errors import DecodeError, InvalidRecordError

_OPERATIONS: Final = frozenset(("create", "update", "delete"))
_JETSTREAM: Final = Source.JETSTREAM.value
_DELETE: Final = Operation.DELETE.value
#: Upper bound of one decompressed message (Jetstream's own frames are far smaller).
MAX_DECOMPRESSED: Final = 16 * 1024 * 1024
#: Integers travel as Avro longs (signed 64-bit).
_LONG_END: Final = 1 << 63


def _load_fast() -> Any:
    """``_fastevent.commit`` configured with this module's rules, or None when it is not built."""
    try:
        import producers.jetstream._fastevent as fast  # noqa: PLC0415 - an optional C module
    except ImportError:  # pragma: no cover - built by every install that has a C compiler
        return None
    fast.configure(orjson.loads, RecordEvent, valid_collections(), MAX_TIME_US, _JETSTREAM, _slots_filled())
    return fast.commit


#: The RecordEvent fields decode_event passes by position (in this order); the others keep their defaults.
_POSITIONAL: Final = ("did", "collection", "rkey", "operation", "rev", "cid", "record", "source", "cursor",
                      "time_us", "job")


def _slots_filled() -> tuple[str, ...] | None:
    """RecordEvent's slots when the native decoder may fill them itself (what its generated __init__
    does for decode_event's call): a plain slotted dataclass whose first fields are decode_event's
    arguments and whose others default to None. None otherwise: the decoder then calls the class."""
    fields = dataclasses.fields(RecordEvent)
    names = tuple(f.name for f in fields)
    if (getattr(RecordEvent, "__slots__", None) != names or names[:len(_POSITIONAL)] != _POSITIONAL
            or hasattr(RecordEvent, "__post_init__") or RecordEvent.__mro__ != (RecordEvent, object)
            or any(f.default is not None for f in fields[len(_POSITIONAL):])):
        return None
    return names


#: The native decoder of plain commit messages (``_fastevent.c``): the event, or None for anything
#: it leaves to :func:`decode_event` (which gives the same event or the precise error). None when
#: the extension is not built; tests set it to None to compare.
FAST: Any = _load_fast()


class Decompressor:
    """zstd decompression with Jetstream's dictionary.

    Args:
        dictionary: the raw dictionary bytes (a zstd dictionary, magic ``37 a4 30 ec``).
    """

    def __init__(self, dictionary: bytes) -> None:
        self._dict = zstandard.ZstdCompressionDict(dictionary)
        self._dctx = zstandard.ZstdDecompressor(dict_data=self._dict)

    def decompress(self, data: bytes) -> bytes:
        """Decompress one message.

        Raises:
            DecodeError: reason ``decompress_failed``, or ``oversize`` when the frame declares more
                than :data:`MAX_DECOMPRESSED` bytes (zstd would allocate what the header says).
        """
        try:
            declared = zstandard.frame_content_size(data)
            if declared > MAX_DECOMPRESSED:
                raise DecodeError("oversize", f"message declares {declared} decompressed bytes "
                                              f"(cap {MAX_DECOMPRESSED})")
            out: bytes = self._dctx.decompress(data, max_output_size=MAX_DECOMPRESSED)
            return out
        except zstandard.ZstdError as e:
            raise DecodeError("decompress_failed", str(e)) from e


def _require(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if type(value) is kind:  # the common case (what orjson returns), decided in one test
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidRecordError(f"{where}.{key} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _opt_long(value: Any) -> int | None:
    """An optional integer field: None unless it is an integer an Avro long holds."""
    return value if type(value) is int and -_LONG_END <= value < _LONG_END else None


def decode_event(obj: Any, *, job: str = "") -> Event:
    """Turn one parsed Jetstream event into a typed event.

    Raises:
        InvalidRecordError: the event lacks fields or has fields of the wrong types.
        DecodeError: reason ``unknown_event`` for a kind this version does not know.
    """
    if not isinstance(obj, dict):
        raise InvalidRecordError(f"event is {type(obj).__name__}, expected object")
    # Each field is checked inline for its common exact type; _require handles the rest (and errors).
    did = obj.get("did")
    if type(did) is not str:
        did = _require(obj, "did", str, "event")
    time_us = obj.get("time_us")
    if type(time_us) is not int:
        time_us = _require(obj, "time_us", int, "event")
    if not 0 <= time_us <= MAX_TIME_US:  # a time a sink can store, and an Avro long
        raise InvalidRecordError(f"event.time_us {time_us} is out of range")
    kind = obj.get("kind")
    src = _JETSTREAM
    if kind == "commit":
        commit = obj.get("commit")
        if type(commit) is not dict:
            commit = _require(obj, "commit", dict, "event")
        op = commit.get("operation")
        if type(op) is not str or op not in _OPERATIONS:
            raise InvalidRecordError(f"commit.operation is {str(op)[:100]!r}")
        collection = commit.get("collection")
        if type(collection) is not str:
            collection = _require(commit, "collection", str, "commit")
        if not is_collection(collection):
            raise InvalidRecordError(f"commit.collection {collection[:100]!r} is not an NSID")
        rkey = commit.get("rkey")
        if type(rkey) is not str:
            rkey = _require(commit, "rkey", str, "commit")
        rev = commit.get("rev")
        if rev is not None and not isinstance(rev, str):
            raise InvalidRecordError("commit.rev is not a string")
        if op == _DELETE:
            record = None
            cid = None
        else:
            record = commit.get("record")
            if type(record) is not dict:
                record = _require(commit, "record", dict, "commit")
            cid = commit.get("cid")
            if type(cid) is not str:
                cid = _require(commit, "cid", str, "commit")
        # positional: half the cost of keywords, once per event
        return RecordEvent(did, collection, rkey, op, rev, cid, record, src, time_us, time_us, job)
    if kind == "identity":
        ident = obj.get("identity") or {}
        if not isinstance(ident, dict):
            raise InvalidRecordError("identity is not an object")
        handle = ident.get("handle")
        seq = ident.get("seq")
        when = ident.get("time")
        return IdentityEvent(did=did, handle=handle if isinstance(handle, str) else None,
                             seq=_opt_long(seq),
                             time=when if isinstance(when, str) else None,
                             source=src, cursor=time_us, time_us=time_us, job=job)
    if kind == "account":
        acct = obj.get("account") or {}
        if not isinstance(acct, dict):
            raise InvalidRecordError("account is not an object")
        active = acct.get("active")
        if not isinstance(active, bool):
            raise InvalidRecordError("account.active is not a boolean")
        status = acct.get("status")
        seq = acct.get("seq")
        when = acct.get("time")
        return AccountEvent(did=did, active=active, status=status if isinstance(status, str) else None,
                            seq=_opt_long(seq),
                            time=when if isinstance(when, str) else None,
                            source=src, cursor=time_us, time_us=time_us, job=job)
    raise DecodeError("unknown_event", f"unknown event kind {kind!r}")


def decode_message(data: bytes | str, *, job: str = "", decompressor: Decompressor | None = None) -> Event:
    """Decode one websocket message (text JSON, or zstd-compressed binary JSON).

    Raises:
        DecodeError: malformed JSON, decompression failure, unknown kind.
        InvalidRecordError: well-formed JSON of the wrong shape.
    """
    if decompressor is None:
        if FAST is not None:
            event: Event | None = FAST(data, job)
            if event is not None:
                return event
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = decompressor.decompress(bytes(data))
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DecodeError("malformed_json", str(e)) from e
    return decode_event(obj, job=job)
