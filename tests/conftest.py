"""Test fixtures: a real Kafka-API broker, a real PostgreSQL database, the captured fixtures.

* ``kafka_bootstrap``: ``KAFKA_BOOTSTRAP_SERVERS`` from the environment if set (an existing Kafka
  cluster), otherwise a single-node Apache Kafka 4 (KRaft, ``tests/kafka/``) started for the session
  on free loopback ports. ``BACKFILL_TEST_BROKER=tansu`` runs the smoke subset (unit tests and the
  integration tests marked ``tansu_smoke``) on an embedded Tansu broker instead.
* ``pg_url``: a fresh database created for the session on the local server (127.0.0.1:5432,
  trust auth; ``TEST_DATABASE_URL`` overrides the server), dropped at the end. The server is
  started if it is down.
* ``prefix``: a unique topic prefix per test, so tests never see each other's topics.
* ``schema``: a fresh PostgreSQL schema per test in that database, dropped afterwards.
* ``fixtures_dir``: ../shared/fixtures (tests using it skip cleanly when it is absent).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import authlib.deprecate
import pytest

with warnings.catch_warnings():
    # authlib, imported by the schema-registry client, warns about its own httpx integration at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import authlib.integrations.httpx_client  # noqa: F401
    import confluent_kafka.schema_registry  # noqa: F401

from runtime.kafka.broker import port_open, start_embedded_broker
from runtime.kafka.settings import KafkaSettings
from tests.kafka.cluster import KafkaCluster
from tests.ops_tools import Procs, PrometheusTools, ToolUnavailable, prometheus_tools

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("ATPROTO_FIXTURES", ROOT.parent / "shared" / "fixtures"))

#: The broker the suite runs on: "kafka" (Apache Kafka, the default) or "tansu" (the smoke subset).
TEST_BROKER = os.environ.get("BACKFILL_TEST_BROKER", "kafka").strip().lower()
if TEST_BROKER not in ("kafka", "tansu"):
    raise pytest.UsageError(f"BACKFILL_TEST_BROKER must be kafka or tansu, not {TEST_BROKER!r}")
EXTERNAL_KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "") not in ("", "auto", "embedded")

_BROKER_FIXTURES = {"kafka_bootstrap", "kafka", "kafka_cluster"}
_POSTGRES_FIXTURES = {"pg_server_url", "pg_url", "schema"}


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that asks for the broker or PostgreSQL is an ``integration`` test, marked or not, so
    ``-m "not integration"`` runs with neither."""
    if (_BROKER_FIXTURES | _POSTGRES_FIXTURES) & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.integration)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On Tansu, keep the unit tests and the integration tests marked ``tansu_smoke`` only."""
    if TEST_BROKER != "tansu" or EXTERNAL_KAFKA:
        return
    keep, drop = [], []
    for item in items:
        needs_broker = bool(_BROKER_FIXTURES & set(getattr(item, "fixturenames", ())))
        (drop if needs_broker and item.get_closest_marker("tansu_smoke") is None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop (no plugin needed)."""
    import asyncio
    import inspect

    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**args))
        return True
    return None


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The captured real-network fixtures; skips the test when absent."""
    if not (FIXTURES / "manifest.json").exists():
        pytest.skip(f"captured fixtures not present at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster | None]:
    """The session's Apache Kafka node (None when the suite runs on an external cluster or Tansu)."""
    if EXTERNAL_KAFKA or TEST_BROKER == "tansu":
        yield None
        return
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka"), nodes=1, heap_mb=512)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(grace=5)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_cluster: KafkaCluster | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-API broker for the whole session."""
    if EXTERNAL_KAFKA:
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if kafka_cluster is not None:
        yield kafka_cluster.bootstrap
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = start_embedded_broker(log_path=log)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix for one test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kafka(kafka_bootstrap: str, prefix: str) -> KafkaSettings:
    """Kafka settings for one test: the session broker, a unique prefix, 3 partitions."""
    return KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, topic_partitions=3)


def _ensure_postgres() -> None:
    if port_open("127.0.0.1", 5432):
        return
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if clusters and shutil.which("pg_ctlcluster"):
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1], "main", "start"],
                       check=False, capture_output=True)
        for _ in range(100):
            if port_open("127.0.0.1", 5432):
                return
            time.sleep(0.1)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the PostgreSQL server's maintenance database."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    _ensure_postgres()
    if not port_open("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and could not be started")
    return "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database for this test session."""
    import psycopg

    name = f"backfill_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = pg_server_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def schema(pg_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema per test, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def prom() -> PrometheusTools:
    """Prometheus's ``prometheus`` and ``promtool`` (Debian's package, unpacked; skips when unavailable)."""
    try:
        return prometheus_tools()
    except ToolUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Processes a test starts (tests/ops_tools.py ``Procs``); none outlives it."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()
