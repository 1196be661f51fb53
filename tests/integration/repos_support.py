"""Helpers shared by the repo-backfill integration tests (no tests here): read the topics back."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent
from runtime.contract.topics import TopicMap
from runtime.contract.typed import event_from_datum
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.pds import PdsNetwork


@dataclass
class Backfilled:
    """Everything the producers wrote under one prefix."""

    events: list[RecordEvent] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)

    def keys(self) -> Counter[tuple[str, str, str]]:
        """(did, collection/rkey, cid) -> how many times it was produced."""
        return Counter((e.did, f"{e.collection}/{e.rkey}", e.cid or "") for e in self.events)

    def status_by_did(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for s in self.statuses:
            out.setdefault(s["did"], []).append(s)
        return out


def read_back(kafka: KafkaSettings, *, max_wait: float = 60.0, isolation: str = "read_committed") -> Backfilled:
    """Decode every data topic, the repo_status topic and the dead letters of ``kafka.topic_prefix``.

    One consumer reads every partition of them to its end (read_committed unless ``isolation``).
    """
    topics = TopicMap(kafka.topic_prefix)
    codec = AvroCodec()
    admin = kafka_util.admin(kafka.client_config())
    md = admin.list_topics(timeout=10).topics
    wanted = [name for name in sorted(md) if name.startswith(kafka.topic_prefix + ".")
              and (topics.collection_of(name) is not None or name in (topics.repo_status, topics.dead_letters))]
    conf = {**kafka.consumer_config("repos-test-reader"), "enable.partition.eof": True, "fetch.wait.max.ms": 20,
            "isolation.level": isolation}
    consumer = Consumer(conf)
    parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in wanted for p in md[t].partitions]
    consumer.assign(parts)
    pending = {(tp.topic, tp.partition) for tp in parts}
    out = Backfilled()
    deadline = time.monotonic() + max_wait
    try:
        while pending:
            assert time.monotonic() < deadline, f"topics not read to their end: {sorted(pending)[:5]}"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                pending.discard((msg.topic() or "", msg.partition() or 0))
                continue
            value = msg.value()
            assert value is not None
            schema, datum = codec.decode(value)
            name = msg.topic()
            if name == topics.repo_status:
                out.statuses.append(datum)
            elif name == topics.dead_letters:
                out.dead.append(datum)
            else:
                event = event_from_datum(schema, datum)
                assert isinstance(event, RecordEvent)
                out.events.append(event)
    finally:
        consumer.close()
    return out


def expected_keys(net: PdsNetwork, dids: list[str] | None = None) -> Counter[tuple[str, str, str]]:
    """What backfilling every active account of ``net`` (or of ``dids``) must produce, once each."""
    want: Counter[tuple[str, str, str]] = Counter()
    for did in dids if dids is not None else net.dids:
        acct = net.accounts[did]
        if acct.state != "active":
            continue
        for path, cid in acct.record_cids.items():
            want[(did, path, cid)] += 1
    return want


def assert_same_keys(got: Counter[tuple[str, str, str]], want: Counter[tuple[str, str, str]],
                     kafka: KafkaSettings | None = None) -> None:
    """``got == want``, failing with the few keys that differ (a Counter's full diff is unreadable).

    With ``kafka``, a failure also says whether the missing records are in the topics uncommitted
    (the broker never committed their transaction) or not there at all.
    """
    missing, extra = want - got, got - want
    if missing and kafka is not None:
        uncommitted = read_back(kafka, isolation="read_uncommitted").keys()
        found = sorted(k for k in missing if uncommitted[k])
        lost = sorted(k for k in missing if not uncommitted[k])
        raise AssertionError(f"missing {len(missing)}: present but uncommitted {found[:10]}; absent {lost[:10]}; "
                             f"extra {sorted(extra.items())[:10]}")
    assert not missing and not extra, f"missing {sorted(missing.items())[:10]}, extra {sorted(extra.items())[:10]}"


def assert_limits_kept(net: PdsNetwork) -> None:
    """No host ever answered 429 because a client exceeded its limit, and no window held more."""
    assert net.total_over_limit() == 0
    for h in net.hosts:
        if h.faults.rate_limit:
            assert max(h.stats.windows.values(), default=0) <= h.faults.rate_limit


def poison(net: PdsNetwork, did: str) -> str:
    """Rebuild ``did``'s repository with one more record whose typed fields are wrong (a like whose
    subject is a string): it decodes, but the producer must refuse and dead-letter it. Returns its path."""
    from runtime.atproto.repo import build_repo_blocks
    from runtime.atproto.tid import make_tid

    acct = net.accounts[did]
    # Simple records of a collection without a typed schema, plus the bad like.
    records: dict[str, Any] = {f"com.example.note/{make_tid(1_720_000_000_000_000 + i)}":
                               {"$type": "com.example.note", "n": i} for i in range(5)}
    bad = f"app.bsky.feed.like/{make_tid(1_730_000_000_000_000)}"
    records[bad] = {"$type": "app.bsky.feed.like", "subject": "not a strong ref", "createdAt": "2024-10-01T00:00:00Z"}
    built = build_repo_blocks(did, acct.key, records, acct.rev)
    acct.car = built.to_car()
    acct.head = str(built.commit_cid)
    acct.record_cids = {p: str(c) for p, c in built.record_cids.items()}
    return bad
