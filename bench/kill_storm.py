"""A kill storm: the whole pipeline, SIGKILLed at random, must still end exact.

    .venv/bin/python bench/kill_storm.py [--kills 20] [--seed N] [--events N] [--send-rate R]
                                         [--broker kafka|tansu] [--bootstrap-servers HOST:PORT]
                                         [--database-url URL] [--keep]

It runs, as real processes on one broker and one PostgreSQL database:

* a Jetstream simulator (in this process) serving a deterministic event set generated from the
  seed: creates, profile updates and deletes across every typed collection and a few others,
  identity and account events; paced (at most ``--send-rate`` messages/s per connection);
* ``backfill jetstream --resume --job storm`` from the first event to an end watermark (92% of the
  way through the events), all collections, producer only;
* three ``backfill consume postgres`` replicas of one group, and one ``backfill consume queue``.

From a plan drawn up front with ``random.Random(seed)`` it SIGKILLs one of the five processes at
each of ``--kills`` moments, and restarts it at once (the producer with ``--resume``, each consumer
with a batch size, linger and writer concurrency drawn from a generator of the same seed). The
moments are points of the pipeline's progress between 2% and 95% (the mean share of the window
the simulator sent and each group stored), so the kills land while there is work to interrupt
however fast the machine is, at least a second apart. About half of the kills
(``--in-transaction-share``) first wait, for up to a few seconds, for the victim to be inside a
transaction: it is frozen (SIGSTOP) and looked at (the broker holding data of the producer's open
transaction; a PostgreSQL connection of that very replica inside a transaction; the queue's SQLite
write lock held), and killed frozen; otherwise resumed and looked at again. The other kills land
wherever the process is.

Then it waits until the job is finished and both groups stored offsets up to the job's final
ones, stops the consumers with SIGTERM (each must exit 0) and checks the exact final state:

* **topics** (read_committed): every event of the window committed exactly once;
* **PostgreSQL**: every record table equal to the expected rows (newest rev per record, deletes
  applied), the identity and account event logs equal to the window's events (none twice for one
  relay seq), the actors, and the stored offsets equal to the job's final offsets;
* **queue**: exactly the items the sink must queue, each once: every identity and account event,
  and each record version that supersedes the version before it in source order (the sink folds
  by :mod:`runtime.contract.order` and does not queue a stale one; the synthetic events hold a few, e.g. a
  delete whose rev is older than the create's). No message reached two committed batches (seen
  through a trigger on the queue's de-duplication table). Per topic and DID, the items are in the
  order the simulator served them: a DID's events of one collection share a partition, and each
  batch is stored with its partition offsets in one transaction, so a restart continues exactly
  there. Across collections no order is promised (one topic per collection).

It prints the kill plan as it goes, then kills per process kind, restarts, records expected and
found, lost, duplicated and wall time. Exit status 0 only when everything is exact. The seed is
printed first with the command that replays the same plan; each process's logs stay in the work
directory when the run is not exact (or with ``--keep``).

``tests/integration/test_kill_storm.py`` runs a shorter storm through :func:`run_storm`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from confluent_kafka import KafkaException  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.brokers import add_broker_arguments, broker, describe  # noqa: E402
from consumers.queue import QueueSink  # noqa: E402
from producers.jetstream.decode import decode_message  # noqa: E402
from runtime.contract.order import asof_us, is_delete, supersedes  # noqa: E402
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, event_key, to_jetstream_json  # noqa: E402
from runtime.contract.timeparse import us_to_iso  # noqa: E402
from runtime.contract.topics import TopicMap  # noqa: E402
from runtime.kafka.checkpoint import FINISHED, load_job  # noqa: E402
from runtime.kafka.settings import KafkaSettings  # noqa: E402
from runtime.simulator.jetstream import JetstreamSimulator, StoredEvent, synthetic_events  # noqa: E402
from tests.integration.eos import committed_event_keys, open_transaction, queue_in_write  # noqa: E402
from tests.integration.pg_pipeline import Tables, expected, record_rows  # noqa: E402

#: Event time of the first generated event (2023-11-14T22:13:20Z), as the tests use.
START_US = 1_700_000_000_000_000
#: The end watermark sits at this fraction of the events; the rest (past it by more than the
#: allowed lateness) is what ends the producer's run.
END_FRACTION = 0.92
JOB = "storm"
QUEUE = "storm"
#: Seconds between two kills at least.
MIN_GAP = 1.0


def backfill_command() -> list[str]:
    """The ``backfill`` entry point of this environment."""
    exe = Path(sys.executable).parent / "backfill"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime"]


def child_env() -> dict[str, str]:
    """The environment of every child: nothing of ours leaks in (everything goes as flags)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BACKFILL_", "KAFKA_", "DATABASE_URL", "JETSTREAM_", "SCHEMA_REGISTRY"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


# ----------------------------------------------------------------------------------- configuration

