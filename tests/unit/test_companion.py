"""The combined mode's contract: ``backfill jetstream`` finds its queue consumer as the ``queue``
companion entry point and drives it through :class:`producers.companion.Companion` (nothing connects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.queue import QueueCompanion, default_queue_path
from producers.companion import Companion
from producers.jetstream import app
from runtime.errors import ConfigError
from runtime.process.plugins import COMPANIONS, load
from tests.unit.test_settings_cli import parse


def test_the_queue_companion_is_the_installed_entry_point() -> None:
    assert load(COMPANIONS, "queue") is QueueCompanion


def test_an_unknown_companion_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="not installed"):
        load(COMPANIONS, "no-such-companion")


def test_the_queue_companion_keeps_the_producer_side_contract(tmp_path: Path) -> None:
    companion = QueueCompanion(queue_name="q", queue_path=tmp_path / "q.sqlite", collections=["app.bsky.*"],
                               batch_size=10)
    assert isinstance(companion, Companion)
    assert companion.stored == 0  # nothing stored before it starts
    with pytest.raises(RuntimeError):
        companion.finish({})
    with pytest.raises(RuntimeError):
        companion.queue_length()
    companion.abort()  # harmless before start
    companion.close()
    assert not (tmp_path / "q.sqlite").exists(), "nothing is opened before start"


def test_jetstream_builds_the_queue_companion_from_its_settings(tmp_path: Path) -> None:
    settings = app.settings_from_namespace(parse(["-c", "app.bsky.feed.like", "--queue-name", "seed",
                                                  "--queue-path", str(tmp_path / "q.sqlite"),
                                                  "--batch-size", "7"]))
    companion = app.make_companion(settings)
    assert isinstance(companion, QueueCompanion)
    assert companion.queue_name == "seed" and companion.path == tmp_path / "q.sqlite"
    assert companion.options.group == "atproto-backfill-queue-seed"
    assert companion.options.collections == ["app.bsky.feed.like"]
    assert companion.options.batch_size == 7
    assert companion.options.include_account_events is False


def test_the_queue_companion_defaults_to_the_default_queue_file() -> None:
    settings = app.settings_from_namespace(parse([]))
    companion = app.make_companion(settings)
    assert isinstance(companion, QueueCompanion) and companion.path == default_queue_path()


def test_consumer_none_runs_no_companion() -> None:
    assert app.make_companion(app.settings_from_namespace(parse(["--consumer", "none"]))) is None
