"""Kafka client settings shared by every process: bootstrap, security, schema registry, group protocol."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

from runtime.errors import ConfigError
from runtime.kafka.broker import embedded_group_timing
from runtime.process.options import Opt, Secret, env_default, parse_secret, redacted

# --------------------------------------------------------------------------------------------
# Kafka settings shared by every process.

#: Consumer-group protocols: Kafka's classic group protocol and KIP-848's consumer protocol (Kafka 4).
GROUP_PROTOCOLS: Final = ("classic", "consumer")

#: Client settings the consumer protocol takes from the broker (librdkafka refuses them there).
CLASSIC_ONLY: Final = {
    "session.timeout.ms": "group.consumer.session.timeout.ms",
    "heartbeat.interval.ms": "group.consumer.heartbeat.interval.ms",
    "partition.assignment.strategy": "group.remote.assignor (client) or group.consumer.assignors (broker)",
}

#: Seconds to read the control topic to its end (``--control-timeout``).
DEFAULT_CONTROL_TIMEOUT: Final = 30.0

KAFKA_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--bootstrap-servers",), "bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", "auto",
        "Kafka bootstrap servers; 'embedded' starts a local in-memory broker (Tansu); 'auto' uses "
        "localhost:9092 when something listens there, else the embedded broker"),
    Opt(("--schema-registry-url",), "schema_registry_url", "SCHEMA_REGISTRY_URL", None,
        "Confluent Schema Registry URL; when set, messages use the registry wire format, otherwise "
        "Avro single-object encoding against the schemas shipped in schemas/"),
    Opt(("--schema-registry-auth",), "schema_registry_auth", "SCHEMA_REGISTRY_BASIC_AUTH", None,
        "registry basic auth as USER:PASSWORD", type=parse_secret, metavar="USER:PASSWORD"),
    Opt(("--topic-prefix",), "topic_prefix", "BACKFILL_TOPIC_PREFIX", "atproto",
        "prefix of every topic: <prefix>.<collection>"),
    Opt(("--topic-partitions",), "topic_partitions", "BACKFILL_TOPIC_PARTITIONS", 6,
        "partitions of topics this process creates", type=int),
    Opt(("--topic-replication",), "topic_replication", "BACKFILL_TOPIC_REPLICATION", 1,
        "replication factor of topics this process creates", type=int),
    Opt(("--security-protocol",), "security_protocol", "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
        "Kafka security.protocol", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")),
    Opt(("--sasl-mechanism",), "sasl_mechanism", "KAFKA_SASL_MECHANISM", None,
        "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"),
    Opt(("--sasl-username",), "sasl_username", "KAFKA_SASL_USERNAME", None, "SASL username"),
    Opt(("--sasl-password",), "sasl_password", "KAFKA_SASL_PASSWORD", None, "SASL password",
        type=parse_secret),
    Opt(("--ssl-ca-location",), "ssl_ca_location", "KAFKA_SSL_CA_LOCATION", None,
        "CA certificate file for SSL"),
    Opt(("--group-protocol",), "group_protocol", "BACKFILL_GROUP_PROTOCOL", "classic",
        "consumer-group protocol of this process's group members (the consumers, the repos work-topic "
        "replicas): classic (the client sets the session timeout, cooperative-sticky assignment) or "
        "consumer (Kafka 4's KIP-848 protocol: the broker assigns partitions and sets the session "
        "timeout and heartbeat, group.consumer.* broker settings)", choices=GROUP_PROTOCOLS),
    Opt(("--control-timeout",), "control_timeout", "BACKFILL_CONTROL_TIMEOUT", DEFAULT_CONTROL_TIMEOUT,
        "seconds to read the control topic (job checkpoints) to its end: a producer's previous "
        "checkpoint (--resume), an --until-done consumer's job, status; a read that cannot finish in "
        "time fails loudly, never taken for 'no checkpoint'", type=float),
    Opt(("--kafka-config",), "kafka_config", "BACKFILL_KAFKA_CONFIG", [],
        "a librdkafka setting KEY=VALUE for every Kafka client of this process, over the defaults "
        "(repeatable; in the env, comma-separated), e.g. linger.ms=20 or debug=cgrp,fetch", type=None,
        action="append", metavar="KEY=VALUE", separator=r",(?=\s*[A-Za-z0-9_.]+=)"),
)


#: The transactional producers' ``transaction.timeout.ms`` unless ``--kafka-config`` sets it: the
#: broker aborts a transaction open longer (a dead producer's, so its partitions do not stay blocked
#: for read_committed readers). Resumes wait a little longer for open transactions
#: (``runtime.kafka.checkpoint.RESUME_SETTLE``).
TRANSACTION_TIMEOUT_MS: Final = 60000
#: The producers' local queue (librdkafka's ``queue.buffering.max.*``; ``--kafka-config`` overrides).
PRODUCER_QUEUE_MESSAGES: Final = 100_000
PRODUCER_QUEUE_KBYTES: Final = 32 * 1024
#: The consumers' largest fetch response (librdkafka's ``fetch.max.bytes``, default 50 MB).
CONSUMER_FETCH_MAX_BYTES: Final = 2 * 1024 * 1024


def parse_kafka_config(items: Sequence[str] | None) -> dict[str, str]:
    """``["linger.ms=20", ...]`` as a dict.

    Raises:
        ConfigError: an item is not ``KEY=VALUE``.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kafka-config wants KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach Kafka and the schema registry, and how topics are named and created."""

    bootstrap_servers: str = "auto"
    schema_registry_url: str | None = None
    schema_registry_auth: Secret | None = None
    topic_prefix: str = "atproto"
    topic_partitions: int = 6
    topic_replication: int = 1
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_ca_location: str | None = None
    group_protocol: str = "classic"
    control_timeout: float = DEFAULT_CONTROL_TIMEOUT
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"KafkaSettings({redacted(self)})"

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> KafkaSettings:
        """Build from a namespace parsed with :data:`KAFKA_OPTIONS`.

        Raises:
            ConfigError: a malformed value.
        """
        values = {o.dest: getattr(ns, o.dest, o.default) for o in KAFKA_OPTIONS}
        if not values["control_timeout"] > 0:
            raise ConfigError(f"--control-timeout must be positive, not {values['control_timeout']}")
        items = values.pop("kafka_config")
        if items is None:  # the append option was not resolved by the caller: flag absent, env or default
            [opt] = [o for o in KAFKA_OPTIONS if o.dest == "kafka_config"]
            items = env_default(opt, os.environ)
        return cls(**values, extra=parse_kafka_config(items))

    def with_bootstrap(self, servers: str) -> KafkaSettings:
        """A copy pointing at ``servers`` (after an embedded broker was started)."""
        return KafkaSettings(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                "bootstrap_servers": servers})

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings common to producers, consumers and the admin client."""
        if self.bootstrap_servers in ("auto", "embedded"):
            raise ConfigError("bootstrap servers not resolved; call runtime.kafka.broker.resolve_bootstrap first")
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            # Idle connections closed by the broker are routine; do not print them to stderr.
            "log.connection.close": False,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        conf.update(self.extra)
        return conf

    def producer_config(self, *, transactional_id: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Settings for an idempotent producer (transactional when ``transactional_id`` is given)."""
        conf = self.client_config()
        conf.update({
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 100,
            "batch.num.messages": 10000,
            "compression.type": "zstd",
            # librdkafka's local queue: messages not yet acknowledged. A producer that fills it
            # waits (produce_retrying), which is the back-pressure on the source; it holds about
            # two seconds of a full-speed job, and keeps the process's memory bounded (issue 16).
            "queue.buffering.max.messages": PRODUCER_QUEUE_MESSAGES,
            "queue.buffering.max.kbytes": PRODUCER_QUEUE_KBYTES,
            "message.max.bytes": 4 * 1024 * 1024,
        })
        conf.update(self.extra)  # the operator's settings over these defaults
        if transactional_id:
            conf["transactional.id"] = transactional_id
            conf.setdefault("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        conf.update(overrides)
        return conf

    def transaction_timeout(self) -> float:
        """Seconds after which the broker aborts a transaction of this process's producers still open.

        Raises:
            ConfigError: ``transaction.timeout.ms`` (``--kafka-config``) is not a positive number.
        """
        raw = self.extra.get("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        try:
            ms = float(raw)
        except ValueError as e:
            raise ConfigError(f"transaction.timeout.ms is not a number: {raw!r}") from e
        if ms <= 0:
            raise ConfigError(f"transaction.timeout.ms must be positive, not {raw!r}")
        return ms / 1000

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        """Settings for a consumer group member that stores offsets itself.

        Classic protocol: the session timeout is Kafka's default (45 s, KIP-735). A member that
        stops cleanly leaves its group at once whatever it is; a short one (this used to be 6 s)
        evicts live members whenever the coordinator is out of reach for a few seconds (a broker
        restart, a network blip), which aborts the repos replicas' open transactions and makes
        every sink re-read its batch. The cost is that a killed member's partitions wait up to 45 s
        for a new owner. Heartbeats go every 0.5 s (default 3 s): members learn of a rebalance at
        their next heartbeat, so a rebalance takes about a second, for one small request per member
        per half-second. With the consumer protocol the broker sets both
        (``group.consumer.session.timeout.ms``, default 45 s, and ``group.consumer.heartbeat.interval.ms``).

        Raises:
            ConfigError: a classic-only setting (``--kafka-config``) with ``group.protocol=consumer``.
        """
        conf = self.client_config()
        conf.update({
            "group.id": group_id,
            "group.protocol": self.group_protocol,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "max.poll.interval.ms": 300000,
            "fetch.message.max.bytes": 4 * 1024 * 1024,
            # librdkafka prefetches up to 100,000 messages per partition and 64 MiB by default: with
            # a topic per collection that held 300-500 MB of a consumer's RSS on a backlog
            # (bench/bench_memory.py). 1,000 per partition and 16 MiB in all keep it bounded at the
            # same measured throughput.
            "queued.min.messages": 1000,
            "queued.max.messages.kbytes": 16 * 1024,
            # A partition whose queue is over those bounds waits this long before its next fetch
            # (librdkafka's default: 1 s). With bounds this small the queue drains in a few ms, and a
            # 1 s wait left a PostgreSQL consumer polling an empty queue: 43,000-44,000 rows/s against
            # 54,000-56,000 with 10 ms (bench/bench_postgres.py, 200,000 events, same memory bounds).
            "fetch.queue.backoff.ms": 10,
        })
        conf.update(self.extra)  # the operator's settings over these defaults
        conf.update(overrides)
        if "fetch.max.bytes" not in conf:
            # librdkafka's memory grows with its fetch responses, not with the queue bounds above:
            # on a backlog of firehose and repository records (bench/bench_memory.py) a PostgreSQL
            # consumer peaked at 298 MB RSS with 8 MiB responses, 239 with 4, 206 with 2 and 199
            # with 1 (the queue bounds at a quarter changed nothing); on a Jetstream backlog 50 MB
            # responses (the default) held 270 MB. 2 MiB wrote as many rows per second as 8
            # (bench/bench_postgres.py: 0.97 and 1.01 of the baseline, within the runs' spread).
            # librdkafka refuses a fetch.max.bytes under message.max.bytes: an operator's larger one
            # raises it.
            conf["fetch.max.bytes"] = max(CONSUMER_FETCH_MAX_BYTES, int(conf.get("message.max.bytes", 0)))
        if conf["group.protocol"] == "consumer":
            for key, broker_side in CLASSIC_ONLY.items():
                if key in conf:
                    raise ConfigError(f"{key} is not a client setting under group.protocol=consumer; "
                                      f"the broker sets it ({broker_side})")
        else:
            # Incremental rebalancing: the sinks' callbacks use incremental_assign/unassign.
            conf.setdefault("partition.assignment.strategy", "cooperative-sticky")
            for key, value in embedded_group_timing(self.bootstrap_servers).items():
                conf.setdefault(key, value)
            conf.setdefault("heartbeat.interval.ms", 500)
        return conf

    def registry_config(self) -> dict[str, Any] | None:
        """Settings for ``SchemaRegistryClient``, or None when no registry is configured."""
        if not self.schema_registry_url:
            return None
        conf: dict[str, Any] = {"url": self.schema_registry_url}
        if self.schema_registry_auth:
            conf["basic.auth.user.info"] = self.schema_registry_auth.get()
        return conf


