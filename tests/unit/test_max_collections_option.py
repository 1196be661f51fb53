"""``--max-collections`` / ``BACKFILL_MAX_COLLECTIONS``: declared once, taken by the Jetstream and
firehose producers, positive, passed to the job runner (the topic-flood bound, issue 13)."""

from __future__ import annotations

import argparse
from types import ModuleType

import pytest

from producers.firehose import app as firehose_app
from producers.jetstream import app as jetstream_app
from producers.job import DEFAULT_MAX_COLLECTIONS, JobOptions, JobRunner
from runtime.contract.codec import AvroCodec
from runtime.errors import ConfigError
from runtime.kafka.settings import KAFKA_OPTIONS, KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import OBSERVABILITY_OPTIONS, add_options, resolve_appends

APPS = [(jetstream_app, jetstream_app.JETSTREAM_OPTIONS), (firehose_app, firehose_app.FIREHOSE_OPTIONS)]


def parse(module: ModuleType, options: tuple[object, ...], args: list[str],
          env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for opts in (options, KAFKA_OPTIONS, OBSERVABILITY_OPTIONS):
        add_options(parser, opts, env or {})  # type: ignore[arg-type]
    ns = parser.parse_args(args)
    resolve_appends(ns, options, env or {})  # type: ignore[arg-type]
    return ns


@pytest.mark.parametrize(("module", "options"), APPS, ids=["jetstream", "firehose"])
def test_the_cap_defaults_to_1000_and_is_set_by_flag_or_environment(module: ModuleType,
                                                                    options: tuple[object, ...]) -> None:
    assert module.settings_from_namespace(parse(module, options, [])).max_collections == DEFAULT_MAX_COLLECTIONS == 1000
    env = {"BACKFILL_MAX_COLLECTIONS": "50"}
    assert module.settings_from_namespace(parse(module, options, [], env)).max_collections == 50
    ns = parse(module, options, ["--max-collections", "7"], env)
    assert module.settings_from_namespace(ns).max_collections == 7
    with pytest.raises(ConfigError, match="--max-collections"):
        module.settings_from_namespace(parse(module, options, ["--max-collections", "0"]))


def test_the_firehose_jobs_get_the_cap() -> None:
    ns = parse(firehose_app, firehose_app.FIREHOSE_OPTIONS, ["--max-collections", "12"])
    settings = firehose_app.settings_from_namespace(ns)
    assert firehose_app.job_options(settings, "j", 0).max_collections == 12


def test_a_runner_refuses_a_cap_below_one() -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(ConfigError, match="--max-collections must be positive"):
        JobRunner(kafka, JobOptions(job="j", source="jetstream", max_collections=0), Metrics(), AvroCodec())
