"""Generated histories of a few DIDs, and the final state the ordering rule gives them.

For property tests of every sink that folds (the queue, PostgreSQL): a sink fed the per-topic
streams of a history in any interleaving, through any replicas, must end in :func:`reference_fold`.

API:

* :func:`histories` - a Hypothesis strategy: one history as a list of :mod:`runtime.contract.records`
  events in source order (creates, updates and deletes with increasing revs across collections;
  account deactivation, reactivation, deletion, takedown and its reversal, and handle changes,
  each with the relay's time and seq; getRepo snapshots at the head rev with their fetch time;
  repository replacements (Jetstream v2's ``#sync`` then resync-creates at its rev of the records
  the repository still holds, the others lost); the same events delivered again, as they are or
  through the other source).
* :func:`split_by_topic` - a history's per-topic streams (a topic per collection, plus
  ``"account"``, ``"identity"`` and ``"sync"``), each in source order: a consumer reads each in order and
  the streams in any relative order.
* :func:`reference_fold` - the final state under :mod:`runtime.contract.order`, computed from the whole
  history at once: :class:`FoldState` (live records with their rev and cid, each DID's newest
  account status and handle).

The histories keep the rule's one assumption (:mod:`runtime.contract.order`: one clock): every event has
its own true time, strictly increasing; a commit's rev is the TID of its time, a status change's
``time`` is its time, and a snapshot at time F shows the repository as it is at F with the head
rev at F. A snapshot's rows are placed anywhere in the history (the repository job runs at its own
pace), so in a collection's stream a snapshot row may follow newer commits of the same record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from hypothesis import strategies as st

from runtime.atproto.tid import make_tid, tid_to_time_us
from runtime.contract.order import asof_us, is_delete, removes, status_time_us
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, SyncEvent

#: Collections the histories write: typed ones, the profile (rkey ``self``, updated in place) and
#: one without a type of its own.
COLLECTIONS: Final = ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow",
                      "app.bsky.actor.profile", "app.bsky.feed.threadgate")
PROFILE: Final = "app.bsky.actor.profile"
POST: Final = "app.bsky.feed.post"
ACCOUNT_TOPIC: Final = "account"
IDENTITY_TOPIC: Final = "identity"
SYNC_TOPIC: Final = "sync"
#: Account changes: (active, status). ``None`` status and active: a reactivation or a reversal.
ACCOUNT_CHANGES: Final = ((False, "deactivated"), (False, "deleted"), (False, "takendown"), (True, None))
#: The removal statuses of ``--account-removal purge`` by default.
DEFAULT_REMOVAL_STATUSES: Final = frozenset({"deleted", "takendown"})

_T0: Final = 1_700_000_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ACTIONS: Final = ("create", "create", "update", "delete", "account", "account", "identity", "snapshot", "sync")
_SOURCES: Final = ("jetstream", "firehose")

RecordKey = tuple[str, str, str]


def relay_time(us: int) -> str:
    """The relay's ``time`` string of unix microseconds ``us`` (what status_time_us parses back)."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def record_key(event: RecordEvent) -> RecordKey:
    """(did, collection, rkey)."""
    return (event.did, event.collection, event.rkey)


@dataclass(frozen=True)
class FoldState:
    """The final state of a history under :mod:`runtime.contract.order`.

    Attributes:
        records: live records: (did, collection, rkey) -> (rev, cid) of the version kept.
        accounts: DID -> (active, status) of its newest account event (status time, then seq).
        handles: DID -> handle of its newest identity event.
    """

    records: dict[RecordKey, tuple[str, str | None]] = field(default_factory=dict)
    accounts: dict[str, tuple[bool, str | None]] = field(default_factory=dict)
    handles: dict[str, str | None] = field(default_factory=dict)


@dataclass
class _Repo:
    """What the network holds of one DID while a history is generated."""

    did: str
    active: bool = True
    head: str | None = None
    records: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = field(default_factory=dict)


