"""Pure decoding of a repository CAR into typed record events (no sockets, no clock, no Kafka).

:class:`RepoDecoder` reads the signed commit (optionally checking its signature against the
account's key), walks the MST once to prove the tree complete and well-formed, so a broken repository
fails before any of its records is produced, then :meth:`RepoDecoder.items` walks it again, from
``commit.data`` through the nodes (keys rebuilt from prefix compression) to every
``collection/rkey``, checks each record block against its CID and yields:

* :class:`~runtime.contract.records.RecordEvent` (operation ``create``, ``rev`` = the commit's rev,
  ``source`` = ``repo``, ``time_us`` = when the repository was requested (the caller's
  ``observed_us``: the records' as-of time, ``runtime.contract.order`` rule 4), else the rev TID's
  timestamp, ``cursor`` = the caller's);
* :class:`~producers.source.Drop` for a record that is missing, oversize, not DAG-CBOR or does not
  match its CID (the rest of the repository goes on);
* :class:`~producers.source.Skip` totals for records filtered out (collection/record type, the
  createdAt range policy) at the end.

Records of unwanted collections are skipped before their block is even read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from producers.source import Drop, Skip
from runtime.atproto import native
from runtime.atproto.car import BlockStore, raw_lookup
from runtime.atproto.cid import CID
from runtime.atproto.commit import Commit, verify_commit
from runtime.atproto.dagcbor import DEFAULT_MAX_DEPTH, record_json_form
from runtime.atproto.errors import AtprotoFormatError, CBORError, MissingBlockError
from runtime.atproto.mst import DEFAULT_MAX_LAYER, walk
from runtime.atproto.repo import read_commit
from runtime.atproto.tid import tid_to_time_us
from runtime.contract.created_at import Outcome, TimestampPolicy
from runtime.contract.nsid import CollectionFilter, is_collection
from runtime.contract.records import Operation, RecordEvent, Source
from runtime.errors import ConfigError, DropError

#: Seed 002's record types and the collection each lives in (a reply is a post with ``reply``).
RECORD_TYPES: Final[dict[str, str]] = {
    "post": "app.bsky.feed.post",
    "reply": "app.bsky.feed.post",
    "like": "app.bsky.feed.like",
    "follow": "app.bsky.graph.follow",
    "repost": "app.bsky.feed.repost",
    "block": "app.bsky.graph.block",
    "profile": "app.bsky.actor.profile",
}
_TYPE_OF_COLLECTION: Final = {c: t for t, c in RECORD_TYPES.items() if t not in ("reply",)}
#: Entries of the validation walk kept for the record pass (beyond: the tree is walked twice).
MAX_CACHED_ENTRIES: Final = 250_000
#: Largest record block accepted (the atproto limit on a record is far below this).
DEFAULT_MAX_RECORD_BYTES: Final = 1 << 20


def record_type(collection: str, record: dict[str, Any] | None) -> str:
    """Seed 002's type of a record: post, reply, like, follow, repost, block, profile, or other."""
    kind = _TYPE_OF_COLLECTION.get(collection)
    if kind is None:
        return "other"
    if kind == "post" and record is not None and isinstance(record.get("reply"), dict):
        return "reply"
    return kind


class RepoDecodeError(DropError):
    """The repository as a whole cannot be used (bad commit, signature, tree); nothing was produced."""