@dataclass
class StormConfig:
    """What a storm runs; everything random comes from ``seed``."""

    seed: int
    kills: int = 20
    events: int = 40_000
    #: Messages per second the simulator sends per connection at most.
    send_rate: float = 1000.0
    #: Generated events per second of event time (the end watermark's allowed lateness is 1 s).
    event_rate: float = 1000.0
    accounts: int = 300
    partitions: int = 3
    #: Share of the kills that first wait for the victim to be inside a transaction.
    in_transaction_share: float = 0.5
    #: Seconds such a kill looks for a transaction before it kills anyway.
    hunt_seconds: float = 8.0
    group_protocol: str = "classic"
    #: Classic protocol: a killed member's partitions move on after this (Kafka's default is 45 s).
    session_timeout_ms: int = 6000
    #: The producer's ``--allowed-lateness`` (None: its default, 1 s): a resume rewinds this far.
    allowed_lateness: float | None = None
    #: Seconds to wait, after the last kill, for the job to finish and both groups to consume it.
    drain_timeout: float = 600.0
    #: Seconds without any progress (nothing sent, nothing stored) before a storm gives up.
    stall_timeout: float = 180.0
    #: Seconds a consumer may take to stop on SIGTERM.
    stop_timeout: float = 90.0

    def replay_command(self) -> str:
        """The command that runs this storm again (the same events, plan and per-start options)."""
        defaults = StormConfig(seed=0)
        extra = "".join(f" --{flag} {value}" for flag, value, default in (
            ("in-transaction-share", self.in_transaction_share, defaults.in_transaction_share),
            ("group-protocol", self.group_protocol, defaults.group_protocol),
            ("accounts", self.accounts, defaults.accounts),
            ("allowed-lateness", self.allowed_lateness, defaults.allowed_lateness)) if value != default)
        return (f".venv/bin/python bench/kill_storm.py --kills {self.kills} --seed {self.seed} "
                f"--events {self.events} --send-rate {self.send_rate:g}{extra}")


@dataclass
class Kill:
    """One kill of the plan, and what happened."""

    #: the pipeline's progress (0..1) it happens at
    at: float
    victim: str
    hunt: bool
    alternative: str
    #: filled in when it happens
    done_at: float = 0.0
    killed: str = ""
    pid: int = 0
    in_transaction: bool | None = None


@dataclass
class SinkCheck:
    """One sink's comparison with the expected state."""

    name: str
    expected: int = 0
    found: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.wrong == 0 and not self.notes


@dataclass
class StormResult:
    """The figures of one storm."""

    config: StormConfig
    kills: list[Kill] = field(default_factory=list)
    restarts: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[str] = field(default_factory=list)
    stop_failures: list[str] = field(default_factory=list)
    checks: list[SinkCheck] = field(default_factory=list)
    producer_runs: int = 0
    window_events: int = 0
    storm_seconds: float = 0.0
    drain_seconds: float = 0.0
    wall_seconds: float = 0.0
    workdir: Path | None = None
    error: str = ""

    @property
    def kills_by_kind(self) -> Counter[str]:
        return Counter(kind_of(k.killed) for k in self.kills if k.killed)

    @property
    def kills_in_transaction(self) -> int:
        return sum(1 for k in self.kills if k.in_transaction)

    @property
    def lost(self) -> int:
        return sum(c.lost for c in self.checks)

    @property
    def duplicated(self) -> int:
        return sum(c.duplicated for c in self.checks)

    @property
    def wrong(self) -> int:
        return sum(c.wrong for c in self.checks)

    @property
    def exact(self) -> bool:
        return (not self.error and bool(self.checks) and all(c.exact for c in self.checks)
                and not self.unexpected_exits and not self.stop_failures
                and sum(1 for k in self.kills if k.killed) == self.config.kills)

    def report(self) -> str:
        c = self.config
        by_kind = self.kills_by_kind
        lines = [
            f"kill storm, seed {c.seed}: {sum(by_kind.values())} kills of {c.kills} "
            f"(producer {by_kind['producer']}, postgres {by_kind['postgres']}, queue {by_kind['queue']}; "
            f"{self.kills_in_transaction} inside an open transaction)",
            f"  restarts: {sum(self.restarts.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.restarts.items()))}); "
            f"producer runs of job {JOB!r}: {self.producer_runs}",
            f"  unexpected exits: {len(self.unexpected_exits)}; "
            f"consumers not stopping cleanly: {len(self.stop_failures)}",
            f"  events in the window: {self.window_events:,}",
        ]
        for check in self.checks:
            lines.append(f"  {check.name:<10} expected {check.expected:>8,}  found {check.found:>8,}  "
                         f"lost {check.lost}  duplicated {check.duplicated}  wrong {check.wrong}")
            lines.extend(f"    ! {n}" for n in check.notes)
        lines.extend(f"  ! unexpected exit: {u}" for u in self.unexpected_exits)
        lines.extend(f"  ! stop: {s}" for s in self.stop_failures)
        if self.error:
            lines.append(f"  ! error: {self.error}")
        lines.append(f"  lost {self.lost}, duplicated {self.duplicated}, wrong {self.wrong}")
        lines.append(f"  wall time {self.wall_seconds:.1f} s (storm {self.storm_seconds:.1f} s, "
                     f"drain after the last kill {self.drain_seconds:.1f} s)")
        lines.append(f"  {'EXACT' if self.exact else 'NOT EXACT'}; replay: {c.replay_command()}")
        return "\n".join(lines)


