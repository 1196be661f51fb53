"""Typed events: what every source decodes into and every consumer reads back.

An event is one of :class:`RecordEvent` (a create/update/delete of one record),
:class:`IdentityEvent`, :class:`AccountEvent` or :class:`SyncEvent` (a repository replaced). Records are
kept losslessly in their atproto JSON form (``$type``, ``{"$link": ...}``, ``{"$bytes": ...}``), the form
Jetstream serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Operation(StrEnum):
    """What happened to a record."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class Source(StrEnum):
    """Where an event came from."""

    JETSTREAM = "jetstream"
    FIREHOSE = "firehose"
    REPO = "repo"
    #: Jetstream v2 archive replay (and live v2): the same events as ``jetstream``, whose ``cursor``
    #: is the serving instance's own ``seq`` (not a time), with ``witnessed_at``/``indexed_at`` set.
    JETSTREAM2 = "jetstream2"


@dataclass(slots=True)
class RecordEvent:
    """A create, update or delete of ``at://did/collection/rkey``.

    ``cursor`` is the source's own resume position (Jetstream ``time_us``, relay ``seq``, or the
    DID's ordinal in a repo job, the instance's ``seq`` for Jetstream v2); ``time_us`` is the event
    time on the source's clock. ``record`` is None exactly for deletes. ``witnessed_at`` and
    ``indexed_at`` (unix microseconds) are set by Jetstream v2 only: when the serving instance first
    saw the event, and the event's original indexed time as imported (may be old and out of order;
    None when unknown).
    """

    did: str
    collection: str
    rkey: str
    operation: str
    rev: str | None
    cid: str | None
    record: dict[str, Any] | None
    source: str
    cursor: int
    time_us: int
    job: str = ""
    #: ``record`` already serialised exactly as ``orjson.dumps`` would (the repository decoder's
    #: native path writes it while decoding); None when not known. Never differs from ``record``.
    record_json: bytes | None = field(default=None, repr=False, compare=False)
    witnessed_at: int | None = None
    indexed_at: int | None = None

    @property
    def uri(self) -> str:
        """The record's ``at://`` URI."""
        return f"at://{self.did}/{self.collection}/{self.rkey}"


@dataclass(slots=True)
class IdentityEvent:
    """A handle or DID-document change of an account."""

    did: str
    handle: str | None
    seq: int | None
    time: str | None
    source: str
    cursor: int
    time_us: int
    job: str = ""
    #: Jetstream v2 only (see :class:`RecordEvent`); None for other sources.
    witnessed_at: int | None = None
    indexed_at: int | None = None


@dataclass(slots=True)
class AccountEvent:
    """An account status change (active, deactivated, takendown, deleted, ...)."""

    did: str
    active: bool
    status: str | None
    seq: int | None
    time: str | None
    source: str
    cursor: int
    time_us: int
    job: str = ""
    #: Jetstream v2 only (see :class:`RecordEvent`); None for other sources.
    witnessed_at: int | None = None
    indexed_at: int | None = None


@dataclass(slots=True)
class SyncEvent:
    """A repository replaced at ``rev`` (Jetstream v2's ``#sync`` row: Sync 1.1's ``#sync`` as archived).

    The source delivers the DID's replacement records after it, at ``rev``; every older version of
    the DID's records is gone from the repository (``runtime.contract.order`` rule 5). ``seq`` and
    ``time`` are the upstream relay event's.
    """

    did: str
    rev: str
    seq: int | None
    time: str | None
    source: str
    cursor: int
    time_us: int
    job: str = ""
    #: Jetstream v2 only (see :class:`RecordEvent`); None for other sources.
    witnessed_at: int | None = None
    indexed_at: int | None = None


Event = RecordEvent | IdentityEvent | AccountEvent | SyncEvent


