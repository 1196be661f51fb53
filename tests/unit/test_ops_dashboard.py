"""The Grafana dashboard, the Prometheus configuration and the alert rules, checked with the real
promtool and against the code's metric registry."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from runtime.process.metrics import Metrics, metric_names
from tests.ops_tools import (
    ALERTS,
    ALERTS_TEST,
    APP_JOBS,
    COMPOSE_FILE,
    COMPOSE_LIVENESS,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    EXTERNAL_METRICS,
    PROMETHEUS_CONFIG,
    PrometheusTools,
    grafana_to_promql,
    promql_metric_names,
)

RULE_FILES = (ALERTS, COMPOSE_LIVENESS)


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


def test_dashboard_datasource_is_a_variable_defaulting_to_the_provisioned_uid(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    assert ds["current"]["value"] == datasource_uid()
    pick = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == pick, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == pick, p["title"]
    for name in ("namespace", "job"):
        assert variables[name]["datasource"] == pick, name


#: A metric selector in a query, with its matchers.
_SELECTOR = re.compile(r"\b(atproto_backfill_[a-z0-9_]+|up|kafka_[a-z_]+)\b(\{[^}]*\})?")


def test_every_query_is_scoped_to_the_chosen_namespace_and_components(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("namespace", "job"):
        v = variables[name]
        assert v["type"] == "query", name
        assert v["includeAll"] is True, name
        assert v["multi"] is True, name
        assert "atproto_backfill_process_resident_memory_bytes" in v["query"]["query"], "every process exports it"
    assert "namespace" in variables["job"]["query"]["query"], "components of the chosen namespace"
    selectors = 0
    for pid, _ref, expr in queries(dashboard):
        for m in _SELECTOR.finditer(expr):
            name, matchers = m.group(1), m.group(2) or ""
            selectors += 1
            if name.startswith("kafka_"):
                assert 'consumergroup=~"$consumergroup"' in matchers, (pid, expr)
            else:
                assert 'namespace=~"$namespace"' in matchers, (pid, expr)
                assert 'job=~"$job"' in matchers, (pid, expr)
    assert selectors >= 40


#: Units Grafana may use for one dimension.
UNIT_FAMILIES = {"s": {"s"}, "ops": {"ops", "reqps"}, "short": {"short"}, "bytes": {"bytes"},
                 "Bps": {"Bps"}, "percentunit": {"percentunit"}}


def dimension(expr: str) -> str:
    """What a query measures, from its metric names and functions."""
    if "histogram_quantile" in expr and "_seconds_bucket" in expr:
        return "s"
    if re.search(r"\brate\(\w+_seconds_total\b", expr):
        return "percentunit"  # seconds spent per second
    if re.search(r"\brate\(\w+_bytes_total\b", expr):
        return "Bps"  # bytes per second
    if "_sum{" in expr and "_count{" in expr:
        return "short"  # the mean of a histogram of counts
    if re.search(r"\brate\(", expr):
        return "ops"
    if "_bytes{" in expr:
        return "bytes"
    if "_ratio{" in expr:
        return "percentunit"
    if "_seconds{" in expr:
        return "s"
    return "short"  # counts: increase(), gauges of messages, members, up


def test_every_axis_has_one_unit_and_it_is_the_querys(dashboard: dict[str, Any]) -> None:
    checked = 0
    for p in panels(dashboard):
        if p["type"] != "timeseries":
            continue
        default = p["fieldConfig"]["defaults"]["unit"]
        units: dict[str, str] = {}
        placement: dict[str, str] = {}
        for o in p["fieldConfig"]["overrides"]:
            if o["matcher"]["id"] == "byFrameRefID":
                for prop in o["properties"]:
                    if prop["id"] == "unit":
                        units[o["matcher"]["options"]] = prop["value"]
                    if prop["id"] == "custom.axisPlacement":
                        placement[o["matcher"]["options"]] = prop["value"]
        axes: dict[str, set[str]] = {}
        for t in p["targets"]:
            unit = units.get(t["refId"], default)
            axes.setdefault(placement.get(t["refId"], "left"), set()).add(unit)
            wanted = dimension(t["expr"])
            assert unit in UNIT_FAMILIES[wanted], f"{p['title']} {t['refId']}: {unit} for a query in {wanted}"
            checked += 1
        for axis, found in axes.items():
            assert len(found) == 1, f"{p['title']}: the {axis} axis mixes {sorted(found)}"
    assert checked >= 39


def test_unit_check_catches_seconds_and_counts_on_one_axis() -> None:
    assert dimension('histogram_quantile(0.99, sum by (le) (rate(x_duration_seconds_bucket{a="b"}[1m])))') == "s"
    assert dimension('sum(rate(atproto_backfill_producer_checkpoints_total{a="b"}[1m]))') == "ops"
    assert dimension('sum(rate(atproto_backfill_jetstream2_archive_received_bytes_total{a="b"}[1m]))') == "Bps"
    mean = 'sum(rate(x_batch_size_messages_sum{a="b"}[1m])) / sum(rate(x_batch_size_messages_count{a="b"}[1m]))'
    assert dimension(mean) == "short"


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
    missing = sorted(used - registry_names - EXTERNAL_METRICS)
    assert not missing, f"dashboard names metrics the code does not register: {missing}"
    assert all(n.startswith("atproto_backfill_") for n in used - EXTERNAL_METRICS)


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
        "up",  # a dead process exports nothing else
        "kafka_consumergroup_lag",  # lag measured at the broker
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
    out = []
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        out.extend(r for g in doc["groups"] for r in g["rules"])
    return out


def test_alert_rules_pass_promtool_check_rules(prom: PrometheusTools) -> None:
    for path in RULE_FILES:
        result = promtool(prom, "check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests(prom: PrometheusTools) -> None:
    assert yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["rule_files"] == [p.name for p in RULE_FILES]
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


def test_alerts_cover_liveness_lag_stalled_cursor_and_dead_letters(registry_names: set[str]) -> None:
    rules = alert_rules()
    used: set[str] = set()
    for r in rules:
        assert r["alert"].startswith("AtprotoBackfill")
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        assert r["annotations"]["description"]
        assert r["annotations"]["runbook_url"].endswith("#" + r["alert"].lower()), r["alert"]
        assert r.get("for"), f"{r['alert']} fires on a single evaluation"
        used |= promql_metric_names(r["expr"])
    assert not sorted(used - registry_names - EXTERNAL_METRICS)
    assert "atproto_backfill_consumer_lag_messages" in used
    assert "atproto_backfill_producer_source_cursor" in used
    assert "atproto_backfill_dlq_messages_total" in used
    # what a dead process cannot report: its targets down, no target at all, lag seen by the broker
    assert "up" in used
    assert any(r["expr"].startswith("absent(up{") for r in rules)
    assert "kafka_consumergroup_lag" in used


def test_alert_aggregations_keep_the_namespace() -> None:
    # Two releases in two namespaces must never add up (and their jobs have the same names).
    for r in alert_rules():
        if "atproto_backfill_" not in r["expr"]:
            continue
        for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", r["expr"]):
            labels = {label.strip() for label in clause.split(",")}
            assert "namespace" in labels, f"{r['alert']}: by/on ({clause}) drops the namespace"


def test_target_down_covers_every_component_and_nothing_else() -> None:
    (down,) = [r for r in alert_rules() if r["alert"] == "AtprotoBackfillTargetDown"]
    m = re.search(r'up\{job=~"([^"]+)"\} == 0', down["expr"])
    assert m is not None
    for job in APP_JOBS:
        assert re.fullmatch(m.group(1), job), job
    for other in ("prometheus", "kafka-exporter", "node-exporter", "grafana"):
        assert not re.fullmatch(m.group(1), other), other


def test_compose_liveness_rules_cover_the_default_services() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
    default = {name for name, svc in compose.items()
               if "profiles" not in svc and "BACKFILL_METRICS_PORT" in (svc.get("environment") or {})}
    rules = yaml.safe_load(COMPOSE_LIVENESS.read_text(encoding="utf-8"))["groups"][0]["rules"]
    jobs = {r["labels"]["job"] for r in rules}
    assert jobs == default | {"kafka-exporter"}
    for r in rules:
        assert r["alert"] == "AtprotoBackfillComponentDown"
        assert r["expr"] == f'absent(up{{job="{r["labels"]["job"]}"}} == 1)'


def test_alert_unit_tests_can_fail(prom: PrometheusTools, tmp_path: Path) -> None:
    # The same tests against rules with an impossible threshold must fail: the unit tests really check.
    rules = ALERTS.read_text(encoding="utf-8").replace("> 100000", "> 1e12")
    (tmp_path / "alerts.yml").write_text(rules, encoding="utf-8")
    (tmp_path / COMPOSE_LIVENESS.name).write_text(COMPOSE_LIVENESS.read_text(encoding="utf-8"), encoding="utf-8")
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
    assert jobs == app_services | {"kafka-exporter"}
    assert "kafka-exporter" in compose
    for job in config["scrape_configs"]:
        if job["job_name"] == "prometheus":
            continue
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [job["job_name"]]
        if job["job_name"] == "kafka-exporter":
            assert sd["port"] == 9308, "kafka_exporter's default --web.listen-address"
        else:
            assert sd["port"] == int(compose[job["job_name"]]["environment"]["BACKFILL_METRICS_PORT"])
    # every rule file is loaded, and compose mounts each next to the configuration
    assert config["rule_files"] == [p.name for p in RULE_FILES]
    mounts = compose["prometheus"]["volumes"]
    for path in RULE_FILES:
        assert f"./{path.relative_to(COMPOSE_FILE.parent)}:/etc/prometheus/{path.name}:ro" in mounts


def test_grafana_rate_interval_matches_the_scrape_interval() -> None:
    # $__rate_interval is derived from the datasource's timeInterval: it must be the scrape interval.
    (ds,) = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
