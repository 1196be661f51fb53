"""The Grafana dashboard, the Prometheus configuration and the alert rules, checked with the real
promtool and against the code's metric registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from runtime.metrics import Metrics, metric_names
from tests.ops_tools import (
    ALERTS,
    ALERTS_TEST,
    COMPOSE_FILE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    PrometheusTools,
    ToolUnavailable,
    grafana_to_promql,
    prometheus_tools,
    promql_metric_names,
)


@pytest.fixture(scope="module")
def prom() -> PrometheusTools:
    try:
        return prometheus_tools()
    except ToolUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def registry_names() -> set[str]:
    return set(metric_names(Metrics(registry=CollectorRegistry())))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dashboard: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(p["id"], t["refId"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def promtool(prom: PrometheusTools, *args: str, cwd: Path | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(prom.promtool), *args], capture_output=True, text=True, cwd=cwd, input=stdin,
                          timeout=120, check=False)


def datasource_uid() -> str:
    provisioned = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
    (ds,) = provisioned["datasources"]
    assert ds["type"] == "prometheus"
    uid: str = ds["uid"]
    return uid


# ------------------------------------------------------------------------------------------ dashboard


def test_dashboard_ids_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "atproto-backfill"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], int] = {}
    for p in panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']} has no query"
            assert p.get("title"), p["id"]
            assert p.get("description"), p["id"]


def test_dashboard_uses_the_provisioned_datasource_uid(dashboard: dict[str, Any]) -> None:
    uid = datasource_uid()
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
    assert "${" not in DASHBOARD.read_text(encoding="utf-8"), "datasource by fixed uid, not a variable"


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    (provider,) = providers
    path = provider["options"]["path"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    mounts = compose["services"]["grafana"]["volumes"]
    source = "./" + str(DASHBOARD.parent.relative_to(COMPOSE_FILE.parent))
    assert f"{source}:{path}:ro" in mounts


def test_every_panel_query_passes_promtool_check_rules(dashboard: dict[str, Any], prom: PrometheusTools,
                                                      tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:panel_{pid}:{ref.lower()}", "expr": grafana_to_promql(expr)}
             for pid, ref, expr in queries(dashboard)]
    assert len(rules) >= 25
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = promtool(prom, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_check_rules_rejects_a_broken_query(prom: PrometheusTools, tmp_path: Path) -> None:
    path = tmp_path / "broken.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum(rate(atproto_backfill_dlq_messages_total[5m])"}]}]}), encoding="utf-8")
    assert promtool(prom, "check", "rules", str(path)).returncode != 0


def test_every_dashboard_metric_exists_in_the_registry(dashboard: dict[str, Any], registry_names: set[str]) -> None:
    used: set[str] = set()
    for _pid, _ref, expr in queries(dashboard):
        names = promql_metric_names(grafana_to_promql(expr))
        assert names, expr
        used |= names
    missing = sorted(used - registry_names)
    assert not missing, f"dashboard names metrics the code does not register: {missing}"
    assert all(n.startswith("atproto_backfill_") for n in used)


def test_dashboard_shows_the_pipeline_at_a_glance(dashboard: dict[str, Any]) -> None:
    used = set()
    for _pid, _ref, expr in queries(dashboard):
        used |= promql_metric_names(grafana_to_promql(expr))
    wanted = {
        "atproto_backfill_producer_events_produced_total",  # ingest rate by collection
        "atproto_backfill_consumer_messages_total",  # sink rate by collection
        "atproto_backfill_consumer_rows_written_total",
        "atproto_backfill_consumer_lag_messages",
        "atproto_backfill_producer_event_time_lag_seconds",
        "atproto_backfill_producer_watermark_progress_ratio",
        "atproto_backfill_producer_watermark_end_seconds",  # ETA
        "atproto_backfill_producer_events_dropped_total",
        "atproto_backfill_dlq_messages_total",
        "atproto_backfill_pds_requests_total",
        "atproto_backfill_pds_rate_limit_wait_seconds_total",
        "atproto_backfill_process_resident_memory_bytes",
        "atproto_backfill_producer_produce_latency_seconds_bucket",
        "atproto_backfill_producer_flush_duration_seconds_bucket",
    }
    assert wanted <= used, sorted(wanted - used)
    by_collection = [expr for _p, _r, expr in queries(dashboard)
                     if "events_produced_total" in expr and "by (collection)" in expr]
    assert by_collection


def test_metric_names_cover_metrics_with_open_labels(registry_names: set[str]) -> None:
    # Lag per partition and rows per table have no sample before first use; metric_names still has them.
    assert "atproto_backfill_consumer_lag_messages" in registry_names
    assert "atproto_backfill_consumer_rows_written_total" in registry_names
    assert "atproto_backfill_producer_produce_latency_seconds_bucket" in registry_names
    assert "atproto_backfill_no_such_metric" not in registry_names


# ------------------------------------------------------------------------------------------ alerts


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_pass_promtool_check_rules(prom: PrometheusTools) -> None:
    result = promtool(prom, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests(prom: PrometheusTools) -> None:
    result = promtool(prom, "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    tested = set()
    for group in yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]:
        for case in group["alert_rule_test"]:
            if case.get("exp_alerts"):
                tested.add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names == tested, f"alerts without a firing test: {sorted(names - tested)}"


def test_alerts_cover_lag_stalled_cursor_and_dead_letters(registry_names: set[str]) -> None:
    rules = alert_rules()
    used: set[str] = set()
    for r in rules:
        assert r["alert"].startswith("AtprotoBackfill")
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        assert r["annotations"]["description"]
        used |= promql_metric_names(r["expr"])
    assert not sorted(used - registry_names)
    assert "atproto_backfill_consumer_lag_messages" in used
    assert "atproto_backfill_producer_source_cursor" in used
    assert "atproto_backfill_dlq_messages_total" in used


def test_alert_unit_tests_can_fail(prom: PrometheusTools, tmp_path: Path) -> None:
    # The same tests against rules with an impossible threshold must fail: the unit tests really check.
    rules = ALERTS.read_text(encoding="utf-8").replace("> 100000", "> 1e12")
    (tmp_path / "alerts.yml").write_text(rules, encoding="utf-8")
    (tmp_path / "alerts.test.yml").write_text(ALERTS_TEST.read_text(encoding="utf-8"), encoding="utf-8")
    result = promtool(prom, "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "AtprotoBackfillConsumerLagHigh" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_config_is_valid_and_scrapes_every_application_service(prom: PrometheusTools) -> None:
    result = promtool(prom, "check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_CONFIG.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    jobs = {j["job_name"] for j in config["scrape_configs"]} - {"prometheus"}
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
    app_services = {name for name, svc in compose.items() if "BACKFILL_METRICS_PORT" in (svc.get("environment") or {})}
    assert jobs == app_services
    for job in config["scrape_configs"]:
        if job["job_name"] != "prometheus":
            (sd,) = job["dns_sd_configs"]
            assert sd["names"] == [job["job_name"]]
            assert sd["port"] == int(compose[job["job_name"]]["environment"]["BACKFILL_METRICS_PORT"])