def to_jetstream_json(event: Event) -> dict[str, Any]:
    """The event in the shape Jetstream serves it (the queue payload and ``inspect`` output)."""
    if isinstance(event, RecordEvent):
        commit: dict[str, Any] = {
            "rev": event.rev,
            "operation": event.operation,
            "collection": event.collection,
            "rkey": event.rkey,
        }
        if event.operation != Operation.DELETE:
            commit["record"] = event.record
            commit["cid"] = event.cid
        return {"did": event.did, "time_us": event.time_us, "kind": "commit", "commit": commit}
    if isinstance(event, IdentityEvent):
        identity: dict[str, Any] = {"did": event.did, "seq": event.seq, "time": event.time}
        if event.handle is not None:
            identity["handle"] = event.handle
        return {"did": event.did, "time_us": event.time_us, "kind": "identity", "identity": identity}
    if isinstance(event, SyncEvent):
        sync = {"did": event.did, "rev": event.rev, "seq": event.seq, "time": event.time}
        return {"did": event.did, "time_us": event.time_us, "kind": "sync", "sync": sync}
    account: dict[str, Any] = {"active": event.active, "did": event.did, "seq": event.seq, "time": event.time}
    if event.status is not None:
        account["status"] = event.status
    return {"did": event.did, "time_us": event.time_us, "kind": "account", "account": account}


_JETSTREAM = Source.JETSTREAM.value
#: The sources whose events are Jetstream's: keyed without their (per-instance) clock.
JETSTREAM_SOURCES: frozenset[str] = frozenset({_JETSTREAM, Source.JETSTREAM2.value})


def event_key(event: Event) -> str:
    """A string that identifies one event across replays (used to de-duplicate).

    A Jetstream event's ``time_us`` is the receive time on the clock of the instance that served it,
    so another instance (or the same one after a restore) serves the same event with another
    ``time_us``: its key leaves the clock out. A commit is the record's ``did``, ``collection``,
    ``rkey`` and ``rev`` (a repository revision changes a record path once at most); a sync is the
    DID and its ``rev`` (one replacement per revision); an identity or
    account event is the relay's ``seq``, which Jetstream passes on. Only an event lacking those
    (no ``rev``, no ``seq``) falls back to its ``time_us``. The relay's and the repositories' events
    keep ``time_us`` in their key: it is the relay's frame time (or the repository's), the same on
    every replay.

    Jetstream v2 (``jetstream2``) serves the same events as v1, so its clock-free keys are v1's, with
    the ``jetstream`` prefix: a v2 instance is one more instance serving the same event, and a
    replay from a v2 archive overlapping a v1 (or another v2) job's window is the same set of
    events, de-duplicated. Rows re-archived, or repeated by a resync, key the same too. Its
    ``cursor`` (the instance's own ``seq``), ``witnessed_at`` and ``indexed_at`` stay out of the key:
    another instance numbers and witnesses the same event differently. Its fallback keys (no
    ``rev`` or ``seq``) include ``time_us``, which is on Jetstream v2's clock (the row's
    ``indexed_at``, else ``witnessed_at``), not v1's: they keep the ``jetstream2`` prefix. The keys of
    v1 events are unchanged (checkpoints and queue de-duplication state hold them).
    """
    jetstream = event.source in JETSTREAM_SOURCES
    if isinstance(event, RecordEvent):
        if jetstream:
            if event.rev:
                return f"{_JETSTREAM}|{event.did}|{event.collection}|{event.rkey}|{event.rev}"
            return (f"{event.source}|{event.did}|{event.collection}|{event.rkey}|{event.operation}||"
                    f"{event.cid or ''}|{event.time_us}")
        return (f"{event.source}|{event.did}|{event.collection}|{event.rkey}|{event.operation}|"
                f"{event.rev or ''}|{event.cid or ''}|{event.time_us}")
    if isinstance(event, SyncEvent):
        # a repository replacement is one per (did, rev), whoever serves it
        return f"{_JETSTREAM if jetstream else event.source}|{event.did}|sync|{event.rev}"
    kind = "identity" if isinstance(event, IdentityEvent) else "account"
    if jetstream and event.seq is not None:
        return f"{_JETSTREAM}|{event.did}|{kind}|{event.seq}"
    return f"{event.source}|{event.did}|{kind}|{event.seq}|{event.time_us}"