@st.composite
def histories(draw: st.DrawFn, *, max_dids: int = 3, max_steps: int = 40, max_snapshots: int = 3,
              max_redeliveries: int = 4) -> list[Event]:
    """A history of one to ``max_dids`` DIDs, as events in source order (module docstring)."""
    dids = [f"did:plc:{chr(ord('a') + i) * 24}" for i in range(draw(st.integers(1, max_dids)))]
    repos = {did: _Repo(did) for did in dids}
    events: list[Event] = []
    snapshots: list[list[Event]] = []
    t = _T0
    seq = 0
    n = 0

    def snapshot(repo: _Repo, at: int) -> None:
        """getRepo at time ``at``: every record the repository holds then, at its head rev."""
        if repo.active and repo.head is not None and len(snapshots) < max_snapshots:
            snapshots.append([
                RecordEvent(repo.did, coll, rkey, "create", repo.head, cid, record, "repo", len(snapshots), at)
                for (coll, rkey), (cid, record) in sorted(repo.records.items())])

    for _ in range(draw(st.integers(0, max_steps))):
        t += draw(st.integers(1, 5_000_000))
        seq += 1
        repo = repos[draw(st.sampled_from(dids))]
        action = draw(st.sampled_from(_ACTIONS))
        source = draw(st.sampled_from(_SOURCES))
        time_us = t + (draw(st.integers(0, 10_000_000)) if source == "jetstream" else 0)  # its receive clock
        if action == "account":
            # an account that is not active comes back as often as not
            back_now = not repo.active and draw(st.booleans())
            active, status = (True, None) if back_now else draw(st.sampled_from(ACCOUNT_CHANGES))
            back = active and not repo.active
            repo.active = active
            events.append(AccountEvent(repo.did, active, status, seq, relay_time(t), source, seq, time_us))
            if back and draw(st.booleans()):  # the repository job fetches an account that came back
                t += 1
                snapshot(repo, t)
        elif action == "identity":
            n += 1
            events.append(IdentityEvent(repo.did, f"h{n}.test", seq, relay_time(t), source, seq, time_us))
        elif action == "snapshot":
            snapshot(repo, t)
        elif action == "sync":
            if not repo.active:
                continue
            # Sync 1.1: the repository diverged; the archive holds a #sync row at the new rev, then
            # the records the repository holds (a subset: the others were lost) at that rev
            rev = make_tid(t, 5)
            kept = [k for k in sorted(repo.records) if draw(st.booleans())]
            repo.records = {k: repo.records[k] for k in kept}
            events.append(SyncEvent(repo.did, rev, seq, relay_time(t), "jetstream2", seq, t))
            for coll, rkey in kept:
                cid, record = repo.records[(coll, rkey)]
                events.append(RecordEvent(repo.did, coll, rkey, "create", rev, cid, record, "jetstream2", seq, t))
            repo.head = rev
        elif repo.active:
            rev = make_tid(t, 5)
            if action == "create":
                coll = draw(st.sampled_from(COLLECTIONS))
                rkey = "self" if coll == PROFILE else make_tid(t, 9)
                record: dict[str, Any] = {"$type": coll, "createdAt": relay_time(t)}
                if coll == POST and draw(st.booleans()):
                    parent = {"uri": f"at://{dids[0]}/{POST}/3kparent22222", "cid": "bafyparent"}
                    record["reply"] = {"root": parent, "parent": parent}
                op = "update" if (coll, rkey) in repo.records else "create"
            else:
                if not repo.records:
                    continue
                coll, rkey = draw(st.sampled_from(sorted(repo.records)))
                record = dict(repo.records[(coll, rkey)][1])
                op = action
            if op == "delete":
                del repo.records[(coll, rkey)]
                events.append(RecordEvent(repo.did, coll, rkey, "delete", rev, None, None, source, seq, time_us))
            else:
                n += 1
                record["text"] = f"v{n}"
                cid = f"bafy{n:06d}"
                repo.records[(coll, rkey)] = (cid, record)
                events.append(RecordEvent(repo.did, coll, rkey, op, rev, cid, record, source, seq, time_us))
            repo.head = rev
    for rows in snapshots:
        at = draw(st.integers(0, len(events)))
        events[at:at] = rows
    for _ in range(draw(st.integers(0, max_redeliveries if events else 0))):
        i = draw(st.integers(0, len(events) - 1))
        again = events[i]
        if again.source != "repo" and draw(st.booleans()):  # the same event through the other source
            other = "firehose" if again.source == "jetstream" else "jetstream"
            again = replace(again, source=other, time_us=again.time_us + 1_000)
        events.insert(draw(st.integers(i + 1, len(events))), again)
    return events


