"""``backfill repos`` settings: DID sources, filters and limits validated before anything connects."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from producers.identity.didlist import ATPROTO_METHODS, read_dids_file
from producers.repos import app
from runtime.errors import ConfigError


def settings(*args: str) -> app.ReposSettings:
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    ns = parser.parse_args(list(args))
    app.finish_namespace(ns)
    return app.settings_from_namespace(ns)


def test_defaults_are_polite() -> None:
    s = settings("--dids", "did:plc:aaa,did:web:example.com")
    assert s.dids == ["did:plc:aaa", "did:web:example.com"]
    assert s.limits.rate <= 10
    assert s.limits.burst + s.limits.rate * 300 < 3000  # under the hosted PDS limit per 5 minutes
    assert s.plc_url == "https://plc.directory"
    assert not s.allow_private_network
    assert s.record_filter.selects_all


def test_filters_and_timestamps() -> None:
    s = settings("--dids", "did:plc:a", "--record-types", "post,reply", "-c", "app.bsky.graph.*",
                 "-s", "2024-09-27", "-e", "2024-12-02-00:00:00", "--out-of-range", "drop")
    f = s.record_filter
    assert f.types == frozenset({"post", "reply"})
    assert f.collections == ("app.bsky.graph.*",)
    assert f.policy.active
    assert f.wants_collection("app.bsky.graph.follow")
    assert not f.wants_collection("app.bsky.feed.like")


@pytest.mark.parametrize("args", [
    [],  # no DIDs at all
    ["--from-topic", "--dids", "did:plc:a"],
    ["--dids", "not-a-did"],
    ["--dids", "did:key:z6Mk"],
    ["--dids", "did:plc:a", "--record-types", "tweet"],
    ["--dids", "did:plc:a", "-c", "not an nsid"],
    ["--dids", "did:plc:a", "--rate", "0"],
    ["--dids", "did:plc:a", "-s", "2024-12-02", "-e", "2024-09-27"],
    ["--dids", "did:plc:a", "-s", "yesterday"],
])
def test_bad_settings(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        settings(*args)


def test_env_and_dids_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "dids.txt"
    f.write_text("# authors\ndid:plc:one\n\ndid:web:two.example\n")
    assert read_dids_file(f, ATPROTO_METHODS) == ["did:plc:one", "did:web:two.example"]
    (tmp_path / "bad.txt").write_text("did:plc:ok\nnope\n")
    with pytest.raises(ConfigError):
        read_dids_file(tmp_path / "bad.txt", ATPROTO_METHODS)
    with pytest.raises(ConfigError):
        read_dids_file(tmp_path / "missing.txt", ATPROTO_METHODS)
    monkeypatch.setenv("BACKFILL_PLC_URL", "http://127.0.0.1:2582")
    monkeypatch.setenv("BACKFILL_FROM_TOPIC", "true")
    s = settings()
    assert s.from_topic
    assert s.plc_url == "http://127.0.0.1:2582"


def test_help_names_env_variables(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    parser.print_help()
    text = capsys.readouterr().out
    for env in ("BACKFILL_PLC_URL", "BACKFILL_PDS_RATE", "BACKFILL_ALLOW_PRIVATE_NETWORK", "BACKFILL_REPLICA_ID"):
        assert env in text