@dataclass(frozen=True)
class RecordFilter:
    """Which records of a repository are produced.

    A record is kept when no selection is given, when its record type is in ``types``, or when its
    collection matches ``collections`` (NSIDs and ``prefix.*`` wildcards). Then the createdAt
    ``policy`` applies (``drop`` skips records outside the range; ``keep``/``standardize`` pass them
    on unchanged, the sinks standardize).

    Raises:
        ConfigError: an unknown record type or a malformed NSID pattern.
    """

    types: frozenset[str] = frozenset()
    collections: tuple[str, ...] = ()
    policy: TimestampPolicy = field(default_factory=TimestampPolicy)
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    _nsids: CollectionFilter = field(init=False, repr=False, compare=False)
    _type_collections: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.types) - set(RECORD_TYPES)
        if unknown:
            raise ConfigError(f"unknown record types {sorted(unknown)}; known: {', '.join(RECORD_TYPES)}")
        # Derived lookups of a frozen dataclass are set once here.
        object.__setattr__(self, "_nsids", CollectionFilter(self.collections))
        object.__setattr__(self, "_type_collections", frozenset(RECORD_TYPES[t] for t in self.types))

    @property
    def selects_all(self) -> bool:
        """True when every collection is wanted."""
        return not self.types and not self.collections

    def wants_collection(self, collection: str) -> bool:
        """Whether records of ``collection`` may be wanted (checked before decoding them)."""
        if self.selects_all:
            return True
        return collection in self._type_collections or (bool(self.collections) and self._nsids(collection))

    def wants(self, collection: str, kind: str) -> bool:
        """Whether a decoded record of ``collection`` and type ``kind`` is wanted."""
        if self.selects_all or kind in self.types:
            return True
        return bool(self.collections) and self._nsids(collection)


@dataclass
class RepoSummary:
    """Per-repository counts (seed 002's per-user metadata)."""

    did: str
    rev: str = ""
    commit_cid: str = ""
    records: int = 0
    record_bytes: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    by_collection: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    timestamps: Counter[str] = field(default_factory=Counter)
    entries: int = 0


