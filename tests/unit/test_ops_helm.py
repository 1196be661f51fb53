"""The Helm chart, linted and rendered with the Helm SDK (helm-python-sdk), the manifests validated
against the Kubernetes schemas (kubernetes-validate, strict) and the KEDA / Prometheus Operator
resources against their models (cloudcoil), for the default values and every documented example."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops_tools import (
    ALERTS,
    CHART,
    DASHBOARD,
    ToolUnavailable,
    command_module,
    module_installed,
    parse_cli,
    require_module,
)

try:
    require_module("helm_python", "helm-python-sdk")
    require_module("kubernetes_validate", "kubernetes-validate")
    require_module("cloudcoil.models.keda", "cloudcoil-models-keda")
    require_module("cloudcoil.models.prometheus_operator", "cloudcoil-models-prometheus-operator")
except ToolUnavailable as e:
    pytest.skip(str(e), allow_module_level=True)

import cloudcoil.models.keda.v1alpha1 as keda
import cloudcoil.models.prometheus_operator.v1 as prometheus_operator
import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information

KUBE_VERSION = "1.30.0"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CASES = ["default", *(p.stem for p in EXAMPLES)]
#: Custom resources validated against their cloudcoil models instead of the Kubernetes schemas.
CRD_MODELS: dict[str, Any] = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
    "ServiceMonitor": prometheus_operator.ServiceMonitor,
    "PrometheusRule": prometheus_operator.PrometheusRule,
}
DB = "postgresql://backfill:s3cr3t-db-pw@db:5432/app"


def case_values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    values: dict[str, Any] = helm.values_from_yaml((CHART / "examples" / f"{case}.yaml").read_text(encoding="utf-8"))
    return values


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(values, name="bf", namespace="backfill")
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container starts with (Secret references get a stand-in value)."""
    env: dict[str, str] = {}
    configmaps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = DB if item["name"] == "DATABASE_URL" else f"from-secret-{ref['key']}"
    return env


# ------------------------------------------------------------------------------------------ lint and render


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_clean(case: str) -> None:
    report = helm.lint(CHART, case_values(case), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_rendered_manifests_validate_against_kubernetes_schemas(chart: Any, case: str) -> None:
    docs = render(chart, case_values(case))
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_MODELS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {path}: {e.message}")


@pytest.mark.parametrize("case", CASES)
def test_custom_resources_match_their_models(chart: Any, case: str) -> None:
    for doc in render(chart, case_values(case)):
        model = CRD_MODELS.get(doc["kind"])
        if model is None:
            continue
        parsed = model.model_validate(doc)
        # The models ignore unknown fields: a lossless round trip proves there are none.
        assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, doc["kind"]


def test_model_round_trip_catches_an_unknown_field() -> None:
    doc = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"name": "d"}, "maxReplicaCount": 3, "maxReplicas": 3,
                    "triggers": [{"type": "kafka", "metadata": {"lagThreshold": "5"}}]}}
    parsed = keda.ScaledObject.model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) != doc


@pytest.mark.parametrize("case", CASES)
def test_every_container_command_parses_with_the_cli(chart: Any, case: str) -> None:
    docs = render(chart, case_values(case))
    for name, spec in pod_specs(docs):
        for container in spec["containers"]:
            args = container["args"]
            module = command_module(args)
            assert module is not None, f"{name}: {args}"
            if not module_installed(module):
                continue  # a command whose module is not part of this installation yet
            ns = parse_cli(args, container_env(docs, container))
            assert ns.metrics_port == 9100, name
            assert ns.metrics_host == "0.0.0.0", name
            if args[0] in ("jetstream", "firehose"):
                assert ns.resume is True, name
            if args[0] == "firehose":
                assert ns.follow is True, name
                assert ns.relay_url == "wss://bsky.network", name