class StormError(Exception):
    """The storm could not go on (no progress)."""


def kind_of(name: str) -> str:
    if name == "producer":
        return "producer"
    return "postgres" if name.startswith("pg") else "queue"


def plan(config: StormConfig) -> list[Kill]:
    """The kill plan: ``config.kills`` moments, each a point of the pipeline's progress (see
    :meth:`Pipeline.progress`) between 2% and 95%, a victim among the five processes, whether it
    waits for a transaction, and the consumer killed instead when the victim is the producer and
    its job already finished.

    Progress, not wall time: how fast the pipeline goes depends on the machine (on 2 busy cores the
    producer streams well below the simulator's pace), and a kill after the work is done interrupts
    nothing."""
    rng = random.Random(config.seed)
    names = ["producer", "pg-1", "pg-2", "pg-3", "queue"]
    moments = sorted(rng.uniform(0.02, 0.95) for _ in range(config.kills))
    return [Kill(at=t, victim=rng.choice(names), hunt=rng.random() < config.in_transaction_share,
                 alternative=rng.choice(names[1:])) for t in moments]


# ----------------------------------------------------------------------------------- the events

@dataclass
class Workload:
    """The simulator's events and the window the job must deliver."""

    stored: list[StoredEvent]
    end_us: int
    window: list[Event]

    @classmethod
    def generate(cls, config: StormConfig) -> Workload:
        stored = synthetic_events(config.events, seed=config.seed, accounts=config.accounts, start_us=START_US,
                                  rate=config.event_rate, real_cids=False)
        end_us = stored[int(len(stored) * END_FRACTION)].time_us
        window = [decode_message(e.text, job=JOB) for e in stored if START_US <= e.time_us < end_us]
        return cls(stored, end_us, window)

    def keys(self) -> Counter[str]:
        return Counter(event_key(e) for e in self.window)


def canon(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def payload_identity(payload: dict[str, Any]) -> tuple[tuple[str, str], str]:
    """``((stream, did), identity)`` of a Jetstream-shaped payload: the stream is the topic it came
    through (the collection, or identity/account); the identity is what ``event_key`` uses."""
    did = str(payload.get("did"))
    kind = payload.get("kind")
    if kind == "commit":
        c = payload.get("commit") or {}
        return (str(c.get("collection")), did), f"{c.get('collection')}|{c.get('rkey')}|{c.get('rev')}"
    body = payload.get(str(kind)) or {}
    return (str(kind), did), str(body.get("seq"))


# ----------------------------------------------------------------------------------- processes

@dataclass
class Member:
    """One of the five processes, restarted under the same name."""

    name: str
    argv: Callable[[random.Random], list[str]]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    finished: bool = False  # the producer exited 0: its job is done
    described: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.name)


