"""``backfill inspect topic TOPIC``: print a topic's messages decoded to JSON lines (like kcat).

Reads either wire format (registry or single-object); undecodable messages are printed with an
``error`` field instead of stopping.
"""

from __future__ import annotations

import argparse
import base64
import sys
from typing import Any, Final

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from runtime.contract.codec import AvroCodec
from runtime.errors import ConfigError, DecodeError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.settings import KAFKA_OPTIONS, KafkaSettings
from runtime.process.options import Opt, add_options

OPTIONS: Final = (
    Opt(("--count", "-n"), "count", None, 0, "stop after this many messages (0 = to the end)", type=int),
    Opt(("--from",), "start", None, "beginning", "start at 'beginning', 'end' or an offset"),
    Opt(("--partition", "-p"), "partition", None, None, "only this partition", type=int),
    Opt(("--follow", "-f"), "follow", None, False, "keep waiting for new messages", action="store_true"),
    Opt(("--timeout",), "timeout", None, 3.0, "seconds without messages that mean 'the end'", type=float),
)


#: One line for ``backfill --help``.
HELP: Final = "print a topic's messages decoded to JSON lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill inspect topic``."""
    parser.add_argument("topic", help="topic to read")
    add_options(parser, OPTIONS)
    add_options(parser.add_argument_group("kafka"), KAFKA_OPTIONS)


def _jsonable(datum: Any) -> Any:
    if isinstance(datum, bytes):
        return {"$bytes": base64.b64encode(datum).decode()}
    if isinstance(datum, dict):
        return {k: _jsonable(v) for k, v in datum.items()}
    if isinstance(datum, list):
        return [_jsonable(v) for v in datum]
    return datum


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill inspect topic``."""
    kafka = KafkaSettings.from_namespace(ns)
    if kafka.bootstrap_servers in ("auto", "embedded"):
        kafka = kafka.with_bootstrap("localhost:9092") if kafka.bootstrap_servers == "auto" else kafka
    with resolve_bootstrap(kafka.bootstrap_servers) as servers:
        kafka = kafka.with_bootstrap(servers)
        codec = AvroCodec.from_config(kafka.registry_config())
        conf = kafka.consumer_config("atproto-backfill-inspect", **{"enable.partition.eof": True})
        consumer = Consumer(conf)
        try:
            md = consumer.list_topics(ns.topic, timeout=10).topics.get(ns.topic)
            if md is None or md.error is not None:
                raise ConfigError(f"no topic {ns.topic!r}")
            parts = sorted(md.partitions) if ns.partition is None else [ns.partition]
            if ns.start == "beginning":
                start = OFFSET_BEGINNING
            elif ns.start == "end":
                start = OFFSET_END
            else:
                start = int(ns.start)
            consumer.assign([TopicPartition(ns.topic, p, start) for p in parts])
            return _print(consumer, codec, ns, len(parts))
        finally:
            consumer.close()


def _print(consumer: Consumer, codec: AvroCodec, ns: argparse.Namespace, nparts: int) -> int:
    seen = 0
    eof: set[int] = set()
    idle = 0.0
    out = sys.stdout
    while True:
        msg = consumer.poll(0.25)
        if msg is None:
            idle += 0.25
            if not ns.follow and (idle >= ns.timeout or len(eof) >= nparts):
                return 0
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                eof.add(msg.partition() or 0)
                if not ns.follow and len(eof) >= nparts:
                    return 0
                continue
            raise ConfigError(f"reading {ns.topic}: {err}")
        idle = 0.0
        eof.discard(msg.partition())
        line: dict[str, Any] = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                                "key": (msg.key() or b"").decode(errors="replace")}
        try:
            schema, datum = codec.decode(msg.value() or b"")
            line["schema"] = schema
            line["value"] = _jsonable(datum)
        except DecodeError as e:
            line["error"] = e.detail
        out.write(orjson.dumps(line).decode() + "\n")
        seen += 1
        if ns.count and seen >= ns.count:
            out.flush()
            return 0
