"""Pure transform of consumed events into PostgreSQL rows, and the batch that reduces them.

No database, no Kafka, no clock: an event goes in, rows (or a :class:`~runtime.errors.DropError`)
come out. A :class:`Batch` keeps only the newest revision of each record key
``(did, collection, rkey)`` it was given (TIDs compare lexicographically), so one upsert statement
per table never touches a row twice and a replayed or out-of-order older change in the same batch
is a no-op, exactly as it is against the stored rows.

Tables (one per typed collection, ``records`` for every other collection)::

    posts     record_type (post | reply | quote), text, langs, reply root/parent, quote, embed_kind
    likes     subject_uri, subject_cid, subject_did, via_uri
    reposts   subject_uri, subject_cid, subject_did, via_uri
    follows   subject_did
    blocks    subject_did
    profiles  display_name, description, avatar_cid, banner_cid, pinned_post_uri
    records   collection (part of the key)

Every row also carries the envelope: did, rkey, rev, cid, the lossless record JSON, the createdAt
chosen by the timestamp policy, source, source cursor, event time, producer job, and ``asof_us``:
the version's as-of time, which an account removal is compared with (``runtime.contract.order`` rules 3-4).
Status changes are ordered by their status time (rule 2), never by a receive clock. ``source`` is free
text (``jetstream2`` included, whose source cursor is the Jetstream v2 instance's ``seq``); Jetstream
v2's ``witnessed_at``/``indexed_at`` are not stored (its event time, ``time_us``, is the first of
``indexed_at`` and ``witnessed_at`` that is set).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from runtime.contract.created_at import Outcome, TimestampPolicy
from runtime.contract.order import asof_us, newer_version, removes, status_time_us, sync_removal_us
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, SyncEvent
from runtime.contract.typed import record_datum
from runtime.errors import DropError, InvalidRecordError

#: Longest values PostgreSQL's btree keys and the atproto specs allow (DID 2 KiB, rkey 512, NSID 317).
MAX_DID: Final = 2048
MAX_RKEY: Final = 512
MAX_COLLECTION: Final = 317
#: A btree entry holds at most ~2700 bytes: the key (did, collection, rkey) must stay below it.
MAX_KEY_BYTES: Final = 2600

#: Envelope columns every record table starts with (``records`` adds ``collection`` after ``did``).
COMMON_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("did", "text"), ("rkey", "text"), ("rev", "text"), ("cid", "text"), ("record", "jsonb"),
    ("created_at", "timestamptz"), ("source", "text"), ("cursor", "bigint"), ("time_us", "bigint"),
    ("job", "text"), ("asof_us", "bigint"),
)

#: Columns of a delete (the tombstones table and its staging table).
DELETE_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("did", "text"), ("collection", "text"), ("rkey", "text"), ("rev", "text"), ("source", "text"),
    ("cursor", "bigint"), ("time_us", "bigint"), ("job", "text"),
)

IDENTITY_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("did", "text"), ("source", "text"), ("cursor", "bigint"), ("time_us", "bigint"), ("seq", "bigint"),
    ("time", "text"), ("handle", "text"), ("job", "text"),
)

ACCOUNT_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("did", "text"), ("source", "text"), ("cursor", "bigint"), ("time_us", "bigint"), ("seq", "bigint"),
    ("time", "text"), ("active", "boolean"), ("status", "text"), ("job", "text"),
)

SYNC_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("did", "text"), ("source", "text"), ("cursor", "bigint"), ("time_us", "bigint"), ("seq", "bigint"),
    ("time", "text"), ("rev", "text"), ("job", "text"),
)

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Table:
    """A record table.

    Attributes:
        name: the table name.
        collection: the collection it holds; None for the generic ``records`` table.
        typed: the typed columns after the envelope, as (name, SQL type).
    """

    name: str
    collection: str | None
    typed: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        """Primary-key columns."""
        return ("did", "rkey") if self.collection is not None else ("did", "collection", "rkey")

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        """Every staged column in row order."""
        if self.collection is not None:
            return COMMON_COLUMNS + self.typed
        return (COMMON_COLUMNS[0], ("collection", "text"), *COMMON_COLUMNS[1:], *self.typed)

    @property
    def column_names(self) -> tuple[str, ...]:
        """Names of :attr:`columns`."""
        return tuple(name for name, _ in self.columns)


_SUBJECT_REF: Final = (("subject_uri", "text"), ("subject_cid", "text"), ("subject_did", "text"),
                       ("via_uri", "text"))

POSTS: Final = Table("posts", "app.bsky.feed.post", (
    ("record_type", "text"), ("text", "text"), ("langs", "text[]"),
    ("reply_root_uri", "text"), ("reply_root_cid", "text"),
    ("reply_parent_uri", "text"), ("reply_parent_cid", "text"),
    ("quote_uri", "text"), ("quote_cid", "text"), ("embed_kind", "text"),
))
LIKES: Final = Table("likes", "app.bsky.feed.like", _SUBJECT_REF)
REPOSTS: Final = Table("reposts", "app.bsky.feed.repost", _SUBJECT_REF)
FOLLOWS: Final = Table("follows", "app.bsky.graph.follow", (("subject_did", "text"),))
BLOCKS: Final = Table("blocks", "app.bsky.graph.block", (("subject_did", "text"),))
PROFILES: Final = Table("profiles", "app.bsky.actor.profile", (
    ("display_name", "text"), ("description", "text"), ("avatar_cid", "text"), ("banner_cid", "text"),
    ("pinned_post_uri", "text"),
))
RECORDS: Final = Table("records", None)

#: Every record table, in the order a batch writes them (a fixed order keeps lock order stable).
RECORD_TABLES: Final[tuple[Table, ...]] = (POSTS, LIKES, REPOSTS, FOLLOWS, BLOCKS, PROFILES, RECORDS)
TABLE_FOR_COLLECTION: Final[dict[str, Table]] = {
    t.collection: t for t in RECORD_TABLES if t.collection is not None}


def uri_did(uri: str | None) -> str | None:
    """The DID authority of an ``at://`` URI (None for handles, other schemes, garbage)."""
    if not uri or not uri.startswith("at://did:"):
        return None
    authority = uri[5:].split("/", 1)[0]
    return authority if len(authority) <= MAX_DID else None


