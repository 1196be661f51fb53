"""Flags, environment, defaults and usage errors of the spine's commands (nothing connects)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from producers.jetstream import app
from producers.jetstream.source import PUBLIC_INSTANCES, instance_url
from runtime.commands.cli import build_parser, main
from runtime.contract.created_at import Outcome, OutOfRange, TimestampPolicy, parse_created_at
from runtime.contract.nsid import CollectionFilter, validate_pattern
from runtime.contract.timeparse import parse_timestamp, timestamp_us, us_to_date
from runtime.errors import ConfigError, CursorRegressionError
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KAFKA_OPTIONS, KafkaSettings
from runtime.process.options import Opt, Secret, add_options, redact_url, redacted


def parse(args: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, app.JETSTREAM_OPTIONS, env or {})
    add_options(parser, KAFKA_OPTIONS, env or {})
    from runtime.process.options import OBSERVABILITY_OPTIONS

    add_options(parser, OBSERVABILITY_OPTIONS, env or {})
    ns = parser.parse_args(args)
    from runtime.process.options import resolve_appends

    resolve_appends(ns, app.JETSTREAM_OPTIONS, env or {})
    return ns


def test_seed_defaults() -> None:
    s = app.settings_from_namespace(parse([]))
    assert s.collections == ["app.bsky.feed.post"]
    assert s.num_records == 10000 and s.max_time == 900 and s.queue_name == "jetstream_sync"
    assert s.batch_size == 100 and s.compress is False and s.dids == [] and s.start_us is None
    assert s.instances == [instance_url(i) for i in PUBLIC_INSTANCES]


def test_seed_short_flags() -> None:
    s = app.settings_from_namespace(parse(
        ["-c", "app.bsky.feed.like", "-c", "app.bsky.graph.*", "-n", "5000", "-s", "2024-01-01",
         "-e", "2024-01-07-12:30:00", "-d", "did:plc:a,did:plc:b", "-i", "jetstream2.us-west", "-t", "60"]))
    assert s.collections == ["app.bsky.feed.like", "app.bsky.graph.*"]
    assert s.num_records == 5000 and s.max_time == 60
    assert s.start_us == timestamp_us("2024-01-01") and s.end_us == timestamp_us("2024-01-07T12:30:00Z")
    assert s.dids == ["did:plc:a", "did:plc:b"]
    assert s.instances == ["wss://jetstream2.us-west.bsky.network/subscribe"]


def test_flags_override_env_and_env_overrides_defaults() -> None:
    env = {"BACKFILL_NUM_RECORDS": "42", "BACKFILL_WANTED_COLLECTIONS": "app.bsky.feed.like,app.bsky.feed.repost",
           "BACKFILL_COMPRESS": "true", "KAFKA_BOOTSTRAP_SERVERS": "k:9092"}
    ns = parse([], env)
    assert ns.num_records == 42 and ns.compress is True and ns.bootstrap_servers == "k:9092"
    assert ns.wanted_collections == ["app.bsky.feed.like", "app.bsky.feed.repost"]
    ns = parse(["-n", "7", "-c", "app.bsky.graph.follow"], env)
    assert ns.num_records == 7 and ns.wanted_collections == ["app.bsky.graph.follow"]


def test_bad_env_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="BACKFILL_NUM_RECORDS"):
        parse([], {"BACKFILL_NUM_RECORDS": "lots"})


def test_help_names_the_env_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["jetstream", "--help"])
    out = capsys.readouterr().out
    for env in ("BACKFILL_NUM_RECORDS", "KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", "BACKFILL_END_TIMESTAMP"):
        assert env in out


@pytest.mark.parametrize("value", ["2024-13-01", "yesterday", "2024-01-01T25:00", "01/02/2024"])
def test_malformed_timestamps_are_usage_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["jetstream", "-s", value, "--bootstrap-servers", "127.0.0.1:1"])
    assert code == 2
    assert "invalid timestamp" in capsys.readouterr().err


def test_timestamp_forms() -> None:
    assert parse_timestamp("2024-01-02").isoformat() == "2024-01-02T00:00:00+00:00"
    assert parse_timestamp("2024-01-02-03:04:05").isoformat() == "2024-01-02T03:04:05+00:00"
    assert parse_timestamp("2024-01-02T03:04:05Z") == parse_timestamp("2024-01-02T05:04:05+02:00")
    assert us_to_date(timestamp_us("2024-05-06-23:59:59")) == "2024-05-06"


def test_start_cursor_precedence() -> None:
    now = lambda: 1_000_000.0  # noqa: E731
    assert app.start_cursor(5, "2024-01-01", 3, now) == 5
    assert app.start_cursor(None, "2024-01-01", 3, now) == timestamp_us("2024-01-01")
    assert app.start_cursor(None, None, 1, now) == 1_000_000_000_000 - 86_400_000_000
    assert app.start_cursor(None, None, -1, now) == 1
    assert app.start_cursor(None, None, 0, now) is None
    with pytest.raises(ConfigError):
        app.start_cursor(None, None, -2, now)


def test_end_before_start_is_rejected() -> None:
    with pytest.raises(ConfigError):
        app.settings_from_namespace(parse(["-s", "2024-01-02", "-e", "2024-01-01"]))


def test_dids_from_file(tmp_path: Path) -> None:
    f = tmp_path / "dids.txt"
    f.write_text("did:plc:a\n# comment\n\ndid:web:example.com\n")
    assert app.settings_from_namespace(parse(["-d", f"@{f}"])).dids == ["did:plc:a", "did:web:example.com"]
    with pytest.raises(ConfigError):
        app.settings_from_namespace(parse(["-d", "notadid"]))
    with pytest.raises(ConfigError):
        app.settings_from_namespace(parse(["-d", f"@{tmp_path / 'missing'}"]))


def test_instance_forms() -> None:
    assert instance_url("jetstream1.us-east") == "wss://jetstream1.us-east.bsky.network/subscribe"
    assert instance_url("ws://127.0.0.1:6008") == "ws://127.0.0.1:6008/subscribe"
    assert instance_url("wss://js.example.com/subscribe?x=1") == "wss://js.example.com/subscribe"
    assert instance_url("js.example.com") == "wss://js.example.com/subscribe"
    # a v2 instance is often named by its HTTP root
    assert instance_url("http://127.0.0.1:6008") == "ws://127.0.0.1:6008/subscribe"
    assert instance_url("https://js.example.com") == "wss://js.example.com/subscribe"
    with pytest.raises(ConfigError):
        instance_url("ftp://x")


def test_collection_patterns() -> None:
    f = CollectionFilter(["app.bsky.feed.*", "app.bsky.graph.follow"])
    assert f("app.bsky.feed.like") and f("app.bsky.graph.follow")
    assert not f("app.bsky.graph.block") and not f("app.bsky.feedx")
    assert CollectionFilter([])("anything.at.all")
    for bad in ("app", "app.*.post", "app.bsky.feed.*.x", "app bsky"):
        with pytest.raises(ConfigError):
            validate_pattern(bad)


def test_secrets_never_print() -> None:
    s = KafkaSettings(bootstrap_servers="k:9092", sasl_username="u", sasl_password=Secret("hunter2"),
                      schema_registry_url="https://user:pw@registry.test")
    text = repr(redacted(s)) + repr(s) + str(s.sasl_password)
    assert "hunter2" not in text and ":pw@" not in text
    assert s.producer_config()["sasl.password"] == "hunter2"
    assert redact_url("postgresql://a:b@h/db") == "postgresql://a:**********@h/db"


def test_option_help_includes_env() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, (Opt(("--x",), "x", "X_ENV", 3, "an x", type=int),), {})
    assert "[env: X_ENV]" in parser.format_help()


def test_created_at_policy() -> None:
    start, end = parse_timestamp("2024-09-27"), parse_timestamp("2024-12-02")
    keep = TimestampPolicy(start, end, OutOfRange.KEEP)
    drop = TimestampPolicy(start, end, OutOfRange.DROP)
    std = TimestampPolicy(start, end, OutOfRange.STANDARDIZE)
    assert keep.apply("2024-10-01T00:00:00Z")[0] is Outcome.IN_RANGE
    assert keep.apply("2023-05-20T10:00:00Z") == (Outcome.KEPT, parse_created_at("2023-05-20T10:00:00Z"))
    assert drop.apply("2023-05-20T10:00:00Z") == (Outcome.DROPPED, None)
    assert std.apply("2023-05-20T10:00:00Z") == (Outcome.STANDARDIZED, parse_timestamp("2023-05-15"))
    assert std.apply("2023-05-03T10:00:00Z") == (Outcome.STANDARDIZED, parse_timestamp("2023-05-01"))
    assert std.apply("garbage") == (Outcome.STANDARDIZED, parse_timestamp("2024-09-15"))
    assert TimestampPolicy().apply("nope") == (Outcome.KEPT, None)
    with pytest.raises(ConfigError):
        TimestampPolicy(end, start)


def test_checkpoint_states_only_move_forward() -> None:
    a = JobState(job="j", source="jetstream", cursor=10, checkpoint=3)
    b = JobState(job="j", source="jetstream", cursor=9, checkpoint=4)
    with pytest.raises(CursorRegressionError):
        b.check_forward(a)
    c = JobState(job="j", source="jetstream", cursor=11, checkpoint=3)
    with pytest.raises(CursorRegressionError):
        c.check_forward(a)
    JobState(job="j", source="jetstream", cursor=11, checkpoint=4).check_forward(a)
    a.merge_offsets({("t", 0): 5, ("t", 1): 1})
    a.merge_offsets({("t", 0): 3})
    assert a.offsets == {"t": {"0": 6, "1": 2}}
    assert JobState.from_bytes(a.to_bytes()) == a


def test_unresolvable_handle_is_a_clear_error(caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.ERROR)
    code = main(["jetstream", "-u", "not a handle", "--bootstrap-servers", "127.0.0.1:1"])
    assert code == 2
    assert "not a valid handle" in capsys.readouterr().err


def test_kafka_config_reaches_every_client_over_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    ns = parse(["--bootstrap-servers", "k:9092", "--kafka-config", "linger.ms=5",
                "--kafka-config", "ssl.key.password=hunter2"])
    s = KafkaSettings.from_namespace(ns)
    assert s.extra == {"linger.ms": "5", "ssl.key.password": "hunter2"}
    producer = s.producer_config(transactional_id="t", on_delivery=print)
    assert producer["linger.ms"] == "5" and producer["transactional.id"] == "t"
    assert s.consumer_config("g")["ssl.key.password"] == "hunter2"
    assert s.consumer_config("g")["group.id"] == "g"  # what the code sets itself is not overridden
    assert "hunter2" not in repr(redacted(s)) + repr(s)
    from runtime.process.options import redacted_namespace

    assert "hunter2" not in repr(redacted_namespace(ns))
    # from the environment, comma-separated, also when the caller did not resolve append options
    monkeypatch.setenv("BACKFILL_KAFKA_CONFIG", "linger.ms=7,compression.type=lz4")
    plain = argparse.ArgumentParser()
    add_options(plain, KAFKA_OPTIONS)
    env_s = KafkaSettings.from_namespace(plain.parse_args(["--bootstrap-servers", "k:9092"]))
    assert env_s.producer_config()["linger.ms"] == "7"
    assert env_s.producer_config()["compression.type"] == "lz4"
    # a value that is itself a list (librdkafka's debug contexts) keeps its commas
    monkeypatch.setenv("BACKFILL_KAFKA_CONFIG", "debug=cgrp,fetch, linger.ms=9")
    env_s = KafkaSettings.from_namespace(plain.parse_args(["--bootstrap-servers", "k:9092"]))
    assert env_s.extra == {"debug": "cgrp,fetch", "linger.ms": "9"}
    with pytest.raises(ConfigError):
        KafkaSettings.from_namespace(parse(["--kafka-config", "linger.ms"]))


def test_group_protocol_decides_the_consumer_settings() -> None:
    classic = KafkaSettings.from_namespace(parse(["--bootstrap-servers", "k:9092"]))
    conf = classic.consumer_config("g")
    assert conf["group.protocol"] == "classic"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["heartbeat.interval.ms"] == 500
    assert "session.timeout.ms" not in conf, "Kafka's default session timeout (45 s)"
    assert classic.consumer_config("g", **{"session.timeout.ms": 6000})["session.timeout.ms"] == 6000

    consumer = KafkaSettings.from_namespace(parse([], {"KAFKA_BOOTSTRAP_SERVERS": "k:9092",
                                                       "BACKFILL_GROUP_PROTOCOL": "consumer"}))
    assert consumer.group_protocol == "consumer"
    conf = consumer.consumer_config("g")
    assert conf["group.protocol"] == "consumer"
    assert not {"session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"} & set(conf)
    with pytest.raises(ConfigError, match=r"group\.consumer\.session\.timeout\.ms"):
        KafkaSettings.from_namespace(parse(["--bootstrap-servers", "k:9092", "--group-protocol", "consumer",
                                            "--kafka-config", "session.timeout.ms=10000"])).consumer_config("g")
    with pytest.raises(SystemExit):
        parse(["--group-protocol", "eager"])


def test_the_embedded_broker_gets_short_group_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.kafka import broker

    monkeypatch.setattr(broker, "_EMBEDDED", {"127.0.0.1:1234"})
    embedded = KafkaSettings(bootstrap_servers="127.0.0.1:1234")
    assert embedded.consumer_config("g")["session.timeout.ms"] == 6000
    assert "session.timeout.ms" not in KafkaSettings(bootstrap_servers="127.0.0.1:1235").consumer_config("g")
    custom = KafkaSettings(bootstrap_servers="127.0.0.1:1234", extra={"session.timeout.ms": "9000"})
    assert custom.consumer_config("g")["session.timeout.ms"] == "9000"


def test_client_buffers_are_bounded_and_librdkafka_accepts_them() -> None:
    """The producers' local queue and the consumers' fetch responses (issue 16: memory), with an
    operator's larger message.max.bytes raising the fetch size librdkafka would otherwise refuse."""
    from confluent_kafka import Consumer, Producer

    from runtime.kafka.settings import CONSUMER_FETCH_MAX_BYTES, PRODUCER_QUEUE_KBYTES, PRODUCER_QUEUE_MESSAGES

    plain = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    p = plain.producer_config()
    assert (p["queue.buffering.max.kbytes"], p["queue.buffering.max.messages"]) == (
        PRODUCER_QUEUE_KBYTES, PRODUCER_QUEUE_MESSAGES)
    assert plain.consumer_config("g")["fetch.max.bytes"] == CONSUMER_FETCH_MAX_BYTES
    # bounded prefetch with librdkafka's 1 s fetch backoff starves the consumers (bench_postgres)
    assert plain.consumer_config("g")["fetch.queue.backoff.ms"] <= 50
    big = KafkaSettings(bootstrap_servers="127.0.0.1:1", extra={"message.max.bytes": "20000000"})
    assert big.consumer_config("g")["fetch.max.bytes"] == 20_000_000
    own = KafkaSettings(bootstrap_servers="127.0.0.1:1", extra={"fetch.max.bytes": "1048576"})
    assert own.consumer_config("g")["fetch.max.bytes"] == "1048576"  # the operator's value stands
    for settings in (plain, big):
        Consumer(settings.consumer_config("g")).close()
        Producer(settings.producer_config()).flush(0)
