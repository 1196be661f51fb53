"""The Helm chart, linted and rendered with the Helm SDK (helm-python-sdk), the manifests validated
against the Kubernetes schemas (kubernetes-validate, strict) and the KEDA / Prometheus Operator
resources against their models (cloudcoil), for the minimal values and every documented example;
upgrades rendered against installs to show that no immutable field of an existing object changes;
the rendered alert rules run through promtool."""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.kafka.settings import KAFKA_OPTIONS, KafkaSettings
from runtime.process.options import resolve_appends
from tests.ops_tools import (
    ALERTS,
    APP_JOBS,
    CHART,
    COMPOSE_LIVENESS,
    DASHBOARD,
    DATABASE_CHECK,
    HEALTH_CHECK,
    ROOT,
    RUNBOOK,
    PrometheusTools,
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
#: "minimal": ci/minimal-values.yaml, the defaults plus the one value without a default (the image).
CASES = ["minimal", *(p.stem for p in EXAMPLES)]
IMAGE = {"repository": "registry.test/atproto-backfill"}
MINIMAL = CHART / "ci" / "minimal-values.yaml"
#: Custom resources validated against their cloudcoil models instead of the Kubernetes schemas.
CRD_MODELS: dict[str, Any] = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
    "ServiceMonitor": prometheus_operator.ServiceMonitor,
    "PrometheusRule": prometheus_operator.PrometheusRule,
}
WORKLOADS = ("Deployment", "StatefulSet", "Job", "Pod")
DB = "postgresql://backfill:s3cr3t-db-pw@db:5432/app"
NAMESPACE = "backfill"


def case_values(case: str) -> dict[str, Any]:
    path = MINIMAL if case == "minimal" else CHART / "examples" / f"{case}.yaml"
    values: dict[str, Any] = helm.values_from_yaml(path.read_text(encoding="utf-8"))
    return values


def minimal(**values: Any) -> dict[str, Any]:
    return {"image": dict(IMAGE), **values}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any], *, upgrade: bool = False) -> list[dict[str, Any]]:
    if upgrade:
        out = chart.render(values, name="bf", namespace=NAMESPACE, revision=2, is_upgrade=True)
    else:
        out = chart.render(values, name="bf", namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]
        elif d["kind"] in WORKLOADS:
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any], pod: str = "pod-0") -> dict[str, str]:
    """The environment a container starts with (Secret references get a stand-in value)."""
    env: dict[str, str] = {}
    configmaps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = DB if item["name"] == "DATABASE_URL" else f"from-secret-{ref['key']}"
    return env


def kafka_of(docs: list[dict[str, Any]], container: dict[str, Any]) -> KafkaSettings:
    """The Kafka settings a container's process builds (BACKFILL_KAFKA_CONFIG included)."""
    env = container_env(docs, container)
    ns = parse_cli(container["args"], env)
    resolve_appends(ns, KAFKA_OPTIONS, env)
    return KafkaSettings.from_namespace(ns)


def component_of(doc: dict[str, Any]) -> str:
    component: str = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    return component