def post_type(record: dict[str, Any], datum: dict[str, Any]) -> str:
    """Seed 002's post type: ``reply`` (has a reply ref), else ``quote`` (embeds a record), else ``post``."""
    if record.get("reply"):
        return "reply"
    if datum.get("embed_record_uri"):
        return "quote"
    return "post"


# A JSON ``\u0000`` escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _check_storable(value: str, what: str) -> None:
    if "\x00" in value:
        raise DropError("transform_failed", f"{what} contains a NUL character, which PostgreSQL cannot store")


def _check_json(text: str) -> None:
    # PostgreSQL's text and jsonb types cannot hold U+0000; such a record is dead-lettered, not stored.
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise DropError("transform_failed", "record contains a NUL character (\\u0000), which PostgreSQL cannot store")


def _check_envelope(event: RecordEvent) -> None:
    did, rkey, collection = event.did, event.rkey, event.collection
    if not did or len(did) > MAX_DID:
        raise DropError("transform_failed", f"DID of length {len(did)} out of range")
    if not rkey or len(rkey) > MAX_RKEY:
        raise DropError("transform_failed", f"rkey of length {len(rkey)} out of range")
    if len(collection) > MAX_COLLECTION:
        raise DropError("transform_failed", f"collection of length {len(collection)} out of range")
    if "\x00" in f"{did}{rkey}{collection}{event.rev}{event.cid}{event.job}":
        raise DropError("transform_failed", "an envelope field contains a NUL character")
    if len(did) + len(rkey) + len(collection) > MAX_KEY_BYTES // 4 and \
            len(f"{did}{collection}{rkey}".encode()) > MAX_KEY_BYTES:
        raise DropError("transform_failed", "the record key (did, collection, rkey) is too long to index")


