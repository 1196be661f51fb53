"""Fixtures of the integration tests (the broker and database ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.kafka.settings import KafkaSettings
from tests.integration.replicas import Replicas


@pytest.fixture
def replicas(kafka: KafkaSettings, pg_url: str, schema: str, tmp_path: Path) -> Iterator[Replicas]:
    """``backfill consume postgres`` processes into the test's schema (group ``g-<schema>``); none outlives
    the test."""
    r = Replicas(kafka, pg_url, schema, f"g-{schema}", tmp_path)
    yield r
    r.close()
