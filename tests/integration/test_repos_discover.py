"""``backfill discover-dids``: authors whose posts were liked/reposted/replied to, minus those done."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer

from consumers.postgres.schema import migrate
from producers.repos.discover import discover
from producers.repos.source import RepoResult
from producers.repos.worktopic import parse_work_value
from runtime.contract.codec import AvroCodec
from runtime.contract.topics import TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
A, B, C, D, E, F, G = (f"did:plc:{c * 24}" for c in "abcdefg")


def _post_uri(did: str, rkey: str = "3k") -> str:
    return f"at://{did}/app.bsky.feed.post/{rkey}"


def _fill(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, schema)
        env = "rev, record, source, cursor, time_us, job"
        vals = "'3l', '{}'::jsonb, 'repo', 0, 0, 'j'"
        conn.execute(f'INSERT INTO "{schema}".actors (did) VALUES (%s)', (A,))
        conn.execute(f'INSERT INTO "{schema}".likes (did, rkey, {env}, subject_uri, subject_did) '
                     f"VALUES (%s, '1', {vals}, %s, %s), (%s, '2', {vals}, %s, %s)",
                     (A, _post_uri(B), B, A, f"at://{G}/app.bsky.feed.generator/x", G))
        conn.execute(f'INSERT INTO "{schema}".reposts (did, rkey, {env}, subject_uri, subject_did) '
                     f"VALUES (%s, '1', {vals}, %s, %s)", (A, _post_uri(C), C))
        conn.execute(f'INSERT INTO "{schema}".posts (did, rkey, {env}, record_type, reply_parent_uri, '
                     f"reply_root_uri, quote_uri) VALUES (%s, '1', {vals}, 'reply', %s, %s, NULL), "
                     f"(%s, '2', {vals}, 'quote', NULL, NULL, %s)",
                     (A, _post_uri(D), _post_uri(E), A, _post_uri(F)))


def _mark_done(kafka: KafkaSettings, did: str) -> None:
    topics = TopicMap(kafka.topic_prefix)
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [topics.repo_status], partitions=3,
                             replication=1)
    datum = RepoResult(did=did, cursor=0, outcome="ok").status_datum("repos", 1)
    producer = Producer(kafka.producer_config())
    producer.produce(topics.repo_status, AvroCodec().encode("repo_status", topics.repo_status, datum), did.encode())
    assert producer.flush(10) == 0


def _enqueued(kafka: KafkaSettings) -> list[str]:
    conf = kafka.consumer_config("discover-test-reader")
    return [parse_work_value(m.key(), m.value())
            for m in kafka_util.read_to_end(conf, TopicMap(kafka.topic_prefix).dids, settle=30)]


def test_discover_enqueues_referenced_authors_not_yet_done(pg_url: str, kafka: KafkaSettings) -> None:
    schema = f"s_{kafka.topic_prefix}"
    _fill(pg_url, schema)
    _mark_done(kafka, C)
    result = discover(pg_url, schema, ["likes", "reposts", "replies"], kafka, job="repos")
    assert result.referenced == 4  # B (liked), C (reposted), D and E (replied to); not G's feed
    assert result.already_done == 1
    assert result.enqueued == 3
    assert sorted(_enqueued(kafka)) == [B, D, E]
    out = io.StringIO()
    dry = discover(pg_url, schema, ["quotes"], kafka, job="repos", dry_run=True, out=out)
    assert out.getvalue().split() == [F]
    assert dry.enqueued == 0


def test_discover_cli_refuses_missing_tables(pg_url: str, kafka: KafkaSettings) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime", "discover-dids", "--database-url", pg_url, "--db-schema",
         "no_such_schema", "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "tables are missing" in proc.stderr
