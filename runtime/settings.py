"""Settings: every option is declared once with its flags, environment variable and default.

A process builds one settings object from flags and the environment; flags override the
environment, which overrides the default. ``--help`` shows each option's environment name.
Secrets are :class:`Secret` values whose ``repr``/``str`` are redacted, so settings can be logged.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Final

from runtime.broker import embedded_group_timing
from runtime.errors import ConfigError


class Secret:
    """A string that never prints itself (flags, env, logs, reprs show ``**********``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value (only where it is handed to a client library)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Opt:
    """One command-line option bound to an environment variable.

    Args:
        flags: the option strings (``("--num-records", "-n")``).
        dest: attribute name in the parsed namespace.
        env: environment variable that supplies the default, or None.
        default: value when neither flag nor env is given.
        help: help text; the env name is appended automatically.
        type: converter from string (applied to env values too).
        action: argparse action (``store_true``, ``append``, ...).
        choices: allowed values.
        metavar: argparse metavar.
        separator: how an ``append`` option's env value splits into items (a regex; default ``,``).
    """

    flags: tuple[str, ...]
    dest: str
    env: str | None = None
    default: Any = None
    help: str = ""
    type: Callable[[str], Any] | None = None
    action: str | None = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    separator: str = ","


_TRUE: Final = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "no", "off", "n", "f", ""})


def parse_bool(value: str) -> bool:
    """Parse an environment boolean (``1/true/yes/on`` or ``0/false/no/off``)."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def parse_secret(value: str) -> Secret:
    """Wrap a flag/env value as a :class:`Secret`."""
    return Secret(value)


def _env_default(opt: Opt, environ: Mapping[str, str]) -> Any:
    if opt.env is None or opt.env not in environ:
        return opt.default
    raw = environ[opt.env]
    try:
        if opt.action in ("store_true", "store_false"):
            return parse_bool(raw)
        if opt.action == "append":
            conv = opt.type or str
            return [conv(part.strip()) for part in re.split(opt.separator, raw) if part.strip()]
        return (opt.type or str)(raw)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"environment variable {opt.env}={raw!r}: {e}") from e


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    opts: Sequence[Opt],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Add ``opts`` to ``parser`` with env-derived defaults and the env name in the help."""
    env = os.environ if environ is None else environ
    for opt in opts:
        default = _env_default(opt, env)
        text = opt.help
        if opt.env:
            text = f"{text} [env: {opt.env}]" if text else f"[env: {opt.env}]"
        if opt.default not in (None, False, []) and opt.action not in ("store_true",):
            shown = "**********" if isinstance(opt.default, Secret) else opt.default
            text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": text.replace("%", "%%")}
        if opt.action in ("store_true", "store_false"):
            kwargs["action"] = opt.action
            kwargs["default"] = bool(default)
        elif opt.action == "append":
            kwargs["action"] = "append"
            # argparse appends to a default list; start from None, resolve_appends() fills env/default.
            kwargs["default"] = None
            if opt.type:
                kwargs["type"] = opt.type
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
        else:
            kwargs["default"] = default
            if opt.type:
                kwargs["type"] = opt.type
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
        parser.add_argument(*opt.flags, **kwargs)


def resolve_appends(ns: argparse.Namespace, opts: Sequence[Opt], environ: Mapping[str, str] | None = None) -> None:
    """Fill append-options that were not given on the command line from env or default."""
    env = os.environ if environ is None else environ
    for opt in opts:
        if opt.action == "append" and getattr(ns, opt.dest, None) is None:
            value = _env_default(opt, env)
            setattr(ns, opt.dest, list(value) if value is not None else [])


def redacted(obj: Any) -> dict[str, Any]:
    """A loggable dict of a settings dataclass with secrets (and URLs' passwords) redacted."""
    out: dict[str, Any] = {}
    if not is_dataclass(obj):
        raise TypeError("redacted() expects a settings dataclass")
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out[f.name] = redacted(value)
        elif isinstance(value, Secret):
            out[f.name] = str(value)
        elif isinstance(value, str) and "://" in value and "@" in value:
            out[f.name] = redact_url(value)
        elif isinstance(value, dict):
            out[f.name] = {k: redact_value(k.replace(".", "_"), v) for k, v in value.items()}
        else:
            out[f.name] = value
    return out


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host/...``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:**********@{host}"


_SECRET_WORDS: Final = frozenset({"password", "passwd", "secret", "token", "auth", "credential", "credentials"})
_DSN_PASSWORD: Final = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact_value(name: str, value: Any) -> Any:
    """``value`` as it may be logged: secrets, URL and DSN passwords, and secret-named strings hidden."""
    if isinstance(value, Secret):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(name, v) for v in value]
    if name == "kafka_config" and isinstance(value, str) and "=" in value:
        key, _, setting = value.partition("=")
        return f"{key}={redact_value(key.replace('.', '_'), setting)}"
    if isinstance(value, str):
        if value and _SECRET_WORDS.intersection(name.lower().split("_")):
            return "**********"
        if "://" in value and "@" in value:
            value = redact_url(value)
        return _DSN_PASSWORD.sub(r"\1**********", value)
    return value


def redacted_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    """A loggable dict of parsed options (internal entries such as the subcommand's function left out)."""
    return {k: redact_value(k, v) for k, v in sorted(vars(ns).items())
            if not k.startswith("_") and not callable(v)}


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
#: (``runtime.checkpoint.RESUME_SETTLE``).
TRANSACTION_TIMEOUT_MS: Final = 60000


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
            items = _env_default(opt, os.environ)
        return cls(**values, extra=parse_kafka_config(items))

    def with_bootstrap(self, servers: str) -> KafkaSettings:
        """A copy pointing at ``servers`` (after an embedded broker was started)."""
        return KafkaSettings(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                "bootstrap_servers": servers})

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings common to producers, consumers and the admin client."""
        if self.bootstrap_servers in ("auto", "embedded"):
            raise ConfigError("bootstrap servers not resolved; call runtime.broker.resolve_bootstrap first")
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
            "queue.buffering.max.messages": 500000,
            "queue.buffering.max.kbytes": 512 * 1024,
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
        })
        conf.update(self.extra)  # the operator's settings over these defaults
        conf.update(overrides)
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


# --------------------------------------------------------------------------------------------
# Observability options shared by every process.

OBSERVABILITY_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--metrics-port",), "metrics_port", "BACKFILL_METRICS_PORT", 0,
        "serve Prometheus metrics, /healthz and /readyz on this port (0 = off)", type=int),
    Opt(("--metrics-host",), "metrics_host", "BACKFILL_METRICS_HOST", "0.0.0.0",  # noqa: S104 - pods are scraped from outside
        "address the metrics server binds"),
    Opt(("--log-level",), "log_level", "BACKFILL_LOG_LEVEL", "INFO", "logging level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Opt(("--log-format",), "log_format", "BACKFILL_LOG_FORMAT", "text", "log line format",
        choices=("text", "json")),
)


@dataclass(frozen=True)
class ObservabilitySettings:
    """Metrics endpoint and logging."""

    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"  # noqa: S104 - see OBSERVABILITY_OPTIONS
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ObservabilitySettings:
        """Build from a namespace parsed with :data:`OBSERVABILITY_OPTIONS`."""
        return cls(**{o.dest: getattr(ns, o.dest) for o in OBSERVABILITY_OPTIONS})