def _typed_posts(record: dict[str, Any], d: dict[str, Any], refs: list[str | None]) -> Row:
    refs.append(uri_did(d["reply_root_uri"]))
    refs.append(uri_did(d["reply_parent_uri"]))
    refs.append(uri_did(d["embed_record_uri"]))
    return (post_type(record, d), d["text"], d["langs"], d["reply_root_uri"], d["reply_root_cid"],
            d["reply_parent_uri"], d["reply_parent_cid"], d["embed_record_uri"], d["embed_record_cid"],
            d["embed_kind"])


def _typed_subject_ref(record: dict[str, Any], d: dict[str, Any], refs: list[str | None]) -> Row:
    subject_did = uri_did(d["subject_uri"])
    refs.append(subject_did)
    return (d["subject_uri"], d["subject_cid"], subject_did, d["via_uri"])


def _typed_subject_did(record: dict[str, Any], d: dict[str, Any], refs: list[str | None]) -> Row:
    subject = d["subject"]
    refs.append(subject if subject and subject.startswith("did:") and len(subject) <= MAX_DID else None)
    return (subject,)


def _typed_profiles(record: dict[str, Any], d: dict[str, Any], refs: list[str | None]) -> Row:
    return (d["display_name"], d["description"], d["avatar_cid"], d["banner_cid"], d["pinned_post_uri"])


_TYPED: Final[dict[str, Callable[[dict[str, Any], dict[str, Any], list[str | None]], Row]]] = {
    "posts": _typed_posts, "likes": _typed_subject_ref, "reposts": _typed_subject_ref,
    "follows": _typed_subject_did, "blocks": _typed_subject_did, "profiles": _typed_profiles,
}


@dataclass(slots=True)
class Change:
    """The newest change of one record key in a batch: an upsert (``row``) or a delete (``tomb``)."""

    table: Table
    rev: str
    row: Row | None
    tomb: Row | None
    #: The version's as-of time (``runtime.contract.order`` rule 4): of two writes of one rev (a commit and a
    #: snapshot row), the later-observed one is kept.
    asof: int = 0


@dataclass(slots=True)
class ActorUpdate:
    """The newest identity (handle) and account status seen for one DID in a batch."""

    handle: str | None = None
    handle_time_us: int | None = None
    active: bool | None = None
    status: str | None = None
    status_time_us: int | None = None


