"""The queue's fold, whatever the interleaving: the per-topic streams of a generated history
(:mod:`tests.fold_history`), consumed in any relative order by one to three replicas (QueueSink
instances on one SQLite file) that flush batches of any size, crash (an unflushed batch discarded,
then re-delivered from the stored offsets) or replay a topic from its start, leave queues whose
reader fold (:class:`consumers.queue.QueueFold`) is the reference fold of the history.

``BACKFILL_FOLD_EXAMPLES`` runs more examples (200 by default).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from consumers.base import Consumed
from consumers.queue import DEFAULT_STATE_MAX, STATE_TABLES, Queue, QueueFold, QueueSink, by_type_router
from runtime.contract.order import supersedes
from runtime.contract.records import Event
from tests.fold_history import DEFAULT_REMOVAL_STATUSES, FoldState, describe, histories, reference_fold, split_by_topic

EXAMPLES = int(os.environ.get("BACKFILL_FOLD_EXAMPLES", "200"))
GROUP = "fold"
BASE = "q"
#: A bound far above any history (nothing pruned) and one far below (state pruned all the time).
STATE_MAXES = (DEFAULT_STATE_MAX, 3)


class Replicas:
    """Replicas of one consumer group over the streams of a history, driven by Hypothesis."""

    def __init__(self, path: Path, streams: dict[str, list[Event]], owners: dict[str, int], replicas: int, *,
                 split: bool, statuses: frozenset[str], state_max: int) -> None:
        route = by_type_router(BASE) if split else None
        self.sinks: list[QueueSink] = []
        for _ in range(replicas):
            self.sinks.append(QueueSink(BASE, path, route=route, removal_statuses=statuses, state_max=state_max,
                                        resync_purge=bool(statuses)))
        self.streams = streams
        self.owners = owners
        self.position = dict.fromkeys(streams, 0)
        self.pending = [False] * replicas

    def owned(self, replica: int) -> list[str]:
        return [t for t, r in self.owners.items() if r == replica]

    def poll(self, topic: str, count: int) -> None:
        replica = self.owners[topic]
        stream = self.streams[topic]
        for offset in range(self.position[topic], min(self.position[topic] + count, len(stream))):
            self.sinks[replica].add(Consumed(topic, 0, offset, "x", stream[offset], 0))
            self.position[topic] = offset + 1
        self.pending[replica] = True

    def flush(self, replica: int) -> None:
        self.sinks[replica].flush(GROUP, {(t, 0): self.position[t] for t in self.owned(replica)})
        self.pending[replica] = False

    def crash(self, replica: int) -> None:
        """The replica dies before storing its batch; it (or another) resumes from the stored offsets."""
        sink = self.sinks[replica]
        sink.discard()
        owned = self.owned(replica)
        stored = sink.load_offsets(GROUP, [(t, 0) for t in owned])
        for t in owned:
            self.position[t] = stored[(t, 0)].offset if (t, 0) in stored else 0
        self.pending[replica] = False

    def replay(self, topic: str) -> None:
        """The topic is read again from its start (stored offsets forgotten)."""
        replica = self.owners[topic]
        self.crash(replica)
        self.sinks[replica].forget_offsets(GROUP, [(topic, 0)])
        self.position[topic] = 0

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def run(replicas: Replicas, data: st.DataObject) -> None:
    """Interleave polls, flushes, crashes and replays until every stream is read and stored."""
    crashes = replays = 0
    while True:
        readable = sorted(t for t, s in replicas.streams.items() if replicas.position[t] < len(s))
        pending = [r for r, p in enumerate(replicas.pending) if p]
        actions = (["poll"] if readable else []) + (["flush"] if pending else [])
        if pending and crashes < 3:
            actions.append("crash")
        if replays < 1 and replicas.streams:
            actions.append("replay")
        if not actions:
            return
        action = data.draw(st.sampled_from(actions))
        if action == "poll":
            replicas.poll(data.draw(st.sampled_from(readable)), data.draw(st.integers(1, 8)))
        elif action == "flush":
            replicas.flush(data.draw(st.sampled_from(pending)))
        elif action == "crash":
            crashes += 1
            replicas.crash(data.draw(st.sampled_from(pending)))
        else:
            replays += 1
            replicas.replay(data.draw(st.sampled_from(sorted(replicas.streams))))


def folds(path: Path) -> dict[str, QueueFold]:
    """Every queue of the file, folded alone by the reader's rule."""
    with closing(sqlite3.connect(path)) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM queues ORDER BY name")]
    out: dict[str, QueueFold] = {}
    for name in names:
        queue = Queue(name, path=path)
        try:
            out[name] = queue.fold()
        finally:
            queue.close()
    return out


