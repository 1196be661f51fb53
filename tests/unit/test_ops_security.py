"""Security settings reach the clients (librdkafka, the schema registry) and secrets never reach the logs."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer

from runtime.contract.codec import AvroCodec
from runtime.contract.records import IdentityEvent
from runtime.contract.typed import datum_for
from runtime.kafka.settings import KafkaSettings
from runtime.process.options import Secret, redact_value, redacted_namespace
from tests.ops_tools import ROOT, parse_cli

SECRET_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "broker-1:9093,broker-2:9093",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "backfill",
    "KAFKA_SASL_PASSWORD": "kafka-pw-7f3a9c",
    "KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca-certificates.crt",
    "SCHEMA_REGISTRY_URL": "https://registry.test",
    "SCHEMA_REGISTRY_BASIC_AUTH": "reg-user:reg-pw-51be02",
}


def settings_from_env(env: dict[str, str]) -> KafkaSettings:
    return KafkaSettings.from_namespace(parse_cli(["status"], env))


def test_env_settings_reach_every_librdkafka_config() -> None:
    kafka = settings_from_env(SECRET_ENV)
    assert isinstance(kafka.sasl_password, Secret)
    for conf in (kafka.client_config(), kafka.producer_config(), kafka.consumer_config("g")):
        assert conf["bootstrap.servers"] == "broker-1:9093,broker-2:9093"
        assert conf["security.protocol"] == "SASL_SSL"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
        assert conf["sasl.username"] == "backfill"
        assert conf["sasl.password"] == "kafka-pw-7f3a9c"
        assert conf["ssl.ca.location"] == "/etc/ssl/certs/ca-certificates.crt"
    assert kafka.registry_config() == {"url": "https://registry.test",
                                       "basic.auth.user.info": "reg-user:reg-pw-51be02"}


def test_flags_override_the_environment() -> None:
    ns = parse_cli(["status", "--security-protocol", "SSL", "--sasl-password", "other"], SECRET_ENV)
    kafka = KafkaSettings.from_namespace(ns)
    assert kafka.security_protocol == "SSL"
    assert kafka.client_config()["sasl.password"] == "other"


def test_librdkafka_accepts_the_sasl_ssl_config() -> None:
    # librdkafka validates its configuration when a client is created: every key and value is known.
    env = {**SECRET_ENV, "KAFKA_SSL_CA_LOCATION": ""}
    producer = Producer(settings_from_env(env).producer_config())
    producer.flush(0)


def test_the_ca_location_is_read_by_librdkafka(tmp_path: Any) -> None:
    env = {**SECRET_ENV, "KAFKA_SSL_CA_LOCATION": str(tmp_path / "missing-ca.pem")}
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        Producer(settings_from_env(env).producer_config())


def test_an_unknown_sasl_mechanism_is_refused_by_librdkafka() -> None:
    env = {**SECRET_ENV, "KAFKA_SASL_MECHANISM": "NOPE"}
    with pytest.raises(KafkaException, match="NOPE"):
        Producer(settings_from_env(env).producer_config())


class FakeRegistry:
    """A loopback schema registry that records the Authorization header of each request."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.auth.append(self.headers.get("Authorization"))
                outer.paths.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"reg-user:reg-pw-51be02").decode():
                    self._reply(401, {"error_code": 40101, "message": "Unauthorized"})
                else:
                    self._reply(200, {"id": 17})

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def identity_datum() -> dict[str, Any]:
    return datum_for(IdentityEvent(did="did:plc:abc", handle="a.test", seq=1, time=None, source="jetstream",
                                   cursor=1, time_us=1))


def test_registry_basic_auth_reaches_the_registry(registry: FakeRegistry) -> None:
    kafka = settings_from_env({**SECRET_ENV, "SCHEMA_REGISTRY_URL": registry.url})
    codec = AvroCodec.from_config(kafka.registry_config())
    value = codec.encode("identity", "p.identity", identity_datum())
    assert value[:5] == b"\x00" + (17).to_bytes(4, "big"), "registry wire format with the registered id"
    assert registry.paths[0].startswith("/subjects/p.identity-value/versions")
    assert registry.auth == ["Basic " + base64.b64encode(b"reg-user:reg-pw-51be02").decode()]


def test_without_credentials_the_registry_refuses(registry: FakeRegistry) -> None:
    env = {k: v for k, v in SECRET_ENV.items() if k != "SCHEMA_REGISTRY_BASIC_AUTH"}
    kafka = settings_from_env({**env, "SCHEMA_REGISTRY_URL": registry.url})
    codec = AvroCodec.from_config(kafka.registry_config())
    with pytest.raises(Exception, match="Unauthorized"):
        codec.encode("identity", "p.identity", identity_datum())
    assert registry.auth == [None]


# ------------------------------------------------------------------------------------------ redaction


def test_redacted_namespace_hides_every_kind_of_secret() -> None:
    ns = argparse.Namespace(
        sasl_password=Secret("kafka-pw-7f3a9c"), schema_registry_auth=Secret("reg-user:reg-pw-51be02"),
        database_url="postgresql://backfill:db-pw-99e1@db:5432/app",
        dsn="host=db user=backfill password=db-pw-99e1 dbname=app",
        api_token="tok-123", sasl_username="backfill", num_records=5, wanted_collections=["app.bsky.feed.post"],
        _main=print)
    shown = redacted_namespace(ns)
    text = repr(shown)
    for secret in ("kafka-pw-7f3a9c", "reg-pw-51be02", "db-pw-99e1", "tok-123"):
        assert secret not in text
    assert shown["database_url"] == "postgresql://backfill:**********@db:5432/app"
    assert shown["dsn"] == "host=db user=backfill password=********** dbname=app"
    assert shown["sasl_username"] == "backfill"
    assert shown["num_records"] == 5
    assert shown["wanted_collections"] == ["app.bsky.feed.post"]
    assert "_main" not in shown
    assert redact_value("author", "did:plc:x") == "did:plc:x", "only whole words name secrets"


def test_a_process_logs_its_settings_without_secrets() -> None:
    env = {**os.environ, **SECRET_ENV, "DATABASE_URL": "postgresql://backfill:db-pw-99e1@db:5432/app",
           "BACKFILL_LOG_LEVEL": "DEBUG"}
    # `embedded` makes status stop with a usage error after logging its settings, before any network use.
    result = subprocess.run([sys.executable, "-m", "runtime", "status", "--bootstrap-servers", "embedded"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    (logged,) = [line for line in result.stderr.splitlines() if "status: settings {" in line]
    assert " DEBUG " in logged
    assert "'sasl_password': '**********'" in logged
    assert "'schema_registry_auth': '**********'" in logged
    assert "'sasl_username': 'backfill'" in logged
    for secret in ("kafka-pw-7f3a9c", "reg-pw-51be02", "db-pw-99e1"):
        assert secret not in result.stderr + result.stdout
