"""The ordering rule for one DID's effects: the same final state in every consumption order.

A topic per collection keeps a DID's events in order inside one topic only: its account events,
its record changes in each collection and its identity changes reach the sinks in any relative
order, through any replica. So no sink orders effects by arrival, and none compares a receive clock
(Jetstream's ``time_us``) across sources. The rule, which both sinks and the queue readers apply:

1. **Versions of one record** (``did``, ``collection``, ``rkey``) are ordered by ``rev``, the
   repository revision (a TID; TIDs sort as strings). The newest rev wins; a delete wins a tie (a
   snapshot at head rev H cannot hold a record that commit H deleted). A delete leaves a tombstone
   that drops any older version arriving later.
2. **Status changes of one DID** (account ``active``/``status``, identity ``handle``) are ordered by
   their *status time*: the relay's event time (``time``, which Jetstream passes on unchanged, so
   the same event has the same status time from either source), ties broken by the relay ``seq``.
   An event without a parseable ``time`` falls back to its own ``time_us``.
3. **A removal** (an inactive account event whose status the sink purges on, e.g. ``deleted``)
   at status time R removes every record version of the DID whose *as-of time* is <= R, whenever it
   arrives, and a removal only ever raises R (the newest removal wins). A version with as-of time
   > R is unaffected: it was written (or observed) after the removal, so a reactivation or a
   reversed takedown lets it in without any "undo".
4. **As-of time** of a record version is when the network is known to have held it: the TID time
   of its ``rev`` for a commit (Jetstream, relay), and the time the repository was fetched for a
   getRepo snapshot row (a snapshot taken after a reversal shows the repository as it is now, even
   when its head commit is older than the takedown).
5. **A repository replacement** (a :class:`~runtime.contract.records.SyncEvent`: Jetstream v2's
   ``#sync`` row, after which the DID's current records come again as resync-creates at the sync's
   ``rev``) is a removal at R = (TID time of that ``rev``) - 1 us: every version written by an older
   commit goes, whenever it arrives; the replacement rows (as-of time = the rev's TID time) and
   every later commit stay. A snapshot fetched after the sync stays too (its as-of time is the fetch
   time). A sync whose ``rev`` is not a usable TID removes nothing (it cannot be placed in time). Two
   commits of one repository within the same microsecond (TIDs differing in their clock id only)
   are the one case rule 5 cannot separate: the older stays.

No rule compares ``cursor``: it is each source's own resume position (a Jetstream instance's clock,
a relay ``seq``, a repository job's ordinal) and, for Jetstream v2 (``jetstream2``), the serving
instance's own ``seq``, not a time at all. Nor do they read Jetstream v2's ``witnessed_at`` (the
instance's receive clock) or ``indexed_at`` (an imported time, possibly old and out of order). A
``jetstream2`` event follows the rules as a Jetstream one: its commits' as-of time is their rev's,
its status changes' the relay's ``time``; only where those fall back to ``time_us`` does the v2 row's
time count (its ``indexed_at``, else ``witnessed_at``).

Rules 1, 3 and 5 are joins of per-key maxima (newest rev per record, newest removal per DID), so the
final state is the same for every interleaving and any partition-to-replica assignment. The one
assumption is that the PDS clock (TIDs), the relay clock (``time``) and the snapshot fetcher's clock
agree to within the time between a commit and a removal of the same account (NTP: milliseconds).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from runtime.atproto.errors import TIDError
from runtime.atproto.tid import tid_to_time_us
from runtime.contract.records import AccountEvent, IdentityEvent, Operation, RecordEvent, Source, SyncEvent
from runtime.contract.timeparse import to_us

#: Times outside [year 2000, year 2200) are not trusted as event times (a bogus ``time`` string or
#: TID), and fall back to ``time_us``.
_MIN_US: Final = 946_684_800_000_000
_MAX_US: Final = 7_258_118_400_000_000
_REPO: Final = Source.REPO.value


def _sane(us: int) -> bool:
    return _MIN_US <= us < _MAX_US


def status_time_us(event: AccountEvent | IdentityEvent) -> int:
    """Rule 2: the relay's event time of a status change, in unix microseconds.

    Falls back to ``event.time_us`` when ``time`` is absent, unparseable or out of range.
    """
    when = event.time
    if when:
        try:
            text = when[:-1] + "+00:00" if when.endswith(("Z", "z")) else when
            dt = datetime.fromisoformat(text)
        except ValueError:
            return event.time_us
        if dt.tzinfo is not None:
            us = to_us(dt)
            if _sane(us):
                return us
    return event.time_us


def asof_us(event: RecordEvent) -> int:
    """Rule 4: the as-of time of a record version, in unix microseconds.

    A getRepo snapshot row's ``time_us`` is the fetch time; a commit's as-of time is its rev's TID
    time, falling back to ``time_us`` when the rev is absent or not a usable TID.
    """
    if event.source == _REPO or not event.rev:
        return event.time_us
    try:
        us = tid_to_time_us(event.rev)
    except TIDError:
        return event.time_us
    return us if _sane(us) else event.time_us


def removes(event: AccountEvent, statuses: frozenset[str]) -> bool:
    """Rule 3: True when ``event`` is a removal under a sink purging on ``statuses``."""
    return not event.active and event.status in statuses


def sync_removal_us(event: SyncEvent) -> int | None:
    """Rule 5: the removal time R of a repository replacement, or None when its rev is not a usable TID."""
    try:
        us = tid_to_time_us(event.rev)
    except TIDError:
        return None
    return us - 1 if _sane(us) else None


def newer_version(rev: str | None, deleted: bool, than_rev: str | None, than_deleted: bool) -> bool:
    """Rule 1: True when version (``rev``, ``deleted``) supersedes (``than_rev``, ``than_deleted``).

    A missing rev sorts before every rev; at equal revs a delete supersedes a write, nothing else.
    """
    a, b = rev or "", than_rev or ""
    if a != b:
        return a > b
    return deleted and not than_deleted


def is_delete(event: RecordEvent) -> bool:
    """True for a delete (a tombstone under rule 1)."""
    return event.operation == Operation.DELETE


def supersedes(rev: str | None, deleted: bool, asof: int,
               than_rev: str | None, than_deleted: bool, than_asof: int) -> bool:
    """Rules 1 and 4 as one order: True when version (``rev``, ``deleted``, ``asof``) replaces the stored one.

    The version order a fold keeps the maximum of: :func:`newer_version` first; two deliveries of one
    version (the same rev, both writes or both deletes: a commit and the getRepo snapshot row at the
    same head rev) are one version whose as-of time is the later one. Without that, the as-of time a
    fold ends with, and so rule 3's verdict on it, would depend on which delivery arrived first.
    """
    if newer_version(rev, deleted, than_rev, than_deleted):
        return True
    return (rev or "") == (than_rev or "") and deleted == than_deleted and asof > than_asof