def split_by_topic(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Per topic (the collection, ``"account"``, ``"identity"``, ``"sync"``), its events in source order."""
    out: dict[str, list[Event]] = {}
    for e in events:
        topic = e.collection if isinstance(e, RecordEvent) else (
            ACCOUNT_TOPIC if isinstance(e, AccountEvent) else SYNC_TOPIC if isinstance(e, SyncEvent)
            else IDENTITY_TOPIC)
        out.setdefault(topic, []).append(e)
    return out


def reference_fold(events: Iterable[Event], removal_statuses: frozenset[str], resync: bool = False) -> FoldState:
    """The final state of ``events`` under :mod:`runtime.contract.order`, computed from all of them at once.

    Per record the kept version is the greatest by (rev, delete over write, as-of time); it is live
    when it is not a delete and its as-of time is later than the DID's newest removal (an account
    event with a status in ``removal_statuses``; empty: keep, nothing is removed; with ``resync``, a
    sync at rev X: every version written before X's time is gone). Per DID the
    account status and the handle are those of the event with the greatest (status time, seq).
    """
    kept: dict[RecordKey, tuple[tuple[str, bool, int], RecordEvent]] = {}
    removed: dict[str, int] = {}
    accounts: dict[str, tuple[tuple[int, int], AccountEvent]] = {}
    handles: dict[str, tuple[tuple[int, int], IdentityEvent]] = {}
    for e in events:
        if isinstance(e, RecordEvent):
            order = (e.rev or "", is_delete(e), asof_us(e))
            key = record_key(e)
            if key not in kept or order > kept[key][0]:
                kept[key] = (order, e)
            continue
        if isinstance(e, SyncEvent):
            if resync:
                gone_before = tid_to_time_us(e.rev)  # versions as of an earlier time are gone
                removed[e.did] = max(removed.get(e.did, gone_before - 1), gone_before - 1)
            continue
        when = (status_time_us(e), -1 if e.seq is None else e.seq)
        if isinstance(e, AccountEvent):
            if e.did not in accounts or when > accounts[e.did][0]:
                accounts[e.did] = (when, e)
            if removes(e, removal_statuses):
                removed[e.did] = max(removed.get(e.did, when[0]), when[0])
        elif e.did not in handles or when > handles[e.did][0]:
            handles[e.did] = (when, e)
    records = {key: (e.rev or "", e.cid) for key, ((_, deleted, asof), e) in kept.items()
               if not deleted and (key[0] not in removed or asof > removed[key[0]])}
    return FoldState(records=records,
                     accounts={did: (e.active, e.status) for did, (_, e) in accounts.items()},
                     handles={did: e.handle for did, (_, e) in handles.items()})


def describe(events: Iterable[Event]) -> str:
    """One line per event (for a failing example's report)."""
    lines = []
    for e in events:
        if isinstance(e, RecordEvent):
            lines.append(f"{e.source:9} {e.did[-3:]} {e.collection}/{e.rkey} {e.operation} rev={e.rev} "
                         f"asof={asof_us(e)}")
        elif isinstance(e, SyncEvent):
            lines.append(f"{e.source:9} {e.did[-3:]} sync rev={e.rev} at={tid_to_time_us(e.rev)}")
        else:
            what = f"account active={e.active} status={e.status}" if isinstance(e, AccountEvent) \
                else f"identity handle={e.handle}"
            lines.append(f"{e.source:9} {e.did[-3:]} {what} at={status_time_us(e)} seq={e.seq}")
    return "\n".join(lines)

