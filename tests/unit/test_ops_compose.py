"""docker-compose.yml and the Dockerfile, validated with the real Docker Compose binary (no engine
needed for ``config``) and against the project's own CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from producers.jetstream.app import finish_namespace, settings_from_namespace
from tests.ops_tools import (
    COMPOSE_FILE,
    DASHBOARD,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    ToolUnavailable,
    command_module,
    compose_binary,
    module_installed,
    parse_cli,
    patched_environ,
)

SERVICES = sorted(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"])
APP_SERVICES = ("producer-jetstream", "producer-firehose", "producer-repos", "consumer-postgres", "consumer-queue")
#: The image's other process: the Jetstream simulator of the quickstart (profile "simulator").
SIMULATOR = "jetstream-simulator"
#: What a user's shell may export for host commands against the published ports (README): the
#: containers must not see it.
HOST_ENV = {"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092", "SCHEMA_REGISTRY_URL": "http://localhost:8081",
            "DATABASE_URL": "postgresql://me:pw@localhost:5433/backfill", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "me", "KAFKA_SASL_PASSWORD": "host-pw",
            "SCHEMA_REGISTRY_BASIC_AUTH": "me:host-pw"}


def compose(*args: str, env: dict[str, str] | None = None,
            file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    try:
        binary = compose_binary()
    except ToolUnavailable as e:
        pytest.skip(str(e))
    # Only this file's own defaults: no variables from the caller's shell leak into the check.
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    return subprocess.run([str(binary), "-f", str(file), "--project-directory", str(file.parent), *args],
                          capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60, check=False)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose model with every profile enabled and every variable interpolated."""
    result = compose("--profile", "*", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_compose_file_validates() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr
    result = compose("--profile", "*", "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    original = COMPOSE_FILE.read_text(encoding="utf-8")
    text = original.replace('command: ["consume", "postgres"]', 'commandd: ["consume", "postgres"]')
    assert text != original
    broken.write_text(text, encoding="utf-8")
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "commandd" in result.stderr


def test_every_wanted_service_is_defined(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == {"kafka", "schema-registry", "postgres", "prometheus", "grafana",
                                         "kafka-exporter", SIMULATOR, *APP_SERVICES}
    assert resolved["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert resolved["services"]["schema-registry"]["image"].startswith("confluentinc/cp-schema-registry:")


def test_compose_runs_the_kafka_version_the_tests_run(resolved: dict[str, Any]) -> None:
    from tests.kafka.cluster import kafka_version

    assert resolved["services"]["kafka"]["image"] == f"apache/kafka:{kafka_version()}"


def test_kafka_runs_one_kraft_node(resolved: dict[str, Any]) -> None:
    env = resolved["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092"
    # the data directory is the image's own volume (owned by its non-root user)
    volumes = resolved["services"]["kafka"]["volumes"]
    assert any(v["target"] == env["KAFKA_LOG_DIRS"] and v["type"] == "volume" for v in volumes)
    for svc in APP_SERVICES:
        assert resolved["services"][svc]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_kafka_and_producer_jetstream_start_a_live_backfill_alone() -> None:
    result = compose("config", "--format", "json", "kafka", "producer-jetstream")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    # only Kafka and what the producer needs (the registry) are pulled in
    assert set(services) == {"kafka", "schema-registry", "producer-jetstream"}
    env = services["producer-jetstream"]["environment"]
    assert env["BACKFILL_JETSTREAM_CONSUMER"] == "none"
    assert env["BACKFILL_NUM_RECORDS"] == "0"
    assert env["BACKFILL_MAX_TIME"] == "0"


def test_plain_up_runs_the_pipeline_into_postgres_with_dashboards() -> None:
    result = compose("config", "--services")
    assert result.returncode == 0, result.stderr
    default = set(result.stdout.split())
    assert {"kafka", "producer-jetstream", "consumer-postgres", "postgres", "prometheus", "grafana",
            "kafka-exporter"} <= default
    # the relay firehose, the repository workers and the simulator are opt-in profiles
    assert "producer-firehose" not in default
    assert "producer-repos" not in default
    assert SIMULATOR not in default


def test_host_variables_for_host_commands_never_reach_the_containers() -> None:
    # README: host commands reach the published ports (localhost:9092, localhost:5433); inside a
    # container localhost is the container itself.
    result = compose("--profile", "*", "config", "--format", "json", env=HOST_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081", name
        assert env["KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT", name
        for leaked in ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                       "SCHEMA_REGISTRY_BASIC_AUTH"):
            assert leaked not in env, f"{name}: {leaked}"
        assert "localhost" not in json.dumps(env), name
        assert "host-pw" not in json.dumps(env), name
    assert services["consumer-postgres"]["environment"]["DATABASE_URL"] == \
        "postgresql://backfill:backfill@postgres:5432/backfill"


def test_quickstart_shows_the_dashboard_with_simulated_data() -> None:
    # docker-compose.yml and README: COMPOSE_PROFILES=simulator JETSTREAM_INSTANCE=ws://jetstream-simulator:6008
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    quickstart = "COMPOSE_PROFILES=simulator JETSTREAM_INSTANCE=ws://jetstream-simulator:6008 docker compose up"
    assert quickstart in text
    assert quickstart in (ROOT / "README.md").read_text(encoding="utf-8")
    result = compose("config", "--format", "json",
                     env={"COMPOSE_PROFILES": "simulator", "JETSTREAM_INSTANCE": "ws://jetstream-simulator:6008"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {SIMULATOR, "producer-jetstream", "consumer-postgres", "prometheus", "grafana"} <= set(services)
    sim = services[SIMULATOR]
    args = list(sim["command"])
    assert command_module(args) == "runtime.simulator.jetstream_cli"
    ns = parse_cli(args, {})
    assert ns.host == "0.0.0.0", "reachable from the producer's container"
    assert ns.port == 6008
    assert ns.live_rate > 0, "data keeps coming while the dashboard is open"
    assert "6008" in " ".join(sim["healthcheck"]["test"])
    # the producer dials the simulator's service name and port
    producer = services["producer-jetstream"]
    env = {k: "" if v is None else str(v) for k, v in producer["environment"].items()}
    pns = parse_cli(list(producer["command"]), env)
    with patched_environ(env):
        finish_namespace(pns)
    settings = settings_from_namespace(pns)
    from producers.jetstream.source import instance_url

    assert [instance_url(i) for i in settings.instances] == ["ws://jetstream-simulator:6008/subscribe"]
    # Grafana opens on the dashboard, anonymously, at the URL the README gives
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    home = grafana["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.endswith("/" + DASHBOARD.name)
    uid = json.loads(DASHBOARD.read_text(encoding="utf-8"))["uid"]
    assert f"http://localhost:3000/d/{uid}" in text


def test_consumer_memory_guard_stays_below_the_container_limit(resolved: dict[str, Any]) -> None:
    for name in ("consumer-postgres", "consumer-queue"):
        svc = resolved["services"][name]
        limit = int(svc["mem_limit"])  # bytes in the resolved model
        guard_mb = int(svc["environment"]["BACKFILL_MAX_MEMORY_MB"])
        assert 0 < guard_mb * 2**20 < 0.8 * limit, name


@pytest.mark.parametrize("service", [*APP_SERVICES, SIMULATOR])
def test_application_containers_are_locked_down(resolved: dict[str, Any], service: str) -> None:
    svc = resolved["services"][service]
    if service == SIMULATOR:  # the image's websocket server: no metrics port, a TCP health check
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        assert "BACKFILL_METRICS_PORT" not in svc["environment"]
        return
    uid = svc["user"].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert svc["read_only"] is True
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    assert {"/tmp", "/cache"} <= set(svc.get("tmpfs", []))
    assert svc["stop_grace_period"] == "1m0s"
    assert "/healthz" in " ".join(svc["healthcheck"]["test"])
    assert svc["environment"]["BACKFILL_METRICS_PORT"] == "9100"
    writable = [v["target"] for v in svc.get("volumes", [])]
    assert writable in ([], ["/data"])
    for name in ("BACKFILL_QUEUE_PATH", "BACKFILL_WORKDIR"):
        if name in svc["environment"]:
            assert svc["environment"][name].startswith("/data"), "written files go to the volume"
            assert writable == ["/data"]


def test_configuration_uses_the_seeds_names(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["consumer-postgres"]["environment"]["DATABASE_URL"].startswith("postgresql://backfill:")
    assert services["producer-firehose"]["environment"]["RELAY_URL"] == "wss://bsky.network"
    pg = services["consumer-postgres"]["environment"]
    for name in ("BACKFILL_BATCH_SIZE", "BACKFILL_BATCH_DELAY_MS", "BACKFILL_MAX_CONCURRENT", "BACKFILL_MAX_MEMORY_MB"):
        assert name in pg
    assert services["producer-jetstream"]["environment"]["BACKFILL_DAYS"] == "0"


def test_environment_overrides_reach_the_services() -> None:
    result = compose("--profile", "*", "config", "--format", "json",
                     env={"BACKFILL_DAYS": "7", "RELAY_URL": "wss://relay.example", "POSTGRES_PASSWORD": "pw"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["producer-jetstream"]["environment"]["BACKFILL_DAYS"] == "7"
    assert services["producer-firehose"]["environment"]["RELAY_URL"] == "wss://relay.example"
    assert services["consumer-postgres"]["environment"]["DATABASE_URL"] == \
        "postgresql://backfill:pw@postgres:5432/backfill"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw"
    assert services["producer-jetstream"]["environment"]["BACKFILL_TOPIC_PREFIX"] == "atproto"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_command_parses_with_the_cli(resolved: dict[str, Any], service: str) -> None:
    svc = resolved["services"][service]
    args = list(svc["command"])
    module = command_module(args)
    assert module is not None, f"{service}: {args} is not a backfill command"
    if not module_installed(module):
        pytest.skip(f"{module} is not part of this installation yet")
    env = {k: "" if v is None else str(v) for k, v in svc["environment"].items()}
    ns = parse_cli(args, env)
    assert ns.metrics_port == 9100
    assert ns.bootstrap_servers == "kafka:9092"
    assert ns.schema_registry_url == "http://schema-registry:8081"
    if service == "producer-jetstream":
        with patched_environ(env):  # append options read the environment after parsing
            finish_namespace(ns)
        settings = settings_from_namespace(ns)
        assert settings.consumer == "none"
        assert settings.num_records == 0
        assert settings.max_time == 0
        assert settings.resume is True
        assert len(settings.collections) == 6
    if service == "producer-firehose":
        assert ns.relay_url == "wss://bsky.network"
        assert ns.resume is True
        assert ns.follow is True, "a live producer keeps following after catching up"
        assert ns.num_records == 0
        assert ns.max_time == 0
    if service == "producer-repos":
        assert ns.from_topic is True
        assert ns.workdir == "/data"
    if service == "consumer-postgres":
        assert ns.database_url.get().startswith("postgresql://")


def test_mounted_files_exist(resolved: dict[str, Any]) -> None:
    for name, svc in resolved["services"].items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name} mounts a missing {v['source']}"
                assert v.get("read_only") is True, f"{name} mounts {v['source']} writable"


# ------------------------------------------------------------------------------------------ the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_non_root_with_exec_entrypoint() -> None:
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [rest for w, rest in final_stage if w == "USER"]
    assert users, "the final stage must switch to an unprivileged user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    entry = [rest for w, rest in final_stage if w == "ENTRYPOINT"]
    assert entry
    assert json.loads(entry[-1]) == ["backfill"]
    assert not any(w == "ADD" for w, _ in instructions), "COPY, not ADD"
    env = " ".join(rest for w, rest in final_stage if w == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem: no .pyc writes
    assert "XDG_CACHE_HOME=/cache" in env


def test_dockerfile_copies_only_what_the_build_context_keeps() -> None:
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore starts from nothing and re-includes"
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                # README.md is the project's readme (pyproject's `readme`), written outside this change set
                assert (ROOT / src).exists() or src == "README.md", f"COPY {src}: missing"
                assert src.rstrip("/") in kept, f"COPY {src}: excluded by .dockerignore"
    # pip install . needs the project metadata and its readme
    assert {"pyproject.toml", "README.md"} <= kept


def test_image_version_is_the_tag_the_chart_pulls() -> None:
    # The chart's default image tag is its appVersion; the Dockerfile labels the image it builds with
    # the same version, the project's.
    chart = yaml.safe_load((ROOT / "helm" / "atproto-backfill" / "Chart.yaml").read_text(encoding="utf-8"))
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert project is not None
    args = [rest for word, rest in dockerfile_instructions() if word == "ARG" and rest.startswith("VERSION=")]
    assert args == [f"VERSION={chart['appVersion']}"]
    assert chart["appVersion"] == project.group(1)
    labels = " ".join(rest for word, rest in dockerfile_instructions() if word == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