def accounts(fold: QueueFold) -> dict[str, tuple[bool, str | None]]:
    return {did: (s.payload["account"]["active"], s.payload["account"].get("status"))
            for did, s in fold.accounts.items()}


def check(path: Path, want: FoldState, *, split: bool) -> None:
    by_queue = folds(path)
    live: dict[tuple[str, str, str], tuple[str, str | None]] = {}
    for fold in by_queue.values():
        for key, payload in fold.live().items():
            assert key not in live, f"{key} is live in two queues"
            live[key] = (payload["commit"]["rev"], payload["commit"].get("cid"))
    assert live == want.records
    # Every queue holds every account event when split by type: each folds alone.
    for name, fold in by_queue.items():
        if split or name == BASE:
            assert accounts(fold) == want.accounts, name
    assert {did: s.payload["identity"].get("handle") for did, s in by_queue[BASE].identities.items()} == want.handles


def check_queue_order(path: Path) -> None:
    """What the sink's own fold promises while it forgets nothing: in each queue every version of a
    record supersedes the ones queued before it, and none is as of a removal queued before it."""
    for name in folds(path):
        queue = Queue(name, path=path)
        try:
            got = queue.peek(10**6)
        finally:
            queue.close()
        kept: dict[tuple[str, str, str], tuple[str, bool, int]] = {}
        removed: dict[str, int] = {}
        for item in got:
            meta, payload = item.metadata, item.payload
            assert meta is not None
            if meta["op"] == "account":
                if meta["removal"]:
                    removed[payload["did"]] = max(removed.get(payload["did"], 0), meta["status_us"])
                continue
            if meta["op"] == "sync":
                if meta["removal"]:
                    removed[payload["did"]] = max(removed.get(payload["did"], 0), meta["removal_us"])
                continue
            if meta["op"] == "identity":
                continue
            key = (payload["did"], payload["commit"]["collection"], payload["commit"]["rkey"])
            version = (meta["rev"] or "", meta["op"] == "delete", meta["asof_us"])
            assert key not in kept or supersedes(*version, *kept[key]), (name, key, version, kept[key])
            assert meta["asof_us"] > removed.get(payload["did"], -1), (name, key, version)
            kept[key] = version


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=histories(), data=st.data())
def test_any_interleaving_over_replicas_folds_to_the_reference(events: list[Event], data: st.DataObject) -> None:
    purge = data.draw(st.booleans(), label="purge")
    split = data.draw(st.booleans(), label="split_by_type")
    state_max = data.draw(st.sampled_from(STATE_MAXES), label="state_max")
    count = data.draw(st.integers(1, 3), label="replicas")
    statuses = DEFAULT_REMOVAL_STATUSES if purge else frozenset()
    streams = split_by_topic(events)
    owners = {t: data.draw(st.integers(0, count - 1), label=f"owner of {t}") for t in sorted(streams)}
    note(describe(events))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queues.sqlite"
        replicas = Replicas(path, streams, owners, count, split=split, statuses=statuses, state_max=state_max)
        try:
            run(replicas, data)
            stored = replicas.sinks[0].load_offsets(GROUP, [(t, 0) for t in streams])
            for reason in sorted({r for sink in replicas.sinks for r in sink.skipped}):
                event(f"skipped: {reason}")  # --hypothesis-show-statistics
        finally:
            replicas.close()
        # exactly once of the offsets: every stream stored to its end
        assert {t: o.offset for (t, _), o in stored.items()} == {t: len(s) for t, s in streams.items()}
        check(path, reference_fold(events, statuses, resync=purge), split=split)
        with closing(sqlite3.connect(path)) as conn:
            for table in STATE_TABLES:
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] <= state_max, table
            items: Counter[tuple[Any, ...]] = Counter(conn.execute("SELECT queue, payload, metadata FROM items"))
        if state_max == DEFAULT_STATE_MAX:
            # nothing forgotten: no event twice in a queue, whatever was re-delivered or replayed
            assert max(items.values(), default=1) == 1
            check_queue_order(path)