def workload(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (d,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and component_of(d) == component]
    return d


def main_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


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
    parsed = 0
    for name, spec in pod_specs(docs):
        for container in containers(spec):
            if "command" in container:  # a helm test script (tested below)
                assert container["command"][:2] == ["python", "-c"], name
                continue
            args = container["args"]
            module = command_module(args)
            assert module is not None, f"{name}: {args}"
            if not module_installed(module):
                continue  # a command whose module is not part of this installation yet
            ns = parse_cli(args, container_env(docs, container))
            parsed += 1
            assert kafka_of(docs, container).producer_config()["message.max.bytes"] == "1000000", name
            if args[0] == "status":  # the helm test: no metrics server
                continue
            assert ns.metrics_port == 9100, name
            assert ns.metrics_host == "0.0.0.0", name
            if args[0] in ("jetstream", "firehose"):
                assert ns.resume is True, name
            if args[0] == "firehose":
                assert ns.follow is True, name
                assert ns.relay_url == "wss://bsky.network", name
    assert parsed


@pytest.mark.parametrize("case", CASES)
def test_workloads_are_hardened_and_probed(chart: Any, case: str) -> None:
    docs = render(chart, case_values(case))
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in containers(spec):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name
            assert container["resources"]["limits"]["memory"], name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/cache"} <= mounts, name
        if spec.get("restartPolicy") == "Never" and "terminationGracePeriodSeconds" not in spec:
            continue  # a helm test Pod: no probes, nothing to drain
        assert spec["terminationGracePeriodSeconds"] >= 30, name
        (container,) = spec["containers"]
        # the startup probe holds liveness off until /healthz first answers (no fixed initial delay)
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        budget = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
        assert budget >= 120, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        if spec.get("restartPolicy") != "Never":  # Jobs have no readiness
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name


# ------------------------------------------------------------------------------------------ topology


def test_minimal_is_a_live_jetstream_producer_with_its_helm_tests(chart: Any) -> None:
    assert set(case_values("minimal")) == {"image"}
    docs = render(chart, minimal())
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Pod", "Secret", "Service", "ServiceAccount"]
    producer = workload(docs, "producer-jetstream")
    assert producer["spec"]["replicas"] == 1
    assert producer["spec"]["strategy"] == {"type": "Recreate"}
    args = main_container(producer)["args"]
    assert args[:9] == ["jetstream", "--consumer", "none", "--num-records", "0", "--max-time", "0", "--job",
                        "jetstream-live"]
    assert main_container(producer)["image"] == "registry.test/atproto-backfill:0.1.0"


def test_the_image_must_be_named(chart: Any) -> None:
    # No registry publishes the image: rendering says how to build it instead of pulling a ghost.
    with pytest.raises(helm.HelmRenderError, match=r"image\.repository is required.*docker build"):
        render(chart, {})
    docs = render(chart, minimal(image={**IMAGE, "digest": "sha256:" + "ab" * 32}))
    image = main_container(workload(docs, "producer-jetstream"))["image"]
    assert image == "registry.test/atproto-backfill@sha256:" + "ab" * 32


def test_full_stack_renders_every_component(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    components = {component_of(d) for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    assert components == {"producer-firehose", "producer-repos", "consumer-postgres", "consumer-queue"}
    assert workload(docs, "producer-firehose")["spec"]["strategy"] == {"type": "Recreate"}
    queue = workload(docs, "consumer-queue")
    assert queue["spec"]["replicas"] == 1
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in queue["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    pdbs = {d["metadata"]["name"] for d in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs == {"bf-atproto-backfill-consumer-postgres", "bf-atproto-backfill-producer-repos"}
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        target = workload(docs, pdb["metadata"]["labels"]["app.kubernetes.io/component"])
        assert pdb["spec"]["selector"]["matchLabels"] == target["spec"]["selector"]["matchLabels"]


def test_repo_workers_are_a_statefulset_with_stable_replica_ids(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    repos = workload(docs, "producer-repos")
    assert repos["kind"] == "StatefulSet", "a Deployment's pods get new names: no fencing on reschedule"
    assert repos["spec"]["replicas"] == 4
    assert repos["spec"]["podManagementPolicy"] == "Parallel"
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    assert repos["spec"]["serviceName"] in services
    container = main_container(repos)
    assert container["args"][:2] == ["repos", "--from-topic"]
    (replica,) = [e for e in container["env"] if e["name"] == "BACKFILL_REPLICA_ID"]
    assert replica["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the pod name of ordinal N is the replica id, so its transactional id survives a reschedule
    name = repos["metadata"]["name"]
    assert len(name) <= 52, "StatefulSet names leave room for the revision hash label"
    for ordinal in (0, 3):
        ns = parse_cli(container["args"], container_env(docs, container, pod=f"{name}-{ordinal}"))
        assert ns.replica_id == f"{name}-{ordinal}"
    # downloaded CARs go to a disk-backed scratch volume, not the small /tmp
    assert {"name": "BACKFILL_WORKDIR", "value": "/data"} in container["env"]
    assert {"name": "work", "mountPath": "/data"} in container["volumeMounts"]
    (work,) = [v for v in repos["spec"]["template"]["spec"]["volumes"] if v["name"] == "work"]
    assert work["emptyDir"]["sizeLimit"] == "20Gi"


def test_replica_id_cannot_be_overridden_by_env(chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(minimal(repos={"enabled": True, "env": {"BACKFILL_REPLICA_ID": "x"}}))


def test_consumer_replicas_by_value(chart: Any) -> None:
    docs = render(chart, case_values("postgres-replicas"))
    consumer = workload(docs, "consumer-postgres")
    assert consumer["spec"]["replicas"] == 4
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "ScaledObject")


def test_consumer_replicas_by_hpa_scale_down_slowly(chart: Any) -> None:
    docs = render(chart, case_values("postgres-hpa"))
    consumer = workload(docs, "consumer-postgres")
    assert "replicas" not in consumer["spec"], "the HPA owns the replica count"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] == 12
    assert hpa["spec"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}
    assert not by_kind(docs, "ScaledObject")


def test_keda_scales_on_each_hot_topic_never_to_zero_and_down_slowly(chart: Any) -> None:
    values = case_values("postgres-keda-sasl")
    docs = render(chart, values)
    consumer = workload(docs, "consumer-postgres")
    assert "replicas" not in consumer["spec"]
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    (so,) = by_kind(docs, "ScaledObject")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= values["kafka"]["topicPartitions"]
    # the same slow scale-down as the HPA: every step rebalances the group
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    args = main_container(consumer)["args"]
    topics = [t["metadata"]["topic"] for t in spec["triggers"]]
    wanted = values["consumers"]["postgres"]["autoscaling"]["keda"]["topics"]
    assert topics == [f"atproto.{c}" for c in wanted], "one trigger per named topic: never a group-wide guess"
    (auth,) = by_kind(docs, "TriggerAuthentication")
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == args[args.index("--group") + 1]
        assert meta["bootstrapServers"] == values["kafka"]["bootstrapServers"]
        assert meta["sasl"] == "scram_sha512"
        assert meta["tls"] == "enable"
        assert meta["allowIdleConsumers"] == "false"
        assert "activationLagThreshold" not in meta
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert len({t["name"] for t in spec["triggers"]}) == len(spec["triggers"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("atproto-backfill-credentials", "kafka-sasl-username"),
                    "password": ("atproto-backfill-credentials", "kafka-sasl-password"),
                    "ca": ("kafka-ca", "ca.crt")}


def test_keda_refuses_zero_replicas_and_unconsumed_topics(chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(with_postgres(autoscaling={"keda": {"enabled": True, "minReplicaCount": 0}}))
    values = with_postgres(collections=["app.bsky.feed.*"],
                           autoscaling={"keda": {"enabled": True, "topics": ["app.bsky.graph.follow"]}})
    with pytest.raises(helm.HelmRenderError, match=r"app\.bsky\.graph\.follow is not among"):
        render(chart, values)
    values["consumers"]["postgres"]["autoscaling"]["keda"]["topics"] = ["app.bsky.feed.like"]
    (so,) = by_kind(render(chart, values), "ScaledObject")
    assert [t["metadata"]["topic"] for t in so["spec"]["triggers"]] == ["atproto.app.bsky.feed.like"]


def test_backfill_jobs_resume_and_do_not_retry_usage_errors(chart: Any) -> None:
    docs = render(chart, case_values("backfill-jobs"))
    jobs = by_kind(docs, "Job")
    assert [j["metadata"]["labels"]["atproto-backfill/job"] for j in jobs] == ["jetstream-7d", "jetstream-profiles"]
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        name = job["metadata"]["labels"]["atproto-backfill/job"]
        assert re.fullmatch(rf"bf-atproto-backfill-{name}-[0-9a-f]{{8}}", job["metadata"]["name"])
        assert job["metadata"]["annotations"]["atproto-backfill/spec-hash"] == job["metadata"]["name"][-8:]
        assert args[:4] == ["jetstream", "--job", name, "--resume"]
        assert "--end-timestamp" in args, "a bounded backfill ends at its watermark"
        assert spec["restartPolicy"] == "Never"
        assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
        assert "ttlSecondsAfterFinished" not in job["spec"], "finished Jobs stay until their entry is removed"
        # nothing in the immutable template that changes with the chart or app version
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels
        assert "app.kubernetes.io/version" not in labels
        assert labels["atproto-backfill/job"] == name
    assert jobs[0]["spec"]["activeDeadlineSeconds"] == 172800


# ------------------------------------------------------------------------------------------ upgrades

#: Fields Kubernetes refuses to change on an existing object (an update that tries is rejected).
IMMUTABLE: dict[str, tuple[str, ...]] = {
    "Job": ("template", "selector", "podFailurePolicy", "completions", "completionMode", "manualSelector",
            "backoffLimitPerIndex"),
    "Deployment": ("selector",),
    "StatefulSet": ("selector", "serviceName", "podManagementPolicy", "volumeClaimTemplates"),
    "PersistentVolumeClaim": ("accessModes", "storageClassName", "volumeName", "selector", "volumeMode"),
    "Service": ("clusterIP",),
}


def immutable_changes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """Every immutable spec field of an object present in both renders whose value differs."""
    old = {(d["kind"], d["metadata"]["name"]): d for d in before}
    changes = []
    for doc in after:
        key = (doc["kind"], doc["metadata"]["name"])
        if key not in old or doc["kind"] not in IMMUTABLE:
            continue
        for field in IMMUTABLE[doc["kind"]]:
            if old[key]["spec"].get(field) != doc["spec"].get(field):
                changes.append(f"{doc['kind']}/{doc['metadata']['name']}: spec.{field}")
    return changes


def upgraded(values: dict[str, Any]) -> dict[str, Any]:
    """The values of a typical upgrade: a new image, a changed setting, more consumers, an edited
    and an added backfill."""
    new = copy.deepcopy(values)
    new["image"].pop("digest", None)
    new["image"]["tag"] = "0.2.0"
    new.setdefault("config", {})["logLevel"] = "DEBUG"
    new["consumers"]["postgres"]["replicas"] = 2
    if new.get("backfillJobs"):
        new["backfillJobs"][1]["args"] = [*new["backfillJobs"][1]["args"], "--allowed-lateness", "2"]
        new["backfillJobs"].append({"name": "firehose-range", "command": "firehose",
                                    "args": ["--start-cursor", "100", "--end-timestamp", "2026-11-20"]})
    return new


@pytest.mark.parametrize("case", ["backfill-jobs", "full-stack", "external-kafka-mtls"])
def test_an_upgrade_changes_no_immutable_field_of_an_existing_object(chart: Any, case: str) -> None:
    values = case_values(case)
    values.setdefault("image", dict(IMAGE))
    before = render(chart, values)
    after = render(chart, upgraded(values), upgrade=True)
    assert immutable_changes(before, after) == []
    # what changed is really rolled out: the Jobs that run the new image are new Jobs
    old_jobs = {j["metadata"]["name"] for j in by_kind(before, "Job")}
    for job in by_kind(after, "Job"):
        assert job["metadata"]["name"] not in old_jobs, "a changed Job gets a new name, never an update"
        assert job["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
    for kind in ("Deployment", "StatefulSet"):
        for doc in by_kind(after, kind):
            assert main_container(doc)["image"].endswith(":0.2.0")


def test_an_upgrade_that_touches_no_job_leaves_the_jobs_alone(chart: Any, tmp_path: Path) -> None:
    values = case_values("backfill-jobs")
    before = by_kind(render(chart, values), "Job")
    # more consumers and a new chart version (same app version): the Jobs run exactly what they ran
    bumped = tmp_path / "atproto-backfill"
    shutil.copytree(CHART, bumped)
    meta = bumped / "Chart.yaml"
    text, bumps = re.subn(r"(?m)^version: .*$", "version: 99.0.0", meta.read_text(encoding="utf-8"))
    assert bumps == 1
    meta.write_text(text, encoding="utf-8")
    more = copy.deepcopy(values)
    more["consumers"]["postgres"]["replicas"] = 5
    with helm.Chart.load(bumped) as newer:
        docs = render(newer, more, upgrade=True)
    assert workload(docs, "consumer-postgres")["metadata"]["labels"]["helm.sh/chart"] == "atproto-backfill-99.0.0"
    after = by_kind(docs, "Job")
    assert [j["metadata"]["name"] for j in after] == [j["metadata"]["name"] for j in before]
    assert [j["spec"] for j in after] == [j["spec"] for j in before]


def test_a_jobs_mutable_fields_change_in_place(chart: Any) -> None:
    values = case_values("backfill-jobs")
    longer = copy.deepcopy(values)
    longer["backfillJobs"][0]["activeDeadlineSeconds"] = 259200
    longer["backfillJobDefaults"] = {"backoffLimit": 10, "ttlSecondsAfterFinished": 86400}
    before, after = by_kind(render(chart, values), "Job"), by_kind(render(chart, longer, upgrade=True), "Job")
    assert [j["metadata"]["name"] for j in after] == [j["metadata"]["name"] for j in before]
    assert after[0]["spec"]["activeDeadlineSeconds"] == 259200
    assert after[0]["spec"]["ttlSecondsAfterFinished"] == 86400
    assert after[0]["spec"]["backoffLimit"] == 10


def test_the_immutability_check_catches_an_updated_job_template(chart: Any) -> None:
    # What the chart did before: the same Job name with a new image in its template.
    before = render(chart, case_values("backfill-jobs"))
    after = copy.deepcopy(before)
    (job, *_) = by_kind(after, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.test/atproto-backfill:0.2.0"
    (sts_source,) = by_kind(render(chart, case_values("full-stack")), "StatefulSet")
    moved = copy.deepcopy(sts_source)
    moved["spec"]["serviceName"] = "elsewhere"
    assert immutable_changes(before, after) == [f"Job/{job['metadata']['name']}: spec.template"]
    assert immutable_changes([sts_source], [moved]) == [f"StatefulSet/{moved['metadata']['name']}: spec.serviceName"]


# ------------------------------------------------------------------------------------------ values checks


def with_postgres(**postgres: Any) -> dict[str, Any]:
    return minimal(secrets={"databaseUrl": DB}, consumers={"postgres": {"enabled": True, **postgres}})


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
        render(chart, minimal(repos={"enabled": True, "replicas": 9}))


@pytest.mark.parametrize("values", [
    {"consumers": {"postgres": {"replicaz": 2}}},
    {"kafka": {"securityProtocol": "SASL_SSLL"}},
    {"config": {"env": {"DATABASE_URL": DB}}},
    {"config": {"env": {"KAFKA_SASL_PASSWORD": "pw"}}},
    {"config": {"env": {"BACKFILL_KAFKA_CONFIG": "linger.ms=5"}}},
    {"producers": {"jetstream": {"env": {"SCHEMA_REGISTRY_BASIC_AUTH": "u:p"}}}},
    {"backfillJobs": [{"name": "x", "command": "consume"}]},
    {"kafka": {"clientConfig": {"sasl.password": "pw"}}},
    {"kafka": {"clientConfig": {"ssl.key.password": "pw"}}},
    {"kafka": {"clientConfig": {"message.max.bytes": 5000000}}},
    {"kafka": {"clientConfig": {"debug": "cgrp,linger.ms=5"}}},
    {"kafka": {"maxMessageBytes": 10}},
    {"image": {"repository": "r", "digest": "latest"}},
])
def test_schema_refuses_typos_and_credentials_outside_secrets(chart: Any, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_postgres_consumer_needs_a_database(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="needs a database"):
        render(chart, minimal(consumers={"postgres": {"enabled": True}}))


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
    consumer = main_container(workload(docs, "consumer-postgres"))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in consumer["env"] if "valueFrom" in e}
    assert set(refs) == {"DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "SCHEMA_REGISTRY_BASIC_AUTH"}
    assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
    producer = main_container(workload(docs, "producer-jetstream"))
    assert "DATABASE_URL" not in {e["name"] for e in producer["env"]}, "only consumers get the database"


def test_existing_secret_is_used_and_none_is_created(chart: Any) -> None:
    values = minimal(secrets={"existingSecret": "mine"}, consumers={"postgres": {"enabled": True}})
    docs = render(chart, values)
    assert not by_kind(docs, "Secret")
    consumer = main_container(workload(docs, "consumer-postgres"))
    (db,) = [e for e in consumer["env"] if e["name"] == "DATABASE_URL"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "database-url"}


def test_kafka_ca_is_mounted_and_configured(chart: Any) -> None:
    docs = render(chart, case_values("postgres-keda-sasl"))
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["KAFKA_SSL_CA_LOCATION"] == "/etc/atproto-backfill/kafka-ca/ca.crt"
    assert cm["data"]["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["data"]["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    spec = workload(docs, "consumer-postgres")["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "kafka-ca"]
    assert vol["secret"]["secretName"] == "kafka-ca"
    for container in containers(spec):
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["kafka-ca"]["readOnly"] is True


# ------------------------------------------------------------------------------------------ external Kafka


def test_producers_send_no_batch_above_the_brokers_message_size(chart: Any) -> None:
    from confluent_kafka import Consumer, Producer

    values = with_postgres()
    values["kafka"] = {"maxMessageBytes": 1048576}
    docs = render(chart, values)
    for component in ("producer-jetstream", "consumer-postgres"):
        kafka = kafka_of(docs, main_container(workload(docs, component)))
        producer_conf = kafka.producer_config()
        assert producer_conf["message.max.bytes"] == "1048576", "not the producers' own 4 MiB default"
        # librdkafka accepts these settings for both client kinds (no broker needed to build them)
        Producer({**producer_conf, "bootstrap.servers": "127.0.0.1:1"})
        Consumer({**kafka.consumer_config("g"), "bootstrap.servers": "127.0.0.1:1"}).close()


def test_mtls_mounts_the_client_certificate_and_configures_every_client(chart: Any) -> None:
    values = case_values("external-kafka-mtls")
    docs = render(chart, values)
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["KAFKA_SECURITY_PROTOCOL"] == "SSL"
    for name, spec in pod_specs(docs):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "kafka-client-cert"]
        assert vol["secret"]["secretName"] == "atproto-backfill-kafka-user", name
        for container in containers(spec):
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["kafka-client-cert"] == {"name": "kafka-client-cert", "readOnly": True,
                                                   "mountPath": "/etc/atproto-backfill/kafka-client"}, name
            if "command" in container:
                continue
            conf = kafka_of(docs, container)
            client = conf.client_config()
            assert client["ssl.certificate.location"] == "/etc/atproto-backfill/kafka-client/tls.crt", name
            assert client["ssl.key.location"] == "/etc/atproto-backfill/kafka-client/tls.key", name
            assert client["ssl.ca.location"] == "/etc/atproto-backfill/kafka-ca/ca.crt", name
            assert client["client.rack"] == "zone-a", name
            assert conf.producer_config()["compression.type"] == "lz4", name
    (auth,) = by_kind(docs, "TriggerAuthentication")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"ca": ("kafka-cluster-ca", "ca.crt"), "cert": ("atproto-backfill-kafka-user", "tls.crt"),
                    "key": ("atproto-backfill-kafka-user", "tls.key")}
    with pytest.raises(helm.HelmRenderError, match=r"need kafka\.securityProtocol SSL"):
        render(chart, minimal(kafka={"tls": {"caSecret": "", "caKey": "ca.crt", "clientCertSecret": "c"}}))


# ------------------------------------------------------------------------------------------ safe defaults


def guard(docs: list[dict[str, Any]], component: str) -> int:
    container = main_container(workload(docs, component))
    ns = parse_cli(container["args"], container_env(docs, container))
    value: int = ns.max_memory_mb
    return value


def test_memory_guard_derives_from_the_container_limit(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    assert guard(docs, "consumer-postgres") == 1536  # 75% of 2Gi
    assert guard(docs, "consumer-queue") == 768  # 75% of 1Gi
    for limit, percent, expected in (("3Gi", 50, 1536), ("1536Mi", 75, 1152), ("2G", 75, 1430),
                                     ("4294967296", 25, 1024)):
        values = with_postgres(memoryGuardPercent=percent,
                               resources={"requests": {"cpu": "1"}, "limits": {"memory": limit}})
        assert guard(render(chart, values), "consumer-postgres") == expected, limit


def test_memory_guard_in_env_wins_but_stays_below_the_limit(chart: Any) -> None:
    docs = render(chart, case_values("postgres-replicas"))
    assert guard(docs, "consumer-postgres") == 1536
    env = main_container(workload(docs, "consumer-postgres"))["env"]
    assert [e for e in env if e["name"] == "BACKFILL_MAX_MEMORY_MB"] == [
        {"name": "BACKFILL_MAX_MEMORY_MB", "value": "1536"}], "set once"
    with pytest.raises(helm.HelmRenderError, match=r"must stay below resources\.limits\.memory"):
        render(chart, with_postgres(env={"BACKFILL_MAX_MEMORY_MB": 4096}))
    with pytest.raises(helm.HelmRenderError, match=r"limits\.memory is required"):
        render(chart, with_postgres(resources={"limits": {"memory": None}}))  # null deletes the default


def test_postgres_migrations_run_in_an_init_container(chart: Any) -> None:
    docs = render(chart, minimal(secrets={"databaseUrl": DB}, consumers={"postgres": {
        "enabled": True, "extraArgs": ["--db-schema", "appview"]}}))
    spec = workload(docs, "consumer-postgres")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (main,) = spec["containers"]
    assert init["name"] == "migrate"
    assert init["image"] == main["image"]
    assert init["args"] == [*main["args"], "--migrate-only"]
    ns = parse_cli(init["args"], container_env(docs, init))
    assert ns.migrate_only is True
    assert ns.db_schema == "appview", "the same schema the consumer writes"
    assert ns.database_url.get() == DB
    off = render(chart, with_postgres(migrations={"initContainer": False}))
    assert "initContainers" not in workload(off, "consumer-postgres")["spec"]["template"]["spec"]


def test_queue_volume_survives_uninstall(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    off = render(chart, minimal(consumers={"queue": {"enabled": True, "persistence": {"keepOnUninstall": False}}}))
    (pvc,) = by_kind(off, "PersistentVolumeClaim")
    assert "annotations" not in pvc["metadata"]
    mine = render(chart, case_values("external-kafka-mtls"))
    assert not by_kind(mine, "PersistentVolumeClaim")
    volumes = workload(mine, "consumer-queue")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "jetstream-queue"}} in volumes


# ------------------------------------------------------------------------------------------ helm test


def test_helm_test_pods_check_kafka_health_and_the_database(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    pods = {p["metadata"]["name"]: p for p in by_kind(docs, "Pod")}
    assert set(pods) == {"bf-atproto-backfill-test-kafka", "bf-atproto-backfill-test-health",
                         "bf-atproto-backfill-test-database"}
    (svc,) = by_kind(docs, "Service")
    for pod in pods.values():
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        # the metrics Service must not select the test Pods (they serve no /healthz)
        assert not svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (kafka,) = pods["bf-atproto-backfill-test-kafka"]["spec"]["containers"]
    ns = parse_cli(kafka["args"], container_env(docs, kafka))
    assert ns.command == "status"
    assert ns.bootstrap_servers == "kafka-bootstrap.kafka.svc:9092"
    (health,) = pods["bf-atproto-backfill-test-health"]["spec"]["containers"]
    assert health["command"][2] == HEALTH_CHECK.read_text(encoding="utf-8")
    env = container_env(docs, health)
    assert env["BACKFILL_TEST_SERVICE"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc"
    assert env["BACKFILL_METRICS_PORT"] == str(svc["spec"]["ports"][0]["port"])
    (database,) = pods["bf-atproto-backfill-test-database"]["spec"]["containers"]
    assert database["command"][2] == DATABASE_CHECK.read_text(encoding="utf-8")
    assert container_env(docs, database)["DATABASE_URL"] == DB
    compile(DATABASE_CHECK.read_text(encoding="utf-8"), str(DATABASE_CHECK), "exec")
    assert not by_kind(render(chart, minimal(tests={"enabled": False})), "Pod")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.mark.parametrize("status", [200, 503, None])
def test_health_check_script_passes_only_when_every_pod_is_healthy(status: int | None) -> None:
    server = None
    port = 9
    if status is not None:
        handler = type("Handler", (_Health,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run([sys.executable, str(HEALTH_CHECK)], capture_output=True, text=True, timeout=60,
                                env={"BACKFILL_TEST_SERVICE": "127.0.0.1", "BACKFILL_METRICS_PORT": str(port),
                                     "BACKFILL_TEST_TIMEOUT": "0"}, check=False)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if status == 200:
        assert result.returncode == 0, result.stderr
        assert "1 pod(s) healthy" in result.stdout
    else:
        assert result.returncode == 1
        assert "unhealthy" in result.stderr
        if status == 503:
            assert "HTTP Error 503" in result.stderr


# ------------------------------------------------------------------------------------------ monitoring


def test_service_monitor_scrapes_every_pod_and_names_jobs_by_component(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert svc["spec"]["clusterIP"] == "None"
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    assert relabel["job"]["action"] == "replace"
    for _name, spec in pod_specs(docs):
        if "ports" in spec["containers"][0]:
            ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
            assert ports["metrics"] == svc["spec"]["ports"][0]["port"]
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert svc["spec"]["selector"].items() <= labels.items()


def test_job_labels_are_the_ones_the_alerts_and_the_dashboard_expect(chart: Any) -> None:
    # The ServiceMonitor turns each pod's component label into its job label.
    components = set()
    for case in ("full-stack", "backfill-jobs", "minimal"):
        for d in render(chart, case_values(case)):
            if d["kind"] in ("Deployment", "StatefulSet", "Job"):
                components.add(d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])
    assert components == set(APP_JOBS)
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"][0]["rules"]
    (down,) = [r for r in rules if r["alert"] == "AtprotoBackfillTargetDown"]
    regex = re.search(r'job=~"([^"]+)"', down["expr"])
    assert regex is not None
    assert {c for c in components if re.fullmatch(regex.group(1), c)} == components
    assert not re.fullmatch(regex.group(1), "node-exporter")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (job_var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert job_var["allValue"] == regex.group(1), "the dashboard's All is the alerts' set of jobs"


def rendered_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = by_kind(docs, "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_prometheus_rule_ships_the_alert_rules_with_runbooks(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    (rule,) = by_kind(docs, "PrometheusRule")
    shipped = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    assert set(groups) == {g["name"] for g in shipped} | {"atproto-backfill-liveness"}
    for group in shipped:
        assert [r["alert"] for r in groups[group["name"]]["rules"]] == [r["alert"] for r in group["rules"]]
        for mine, theirs in zip(groups[group["name"]]["rules"], group["rules"], strict=True):
            assert {k: v for k, v in mine.items() if k != "expr"} == \
                {k: v for k, v in theirs.items() if k != "expr"}, mine["alert"]
            groups_regex = "atproto-backfill-postgres|atproto-backfill-queue"
            assert mine["expr"] == theirs["expr"].replace("atproto-backfill-.*", groups_regex), mine["alert"]
    # the broker-side rules name this release's consumer groups
    broker = " ".join(r["expr"] for r in groups["atproto-backfill-broker"]["rules"])
    assert 'consumergroup=~"atproto-backfill-postgres|atproto-backfill-queue"' in broker
    assert "atproto-backfill-.*" not in broker
    # the runbook URLs follow metrics.prometheusRule.runbookUrlTemplate
    mtls = render(chart, case_values("external-kafka-mtls"))
    for r in rendered_rules(mtls):
        assert r["annotations"]["runbook_url"] == f"https://wiki.example.net/runbooks/atproto-backfill#{r['alert'].lower()}"
    no_broker = case_values("full-stack")
    no_broker["metrics"]["prometheusRule"]["brokerLagRules"] = False
    assert not [r for r in rendered_rules(render(chart, no_broker)) if "kafka_consumergroup" in r["expr"]]


def test_liveness_rules_cover_every_enabled_component(chart: Any) -> None:
    for case, expected in (("full-stack", {"producer-firehose", "producer-repos", "consumer-postgres",
                                           "consumer-queue"}),
                           ("backfill-jobs", {"producer-jetstream", "consumer-postgres"})):
        values = case_values(case)
        values.setdefault("metrics", {})["prometheusRule"] = {"enabled": True}
        down = [r for r in rendered_rules(render(chart, values)) if r["alert"] == "AtprotoBackfillComponentDown"]
        assert {r["labels"]["job"] for r in down} == expected, case
        for r in down:
            assert r["labels"]["namespace"] == NAMESPACE
            assert r["expr"] == f'absent(up{{namespace="{NAMESPACE}", job="{r["labels"]["job"]}"}} == 1)'
            assert r["for"] == "10m"


def test_every_alert_has_a_runbook_section() -> None:
    anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in RUNBOOK.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}
    alerts = set()
    for path in (ALERTS, COMPOSE_LIVENESS):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for r in group["rules"]:
                alerts.add(r["alert"])
                url = r["annotations"]["runbook_url"]
                assert url.endswith(f"/helm/atproto-backfill/RUNBOOK.md#{r['alert'].lower()}"), r["alert"]
    assert "AtprotoBackfillComponentDown" in alerts
    assert {a.lower() for a in alerts} <= anchors, sorted({a.lower() for a in alerts} - anchors)


def test_rendered_rules_pass_promtool_and_fire_per_component(chart: Any, prom: PrometheusTools,
                                                            tmp_path: Path) -> None:
    values = case_values("full-stack")
    values["consumers"]["postgres"]["group"] = "bf.pg"  # a regex metacharacter in a group name
    rules = rendered_rules(render(chart, values))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "rendered", "rules": rules}]}),
                                        encoding="utf-8")
    check = subprocess.run([str(prom.promtool), "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    down = [r for r in rules if r["alert"] == "AtprotoBackfillComponentDown"]
    jobs = sorted(r["labels"]["job"] for r in down)
    tests = []
    for victim in jobs:
        series = [{"series": f'up{{namespace="{NAMESPACE}",job="{job}",instance="{job}-0:9100"}}',
                   "values": "1x30" if job != victim else "1x4 0x26"} for job in jobs]
        (rule,) = [r for r in down if r["labels"]["job"] == victim]
        tests.append({"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": "10m", "alertname": "AtprotoBackfillComponentDown", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "AtprotoBackfillComponentDown", "exp_alerts": [
                {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}]}]})
    # another namespace's pods do not count as this release's
    tests.append({"interval": "1m", "input_series": [
        {"series": f'up{{namespace="other",job="{job}",instance="x:9100"}}', "values": "1x30"} for job in jobs],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "AtprotoBackfillComponentDown", "exp_alerts": [
            {"exp_labels": r["labels"], "exp_annotations": r["annotations"]} for r in down]}]})
    # the broker-side rule matches the release's group names exactly (the dot is no wildcard)
    (lag,) = [r for r in rules if r["alert"] == "AtprotoBackfillBrokerLagHigh"]
    tests.append({"interval": "1m", "input_series": [
        {"series": 'kafka_consumergroup_lag{consumergroup="bf.pg",topic="t",partition="0"}', "values": "200000x30"},
        {"series": 'kafka_consumergroup_lag{consumergroup="bfxpg",topic="t",partition="0"}', "values": "200000x30"}],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "AtprotoBackfillBrokerLagHigh", "exp_alerts": [
            {"exp_labels": {**lag["labels"], "consumergroup": "bf.pg", "topic": "t"},
             "exp_annotations": {**lag["annotations"],
                                 "summary": "Consumer group bf.pg is far behind on t",
                                 "description": "The brokers count 200k messages of t that bf.pg has not committed,"
                                                " for 15 minutes."}}]}]})
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                                                             "tests": tests}), encoding="utf-8")
    result = subprocess.run([str(prom.promtool), "test", "rules", "rules.test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_configmaps_ship_the_dashboard_and_its_datasource(chart: Any) -> None:
    docs = render(chart, case_values("full-stack"))
    maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    dash = maps["bf-atproto-backfill-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert json.loads(dash["data"]["atproto-backfill.json"]) == dashboard
    ds = yaml.safe_load(maps["bf-atproto-backfill-datasource"]["data"]["atproto-backfill-datasource.yaml"])
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus-operated.monitoring.svc:9090"
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["uid"] == variable["current"]["value"], "the dashboard's default datasource"
    # $__rate_interval needs the interval Prometheus really scrapes at
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert source["jsonData"]["timeInterval"] == sm["spec"]["endpoints"][0]["interval"] == "30s"
    faster = case_values("full-stack")
    faster["metrics"]["serviceMonitor"]["interval"] = "10s"
    maps = {d["metadata"]["name"]: d for d in by_kind(render(chart, faster), "ConfigMap")}
    ds = yaml.safe_load(maps["bf-atproto-backfill-datasource"]["data"]["atproto-backfill-datasource.yaml"])
    assert ds["datasources"][0]["jsonData"]["timeInterval"] == "10s"


# ------------------------------------------------------------------------------------------ documentation


def test_examples_are_documented() -> None:
    assert len(EXAMPLES) >= 6
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    for path in EXAMPLES:
        first = Path(path).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), f"{path.name} starts with a comment saying what it shows"
        assert f"`{path.name}`" in readme, f"the chart README lists {path.name}"


def in_text(figure: str, text: str) -> bool:
    """``figure`` occurs in ``text`` as a whole number (21,800 does not match 1,800 or 21,8000)."""
    return re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d]|[.,]\d)", text) is not None


def test_sizing_table_takes_its_figures_from_the_readme_benchmarks() -> None:
    chart_readme = (CHART / "README.md").read_text(encoding="utf-8")
    section = chart_readme.split("\n## Sizing\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    header, rows = rows[0], rows[2:]
    measured_col = header.index("measured per process")
    processes_col = header.index("per 1,000 events/s: processes")
    cpu_col = header.index("per 1,000 events/s: CPU, at most")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    benchmarks = readme.split("## Tests and benchmarks", 1)[1]
    derived = 0
    for row in rows:
        figures = re.findall(r"\d{1,3}(?:,\d{3})+|\d+\.\d+", row[measured_col])
        for figure in figures:
            assert in_text(figure, benchmarks), f"{figure} ({row[0]}) is not a figure of the README's benchmarks"
        for figure in re.findall(r"\d+ MB|\d+\.\d+x", row[-1]):  # memory: measured figures only
            assert in_text(figure, benchmarks), f"{figure} ({row[0]})"
        if re.fullmatch(r"[\d,]+ \w+/s", row[measured_col]):
            rate = float(figures[0].replace(",", ""))
            assert row[processes_col] == f"{1000 / rate:.3f}", row[0]
            assert row[cpu_col] == f"{2 * 1000 / rate:.3f} cores", row[0]  # the benchmark machine's 2 cores
            derived += 1
    assert derived >= 3
    assert {"Jetstream producer", "PostgreSQL consumer"} <= {r[0] for r in rows}
    assert "helm/atproto-backfill/README.md#sizing" in readme, "the README points at the sizing table"


def test_sizing_check_refuses_a_figure_the_readme_does_not_have() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert in_text("13,600", readme)
    assert not in_text("3,600", readme)
    assert not in_text("31,500", readme), "an old figure the README no longer has"


def test_values_defaults_pass_the_schema(chart: Any) -> None:
    chart.validate_schema(copy.deepcopy(chart.values))
