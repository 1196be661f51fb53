"""The queue companion on the real broker: started beside a producer job, finished at the job's final
offsets, it stores every wanted record event once and reports what the seed's statistics print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.queue import Queue
from producers.companion import Companion, CompanionFactory
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import RecordEvent, event_key, to_jetstream_json
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.plugins import COMPANIONS, load
from tests.integration.pg_pipeline import make_events, produce

pytestmark = pytest.mark.integration

WANTED = ["app.bsky.feed.*"]


def _canon(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def _companion(path: Path, name: str) -> Companion:
    factory: CompanionFactory = load(COMPANIONS, "queue")
    return factory(queue_name=name, queue_path=path, collections=WANTED, batch_size=50)


def test_the_companion_consumes_up_to_the_final_offsets(kafka: KafkaSettings, tmp_path: Path) -> None:
    events = make_events(600, seed=5, job="companion")
    companion = _companion(tmp_path / "q.sqlite", "cq")
    companion.start(kafka, Metrics())
    try:
        offsets = produce(kafka, events, "companion")
        companion.finish(offsets)
        stored, length = companion.stored, companion.queue_length()
    finally:
        companion.close()
    wanted = CollectionFilter(WANTED)
    expected = {event_key(e) for e in events if isinstance(e, RecordEvent) and wanted(e.collection)}
    assert expected
    assert stored == length == len(expected)
    queue = Queue("cq", path=tmp_path / "q.sqlite")
    try:
        payloads = [item.payload for item in queue.peek(10_000)]
    finally:
        queue.close()
    by_key = {event_key(e): to_jetstream_json(e) for e in events}
    assert sorted(map(_canon, payloads)) == sorted(_canon(by_key[k]) for k in expected)


def test_an_aborted_companion_stops_without_reaching_any_offsets(kafka: KafkaSettings, tmp_path: Path) -> None:
    companion = _companion(tmp_path / "q.sqlite", "aborted")
    companion.start(kafka, Metrics())
    companion.abort()
    companion.finish({"never.reached": {"0": 10**9}})  # returns once the aborted thread ended
    assert companion.stored == companion.queue_length() == 0
    companion.close()