@dataclass
class Batch:
    """The reduced contents of one sink transaction.

    Attributes:
        changes: (did, collection, rkey) -> newest change.
        identities, accounts: event-log rows by their primary key.
        actors: every DID seen as author or referenced as subject.
        actor_updates: DIDs whose handle or account status changes.
        syncs: repository replacements (the ``sync_events`` log) by their primary key.
        removals: DID -> time R of the newest removal to purge: an account removal's status time
            (``--account-removal purge``; runtime.contract.order rule 3) or a sync's
            (``--resync purge``; rule 5).
        progress: (producer job, topic, partition) -> (newest source cursor, its event time in
            microseconds); the job's ``firehose_cursor`` is the low watermark over its partitions.
        event_times: event time of every event in the batch (for the latency hook).
        superseded: changes replaced within the batch by a newer revision of the same key.
        outcomes: createdAt policy outcomes of the records added (counted into metrics per batch).
    """

    changes: dict[tuple[str, str, str], Change] = field(default_factory=dict)
    identities: dict[tuple[Any, ...], Row] = field(default_factory=dict)
    accounts: dict[tuple[Any, ...], Row] = field(default_factory=dict)
    syncs: dict[tuple[Any, ...], Row] = field(default_factory=dict)
    actors: set[str] = field(default_factory=set)
    actor_updates: dict[str, ActorUpdate] = field(default_factory=dict)
    removals: dict[str, int] = field(default_factory=dict)
    progress: dict[tuple[str, str, int], tuple[int, int]] = field(default_factory=dict)
    event_times: list[int] = field(default_factory=list)
    superseded: int = 0
    outcomes: dict[Outcome, int] = field(default_factory=dict)
    _last_service: str = ""
    _last_position: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.changes) + len(self.identities) + len(self.accounts) + len(self.syncs)

    @property
    def empty(self) -> bool:
        """True when nothing would be written (offsets may still be)."""
        return not (self.changes or self.identities or self.accounts or self.syncs or self.actors or self.actor_updates
                    or self.removals or self.progress)

    def upserts(self) -> dict[str, list[Row]]:
        """Rows to upsert, per table name (tables without rows are absent)."""
        out: dict[str, list[Row]] = {}
        for change in self.changes.values():
            if change.row is not None:
                out.setdefault(change.table.name, []).append(change.row)
        return out

    def deletes(self) -> list[Row]:
        """Tombstone rows of the deletes."""
        return [c.tomb for c in self.changes.values() if c.tomb is not None]

    def delete_tables(self) -> set[str]:
        """Names of the tables that have deletes in this batch."""
        return {c.table.name for c in self.changes.values() if c.tomb is not None}

    def _note_progress(self, job: str, source: str, cursor: int, time_us: int) -> None:
        self._last_service = job or source
        self._last_position = (cursor, time_us)
        self.event_times.append(time_us)

    def note_partition(self, topic: str, partition: int) -> None:
        """Record the position of the event just added as read from ``topic``/``partition``."""
        if self._last_position is None:
            return
        key = (self._last_service, topic, partition)
        current = self.progress.get(key)
        if current is None or self._last_position[0] > current[0]:
            self.progress[key] = self._last_position
        self._last_position = None

    def _put(self, key: tuple[str, str, str], change: Change) -> None:
        old = self.changes.get(key)
        if old is not None:
            # runtime.contract.order rule 1: the newer revision wins, a delete wins a tie; an equal change
            # is the same one delivered twice.
            self.superseded += 1
            if not newer_version(change.rev, change.row is None, old.rev, old.row is None) and not (
                    change.rev == old.rev and change.row is not None and old.row is not None
                    and change.asof > old.asof):
                return
        self.changes[key] = change


@dataclass(frozen=True)
class TransformOptions:
    """How events become rows.

    Args:
        policy: seed 002's createdAt range and what to do with records outside it.
        removal_statuses: account statuses whose events purge the account's rows; empty = keep rows.
        resync_purge: a repository replacement (a sync event) purges the DID's older record
            versions (``--resync purge``); False keeps them (the event is logged only).
    """

    policy: TimestampPolicy = field(default_factory=TimestampPolicy)
    removal_statuses: frozenset[str] = frozenset()
    resync_purge: bool = False

    @property
    def purges(self) -> bool:
        """True when any event can remove records (the sink then guards every write)."""
        return bool(self.removal_statuses) or self.resync_purge


def add_event(batch: Batch, event: Event, options: TransformOptions, datum: dict[str, Any] | None = None,
              schema: str | None = None) -> Outcome | None:
    """Transform ``event`` into ``batch``.

    Args:
        batch: where the rows go.
        event: the event.
        options: createdAt policy and removal statuses.
        datum: the Avro datum the event was decoded from; its typed fields and ``record_json`` are
            used as they are when ``schema`` is the collection's own schema (else they are derived
            from ``event.record``).
        schema: the name of the schema ``datum`` was decoded with.

    Returns:
        the createdAt policy outcome of a created/updated record (``DROPPED``: not added); None for
        deletes, identity and account events.

    Raises:
        DropError: the event cannot be stored (wrong field types, values PostgreSQL cannot hold).
    """
    if isinstance(event, RecordEvent):
        return _add_record(batch, event, options, datum, schema)
    if len(event.did) > MAX_DID:
        raise DropError("transform_failed", f"DID of length {len(event.did)} out of range")
    _check_storable(event.did, "did")
    _check_storable(event.time or "", "time")
    _check_storable(event.job, "job")
    key = (event.did, event.source, event.cursor, event.time_us)
    if isinstance(event, SyncEvent):
        _check_storable(event.rev, "rev")
        batch.syncs[key] = (event.did, event.source, event.cursor, event.time_us, event.seq, event.time,
                            event.rev, event.job)
        if options.resync_purge:
            when = sync_removal_us(event)
            if when is not None:
                prev = batch.removals.get(event.did)
                if prev is None or when > prev:
                    batch.removals[event.did] = when
    elif isinstance(event, IdentityEvent):
        _check_storable(event.handle or "", "handle")
        batch.identities[key] = (event.did, event.source, event.cursor, event.time_us, event.seq, event.time,
                                 event.handle, event.job)
        upd = batch.actor_updates.setdefault(event.did, ActorUpdate())
        when = status_time_us(event)
        if upd.handle_time_us is None or when > upd.handle_time_us:
            upd.handle, upd.handle_time_us = event.handle, when
    else:
        assert isinstance(event, AccountEvent)
        _check_storable(event.status or "", "status")
        batch.accounts[key] = (event.did, event.source, event.cursor, event.time_us, event.seq, event.time,
                               event.active, event.status, event.job)
        upd = batch.actor_updates.setdefault(event.did, ActorUpdate())
        when = status_time_us(event)
        if upd.status_time_us is None or when > upd.status_time_us:
            upd.active, upd.status, upd.status_time_us = event.active, event.status, when
        if removes(event, options.removal_statuses):
            prev = batch.removals.get(event.did)
            if prev is None or when > prev:
                batch.removals[event.did] = when
    batch.actors.add(event.did)
    batch._note_progress(event.job, event.source, event.cursor, event.time_us)
    return None


