"""The control topic compacted for real: the log cleaner removes every job's old checkpoints, and
``backfill status`` and ``--resume`` still find each job's newest one.

Two Jetstream jobs checkpoint every few events into the control topic the first one created (with
``CONTROL_TOPIC_CONFIG``), altered so that a segment rolls on the first append 100 ms after it
began and any dirty ratio is worth a cleaning. Kafka never cleans the active segment: the other
job runs again after the job stops, so the job's last checkpoints are in closed segments too.
Once the cleaner has left the job its newest checkpoint only (and the lowest offsets are gone),
``load_job`` and ``backfill status`` read the job exactly as it was, and ``--resume`` continues
from that checkpoint: every event of the range is in the topics exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from producers.jetstream.decode import decode_message
from runtime.commands.cli import main
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import event_key
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import CONTROL_TOPIC_CONFIG, TopicMap
from runtime.contract.typed import event_from_datum
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState, load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.integration.eos import committed, event_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START = 1_700_000_000_000_000
EVENTS = synthetic_events(4000, seed=43, accounts=60, start_us=START, rate=1000, real_cids=False)
END = EVENTS[3500].time_us
COLLECTIONS = "app.bsky.*"
JOB = "compacted"
OTHER = "neighbour"


@pytest.fixture(scope="module")
def sim() -> Iterator[JetstreamSimulator]:
    s = JetstreamSimulator(EVENTS, rate_limit=400).start_in_thread()  # a checkpoint every few dozen events
    yield s
    s.stop_thread()


def jetstream(sim: JetstreamSimulator, kafka: KafkaSettings, job: str, *extra: str) -> int:
    return main(["jetstream", "--instance", sim.url, "--cursor", str(START), "--end-timestamp", us_to_iso(END),
                 "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                 "--topic-partitions", "3", "--job", job, "--consumer", "none", "--progress", "none",
                 "--end-idle", "1", "--checkpoint-interval", "0.05", "--kafka-config", "linger.ms=5", "-c", COLLECTIONS,
                 *extra])


def final_state(kafka: KafkaSettings, job: str, runs: int = 1) -> JobState:
    """The final checkpoint of the job's ``runs``-th run, once readable: a commit returns before the
    transaction coordinator has written its markers, and a read_committed reader sees it only after."""
    deadline = time.monotonic() + 30
    while True:
        state = load_job(kafka.consumer_config("t-reader"), TopicMap(kafka.topic_prefix).control, job, settle=0)
        if state is not None and state.status == "finished" and state.runs == runs:
            return state
        assert time.monotonic() < deadline, f"job {job}: no final checkpoint, newest {state}"
        time.sleep(0.05)


def control_records(kafka: KafkaSettings) -> list[tuple[int, JobState]]:
    """(offset, state) of every checkpoint the control topic holds now, from its beginning."""
    return [(m.offset() or 0, JobState.from_bytes(m.value() or b"")) for m in kafka_util.read_to_end(
        kafka.consumer_config("t-compaction"), TopicMap(kafka.topic_prefix).control, settle=30)]


def topic_configs(kafka: KafkaSettings, topic: str) -> dict[str, str]:
    admin = kafka_util.admin(kafka.client_config())
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def make_it_compact_now(kafka: KafkaSettings, topic: str) -> None:
    """Segments roll on the first append after 100 ms, and any dirty ratio is worth a cleaning."""
    admin = kafka_util.admin(kafka.client_config())
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("segment.ms", "100", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("min.cleanable.dirty.ratio", "0.01", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)


def committed_events_of(kafka: KafkaSettings, job: str) -> Counter[str]:
    """How many times each event ``job`` wrote is committed in the event topics."""
    return Counter(event_key(event_from_datum(name, datum))
                   for _, name, datum in committed(kafka, event_topics(kafka)) if datum["job"] == job)


def expected_events() -> Counter[str]:
    """Every event of the range the job asks for (its collections, identity and account events), once."""
    wanted = CollectionFilter([COLLECTIONS])
    return Counter(event_key(decode_message(s.text)) for s in EVENTS
                   if START <= s.time_us < END and (s.collection is None or wanted(s.collection)))


def test_compaction_removes_old_checkpoints_and_status_and_resume_use_the_newest(
        sim: JetstreamSimulator, kafka: KafkaSettings) -> None:
    control = TopicMap(kafka.topic_prefix).control
    conf = kafka.consumer_config("t-reader")

    # The first job creates the control topic the way every producer does.
    assert jetstream(sim, kafka, OTHER, "-n", "200", "--checkpoint-every", "10") == 0
    configs = topic_configs(kafka, control)
    assert {k: configs[k] for k in CONTROL_TOPIC_CONFIG} == CONTROL_TOPIC_CONFIG
    make_it_compact_now(kafka, control)

    # The job stops at its record limit after many checkpoints; its newest is what resumes.
    assert jetstream(sim, kafka, JOB, "-n", "1500", "--checkpoint-every", "25") == 0
    newest = final_state(kafka, JOB)
    assert newest.counts["records"] == 1500 and newest.checkpoint >= 10
    # The neighbour's next run appends after it, so none of the job's checkpoints is left in the
    # active segment, which Kafka never cleans.
    assert jetstream(sim, kafka, OTHER, "--resume", "-n", "100", "--checkpoint-every", "10") == 0
    neighbour = final_state(kafka, OTHER, runs=2)
    written = newest.checkpoint + neighbour.checkpoint  # each job numbers its checkpoints from 1

    # The cleaner runs in the broker: wait until it removed the old checkpoints.
    deadline = time.monotonic() + 90
    while True:
        records = control_records(kafka)
        kept = {job: sorted(s.checkpoint for _, s in records if s.job == job) for job in (JOB, OTHER)}
        if records[0][0] > 0 and kept[JOB] == [newest.checkpoint] and 1 not in kept[OTHER]:
            break
        assert time.monotonic() < deadline, (
            f"the log cleaner did not compact {control}: {len(records)} of {written} checkpoints left, "
            f"first offset {records[0][0]}, checkpoints kept {kept}")
        time.sleep(0.5)
    assert len(records) < written / 2
    assert kept[OTHER][-1] == neighbour.checkpoint

    # Both readers of the control topic see each job exactly as it was before the cleaning.
    assert load_job(conf, control, JOB) == newest
    assert load_job(conf, control, OTHER) == neighbour
    status = subprocess.run(
        [sys.executable, "-m", "runtime", "status", "--json", "--bootstrap-servers", kafka.bootstrap_servers,
         "--topic-prefix", kafka.topic_prefix], capture_output=True, text=True, cwd=ROOT, timeout=90, check=False)
    assert status.returncode == 0, status.stderr[-3000:]
    jobs = {j["job"]: j for j in json.loads(status.stdout)["jobs"]}
    assert set(jobs) == {JOB, OTHER}
    shown = jobs[JOB]
    assert (shown["status"], shown["checkpoint"], shown["cursor"], shown["counts"], shown["runs"]) == (
        newest.status, newest.checkpoint, newest.cursor, newest.counts, 1)
    assert shown["written"] == sum(sum(p.values()) for p in newest.offsets.values())
    assert jobs[OTHER]["checkpoint"] == neighbour.checkpoint

    # --resume continues from the newest checkpoint: the range ends up in the topics exactly once.
    assert jetstream(sim, kafka, JOB, "--resume", "-n", "0", "--checkpoint-every", "100") == 0
    final = final_state(kafka, JOB, runs=2)
    assert final.stop_reason == "end_cursor_reached" and final.checkpoint > newest.checkpoint
    got = committed_events_of(kafka, JOB)
    want = expected_events()
    assert max(want.values()) == 1
    missing, extra = want - got, got - want
    assert not missing and not extra, f"{len(missing)} events missing, {len(extra)} extra or twice: " \
        f"{list(missing)[:2]} {list(extra)[:2]}"
