"""What ``--until-done JOB`` makes of checkpoints that do not say where a job's data ends.

* a finished job that produced events but records no offsets (what a sharded firehose job wrote
  before its coordinator carried its workers' offsets) is never taken as consumed;
* a DID work topic's replica progress (``<job>@<replica>``, no offsets, "finished" when one replica
  went idle) is refused with a clear error, asked for by the replica's name or by the job's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumers.base import ConsumerOptions, ConsumerStats, GroupConsumer
from consumers.queue import QueueSink
from runtime.contract.codec import AvroCodec
from runtime.contract.topics import CONTROL_TOPIC_CONFIG, TopicMap
from runtime.errors import ConfigError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import FINISHED, JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics

pytestmark = pytest.mark.integration


def write_states(kafka: KafkaSettings, *states: JobState) -> None:
    """Checkpoints into the control topic, as their writers put them there."""
    topics = TopicMap(kafka.topic_prefix)
    admin = kafka_util.admin(kafka.client_config())
    kafka_util.ensure_topics(admin, [topics.control], partitions=1, replication=kafka.topic_replication,
                             config=CONTROL_TOPIC_CONFIG)
    # a data topic, so the consumer subscribes and its idle exit bounds the wait
    kafka_util.ensure_topics(admin, [f"{kafka.topic_prefix}.app.bsky.feed.post"], partitions=1,
                             replication=kafka.topic_replication)
    producer = Producer(kafka.producer_config())
    for st in states:
        producer.produce(topics.control, st.to_bytes(), st.job.encode())
    assert producer.flush(30) == 0


def consume(kafka: KafkaSettings, tmp_path: Path, job: str) -> ConsumerStats:
    sink = QueueSink("q", tmp_path / "q.sqlite")
    options = ConsumerOptions(group=f"{kafka.topic_prefix}-until", until_done=job, linger=0.1, idle_exit=4.0)
    try:
        return GroupConsumer(kafka, sink, options, Metrics(), AvroCodec()).run()
    finally:
        sink.close()


def replica(name: str) -> JobState:
    """A work-topic replica's progress record as ``producers/repos/worktopic.py`` writes it when idle."""
    return JobState(job=f"repos@{name}", source="repo", status=FINISHED, stop_reason="idle",
                    filters={"mode": "work-topic", "group": "g", "topic": "t"},
                    position={"work_offsets": {"0": 12}}, cursor=6, counts={"dids": 6, "records": 90},
                    checkpoint=1)


def test_a_finished_job_with_events_but_no_offsets_is_not_taken_as_consumed(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    write_states(kafka, JobState(job="old-sharded", source="firehose", status=FINISHED,
                                 counts={"produced": 120, "records": 118}, checkpoint=3))
    assert consume(kafka, tmp_path, "old-sharded").stop_reason == "idle"


def test_until_done_refuses_a_work_topic_replica_and_its_job(kafka: KafkaSettings, tmp_path: Path) -> None:
    write_states(kafka, replica("r1"), replica("r2"))
    with pytest.raises(ConfigError, match=r"--until-done repos@r1: repos@r1: replica progress of a DID work topic"):
        consume(kafka, tmp_path, "repos@r1")
    with pytest.raises(ConfigError, match=r"--until-done repos: repos@r1, repos@r2: replica progress"):
        consume(kafka, tmp_path, "repos")