def _add_record(batch: Batch, event: RecordEvent, options: TransformOptions, datum: dict[str, Any] | None,
                schema: str | None) -> Outcome | None:
    _check_envelope(event)
    collection = event.collection
    table = TABLE_FOR_COLLECTION.get(collection, RECORDS)
    key = (event.did, collection, event.rkey)
    rev = event.rev or ""
    record = event.record
    if record is None:
        if event.operation != "delete":
            raise InvalidRecordError(f"{event.operation} without a record")
        tomb = (event.did, collection, event.rkey, rev, event.source, event.cursor, event.time_us, event.job)
        batch._put(key, Change(table, rev, None, tomb))
        batch.actors.add(event.did)
        batch._note_progress(event.job, event.source, event.cursor, event.time_us)
        return None
    if not isinstance(record, dict):
        raise InvalidRecordError(f"record is {type(record).__name__}, expected object")
    text = datum.get("record_json") if datum is not None else None
    if not isinstance(text, str):
        try:
            text = orjson.dumps(record).decode()
        except TypeError as e:
            raise InvalidRecordError(f"record does not serialise to JSON: {e}") from e
    _check_json(text)
    typed: dict[str, Any] | None = None
    if table.collection is not None:
        # The typed fields travel in the Avro datum (the contract); derive them only for a datum of
        # another schema (or none, when called outside a consumer).
        typed = datum if datum is not None and schema == collection else record_datum(event, text)
        raw_created = typed.get("created_at")
    else:
        raw_created = record.get("createdAt")
    outcome, created_at = options.policy.apply(raw_created if isinstance(raw_created, str) else None)
    outcomes = batch.outcomes
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if outcome is Outcome.DROPPED:
        return outcome
    refs: list[str | None] = []
    asof = asof_us(event)
    if typed is not None:
        row = (event.did, event.rkey, rev, event.cid, text, created_at, event.source, event.cursor,
               event.time_us, event.job, asof, *_TYPED[table.name](record, typed, refs))
    else:
        row = (event.did, collection, event.rkey, rev, event.cid, text, created_at, event.source,
               event.cursor, event.time_us, event.job, asof)
    batch._put(key, Change(table, rev, row, None, asof))
    actors = batch.actors
    actors.add(event.did)
    for ref in refs:
        if ref is not None and "\x00" not in ref:
            actors.add(ref)
    batch._note_progress(event.job, event.source, event.cursor, event.time_us)
    return outcome


def naive_utc(time_us: int) -> datetime:
    """A naive UTC datetime for a ``TIMESTAMP`` (without time zone) column such as the seed's."""
    return datetime.fromtimestamp(time_us / 1e6, UTC).replace(tzinfo=None)

