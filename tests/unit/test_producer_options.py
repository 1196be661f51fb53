"""The options every producer shares (:mod:`producers.options`) and the consumers' account-removal
options (:mod:`consumers.options`): declared once, taken by each command with its own defaults."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from consumers.options import account_removal_options, removal_statuses, resync_purge
from consumers.postgres import app as postgres_app
from producers.firehose import settings as firehose_settings
from producers.jetstream import app as jetstream_app
from producers.options import PRODUCER_OPTIONS, add_producer_arguments, job_option, producer_options
from producers.repos import app as repos_app
from producers.repos import discover
from runtime.errors import ConfigError
from runtime.process.options import Opt, add_options

SHARED = {opt.dest for opt in PRODUCER_OPTIONS}


def _by_dest(options: tuple[Opt, ...]) -> dict[str, Opt]:
    counts = Counter(flag for opt in options for flag in opt.flags)
    assert [f for f, n in counts.items() if n > 1] == [], "a flag is declared twice"
    return {opt.dest: opt for opt in options}


@pytest.mark.parametrize(("options", "job", "max_time", "absent"), [
    (jetstream_app.JETSTREAM_OPTIONS, "jetstream", 900.0, set()),
    (firehose_settings.FIREHOSE_OPTIONS, "firehose", 0.0, set()),
    (repos_app.REPOS_OPTIONS, "repos", 0.0, {"checkpoint_events", "max_collections"}),
], ids=["jetstream", "firehose", "repos"])
def test_each_producer_takes_the_shared_options_with_its_defaults(options: tuple[Opt, ...], job: str,
                                                                  max_time: float, absent: set[str]) -> None:
    by_dest = _by_dest(options)
    assert SHARED - absent <= set(by_dest)
    assert not absent & set(by_dest)
    assert by_dest["job"].default == job
    assert by_dest["max_time"].default == max_time
    shared = {opt.dest: opt for opt in PRODUCER_OPTIONS}
    for dest in SHARED - absent - {"job", "max_time", "resume", "transactions"}:
        assert by_dest[dest] is shared[dest], f"{dest} is the shared declaration"


def test_a_command_rewords_a_shared_help_but_keeps_its_flags_and_environment() -> None:
    (resume,) = [o for o in producer_options("x", help={"resume": "only resumes"}) if o.dest == "resume"]
    assert resume.help == "only resumes"
    assert resume.flags == ("--resume",) and resume.env == "BACKFILL_RESUME" and resume.action == "store_true"


def test_flags_and_environment_set_the_shared_options() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, producer_options("j", max_time=5), {"BACKFILL_CHECKPOINT_EVENTS": "7"})
    ns = parser.parse_args(["--resume", "-t", "3", "--transactions", "off", "--progress", "none"])
    assert (ns.job, ns.resume, ns.max_time, ns.transactions, ns.progress) == ("j", True, 3.0, "off", "none")
    assert (ns.checkpoint_events, ns.checkpoint_interval, ns.max_collections) == (7, 2.0, 1000)


def test_an_unknown_shared_option_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no shared producer option"):
        producer_options("j", leave_out=("checkpoint_everything",))
    with pytest.raises(ValueError, match="no shared producer option"):
        producer_options("j", help={"jobs": "?"})


def test_discover_names_the_repos_job_like_the_producers() -> None:
    (job,) = [o for o in discover.DISCOVER_OPTIONS if o.dest == "job"]
    assert job.flags == job_option("repos").flags and job.env == "BACKFILL_JOB" and job.default == "repos"


def test_both_consumers_take_the_same_account_removal_options() -> None:
    from consumers import queue

    queue_opts = {o.dest: o for o in queue.QUEUE_OPTIONS}
    pg_opts = {o.dest: o for o in postgres_app.POSTGRES_OPTIONS}
    shared = account_removal_options("...", "...")
    assert [o.flags for o in shared] == [("--account-removal",), ("--removal-statuses",), ("--resync",)]
    for opt in shared:
        for theirs in (queue_opts[opt.dest], pg_opts[opt.dest]):
            assert (theirs.flags, theirs.env, theirs.default, theirs.choices) == (opt.flags, opt.env, opt.default,
                                                                                  opt.choices)


@pytest.mark.parametrize(("mode", "statuses", "want"), [
    ("keep", "deleted", frozenset()),
    ("purge", "deleted, takendown ,", frozenset({"deleted", "takendown"})),
])
def test_removal_statuses(mode: str, statuses: str, want: frozenset[str]) -> None:
    assert removal_statuses(argparse.Namespace(account_removal=mode, removal_statuses=statuses)) == want


@pytest.mark.parametrize(("mode", "want"), [("purge", True), ("keep", False)])
def test_resync_purge(mode: str, want: bool) -> None:
    assert resync_purge(argparse.Namespace(resync=mode)) is want
    default = {o.dest: o for o in postgres_app.POSTGRES_OPTIONS}["resync"]
    assert (default.default, default.env) == ("purge", "BACKFILL_RESYNC")


def test_purge_without_statuses_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="removal-statuses"):
        removal_statuses(argparse.Namespace(account_removal="purge", removal_statuses=" , "))


def test_every_producer_parser_has_the_kafka_and_observability_groups() -> None:
    parser = argparse.ArgumentParser()
    add_producer_arguments(parser, producer_options("j"))
    ns = parser.parse_args(["--bootstrap-servers", "k:9092", "--metrics-port", "9100", "--job", "x"])
    assert (ns.bootstrap_servers, ns.metrics_port, ns.job) == ("k:9092", 9100, "x")
    titles = {group.title for group in parser._action_groups}
    assert {"kafka", "observability"} <= titles


def test_the_python_apis_namespace_takes_defaults_then_arguments_then_overrides() -> None:
    from producers.options import api_namespace

    ns = api_namespace(jetstream_app.add_arguments, jetstream_app.finish_namespace, {"num_records": 5, "job": "a"},
                       {"job": "b", "transactions": "off"})
    assert (ns.num_records, ns.job, ns.transactions, ns.progress) == (5, "b", "off", "none")
    assert ns.wanted_collections == ["app.bsky.feed.post"], "append options resolved to their default"
    assert api_namespace(jetstream_app.add_arguments, jetstream_app.finish_namespace, {},
                         {"progress": "log"}).progress == "log"
    with pytest.raises(ConfigError, match="unknown option 'no_such_option'"):
        api_namespace(repos_app.add_arguments, repos_app.finish_namespace, {}, {"no_such_option": 1})
