"""A short kill storm (``bench/kill_storm.py``): the Jetstream simulator, the producer, three
PostgreSQL replicas and a queue consumer as real processes; five SIGKILLs of random ones at random
moments, each restarted; the topics, the tables and the queue end exact.

``KILL_STORM_SEED`` replays another plan (the seed is printed either way; ``-s`` shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.kill_storm import StormConfig, run_storm

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_kill_storm_neither_loses_nor_duplicates(
        kafka_bootstrap: str, prefix: str, pg_url: str, schema: str, tmp_path: Path) -> None:
    # Seed 1311's plan kills the producer twice (once inside an open transaction), two PostgreSQL
    # replicas (one inside a transaction) and the queue consumer.
    seed = int(os.environ.get("KILL_STORM_SEED", "1311"))
    # 9,000 events at up to 500 messages/s: a stream of 20-40 s on 2 busy cores, the kills spread over it.
    config = StormConfig(seed=seed, kills=5, events=9_000, send_rate=500.0, drain_timeout=180.0)
    result = run_storm(config, bootstrap=kafka_bootstrap, pg_url=pg_url, schema=schema, workdir=tmp_path,
                       topic_prefix=prefix)
    report = result.report()
    print(report)
    assert not result.error, report
    assert sum(result.kills_by_kind.values()) == 5, report
    if "KILL_STORM_SEED" not in os.environ:
        assert set(result.kills_by_kind) == {"producer", "postgres", "queue"}, report
    assert not result.unexpected_exits, report
    assert not result.stop_failures, report
    assert result.lost == 0, report
    assert result.duplicated == 0, report
    assert result.wrong == 0, report
    assert [c.name for c in result.checks] == ["topics", "postgres", "queue"]
    for check in result.checks:
        assert check.exact, report
        assert check.found == check.expected > 1000, report
    assert result.exact, report
