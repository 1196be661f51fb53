"""A real Prometheus (Debian's package, on loopback) scrapes a running producer and two consumers.

The producer is ``backfill jetstream --consumer none`` against the Jetstream simulator, the consumers
``backfill consume queue`` and ``backfill consume postgres`` (on the session database), all
subprocesses on the session broker with ``--metrics-port``. The test
checks that ``promtool check metrics`` is clean on both endpoints, that the expected series exist
and move, that the health endpoints answer, that Prometheus loads the alert rules, and that
neither process logs a secret.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from runtime.kafka.broker import free_port
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.ops_tools import (
    ALERTS,
    COMPOSE_LIVENESS,
    Procs,
    PrometheusTools,
    http_ok,
    wait_for,
)

pytestmark = pytest.mark.integration

SECRET = "sasl-pw-do-not-log-4b1e"


def base_env(kafka: KafkaSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "BACKFILL_", "SCHEMA_REGISTRY"))}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BACKFILL_TOPIC_PREFIX": kafka.topic_prefix,
        "BACKFILL_TOPIC_PARTITIONS": "3",
        "BACKFILL_METRICS_HOST": "127.0.0.1",
        "BACKFILL_LOG_LEVEL": "INFO",
        # credentials given but not used by the PLAINTEXT broker: they must never reach the logs
        "KAFKA_SASL_USERNAME": "ops-test",
        "KAFKA_SASL_PASSWORD": SECRET,
    })
    return env


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def sim() -> Iterator[JetstreamSimulator]:
    """30 s of stored events, then live ones (requested before ``procs``: it stops after the clients)."""
    start_us = int((time.time() - 30) * 1e6)
    events = synthetic_events(1500, seed=23, accounts=40, start_us=start_us, rate=100)
    simulator = JetstreamSimulator(events, live_rate=200).start_in_thread()
    try:
        yield simulator
    finally:
        time.sleep(0.5)  # let the server finish the handlers of the connections just closed
        simulator.stop_thread()


def test_prometheus_scrapes_a_running_producer_and_consumers(kafka: KafkaSettings, prom: PrometheusTools,
                                                             pg_url: str, sim: JetstreamSimulator, procs: Procs,
                                                             tmp_path: Path) -> None:
    start = datetime.fromtimestamp(sim.events[0].time_us / 1e6, UTC)
    p_port, c_port, pg_port, prom_port = free_port(), free_port(), free_port(), free_port()
    env = base_env(kafka)
    end = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cli = [sys.executable, "-m", "runtime"]
    procs.start("producer", [
        *cli, "jetstream", "--consumer", "none", "--metrics-port", str(p_port), "--instance", sim.url,
        "--num-records", "0", "--max-time", "0", "--job", f"ops-{kafka.topic_prefix}",
        "--wanted-collections", "app.bsky.feed.*", "--start-timestamp", start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "--end-timestamp", end, "--checkpoint-interval", "0.5", "--progress", "none"], env)
    procs.start("consumer", [
        *cli, "consume", "queue", "--metrics-port", str(c_port), "--queue-path", str(tmp_path / "q.sqlite"),
        "--queue-name", "ops", "--linger", "0.2", "--batch-size", "200"], env)
    procs.start("postgres", [
        *cli, "consume", "postgres", "--metrics-port", str(pg_port), "--db-schema", f"ops_{kafka.topic_prefix}",
        "--linger", "0.2", "--batch-size", "200"], {**env, "DATABASE_URL": pg_url})
    for name, port in (("producer", p_port), ("consumer", c_port), ("postgres", pg_port)):

        def ready(name: str = name, port: int = port) -> bool:
            return procs.alive(name) and http_ok(f"http://127.0.0.1:{port}/readyz")

        wait_for(f"the {name}'s /readyz", ready)
        assert http_ok(f"http://127.0.0.1:{port}/healthz")

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS), str(COMPOSE_LIVENESS)],
        "scrape_configs": [
            {"job_name": "producer-jetstream", "static_configs": [{"targets": [f"127.0.0.1:{p_port}"]}]},
            {"job_name": "consumer-queue", "static_configs": [{"targets": [f"127.0.0.1:{c_port}"]}]},
            {"job_name": "consumer-postgres", "static_configs": [{"targets": [f"127.0.0.1:{pg_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    procs.start("prometheus", [
        str(prom.prometheus), f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    server = Prometheus(f"http://127.0.0.1:{prom_port}")
    wait_for("Prometheus ready", lambda: procs.alive("prometheus") and http_ok(f"{server.url}/-/ready"))

    wait_for("every target up", lambda: server.value("sum(up)") == 3)

    # the series move between scrapes
    produced = "sum(atproto_backfill_producer_events_produced_total{source=\"jetstream\"})"
    consumed = "sum(atproto_backfill_consumer_messages_total{sink=\"queue\"})"
    wait_for("events produced", lambda: (server.value(produced) or 0) > 0)
    wait_for("messages consumed", lambda: (server.value(consumed) or 0) > 0)
    first_produced, first_consumed = server.value(produced), server.value(consumed)
    assert first_produced is not None
    assert first_consumed is not None
    wait_for("produced events to grow", lambda: (server.value(produced) or 0) > first_produced)
    wait_for("consumed messages to grow", lambda: (server.value(consumed) or 0) > first_consumed)

    P = '{job="producer-jetstream",source="jetstream"}'  # every process exports every metric
    expectations: dict[str, Callable[[float], bool]] = {
        'sum(atproto_backfill_producer_events_received_total{source="jetstream"})': lambda v: v > 0,
        'sum(atproto_backfill_producer_produce_latency_seconds_count{source="jetstream"})': lambda v: v > 0,
        'sum(atproto_backfill_producer_flush_duration_seconds_count{source="jetstream"})': lambda v: v > 0,
        f'atproto_backfill_producer_source_cursor{P}': lambda v: v > 1e15,
        f'atproto_backfill_producer_watermark_end_seconds{P}': lambda v: v > time.time(),
        f'atproto_backfill_producer_watermark_progress_ratio{P}': lambda v: 0 < v < 1,
        f'atproto_backfill_producer_event_time_lag_seconds{P}': lambda v: 0 <= v < 600,
        'sum(atproto_backfill_consumer_rows_written_total{sink="queue",table="ops"})': lambda v: v > 0,
        'sum(atproto_backfill_consumer_batch_duration_seconds_count{sink="queue"})': lambda v: v > 0,
        'count(atproto_backfill_consumer_lag_messages{sink="queue"})': lambda v: v > 0,
        # the PostgreSQL sink writes rows per table (posts, likes, ...)
        'count(atproto_backfill_consumer_rows_written_total{sink="postgres"} > 0)': lambda v: v >= 2,
        'sum(atproto_backfill_consumer_messages_total{sink="postgres"})': lambda v: v > 0,
        'count(atproto_backfill_consumer_lag_messages{sink="postgres"})': lambda v: v > 0,
        'min(atproto_backfill_process_resident_memory_bytes)': lambda v: v > 10e6,
        'count(atproto_backfill_process_resident_memory_bytes)': lambda v: v == 3,
    }
    for expr, ok in expectations.items():

        def holds(expr: str = expr, ok: Callable[[float], bool] = ok) -> bool:
            value = server.value(expr)
            return value is not None and ok(value)

        def last(expr: str = expr) -> str:
            return f"{expr} (last result {server.query(expr)})"

        wait_for(last, holds, timeout=30)

    # Prometheus loaded and evaluates the alert rules (the liveness ones on up and absent() too)
    shipped = sum(len(g["rules"]) for path in (ALERTS, COMPOSE_LIVENESS)
                  for g in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"])

    def rules_ok() -> bool:
        groups = httpx.get(f"{server.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == shipped and all(r["health"] == "ok" and r["lastEvaluation"] > "2000" for r in rules)

    wait_for("the alert rules evaluated", rules_ok)
    # every target is up, so the liveness rules have nothing to say about the three processes
    assert server.query('ALERTS{alertname="AtprotoBackfillTargetDown"}') == []
    for job in ("producer-jetstream", "consumer-queue", "consumer-postgres"):
        assert server.query(f'ALERTS{{alertname="AtprotoBackfillComponentDown", job="{job}"}}') == []

    # the exposition of both processes passes promtool's lint
    for port in (p_port, c_port, pg_port):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        lint = subprocess.run([str(prom.promtool), "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=60, check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert lint.stdout.strip() == "", lint.stdout

    # graceful stop: SIGTERM finishes the batch / checkpoint and exits 0
    assert procs.stop("producer") == 0, procs.log("producer")[-3000:]
    assert procs.stop("consumer") == 0, procs.log("consumer")[-3000:]
    assert procs.stop("postgres") == 0, procs.log("postgres")[-3000:]
    for name in ("producer", "consumer", "postgres"):
        log = procs.log(name)
        assert "settings {" in log, f"{name} logs its settings at start"
        assert SECRET not in log, f"{name} logged a secret"