class RepoDecoder:
    """A repository CAR, checked and ready to yield its records.

    Args:
        car: the CAR (a :class:`~runtime.atproto.car.Car` or an on-disk
            :class:`~runtime.atproto.car.CarFile`).
        did: the DID the repository was fetched for (the commit must be for it).
        flt: the record filter.
        job: the producer job name put into every event.
        cursor: the events' cursor (the DID's ordinal in the job, or its work-topic offset).
        signing_key: when given (``did:key``), the commit signature must verify against it.
        max_cached_entries: keep up to this many ``(key, CID)`` entries of the first walk (about
            130 bytes each) so the second pass needs no MST parsing; larger trees are walked twice.
        observed_us: when the repository was requested (unix microseconds): the events' ``time_us``
            (None: the rev TID's timestamp).

    Raises:
        RepoDecodeError: no/invalid commit (``malformed_car``/``malformed_cbor``), a commit for
            another DID (``invalid_record``), a bad signature (``bad_signature``), a missing or
            malformed MST node (``missing_block``/``bad_mst_proof``/``bad_cid``).
    """

    def __init__(self, car: BlockStore, did: str, flt: RecordFilter, *, job: str = "", cursor: int = 0,
                 signing_key: str | None = None, max_cached_entries: int = MAX_CACHED_ENTRIES,
                 observed_us: int | None = None) -> None:
        self.car = car
        self.did = did
        self.flt = flt
        self.job = job
        self.cursor = cursor
        try:
            commit = read_commit(car)
            if signing_key is not None:
                block = car.get(car.roots[0])
                assert block is not None  # read_commit found it
                commit = verify_commit(block, signing_key)
        except AtprotoFormatError as e:
            raise RepoDecodeError(e.reason, f"commit of {did}: {e}") from e
        if commit.did != did:
            raise RepoDecodeError("invalid_record", f"the repository fetched for {did} is signed for {commit.did}")
        self.commit: Commit = commit
        self.time_us = observed_us if observed_us is not None else tid_to_time_us(commit.rev)
        self.summary = RepoSummary(did=did, rev=commit.rev, commit_cid=str(car.roots[0]))
        # First pass: the whole tree (nodes only) must be present and valid before anything is
        # produced, so a broken repository is never half-produced. Its entries are kept for the
        # second pass (a node is parsed once) unless the tree is huge: then the second pass walks
        # the tree again, and memory stays bounded whatever the repository's size. The native walk
        # does this for canonical trees; anything else (and every broken tree, for its error) goes
        # through the Python walk.
        self._lookup = raw_lookup(car)
        entries: list[tuple[str, bytes]] | None = None
        fast = native.NATIVE
        try:
            walked = None if fast is None else fast.mst_walk(commit.data.raw, self._lookup, True,
                                                             DEFAULT_MAX_LAYER, max_cached_entries)
        except AtprotoFormatError as e:  # raised by the store's own reads (a CAR file cut short)
            raise RepoDecodeError(e.reason, f"MST of {did}: {e}") from e
        if isinstance(walked, list):
            entries, count = walked, len(walked)
        elif walked is not None:
            count = walked
        else:
            entries, count = [], 0
            try:
                for key, cid in walk(commit.data, car, verify=True):
                    count += 1
                    if entries is not None:
                        if count > max_cached_entries:
                            entries = None
                        else:
                            entries.append((key, cid.raw))
            except AtprotoFormatError as e:
                raise RepoDecodeError(e.reason, f"MST of {did}: {e}") from e
        self._entries = entries
        self.summary.entries = count

    def _second_walk(self) -> Iterator[tuple[str, bytes]]:
        for key, cid in walk(self.commit.data, self.car, verify=False):
            yield key, cid.raw

    def items(self) -> Iterator[RecordEvent | Drop | Skip]:
        """Yield the repository's records (key order), drops, and the skip totals at the end."""
        flt = self.flt
        s = self.summary
        did, job, cursor, rev, time_us = self.did, self.job, self.cursor, self.commit.rev, self.time_us
        policy = flt.policy
        policy_active = policy.active
        max_bytes = flt.max_record_bytes
        max_depth = flt.max_depth
        by_type = s.by_type
        by_collection = s.by_collection
        skipped = s.skipped
        create = Operation.CREATE.value
        repo = Source.REPO.value
        entries = self._entries if self._entries is not None else self._second_walk()
        every = flt.selects_all
        lookup = self._lookup
        get = lookup.get if isinstance(lookup, dict) else lookup
        fast = native.NATIVE
        record_form = None if fast is None else fast.record_form
        for key, raw in entries:
            collection, _, rkey = key.partition("/")
            if not every and not flt.wants_collection(collection):
                skipped["collection_filter"] += 1
                continue
            if not is_collection(collection):  # an MST key admits characters no topic name does
                yield self._drop("invalid_record", f"record {key[:200]}: the collection is not an NSID", b"", key)
                continue
            block = get(raw)
            if block is None:
                yield self._drop("missing_block", f"record {key}: {MissingBlockError(CID.from_bytes(raw))}", b"", key)
                continue
            if len(block) > max_bytes:
                yield self._drop("oversize", f"record {key} is {len(block)} bytes (cap {max_bytes})", block[:4096], key)
                continue
            formed = None if record_form is None else record_form(block, raw, max_depth)
            if formed is None:  # the Python path: the native one does not take this record's form
                cid = CID.from_bytes(raw)
                if not cid.matches(block):
                    yield self._drop("bad_cid", f"record {key} does not match its CID {cid}", block, key)
                    continue
                try:
                    record = record_json_form(block, max_depth=max_depth)
                except CBORError as e:
                    yield self._drop(e.reason, f"record {key}: {e}", block, key)
                    continue
                cid_str, record_json = str(cid), None
            elif formed is False:
                yield self._drop("bad_cid", f"record {key} does not match its CID {CID.from_bytes(raw)}", block, key)
                continue
            else:
                cid_str, record, record_json = formed  # type: ignore[misc]
            kind = record_type(collection, record)
            if not every and not flt.wants(collection, kind):
                skipped["collection_filter"] += 1
                continue
            if policy_active:
                outcome, _ = policy.apply(record.get("createdAt"))
                s.timestamps[outcome.value] += 1
                if outcome is Outcome.DROPPED:
                    skipped["out_of_range_timestamp"] += 1
                    continue
            by_type[kind] += 1
            by_collection[collection] += 1
            s.records += 1
            s.record_bytes += len(block)
            yield RecordEvent(did, collection, rkey, create, rev, cid_str, record, repo, cursor, time_us, job,
                              record_json)
        for reason, n in sorted(skipped.items()):
            yield Skip(reason, n)

    def _drop(self, reason: str, detail: str, payload: bytes, key: str) -> Drop:
        self.summary.dropped[reason] += 1
        return Drop(reason, detail, bytes(payload), f"repo:{self.did}/{key}", did=self.did, cursor=self.cursor)
