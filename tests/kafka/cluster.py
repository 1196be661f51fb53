"""Apache Kafka (KRaft, no ZooKeeper) on loopback, from the jars ``pom.xml`` resolves.

The test fixtures and the benchmarks start one node (or three, for the broker-failure test) on
free loopback ports, with a small heap and test-friendly settings: no initial rebalance delay,
internal topics replicated as far as the cluster is large, short minimum session timeouts so a
killed consumer leaves its group in seconds, a log cleaner that looks every half second. Each node
runs ``kafka.Kafka`` the way the distribution's scripts do: the storage directory formatted by the
storage tool, then the broker started with a properties file, the jars on the classpath and a log4j2
configuration. Each node logs to ``<workdir>/node-<id>/server.log``.

A node is killed with its parent (``PR_SET_PDEATHSIG``), so an interrupted test run leaves no JVM
behind. The parent is the thread that started it: start clusters from the main thread.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J = HERE / "log4j2.properties"
TOOLS_LOG4J = HERE / "tools-log4j2.properties"
LIB = Path(os.environ.get("BACKFILL_KAFKA_LIB", HERE / "lib"))

#: Broker settings every test node gets (a cluster of n nodes replicates internal topics n times).
TEST_SETTINGS: dict[str, str] = {
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.num.partitions": "5",
    "message.max.bytes": "5242880",
    # classic protocol: the tests' consumers use session timeouts of 2-6 s
    "group.min.session.timeout.ms": "1000",
    # consumer protocol (KIP-848): the session timeout and heartbeat are the broker's
    "group.consumer.min.session.timeout.ms": "1000",
    "group.consumer.session.timeout.ms": "6000",
    "group.consumer.min.heartbeat.interval.ms": "250",
    "group.consumer.heartbeat.interval.ms": "500",
    # compaction test: the cleaner looks often
    "log.cleaner.backoff.ms": "500",
    "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
    "log.cleaner.threads": "1",
    # a killed producer's open transaction is aborted within a second of its timeout
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
    # a restarted node of the three-node cluster catches up quickly
    "replica.lag.time.max.ms": "5000",
    "controlled.shutdown.enable": "true",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
}


class KafkaStartError(RuntimeError):
    """A node did not start; the message ends with the tail of its log."""


def kafka_version() -> str:
    """The Kafka version ``pom.xml`` pins."""
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    if m is None:
        raise KafkaStartError(f"no <kafka.version> in {POM}")
    return m.group(1)


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def jars_present(lib: Path = LIB) -> bool:
    """True when ``lib`` holds the jars of the current ``pom.xml``."""
    stamp = lib / ".pom-sha256"
    return stamp.exists() and stamp.read_text().strip() == _pom_digest()


def ensure_jars(lib: Path = LIB) -> Path:
    """Resolve the Kafka jars into ``lib`` with Maven (once per ``pom.xml`` version); return ``lib``.

    Raises:
        KafkaStartError: Maven is missing or could not resolve the jars.
    """
    if jars_present(lib):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaStartError("Maven (mvn) is needed to fetch Apache Kafka's jars; run bash .ci/setup")
    staging = lib.with_name(lib.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    proc = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaStartError(f"mvn could not resolve Kafka's jars:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (staging / ".pom-sha256").write_text(_pom_digest())
    shutil.rmtree(lib, ignore_errors=True)
    staging.rename(lib)
    return lib


def java() -> str:
    """The java launcher: ``$JAVA_HOME/bin/java`` when set, else ``java`` on the PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise KafkaStartError("Java 17+ is needed to run Apache Kafka (no java on the PATH, no JAVA_HOME)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    Never one that starts with ``-``: the storage tool would read ``-t -abc...`` as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class Node:
    """One combined broker + controller process."""

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    #: The port of the node's EXTERNAL listener, when it has one (see ``KafkaCluster.external``).
    external_port: int | None = None

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no server.log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class KafkaCluster:
    """``nodes`` Apache Kafka nodes in KRaft mode on loopback, their data under ``workdir``.

    ``external``: node id -> an address (``host:port``) that node advertises on a second listener,
    EXTERNAL, besides its own PLAINTEXT one: a client that connects to the EXTERNAL listener learns
    that address for the node from the metadata, so all its requests go there (a proxy in front of
    the listener, say, that forwards to ``Node.external_port``). Brokers talk to each other, and
    clients of :attr:`bootstrap` to them, on PLAINTEXT.
    """

    workdir: Path
    nodes: int = 1
    heap_mb: int = 512
    config: Mapping[str, str] = field(default_factory=dict)
    lib: Path = LIB
    cluster_id: str = field(default_factory=new_cluster_id)
    members: list[Node] = field(default_factory=list)
    external: Mapping[int, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers of every node."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.members)

    @property
    def external_bootstrap(self) -> str:
        """The advertised EXTERNAL addresses (see ``external``)."""
        return ",".join(self.external[n.node_id] for n in self.members if n.node_id in self.external)

    def node(self, node_id: int) -> Node:
        return next(n for n in self.members if n.node_id == node_id)

    def _properties(self, node: Node) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.members)
        replicas = str(min(self.nodes, 3))
        min_isr = str(min(self.nodes, 2) if self.nodes > 1 else 1)
        listeners = f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{node.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if node.external_port is not None:
            listeners += f",EXTERNAL://127.0.0.1:{node.external_port}"
            advertised += f",EXTERNAL://{self.external[node.node_id]}"
            protocols += ",EXTERNAL:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(node.directory / "data"),
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            **TEST_SETTINGS,
            **self.config,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, main: str, *args: str, heap_mb: int = 256) -> list[str]:
        return [java(), f"-Xmx{heap_mb}m", "-XX:+UseSerialGC", "-Xshare:auto", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={TOOLS_LOG4J}", "-cp", f"{self.lib}/*", main, *args]

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """Format every node's storage, start the nodes, and wait until every broker is registered.

        Raises:
            KafkaStartError: a node exited or the cluster was not ready within ``timeout`` seconds.
        """
        ensure_jars(self.lib)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.members = [Node(i, free_port(), free_port(), self.workdir / f"node-{i}",
                             external_port=free_port() if i in self.external else None)
                        for i in range(1, self.nodes + 1)]
        formats = []
        for node in self.members:
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "server.properties").write_text(self._properties(node))
            formats.append(subprocess.Popen(
                [*self._java("kafka.tools.StorageTool", heap_mb=128), "format", "-t", self.cluster_id,
                 "-c", str(node.directory / "server.properties"), "--ignore-formatted"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for node, proc in zip(self.members, formats, strict=True):
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise KafkaStartError(f"formatting node {node.node_id} failed:\n{out.decode(errors='replace')}")
        for node in self.members:
            self._launch(node)
        self.wait_ready(timeout=timeout)
        return self

    def _launch(self, node: Node) -> None:
        heap = self.heap_mb
        cmd = [java(), f"-Xmx{heap}m", f"-Xms{min(heap, 256)}m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={node.directory}",
               "-cp", f"{self.lib}/*", "kafka.Kafka", str(node.directory / "server.properties")]
        with (node.directory / "stdout.log").open("ab") as out:  # the child keeps its own descriptor
            node.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - only prctl, before exec

    def brokers_registered(self) -> set[int]:
        """Ids of the brokers the cluster's metadata lists now (empty when none answers)."""
        from confluent_kafka.admin import AdminClient

        live = [n for n in self.members if n.alive() and _port_open(n.port)]
        if not live:
            return set()
        client = AdminClient({"bootstrap.servers": ",".join(f"127.0.0.1:{n.port}" for n in live),
                              "socket.timeout.ms": 2000})
        try:
            return {b.id for b in client.describe_cluster(request_timeout=2).result(timeout=3).nodes}
        except Exception:
            return set()

    def wait_ready(self, timeout: float = 90.0, want: set[int] | None = None) -> None:
        """Wait until the brokers ``want`` (default: every running node) are registered."""
        deadline = time.monotonic() + timeout
        while True:
            expected = want if want is not None else {n.node_id for n in self.members if n.process is not None
                                                      and n.alive()}
            for n in self.members:
                if n.process is not None and n.process.poll() is not None and n.node_id in expected:
                    raise KafkaStartError(f"Kafka node {n.node_id} exited with status {n.process.returncode}:\n"
                                          f"{n.log_tail()}")
            if expected <= self.brokers_registered():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"-- node {n.node_id}:\n{n.log_tail()}" for n in self.members)
                raise KafkaStartError(f"Kafka brokers {sorted(expected)} not ready within {timeout:.0f} s\n{tails}")
            time.sleep(0.2)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash: no controlled shutdown)."""
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def terminate(self, node_id: int, grace: float = 30.0) -> None:
        """SIGTERM one node (a controlled shutdown, as an operator's restart does); SIGKILL it if it
        has not exited after ``grace`` seconds. :meth:`restart` starts it again on its ports and data."""
        node = self.node(node_id)
        if node.process is None or node.process.poll() is not None:
            return
        node.process.terminate()
        try:
            node.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        """Start a stopped or killed node again on its ports and data, and wait until it is registered."""
        node = self.node(node_id)
        if node.alive():
            raise KafkaStartError(f"node {node_id} is still running")
        self._launch(node)
        self.wait_ready(timeout=timeout, want={n.node_id for n in self.members if n.alive()})

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node: SIGTERM (controlled shutdown), SIGKILL after ``grace`` seconds."""
        for node in self.members:
            if node.alive():
                assert node.process is not None
                node.process.terminate()
        deadline = time.monotonic() + grace
        for node in self.members:
            if node.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()

    def tool(self, main: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run one of Kafka's own command-line tools (a main class from the same jars) against the cluster."""
        return subprocess.run(
            self._java(main, *args), capture_output=True, text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def running(workdir: Path, nodes: int = 1, **kwargs: object) -> Iterator[KafkaCluster]:
    """A started cluster for the duration of the context."""
    cluster = KafkaCluster(workdir, nodes, **kwargs)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def consumer_groups_tool(bootstrap: str, group: str, lib: Path = LIB) -> str:
    """``kafka-consumer-groups.sh --describe --group G`` output, from the jars, for any cluster."""
    cluster = KafkaCluster(Path("/nonexistent"), lib=lib)
    proc = cluster.tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                        "--bootstrap-server", bootstrap, "--describe", "--group", group, "--offsets")
    if proc.returncode != 0:
        raise KafkaStartError(f"kafka-consumer-groups failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