class Pipeline:
    """Starts, watches, kills and restarts the five processes."""

    def __init__(self, config: StormConfig, kafka: KafkaSettings, pg_url: str, schema: str, workdir: Path,
                 sim: JetstreamSimulator, workload: Workload, say: Callable[[str], None]) -> None:
        self.config = config
        self.sim = sim
        self.window = len(workload.window)
        self.kafka = kafka
        self.pg_url = pg_url
        self.schema = schema
        self.logs = workdir / "logs"
        self.queue_path = workdir / "queues.sqlite"
        # a work directory used before: this storm's files start afresh
        shutil.rmtree(self.logs, ignore_errors=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.queue_path}{suffix}").unlink(missing_ok=True)
        self.logs.mkdir(parents=True)
        self.say = say
        self.rng = random.Random(config.seed + 1)  # per-start options; the plan has its own
        self.pg_group = f"storm-pg-{kafka.topic_prefix}"
        self.queue_group = f"storm-queue-{kafka.topic_prefix}"
        self.restarts: Counter[str] = Counter()
        self.unexpected: list[str] = []
        common = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                  "--log-level", "INFO", "--group-protocol", config.group_protocol]
        group_conf = (["--kafka-config", f"session.timeout.ms={config.session_timeout_ms}"]
                      if config.group_protocol == "classic" else [])
        producer = [*backfill_command(), "jetstream", "--instance", sim.url, "--cursor", str(START_US),
                    "--end-timestamp", us_to_iso(workload.end_us), "-n", "0", "-t", "0", "-c", "*", "--job", JOB,
                    "--resume", "--consumer", "none", "--topic-partitions", str(config.partitions),
                    "--checkpoint-interval", "1", "--progress", "none", *common]
        if config.allowed_lateness is not None:
            producer += ["--allowed-lateness", str(config.allowed_lateness)]

        def pg(rng: random.Random) -> list[str]:
            return [*backfill_command(), "consume", "postgres", "--database-url", pg_url, "--db-schema", schema,
                    "--group", self.pg_group, "--batch-size", str(rng.choice((100, 500, 2000, 5000))),
                    "--max-concurrent", str(rng.choice((1, 2))), "--linger", str(rng.choice((0.1, 0.5))),
                    *group_conf, *common]

        def queue(rng: random.Random) -> list[str]:
            return [*backfill_command(), "consume", "queue", "--queue-path", str(self.queue_path),
                    "--queue-name", QUEUE, "--group", self.queue_group,
                    "--batch-size", str(rng.choice((100, 500, 2000))), "--linger", str(rng.choice((0.1, 0.5))),
                    *group_conf, *common]

        self.members = {m.name: m for m in (
            Member("producer", lambda _rng: producer),
            Member("pg-1", pg), Member("pg-2", pg), Member("pg-3", pg),
            Member("queue", queue))}
        parts = psycopg.conninfo.conninfo_to_dict(pg_url)
        self.pg_port = int(str(parts.get("port") or 5432))
        self._pg: psycopg.Connection[Any] | None = None

    # --------------------------------------------------------------- life cycle

    def prepare_queue(self) -> None:
        """The queue's schema, and the instrumentation: every de-duplication key a committed batch
        wrote (a BEFORE trigger also fires for the rows INSERT OR IGNORE then ignores, so a message
        the sink got twice shows twice)."""
        QueueSink(QUEUE, self.queue_path).close()
        with contextlib.closing(sqlite3.connect(self.queue_path)) as conn:
            conn.executescript("""
                CREATE TABLE attempts (queue TEXT NOT NULL, key BLOB NOT NULL);
                CREATE TRIGGER seen_attempt BEFORE INSERT ON seen BEGIN
                    INSERT INTO attempts (queue, key) VALUES (NEW.queue, NEW.key);
                END;
            """)

    def start(self, m: Member) -> None:
        argv = m.argv(self.rng)
        if m.starts:
            self.restarts[m.kind] += 1
        m.starts += 1
        m.described = _options(argv) or "with --resume"
        with (self.logs / f"{m.name}.{m.starts}.log").open("ab") as out:  # the child keeps its own descriptor
            m.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                                      start_new_session=True)

    def start_all(self) -> None:
        for m in self.members.values():
            self.start(m)

    def log_tail(self, m: Member, chars: int = 1500) -> str:
        path = self.logs / f"{m.name}.{m.starts}.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def running(self, m: Member) -> bool:
        """Whether ``m``'s current process reached its consumer loop (its SIGTERM handler is installed
        before: a process stopped while Python still starts dies of the signal, having done nothing)."""
        path = self.logs / f"{m.name}.{m.starts}.log"
        try:
            return "subscribing " in path.read_text(errors="replace")
        except OSError:
            return False

    def watch(self) -> None:
        """Restart whatever exited on its own (a finished producer excepted): each such exit is a
        finding (consumers run until stopped; the producer ends with status 0 at the watermark)."""
        for m in self.members.values():
            proc = m.proc
            if proc is None or m.finished or proc.poll() is None:
                continue
            if m.name == "producer" and proc.returncode == 0:
                m.finished = True
                self.say(f"  producer finished its job (run {m.starts})")
                continue
            self.unexpected.append(f"{m.name} (start {m.starts}) exited with {proc.returncode}: "
                                   f"{self.log_tail(m)!r}")
            self.say(f"  ! {m.name} exited on its own with {proc.returncode}; restarting")
            self.start(m)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` while watching the processes."""
        end = time.monotonic() + seconds
        while True:
            self.watch()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def close(self) -> None:
        for m in self.members.values():
            if m.proc is not None and m.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(30)
        if self._pg is not None:
            self._pg.close()

    # --------------------------------------------------------------- kills

    def pg(self) -> psycopg.Connection[Any]:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(self.pg_url, autocommit=True, application_name="kill-storm")
        return self._pg

    def in_transaction(self, m: Member) -> bool:
        """Whether the (frozen) process ``m`` is inside a transaction now."""
        assert m.proc is not None
        if m.kind == "producer":
            return bool(open_transaction(self.kafka))
        if m.kind == "postgres":
            try:
                ports = [c.laddr.port for c in psutil.Process(m.proc.pid).net_connections(kind="tcp")
                         if c.raddr and c.raddr.port == self.pg_port]
            except psutil.Error:
                return False
            if not ports:
                return False
            row = self.pg().execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'atproto-backfill-postgres%%' AND xact_start IS NOT NULL "
                "AND client_port = ANY(%s)", (ports,)).fetchone()
            return row is not None and row[0] > 0
        return queue_in_write(self.queue_path)

    def kill(self, m: Member, hunt: bool) -> tuple[int, bool | None]:
        """SIGKILL ``m``'s process group, then restart it. With ``hunt``, first look for a moment
        it is inside a transaction (frozen while looked at; killed frozen) for up to
        ``hunt_seconds``. Returns the pid killed and whether it was seen in a transaction (None:
        not looked at)."""
        proc = m.proc
        assert proc is not None
        pid = proc.pid
        seen: bool | None = None
        if hunt:
            seen = False
            deadline = time.monotonic() + self.config.hunt_seconds
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGSTOP)
                try:
                    held = self.in_transaction(m)
                except (psycopg.Error, sqlite3.Error, KafkaException, AssertionError, OSError) as e:
                    held = False  # a busy broker or database: resumed, and looked at again
                    self.say(f"  (could not look at {m.name}: {e})")
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    raise
                if held:
                    seen = True
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
                time.sleep(0.01 if m.kind != "producer" else 0.05)
        if proc.poll() is not None:  # it ended by itself meanwhile: the watcher deals with it
            return 0, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        proc.wait(60)
        self.start(m)
        return pid, seen

    # --------------------------------------------------------------- progress

    def pg_offsets(self) -> dict[tuple[str, int], int]:
        try:
            rows = self.pg().execute(sql.SQL("SELECT topic, partition, next_offset FROM {}.kafka_offsets "
                                             "WHERE group_id = %s").format(sql.Identifier(self.schema)),
                                     (self.pg_group,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
        return {(t, int(p)): int(o) for t, p, o in rows}

    def queue_offsets(self) -> dict[tuple[str, int], int]:
        with contextlib.closing(sqlite3.connect(self.queue_path, timeout=30)) as conn:
            rows = conn.execute("SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?",
                                (self.queue_group,)).fetchall()
        return {(t, int(p)): int(o) for t, p, o in rows}

    def progress(self) -> tuple[float, tuple[int, int, int], str]:
        """The pipeline's progress from 0 to 1: the mean of the messages the simulator sent and the
        offsets each group stored, each as a share of the window's events (capped at 1: replays
        and transaction markers count too); the three figures; a line saying it."""
        sent, pg, q = self.sim.messages_sent, sum(self.pg_offsets().values()), sum(self.queue_offsets().values())
        n = max(1, self.window)
        share = (min(1.0, sent / n) + min(1.0, pg / n) + min(1.0, q / n)) / 3
        return share, (sent, pg, q), (f"progress {share:.0%} (simulator sent {sent:,}; stored offsets: "
                                      f"postgres {pg:,}, queue {q:,})")

    def wait_for(self, share: float, not_before: float) -> None:
        """Watch the processes until the progress reached ``share`` and the clock ``not_before``.

        Raises:
            StormError: nothing moved for ``config.stall_timeout`` seconds.
        """
        figures: tuple[int, int, int] | None = None
        moved = time.monotonic()
        while True:
            self.watch()
            now = time.monotonic()
            done, now_figures, line = self.progress()
            if now_figures != figures:
                figures, moved = now_figures, now
            if done >= share and now >= not_before:
                return
            if now - moved > self.config.stall_timeout:
                raise StormError(f"no progress for {self.config.stall_timeout:.0f} s: {line}")
            time.sleep(0.2)


def _options(argv: list[str]) -> str:
    """The per-start options of a consumer, for the kill log."""
    out = []
    for i, a in enumerate(argv[:-1]):
        if a in ("--batch-size", "--max-concurrent", "--linger"):
            out.append(f"{a[2:]}={argv[i + 1]}")
    return " ".join(out)


# ----------------------------------------------------------------------------------- checks

def final_offsets(kafka: KafkaSettings) -> tuple[dict[tuple[str, int], int], int, str]:
    """The finished job's final data offsets, its number of runs and its status."""
    control = TopicMap(kafka.topic_prefix).control
    state = load_job(kafka.consumer_config(f"storm-reader-{uuid.uuid4().hex[:6]}"), control, JOB, settle=0)
    if state is None:
        return {}, 0, "absent"
    offsets = {(t, int(p)): int(o) for t, parts in state.offsets.items() if t != control for p, o in parts.items()}
    return offsets, state.runs, state.status


def covered(stored: dict[tuple[str, int], int], final: dict[tuple[str, int], int]) -> bool:
    return all(stored.get(tp, 0) >= off for tp, off in final.items())


def compare_counts(name: str, want: Counter[Any], got: Counter[Any]) -> SinkCheck:
    check = SinkCheck(name, expected=sum(want.values()), found=sum(got.values()))
    for k, n in want.items():
        check.lost += max(0, n - got.get(k, 0))
        check.duplicated += max(0, got.get(k, 0) - n)
    check.wrong = sum(n for k, n in got.items() if k not in want)
    return check


def check_topics(kafka: KafkaSettings, workload: Workload) -> SinkCheck:
    return compare_counts("topics", workload.keys(), committed_event_keys(kafka))


def pg_state(pg_url: str, schema: str) -> tuple[Tables, Counter[tuple[str, str, int]]]:
    """What the tables hold: the record rows, event logs and actors (``Tables``), and every event
    log row counted by (table, did, relay seq), so an event logged twice shows."""
    out = Tables()
    s = sql.Identifier(schema)
    logged: Counter[tuple[str, str, int]] = Counter()
    with psycopg.connect(pg_url) as conn:
        out.records = record_rows(conn, schema)
        for name in ("identity_events", "account_events"):
            rows = conn.execute(sql.SQL("SELECT did, source, cursor, time_us, seq FROM {}.{}").format(
                s, sql.Identifier(name))).fetchall()
            target = out.identities if name == "identity_events" else out.accounts
            for did, source, cursor, time_us, seq in rows:
                target.add((did, source, cursor, time_us))
                logged[(name, did, seq)] += 1
        out.actors = {r[0] for r in conn.execute(sql.SQL("SELECT did FROM {}.actors").format(s))}
    return out, logged


def check_postgres(pg_url: str, schema: str, workload: Workload, stored: dict[tuple[str, int], int],
                   final: dict[tuple[str, int], int]) -> SinkCheck:
    want = expected(workload.window)
    got, logged = pg_state(pg_url, schema)
    check = SinkCheck("postgres")
    for name, rows in want.records.items():
        have = got.records[name]
        check.expected += len(rows)
        check.found += len(have)
        for key, value in rows.items():
            if key not in have:
                check.lost += 1
            elif have[key] != value:
                if (have[key][0] or "") < (value[0] or ""):
                    check.lost += 1  # an older revision kept: the newer one was lost
                else:
                    check.wrong += 1
        extra = have.keys() - rows.keys()
        check.wrong += len(extra)  # rows that must not be there (deleted, or never in the window)
        if extra:
            check.notes.append(f"{name}: {len(extra)} unexpected rows, e.g. {sorted(extra)[0]}")
    for label, w, g in (("identity_events", want.identities, got.identities),
                        ("account_events", want.accounts, got.accounts)):
        check.expected += len(w)
        check.found += sum(n for (t, _, _), n in logged.items() if t == label)
        check.lost += len(w - g)
        check.wrong += len(g - w)
    check.duplicated += sum(n - 1 for n in logged.values() if n > 1)
    missing_actors, extra_actors = want.actors - got.actors, got.actors - want.actors
    if missing_actors or extra_actors:
        check.notes.append(f"actors: {len(missing_actors)} missing, {len(extra_actors)} unexpected")
    if stored != final:
        diff = sorted(tp for tp in final.keys() | stored.keys() if stored.get(tp) != final.get(tp))
        check.notes.append(f"stored offsets differ from the job's final offsets on {len(diff)} partitions, "
                           f"e.g. {diff[0]}: stored {stored.get(diff[0])}, final {final.get(diff[0])}")
    return check


def queued_events(window: list[Event]) -> tuple[list[Event], int]:
    """The events the queue sink must queue, in source order, and how many it must not.

    The sink folds (:mod:`runtime.contract.order`): a record version that does not supersede the version
    it already folded for the same record (did, collection, rkey) is stale and not queued; account
    and identity events always are (``--account-removal keep``: nothing is a removal). A record's
    versions all travel in one partition, in source order, and the fold state commits with each
    batch and its offsets, so which versions are stale is decided by the source order alone,
    whatever the kills.
    """
    kept: dict[tuple[str, str, str], tuple[str | None, bool, int]] = {}
    out: list[Event] = []
    stale = 0
    for e in window:
        if isinstance(e, RecordEvent):
            key = (e.did, e.collection, e.rkey)
            version = (e.rev, is_delete(e), asof_us(e))
            old = kept.get(key)
            if old is not None and not supersedes(*version, *old):
                stale += 1
                continue
            kept[key] = version
        out.append(e)
    return out, stale


def check_queue(path: Path, group: str, workload: Workload, final: dict[tuple[str, int], int]) -> SinkCheck:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        rows = conn.execute("SELECT queue, payload FROM items ORDER BY id").fetchall()
        stored = {(t, int(p)): int(o) for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?", (group,))}
        attempts = Counter(conn.execute("SELECT queue, key FROM attempts").fetchall())
    must, _stale = queued_events(workload.window)
    want = Counter(canon(to_jetstream_json(e)) for e in must)
    payloads = [orjson.loads(p) for q, p in rows if q == QUEUE]
    check = compare_counts("queue", want, Counter(canon(p) for p in payloads))
    if any(q != QUEUE for q, _ in rows):
        check.notes.append(f"items in other queues: {Counter(q for q, _ in rows if q != QUEUE)}")
    # Exactly once at the sink itself: every message reached a committed batch once (a stale
    # version too: it is marked seen, then not queued).
    rewritten = sum(n - 1 for n in attempts.values() if n > 1)
    if rewritten:
        check.notes.append(f"{rewritten} messages handled again by a later committed batch "
                           "(absorbed by de-duplication)")
    if sum(attempts.values()) - rewritten != len(workload.window):
        check.notes.append(f"{sum(attempts.values()) - rewritten:,} distinct messages reached a committed "
                           f"batch, not {len(workload.window):,}")
    # Per (topic, DID): the simulator's order.
    order_want: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in must:
        stream, ident = payload_identity(to_jetstream_json(e))
        order_want[stream].append(ident)
    order_got: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in payloads:
        stream, ident = payload_identity(p)
        order_got[stream].append(ident)
    disordered = [s for s in order_want.keys() | order_got.keys()
                  if order_want.get(s) != order_got.get(s)
                  and sorted(order_want.get(s, [])) == sorted(order_got.get(s, []))]
    if disordered:
        check.notes.append(f"{len(disordered)} (topic, DID) streams out of the simulator's order, "
                           f"e.g. {sorted(disordered)[0]}")
    if stored != final:
        diff = sorted(tp for tp in final.keys() | stored.keys() if stored.get(tp) != final.get(tp))
        check.notes.append(f"stored offsets differ from the job's final offsets on {len(diff)} partitions, "
                           f"e.g. {diff[0]}: stored {stored.get(diff[0])}, final {final.get(diff[0])}")
    return check


def window_counts(window: list[Event]) -> str:
    kinds: Counter[str] = Counter()
    for e in window:
        if isinstance(e, RecordEvent):
            kinds[str(e.operation)] += 1
        elif isinstance(e, IdentityEvent):
            kinds["identity"] += 1
        elif isinstance(e, AccountEvent):
            kinds["account"] += 1
    collections = len({e.collection for e in window if isinstance(e, RecordEvent)})
    return (f"{len(window):,} events in the window ({', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))}; "
            f"{collections} collections)")


# ----------------------------------------------------------------------------------- the storm

def run_storm(config: StormConfig, *, bootstrap: str, pg_url: str, schema: str, workdir: Path,
              topic_prefix: str | None = None, say: Callable[[str], None] = print) -> StormResult:
    """Run one storm on the broker at ``bootstrap`` into ``schema`` of the database at ``pg_url``
    (both must exist; the schema is created by the consumers), with logs and the queue file under
    ``workdir``. Returns the figures; :attr:`StormResult.exact` says whether it ended exact."""
    t0 = time.monotonic()
    result = StormResult(config, workdir=workdir)
    say(f"kill storm: seed {config.seed} ({config.replay_command()})")
    workload = Workload.generate(config)
    result.window_events = len(workload.window)
    queued, stale = queued_events(workload.window)
    say(f"  {len(workload.stored):,} simulated events; {window_counts(workload.window)}; end watermark "
        f"{us_to_iso(workload.end_us)}; {len(queued):,} to queue ({stale} stale versions not)")
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=topic_prefix or f"storm{uuid.uuid4().hex[:8]}",
                          topic_partitions=config.partitions)
    sim = JetstreamSimulator(workload.stored, rate_limit=config.send_rate).start_in_thread()
    pipeline = Pipeline(config, kafka, pg_url, schema, workdir, sim, workload, say)
    kills = plan(config)
    result.kills = kills
    try:
        pipeline.prepare_queue()
        pipeline.start_all()
        storm_start = time.monotonic()
        say(f"  started the producer, 3 PostgreSQL replicas (group {pipeline.pg_group}) and a queue consumer "
            f"(group {pipeline.queue_group}); {config.kills} kills at progress "
            f"{', '.join(f'{k.at:.0%}' for k in kills)}")
        last = 0.0
        for i, k in enumerate(kills, 1):
            # the plan's moment, but never right after the previous kill
            pipeline.wait_for(k.at, last + MIN_GAP)
            victim = pipeline.members[k.victim]
            if victim.finished:
                victim = pipeline.members[k.alternative]
            k.killed = victim.name
            k.pid, k.in_transaction = pipeline.kill(victim, k.hunt)
            last = time.monotonic()
            k.done_at = last - storm_start
            if not k.pid:
                k.killed = ""  # it had exited by itself; the watcher restarts it and reports it
                say(f"  [{k.done_at:6.1f} s] kill {i}/{config.kills}: {victim.name} had already exited")
                continue
            where = ("anywhere" if k.in_transaction is None
                     else "inside a transaction" if k.in_transaction else "no transaction seen")
            say(f"  [{k.done_at:6.1f} s] kill {i}/{config.kills}: {victim.name} (pid {k.pid}, {where}); "
                f"restarted ({victim.described}); {pipeline.progress()[2]}")
        result.storm_seconds = time.monotonic() - storm_start
        drain_start = time.monotonic()
        deadline = drain_start + config.drain_timeout
        final: dict[tuple[str, int], int] = {}
        while True:
            pipeline.watch()
            if pipeline.members["producer"].finished:
                if not final:  # its final checkpoint, committed before it exited
                    final, result.producer_runs, status = final_offsets(kafka)
                    if status != FINISHED or not final:
                        result.error = f"the producer exited 0 but job {JOB!r} is {status}, offsets {final}"
                        return result
                if covered(pipeline.pg_offsets(), final) and covered(pipeline.queue_offsets(), final):
                    break
            if time.monotonic() > deadline:
                result.error = (f"not consumed within {config.drain_timeout:.0f} s after the last kill "
                                f"(producer finished: {pipeline.members['producer'].finished}; "
                                f"{pipeline.progress()[2]})")
                return result
            time.sleep(0.5)
        result.drain_seconds = time.monotonic() - drain_start
        say(f"  consumed everything {result.drain_seconds:.1f} s after the last kill; stopping the consumers")
        consumers = [m for m in pipeline.members.values() if m.kind != "producer"]
        deadline = time.monotonic() + config.stop_timeout
        while not all(pipeline.running(m) for m in consumers):  # a consumer restarted by the last kills
            pipeline.watch()
            if time.monotonic() > deadline:
                result.stop_failures += [f"{m.name} (start {m.starts}) never reached its consumer loop: "
                                         f"{pipeline.log_tail(m)!r}" for m in consumers if not pipeline.running(m)]
                break
            time.sleep(0.1)
        for m in consumers:
            if m.proc is not None:
                os.killpg(m.proc.pid, signal.SIGTERM)
        for m in consumers:
            if m.proc is None:
                continue
            try:
                code = m.proc.wait(config.stop_timeout)
            except subprocess.TimeoutExpired:
                result.stop_failures.append(f"{m.name} did not stop within {config.stop_timeout:.0f} s of SIGTERM")
                continue
            if code != 0:
                result.stop_failures.append(f"{m.name} exited with {code} on SIGTERM: {pipeline.log_tail(m)!r}")
        result.unexpected_exits = list(pipeline.unexpected)
        result.restarts = pipeline.restarts
        say("  checking the topics, the tables and the queue")
        result.checks = [
            check_topics(kafka, workload),
            check_postgres(pg_url, schema, workload, pipeline.pg_offsets(), final),
            check_queue(pipeline.queue_path, pipeline.queue_group, workload, final),
        ]
    except StormError as e:
        result.error = str(e)
    finally:
        result.unexpected_exits = list(pipeline.unexpected)
        result.restarts = pipeline.restarts
        pipeline.close()
        sim.stop_thread()
        result.wall_seconds = time.monotonic() - t0
    return result


# ----------------------------------------------------------------------------------- the command

@contextlib.contextmanager
def database(url: str | None) -> Iterator[tuple[str, str]]:
    """``(url, schema)``: a fresh schema in the database at ``url``, or, without one, a fresh
    database on the local server (127.0.0.1:5432); dropped afterwards."""
    schema = f"storm_{uuid.uuid4().hex[:8]}"
    if url:
        try:
            yield url, schema
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        return
    server = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"kill_storm_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}", schema
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="how many SIGKILLs (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="the seed of the events and the plan (default: new)")
    parser.add_argument("--events", type=int, default=40_000, help="simulated events (default 40,000)")
    parser.add_argument("--send-rate", type=float, default=1000.0,
                        help="messages/s the simulator sends at most (default 1,000)")
    parser.add_argument("--in-transaction-share", type=float, default=0.5,
                        help="share of kills that first wait for the victim to be inside a transaction")
    parser.add_argument("--group-protocol", choices=("classic", "consumer"), default="classic",
                        help="the consumer groups' protocol (default classic, with a 6 s session timeout)")
    parser.add_argument("--accounts", type=int, default=300, help="simulated accounts (default 300)")
    parser.add_argument("--allowed-lateness", type=float, default=None,
                        help="the producer's --allowed-lateness (default: its own, 1 s); a resume rewinds this far")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or None,
                        help="PostgreSQL database to use a fresh schema of (env DATABASE_URL; "
                             "default: a fresh database on 127.0.0.1:5432)")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and the queue file (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even when exact")
    add_broker_arguments(parser)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    config = StormConfig(seed=seed, kills=args.kills, events=args.events, send_rate=args.send_rate,
                         in_transaction_share=args.in_transaction_share, group_protocol=args.group_protocol,
                         accounts=args.accounts, allowed_lateness=args.allowed_lateness)
    print(f"seed {seed}; broker: {describe(args)}", flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill-storm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with broker(args) as bootstrap, database(args.database_url) as (url, schema):
        result = run_storm(config, bootstrap=bootstrap, pg_url=url, schema=schema, workdir=workdir,
                           say=lambda line: print(line, flush=True))
    print(result.report(), flush=True)
    if result.exact and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"  logs and the queue file: {workdir}")
    return 0 if result.exact else 1


if __name__ == "__main__":
    sys.exit(main())