@pytest.mark.parametrize("case", CASES)
def test_workloads_are_hardened_and_probed(chart: Any, case: str) -> None:
    docs = render(chart, case_values(case))
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["terminationGracePeriodSeconds"] >= 30, name
        (container,) = spec["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        if spec.get("restartPolicy") != "Never":  # Jobs have no readiness
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
        assert container["resources"]["requests"], name
        assert container["resources"]["limits"]["memory"], name
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/cache"} <= mounts, name


# ------------------------------------------------------------------------------------------ topology


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (d,) = [d for d in by_kind(docs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return d


def test_default_is_a_live_jetstream_producer(chart: Any) -> None:
    docs = render(chart, {})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"]
    producer = deployment(docs, "producer-jetstream")
    assert producer["spec"]["replicas"] == 1
    assert producer["spec"]["strategy"] == {"type": "Recreate"}
    args = producer["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:9] == ["jetstream", "--consumer", "none", "--num-records", "0", "--max-time", "0", "--job",
                        "jetstream-live"]


def test_full_stack_renders_every_component(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in by_kind(docs, "Deployment")}
    assert components == {"producer-firehose", "repos", "consumer-postgres", "consumer-queue"}
    assert deployment(docs, "producer-firehose")["spec"]["strategy"] == {"type": "Recreate"}
    queue = deployment(docs, "consumer-queue")
    assert queue["spec"]["replicas"] == 1
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in queue["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    pdbs = {d["metadata"]["name"] for d in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs == {"bf-atproto-backfill-consumer-postgres", "bf-atproto-backfill-repos"}
    repos = deployment(docs, "repos")
    assert repos["spec"]["replicas"] == 4
    container = repos["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["repos", "--from-topic"]
    # downloaded CARs go to a disk-backed scratch volume, not the small /tmp
    assert {"name": "BACKFILL_WORKDIR", "value": "/data"} in container["env"]
    assert {"name": "work", "mountPath": "/data"} in container["volumeMounts"]
    (work,) = [v for v in repos["spec"]["template"]["spec"]["volumes"] if v["name"] == "work"]
    assert work["emptyDir"]["sizeLimit"] == "20Gi"


def test_consumer_replicas_by_value(chart: Any) -> None:
    docs = render(chart, case_values("postgres-replicas"))
    consumer = deployment(docs, "consumer-postgres")
    assert consumer["spec"]["replicas"] == 4
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "ScaledObject")


def test_consumer_replicas_by_hpa(chart: Any) -> None:
    docs = render(chart, case_values("postgres-hpa"))
    consumer = deployment(docs, "consumer-postgres")
    assert "replicas" not in consumer["spec"], "the HPA owns the replica count"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] == 12
    assert not by_kind(docs, "ScaledObject")


def test_consumer_replicas_by_keda_on_the_consumer_groups_lag(chart: Any) -> None:
    values = case_values("postgres-keda-sasl")
    docs = render(chart, values)
    consumer = deployment(docs, "consumer-postgres")
    assert "replicas" not in consumer["spec"]
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    (so,) = by_kind(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
    assert so["spec"]["maxReplicaCount"] <= values["kafka"]["topicPartitions"]
    (trigger,) = so["spec"]["triggers"]
    args = consumer["spec"]["template"]["spec"]["containers"][0]["args"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == args[args.index("--group") + 1]
    assert trigger["metadata"]["bootstrapServers"] == values["kafka"]["bootstrapServers"]
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    (auth,) = by_kind(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("atproto-backfill-credentials", "kafka-sasl-username"),
                    "password": ("atproto-backfill-credentials", "kafka-sasl-password"),
                    "ca": ("kafka-ca", "ca.crt")}


def test_backfill_jobs_resume_and_do_not_retry_usage_errors(chart: Any) -> None:
    docs = render(chart, case_values("backfill-jobs"))
    jobs = by_kind(docs, "Job")
    assert [j["metadata"]["labels"]["atproto-backfill/job"] for j in jobs] == ["jetstream-7d", "jetstream-profiles"]
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        name = job["metadata"]["labels"]["atproto-backfill/job"]
        assert args[:4] == ["jetstream", "--job", name, "--resume"]
        assert "--end-timestamp" in args, "a bounded backfill ends at its watermark"
        assert spec["restartPolicy"] == "Never"
        assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert jobs[0]["spec"]["activeDeadlineSeconds"] == 172800


# ------------------------------------------------------------------------------------------ values checks


def with_postgres(**postgres: Any) -> dict[str, Any]:
    return {"secrets": {"databaseUrl": DB}, "consumers": {"postgres": {"enabled": True, **postgres}}}


def test_schema_refuses_two_autoscalers(chart: Any) -> None:
    values = with_postgres(autoscaling={"hpa": {"enabled": True}, "keda": {"enabled": True}})
    with pytest.raises(helm.HelmValuesError, match="autoscaling"):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        render(chart, values)
    chart.validate_schema(with_postgres(autoscaling={"keda": {"enabled": True}}))


@pytest.mark.parametrize("postgres", [
    {"replicas": 7},
    {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 7}}},
    {"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 7}}},
])
def test_replicas_are_bounded_by_the_partitions(chart: Any, postgres: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"exceeds kafka\.topicPartitions"):
        render(chart, with_postgres(**postgres))
    bigger = with_postgres(**postgres)
    bigger["kafka"] = {"topicPartitions": 7}
    assert render(chart, bigger)


def test_repo_workers_are_bounded_by_the_partitions(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"repos.replicas \(9\)"):
        render(chart, {"repos": {"enabled": True, "replicas": 9}})


@pytest.mark.parametrize("values", [
    {"consumers": {"postgres": {"replicaz": 2}}},
    {"kafka": {"securityProtocol": "SASL_SSLL"}},
    {"config": {"env": {"DATABASE_URL": DB}}},
    {"config": {"env": {"KAFKA_SASL_PASSWORD": "pw"}}},
    {"producers": {"jetstream": {"env": {"SCHEMA_REGISTRY_BASIC_AUTH": "u:p"}}}},
    {"backfillJobs": [{"name": "x", "command": "consume"}]},
])
def test_schema_refuses_typos_and_credentials_outside_secrets(chart: Any, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_postgres_consumer_needs_a_database(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="needs a database"):
        render(chart, {"consumers": {"postgres": {"enabled": True}}})


def test_credentials_only_in_the_secret(chart: Any) -> None:
    values = with_postgres()
    values["kafka"] = {"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-256"}
    values["secrets"].update(kafkaSaslUsername="bf-user", kafkaSaslPassword="s3cr3t-kafka-pw",
                             schemaRegistryBasicAuth="reg:s3cr3t-reg-pw")
    values["schemaRegistry"] = {"url": "https://registry.test", "basicAuth": True}
    docs = render(chart, values)
    (secret,) = by_kind(docs, "Secret")
    assert secret["stringData"] == {"database-url": DB, "kafka-sasl-username": "bf-user",
                                    "kafka-sasl-password": "s3cr3t-kafka-pw",
                                    "schema-registry-basic-auth": "reg:s3cr3t-reg-pw"}
    others = json.dumps([d for d in docs if d["kind"] != "Secret"])
    for secret_value in ("s3cr3t-db-pw", "s3cr3t-kafka-pw", "s3cr3t-reg-pw", "bf-user"):
        assert secret_value not in others
    consumer = deployment(docs, "consumer-postgres")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in consumer["env"] if "valueFrom" in e}
    assert set(refs) == {"DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "SCHEMA_REGISTRY_BASIC_AUTH"}
    assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
    producer = deployment(docs, "producer-jetstream")["spec"]["template"]["spec"]["containers"][0]
    assert "DATABASE_URL" not in {e["name"] for e in producer["env"]}, "only consumers get the database"


def test_existing_secret_is_used_and_none_is_created(chart: Any) -> None:
    values = {"secrets": {"existingSecret": "mine"}, "consumers": {"postgres": {"enabled": True}}}
    docs = render(chart, values)
    assert not by_kind(docs, "Secret")
    consumer = deployment(docs, "consumer-postgres")["spec"]["template"]["spec"]["containers"][0]
    (db,) = [e for e in consumer["env"] if e["name"] == "DATABASE_URL"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "database-url"}


def test_kafka_ca_is_mounted_and_configured(chart: Any) -> None:
    docs = render(chart, case_values("postgres-keda-sasl"))
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["KAFKA_SSL_CA_LOCATION"] == "/etc/atproto-backfill/kafka-ca/ca.crt"
    assert cm["data"]["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["data"]["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    spec = deployment(docs, "consumer-postgres")["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "kafka-ca"]
    assert vol["secret"]["secretName"] == "kafka-ca"
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["kafka-ca"]["readOnly"] is True


# ------------------------------------------------------------------------------------------ monitoring


def test_service_monitor_scrapes_the_metrics_port_of_every_pod(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert svc["spec"]["clusterIP"] == "None"
    for _name, spec in pod_specs(docs):
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert ports["metrics"] == svc["spec"]["ports"][0]["port"]
    for d in by_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()


def test_prometheus_rule_ships_the_alert_rules(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]


def test_grafana_configmaps_ship_the_dashboard_and_its_datasource(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    dash = maps["bf-atproto-backfill-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["atproto-backfill.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ds = yaml.safe_load(maps["bf-atproto-backfill-datasource"]["data"]["atproto-backfill-datasource.yaml"])
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus-operated.monitoring.svc:9090"
    assert source["uid"] == json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"][1]["datasource"]["uid"]


def test_examples_are_documented() -> None:
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        first = Path(path).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), f"{path.name} starts with a comment saying what it shows"


def test_values_defaults_pass_the_schema(chart: Any) -> None:
    chart.validate_schema(copy.deepcopy(chart.values))
