"""``backfill consume postgres``: flags bound to environment variables, validation, SQL built per mode."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from consumers.cli import CONSUMER_OPTIONS, consumer_settings
from consumers.postgres import app
from consumers.postgres.rows import RECORD_TABLES
from consumers.postgres.schema import CURRENT_VERSION, MIGRATIONS, lock_key
from consumers.postgres.sink import PostgresSettings, Statements, describe_dsn
from runtime.commands.cli import build_parser
from runtime.contract.created_at import OutOfRange
from runtime.errors import ConfigError
from runtime.kafka.settings import KAFKA_OPTIONS
from runtime.process.options import OBSERVABILITY_OPTIONS, Secret, add_options

URL = "postgresql://backfill:sekret@db.example:5432/atproto"


def parse(args: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, app.POSTGRES_OPTIONS, env or {})
    add_options(parser, CONSUMER_OPTIONS, env or {})
    add_options(parser, KAFKA_OPTIONS, env or {})
    add_options(parser, OBSERVABILITY_OPTIONS, env or {})
    return parser.parse_args(args)


def test_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["consume", "postgres", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for env in ("DATABASE_URL", "BACKFILL_BATCH_SIZE", "BACKFILL_BATCH_DELAY_MS", "BACKFILL_MAX_CONCURRENT",
                "BACKFILL_MAX_MEMORY_MB", "BACKFILL_DB_SCHEMA", "BACKFILL_DELETES", "BACKFILL_OUT_OF_RANGE",
                "BACKFILL_UNTIL_DONE", "BACKFILL_END_TIMESTAMP", "KAFKA_BOOTSTRAP_SERVERS"):
        assert f"[env: {env}]" in text


def test_environment_then_flags() -> None:
    env = {"DATABASE_URL": URL, "BACKFILL_BATCH_SIZE": "250", "BACKFILL_BATCH_DELAY_MS": "2000",
           "BACKFILL_MAX_CONCURRENT": "2", "BACKFILL_MAX_MEMORY_MB": "512", "BACKFILL_DELETES": "flag"}
    ns = parse([], env)
    settings = consumer_settings(ns, default_group="g", default_batch=app.DEFAULT_BATCH)
    pg = app.postgres_settings(ns, settings.max_concurrent)
    assert settings.options.batch_size == 250
    assert settings.options.batch_delay == 2.0
    assert settings.options.max_memory_mb == 512
    assert pg.max_concurrent == 2
    assert pg.deletes == "flag"
    assert pg.database_url == Secret(URL)
    assert "sekret" not in repr(pg)
    ns = parse(["--batch-size", "10", "--deletes", "delete", "--database-url", "postgresql://other/db"], env)
    settings = consumer_settings(ns, default_group="g", default_batch=app.DEFAULT_BATCH)
    assert settings.options.batch_size == 10
    assert app.postgres_settings(ns, 1).database_url.get() == "postgresql://other/db"
    assert consumer_settings(parse([], {"DATABASE_URL": URL}), default_group="g",
                             default_batch=app.DEFAULT_BATCH).options.batch_size == app.DEFAULT_BATCH


def test_created_at_range_and_account_removal() -> None:
    ns = parse(["--database-url", URL, "--created-at-start", "2024-09-27-00:00:00", "--created-at-end",
                "2024-12-02", "--out-of-range", "standardize", "--account-removal", "purge"])
    pg = app.postgres_settings(ns, 1)
    policy = pg.transform.policy
    assert policy.start == datetime(2024, 9, 27, tzinfo=UTC)
    assert policy.end == datetime(2024, 12, 2, tzinfo=UTC)
    assert policy.out_of_range is OutOfRange.STANDARDIZE
    assert pg.transform.removal_statuses == {"deleted", "takendown"}
    assert app.postgres_settings(parse(["--database-url", URL]), 1).transform.removal_statuses == frozenset()


@pytest.mark.parametrize("args", [
    [],                                                                  # no database at all
    ["--database-url", URL, "--account-removal", "purge", "--removal-statuses", " , "],
    ["--database-url", URL, "--created-at-start", "2024-02-01", "--created-at-end", "2024-01-01"],
    ["--database-url", URL, "--created-at-start", "not a date"],
    ["--database-url", URL, "--db-schema", "x" * 64],
])
def test_usage_errors(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        app.postgres_settings(parse(args), 1)


def test_settings_validation() -> None:
    with pytest.raises(ConfigError):
        PostgresSettings(Secret(URL), deletes="soft")
    with pytest.raises(ConfigError):
        PostgresSettings(Secret(URL), max_concurrent=0)


def test_migrations_are_ordered_and_name_every_table() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == CURRENT_VERSION
    ddl = "\n".join(s for m in MIGRATIONS for s in m.statements)
    for table in RECORD_TABLES:
        assert f"CREATE TABLE {{s}}.{table.name} (" in ddl
    assert -(2**31) <= lock_key("public") < 2**31
    assert lock_key("a") != lock_key("b")


def test_statements_follow_the_modes() -> None:
    plain = Statements("s", flag_deletes=False, purge=False)
    flagged = Statements("s", flag_deletes=True, purge=True)
    as_text = lambda q: q.as_string(None)  # noqa: E731 - tiny local helper
    assert as_text(plain.delete["posts"]).startswith("DELETE FROM")
    assert as_text(flagged.delete["posts"]).startswith("UPDATE")
    assert "deleted = true" in as_text(flagged.delete["posts"])
    assert "r.t_us >= x.asof_us" not in as_text(plain.upsert["posts"])
    assert "r.t_us >= x.asof_us" in as_text(flagged.upsert["posts"])  # the removals, as parameters
    assert "r.t_us" not in as_text(flagged.upsert_unguarded["posts"])
    assert as_text(plain.upsert_unguarded["posts"]) == as_text(plain.upsert["posts"])
    assert "t.rev < EXCLUDED.rev" in as_text(plain.upsert["records"])
    assert "FORMAT BINARY" in as_text(plain.copy["likes"])
    assert plain.copy_types["posts"][4] == "text"  # the record travels as text, cast to jsonb by the upsert


def test_connection_descriptions_never_show_the_password() -> None:
    assert describe_dsn(URL) == "backfill@db.example:5432/atproto"
    assert describe_dsn("host=h dbname=d user=u password=sekret") == "u@h/d"
    assert describe_dsn("postgresql:///atproto") == "localhost/atproto"
    assert "sekret" not in describe_dsn("not a dsn password=sekret '")


def test_the_memory_guard_defaults_to_a_share_of_the_container_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import consumers.cli

    monkeypatch.setattr(consumers.cli, "default_memory_guard_mb", lambda: 768)  # a 1 GiB container
    assert consumer_settings(parse([], {"DATABASE_URL": URL}), default_group="g",
                             default_batch=app.DEFAULT_BATCH).options.max_memory_mb == 768
    for explicit, env in ((["--max-memory-mb", "0"], {}), ([], {"BACKFILL_MAX_MEMORY_MB": "0"})):
        ns = parse(explicit, {"DATABASE_URL": URL, **env})
        assert consumer_settings(ns, default_group="g", default_batch=app.DEFAULT_BATCH).options.max_memory_mb == 0
    monkeypatch.setattr(consumers.cli, "default_memory_guard_mb", lambda: 0)  # no limit: no guard
    assert consumer_settings(parse([], {"DATABASE_URL": URL}), default_group="g",
                             default_batch=app.DEFAULT_BATCH).options.max_memory_mb == 0
