"""``backfill repos``: backfill whole repositories (getRepo CARs) into the typed topics (seed 002).

Where the DIDs come from:

* a list: ``--dids a,b,c``, ``--dids-file FILE``, ``-u handle,...``, ``--from-relay`` (every repo the
  relay's paginated ``com.atproto.sync.listRepos`` knows) and ``--from-pds URL`` (a PDS's own list;
  the relay's is known to be incomplete). A list runs as one producer job (checkpointed,
  ``--resume``-able), fetched concurrently and produced in batches of ``--batch-size`` DIDs;
* ``--enqueue``: the list goes into the DID work topic ``<prefix>.backfill.dids`` instead;
* ``--from-topic``: this process is one replica of a consumer group on the DID work topic
  (see :mod:`producers.repos.worktopic`); run N of them on N machines.

Each DID: resolve its DID document (PLC directory or did:web), fetch ``getRepo`` from its PDS
politely (per-host budgets, RateLimit headers, 429s, retries; :mod:`producers.repos.pds`), walk
the MST from the signed commit (``--verify`` checks the signature), produce every wanted record
(operation ``create``, ``rev`` = the commit's rev, ``source`` = ``repo``) and a ``repo_status``
record with the per-user metadata, in the same transaction. Python API (seed 002)::

    from producers.repos import run_batched_backfill
    result = run_batched_backfill(dids, batch_size=50, start_timestamp="2024-09-27-00:00:00",
                                  end_timestamp="2024-12-02-00:00:00")
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tenacity import wait_exponential_jitter, wait_none

from producers.identity.didlist import ATPROTO_METHODS, check_did, read_dids_file, split_csv
from producers.identity.handles import DEFAULT_RESOLVER, resolve_handles
from producers.identity.resolver import DEFAULT_PLC_URL, PLC_URL_ENV, DidResolver
from producers.job import JobOptions, JobRunner, JobStats
from producers.netsafety import NetworkPolicy
from producers.options import add_producer_arguments, api_namespace, check_producer_options, producer_options
from producers.repos import taskdump
from producers.repos.decode import RECORD_TYPES, RecordFilter, record_type
from producers.repos.pds import PdsClient, PdsError, PdsLimits
from producers.repos.source import (
    RepoFetcher,
    RepoPosition,
    RepoProcessor,
    RepoResult,
    RepoSource,
    count_outcome,
    dids_fingerprint,
)
from producers.repos.worktopic import WorkOptions, WorkStats, WorkTopicRunner, enqueue_dids
from runtime.contract.codec import AvroCodec
from runtime.contract.created_at import OutOfRange, TimestampPolicy
from runtime.contract.nsid import validate_pattern
from runtime.contract.records import Event, RecordEvent
from runtime.contract.timeparse import parse_timestamp
from runtime.errors import ConfigError, DropError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Health, Metrics, MetricsServer
from runtime.process.options import ObservabilitySettings, Opt, resolve_appends
from runtime.process.progress import Progress, print_statistics
from runtime.process.signals import handle_stop_signals

log = logging.getLogger(__name__)

DEFAULT_RELAY: Final = "https://bsky.network"
#: Checkpoints of a list job happen on the interval only, always between two DIDs.
_NEVER: Final = 1 << 62


def _default_replica() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


REPOS_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--dids",), "dids", "BACKFILL_DIDS", None, "comma-separated DIDs to backfill"),
    Opt(("--dids-file",), "dids_file", "BACKFILL_DIDS_FILE", None,
        "file with one DID per line (# comments allowed)"),
    Opt(("--bluesky-user-handles", "-u"), "handles", "BACKFILL_USER_HANDLES", None,
        "comma-separated Bluesky handles, resolved to DIDs and backfilled"),
    Opt(("--handle-resolver",), "handle_resolver", "BACKFILL_HANDLE_RESOLVER", DEFAULT_RESOLVER,
        "service answering com.atproto.identity.resolveHandle"),
    Opt(("--from-relay",), "from_relay", "BACKFILL_FROM_RELAY", False,
        "backfill every repository the relay lists (com.atproto.sync.listRepos, paginated)",
        action="store_true"),
    Opt(("--relay-url",), "relay_url", "BACKFILL_RELAY_URL", DEFAULT_RELAY, "the relay for --from-relay"),
    Opt(("--from-pds",), "from_pds", "BACKFILL_FROM_PDS", None,
        "also backfill every repository this PDS lists (its own listRepos; the relay's list is "
        "incomplete); repeatable", action="append", metavar="URL"),
    Opt(("--limit",), "limit", "BACKFILL_DID_LIMIT", 0, "backfill at most this many DIDs of the list (0 = all)",
        type=int),
    Opt(("--from-topic",), "from_topic", "BACKFILL_FROM_TOPIC", False,
        "be a replica of the consumer group on the DID work topic <prefix>.backfill.dids",
        action="store_true"),
    Opt(("--enqueue",), "enqueue", "BACKFILL_ENQUEUE", False,
        "put the listed DIDs into the DID work topic instead of backfilling them here", action="store_true"),
    Opt(("--record-types",), "record_types", "BACKFILL_RECORD_TYPES", None,
        f"comma-separated record types to produce ({', '.join(RECORD_TYPES)}; default: all)"),
    Opt(("--collections", "-c"), "collections", "BACKFILL_COLLECTIONS", [],
        "also produce these collections; repeatable; NSID prefix wildcards allowed", action="append",
        metavar="NSID"),
    Opt(("--start-timestamp", "-s"), "start_timestamp", "BACKFILL_START_TIMESTAMP", None,
        "createdAt range start (YYYY-MM-DD, YYYY-MM-DD-HH:MM:SS UTC, or ISO 8601)"),
    Opt(("--end-timestamp", "-e"), "end_timestamp", "BACKFILL_END_TIMESTAMP", None,
        "createdAt range end (exclusive)"),
    Opt(("--out-of-range",), "out_of_range", "BACKFILL_OUT_OF_RANGE", "keep",
        "records whose createdAt is outside the range or unparseable: keep (produce them), drop (skip "
        "and count them), standardize (produce them; the sinks set the 1st/15th of the month)",
        choices=("keep", "drop", "standardize")),
    Opt(("--batch-size",), "batch_size", "BACKFILL_BATCH_SIZE", 0,
        "DIDs per batch; a batch completes (and memory is released) before the next (0 = one batch)",
        type=int),
    Opt(("--concurrency",), "concurrency", "BACKFILL_CONCURRENCY", 32, "DIDs fetched at once", type=int),
    Opt(("--rate",), "rate", "BACKFILL_PDS_RATE", 9.0,
        "requests per second per PDS host (hosted PDSes allow about 3,000 per 5 minutes)", type=float),
    Opt(("--burst",), "burst", "BACKFILL_PDS_BURST", 5, "request burst per PDS host", type=int),
    Opt(("--per-host-concurrency",), "per_host_concurrency", "BACKFILL_PDS_HOST_CONCURRENCY", 4,
        "requests in flight per PDS host", type=int),
    Opt(("--global-concurrency",), "global_concurrency", "BACKFILL_PDS_CONCURRENCY", 32,
        "requests in flight over all hosts", type=int),
    Opt(("--max-car-bytes",), "max_car_bytes", "BACKFILL_MAX_CAR_BYTES", 1 << 30,
        "refuse repositories larger than this many bytes", type=int),
    Opt(("--max-car-blocks",), "max_car_blocks", "BACKFILL_MAX_CAR_BLOCKS", 4_000_000,
        "dead-letter repositories of more blocks than this (the index of a repository's blocks, about "
        "150 bytes each, is the memory it takes while decoded)", type=int),
    Opt(("--max-record-bytes",), "max_record_bytes", "BACKFILL_MAX_RECORD_BYTES", 1 << 20,
        "dead-letter records larger than this", type=int),
    Opt(("--max-cbor-depth",), "max_cbor_depth", "BACKFILL_MAX_CBOR_DEPTH", 64,
        "dead-letter records nested deeper than this", type=int),
    Opt(("--attempts",), "attempts", "BACKFILL_REPO_ATTEMPTS", 3,
        "tries per repository before it is dead-lettered (each retries its requests too)", type=int),
    Opt(("--request-attempts",), "request_attempts", "BACKFILL_REQUEST_ATTEMPTS", 4,
        "tries per request on 5xx, timeouts and cut-short bodies", type=int),
    Opt(("--retry-backoff",), "retry_backoff", "BACKFILL_RETRY_BACKOFF", 2.0,
        "base of the jittered exponential backoff between repository tries, in seconds (requests use "
        "a quarter of it; 0 = retry at once)", type=float),
    Opt(("--read-timeout",), "read_timeout", "BACKFILL_READ_TIMEOUT", 60.0,
        "seconds without data from a PDS before a request is retried", type=float),
    Opt(("--plc-url",), "plc_url", PLC_URL_ENV, DEFAULT_PLC_URL, "the PLC directory resolving did:plc"),
    Opt(("--allow-private-network",), "allow_private_network", "BACKFILL_ALLOW_PRIVATE_NETWORK", False,
        "let DID documents point at loopback/private/link-local addresses (simulators, tests)",
        action="store_true"),
    Opt(("--did-web-scheme",), "did_web_scheme", "BACKFILL_DID_WEB_SCHEME", "https",
        "scheme of did:web documents (http only for simulators)", choices=("https", "http")),
    Opt(("--verify",), "verify", "BACKFILL_VERIFY", False,
        "check every commit signature against the DID document's key", action="store_true"),
    Opt(("--workdir",), "workdir", "BACKFILL_WORKDIR", None,
        "directory for downloaded CARs (default: a temporary directory)"),
    Opt(("--replica-id",), "replica_id", "BACKFILL_REPLICA_ID", None,
        "--from-topic: this replica's stable id (default $HOSTNAME); restart a replica with its id"),
    Opt(("--prefetch",), "prefetch", "BACKFILL_PREFETCH", 64,
        "--from-topic: work items held per partition", type=int),
    Opt(("--txn-max-dids",), "txn_max_dids", "BACKFILL_TXN_MAX_DIDS", 100,
        "--from-topic: DIDs per transaction at most", type=int),
    Opt(("--txn-max-records",), "txn_max_records", "BACKFILL_TXN_MAX_RECORDS", 200_000,
        "--from-topic: records per transaction at most (a repository counts with its tree's entries and "
        "joins a transaction only if it fits; a larger repository commits alone)", type=int),
    Opt(("--txn-max-seconds",), "txn_max_seconds", "BACKFILL_TXN_MAX_SECONDS", 20.0,
        "--from-topic: a transaction takes no further DID once open this long; below the transaction "
        "timeout (transaction.timeout.ms, 60 s), which must also cover the slowest single repository",
        type=float),
    Opt(("--idle-exit",), "idle_exit", "BACKFILL_IDLE_EXIT", 0.0,
        "--from-topic: exit once the work topic is drained and this replica had no work for this many "
        "seconds (0 = never)", type=float),
    Opt(("--redo",), "redo", "BACKFILL_REDO", False,
        "--from-topic: backfill DIDs again even when their status says done", action="store_true"),
    *producer_options("repos", leave_out=("checkpoint_events", "max_collections"),
                      help={"job": "job name (checkpoint key; work-topic consumer group)",
                            "resume": "continue a list job from its checkpoint",
                            "transactions": "list jobs: commit data and checkpoints atomically"}),
)


@dataclass
class ReposSettings:
    """Settings of one ``backfill repos`` process."""

    kafka: KafkaSettings
    obs: ObservabilitySettings
    dids: list[str]
    dids_file: Path | None
    handles: list[str]
    handle_resolver: str
    from_relay: bool
    relay_url: str
    from_pds: list[str]
    limit: int
    from_topic: bool
    enqueue: bool
    record_filter: RecordFilter
    batch_size: int
    concurrency: int
    limits: PdsLimits
    attempts: int
    retry_backoff: float
    plc_url: str
    allow_private_network: bool
    did_web_scheme: str
    verify: bool
    job: str
    resume: bool
    transactions: str
    checkpoint_interval: float
    max_time: float
    workdir: Path | None
    replica: str
    prefetch: int
    txn_max_dids: int
    txn_max_records: int
    txn_max_seconds: float
    idle_exit: float
    redo: bool
    progress: str
    extra: dict[str, Any] = field(default_factory=dict)


def settings_from_namespace(ns: argparse.Namespace) -> ReposSettings:
    """Validate parsed flags into settings before anything connects.

    Raises:
        ConfigError: a malformed or contradictory value.
    """
    types = frozenset(split_csv(ns.record_types))
    collections = tuple(validate_pattern(c) for c in (ns.collections or []))
    start = parse_timestamp(ns.start_timestamp) if ns.start_timestamp else None
    end = parse_timestamp(ns.end_timestamp) if ns.end_timestamp else None
    policy = TimestampPolicy(start=start, end=end, out_of_range=OutOfRange(ns.out_of_range))
    flt = RecordFilter(types=types, collections=collections, policy=policy,
                       max_record_bytes=ns.max_record_bytes, max_depth=ns.max_cbor_depth)
    listed = bool(ns.dids or ns.dids_file or ns.handles or ns.from_relay or ns.from_pds)
    if ns.from_topic and (listed or ns.enqueue):
        raise ConfigError("--from-topic takes its DIDs from the work topic; drop --dids/--dids-file/-u/"
                          "--from-relay/--from-pds/--enqueue")
    if not ns.from_topic and not listed:
        raise ConfigError("no DIDs: give --dids, --dids-file, -u, --from-relay, --from-pds, or --from-topic")
    for name in ("concurrency", "rate", "burst", "per_host_concurrency", "global_concurrency", "attempts",
                 "request_attempts", "prefetch", "txn_max_dids", "txn_max_records", "txn_max_seconds",
                 "max_car_bytes", "max_car_blocks"):
        if getattr(ns, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    check_producer_options(ns)
    if ns.batch_size < 0 or ns.limit < 0 or ns.idle_exit < 0 or ns.retry_backoff < 0:
        raise ConfigError("--batch-size, --limit, --idle-exit and --retry-backoff must be >= 0")
    kafka = KafkaSettings.from_namespace(ns)
    txn_timeout = kafka.transaction_timeout()
    if ns.from_topic and ns.txn_max_seconds >= txn_timeout:
        raise ConfigError(f"--txn-max-seconds {ns.txn_max_seconds:g} must be below the transaction timeout "
                          f"({txn_timeout:g} s, transaction.timeout.ms): the broker aborts a transaction open longer")
    limits = PdsLimits(rate=ns.rate, burst=ns.burst, per_host_concurrency=ns.per_host_concurrency,
                       global_concurrency=ns.global_concurrency, attempts=ns.request_attempts,
                       max_car_bytes=ns.max_car_bytes, max_car_blocks=ns.max_car_blocks,
                       read_timeout=ns.read_timeout)
    return ReposSettings(
        kafka=kafka, obs=ObservabilitySettings.from_namespace(ns),
        dids=[check_did(d, ATPROTO_METHODS) for d in split_csv(ns.dids)],
        dids_file=Path(ns.dids_file) if ns.dids_file else None,
        handles=split_csv(ns.handles), handle_resolver=ns.handle_resolver, from_relay=bool(ns.from_relay),
        relay_url=ns.relay_url, from_pds=list(ns.from_pds or []), limit=ns.limit, from_topic=bool(ns.from_topic),
        enqueue=bool(ns.enqueue), record_filter=flt, batch_size=ns.batch_size, concurrency=ns.concurrency,
        limits=limits, attempts=ns.attempts, retry_backoff=ns.retry_backoff, plc_url=ns.plc_url,
        allow_private_network=bool(ns.allow_private_network),
        did_web_scheme=ns.did_web_scheme, verify=bool(ns.verify), job=ns.job, resume=bool(ns.resume),
        transactions=ns.transactions, checkpoint_interval=ns.checkpoint_interval, max_time=ns.max_time,
        workdir=Path(ns.workdir) if ns.workdir else None, replica=ns.replica_id or _default_replica(),
        prefetch=ns.prefetch, txn_max_dids=ns.txn_max_dids, txn_max_records=ns.txn_max_records,
        txn_max_seconds=ns.txn_max_seconds, idle_exit=ns.idle_exit, redo=bool(ns.redo),
        progress=ns.progress,
    )


#: One line for ``backfill --help``.
HELP: Final = "backfill whole repositories (getRepo) into the typed topics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``backfill repos`` option."""
    add_producer_arguments(parser, REPOS_OPTIONS)


def finish_namespace(ns: argparse.Namespace) -> None:
    """Resolve append-options from the environment when absent on the command line."""
    resolve_appends(ns, REPOS_OPTIONS)
    if ns.from_pds is None:
        ns.from_pds = []


# ------------------------------------------------------------------------------------ the run


class RepoJobRunner(JobRunner):
    """The job runner of a list job, which also writes each DID's repo_status record."""

    _refused: dict[str, list[tuple[str, str]]] | None = None

    def _emit(self, event: Event) -> None:
        try:
            super()._emit(event)
        except DropError as e:
            # The runner dead-letters it; the DID's status must not count it as produced.
            if isinstance(event, RecordEvent):
                if self._refused is None:
                    self._refused = {}
                self._refused.setdefault(event.did, []).append((record_type(event.collection, event.record),
                                                                e.reason))
            raise

    def produce_status(self, result: RepoResult) -> None:
        """Produce ``result`` to ``<prefix>.backfill.repo_status`` in the open transaction."""
        if self._refused:
            for kind, reason in self._refused.pop(result.did, []):
                result.not_produced(kind, reason)
        topic = self.topics.repo_status
        self.publisher.ensure([topic], {"cleanup.policy": "compact"})
        datum = result.status_datum(self.opts.job, int(self.wall() * 1e6), batch=self.next_checkpoint)
        self.publisher.produce(topic, result.did.encode(), self.codec.encode("repo_status", topic, datum))


@dataclass
class ReposRun:
    """What a run returns: statistics and per-user metadata (a replica's: its latest ``RECENT_USERS``)."""

    statistics: dict[str, Any]
    users: dict[str, dict[str, Any]]
    state: JobState | None = None
    work: WorkStats | None = None


class _Context:
    """Clients shared by both modes, built inside the event loop."""

    def __init__(self, settings: ReposSettings, metrics: Metrics, workdir: Path) -> None:
        s = settings
        policy = NetworkPolicy(allow_private=s.allow_private_network)
        self.resolver = DidResolver(s.plc_url, policy=policy, metrics=metrics, did_web_scheme=s.did_web_scheme)
        trusted = policy.with_trusted([s.relay_url, *s.from_pds])
        b = s.retry_backoff
        self.pds = PdsClient(s.limits, policy=trusted, metrics=metrics,
                             wait=wait_exponential_jitter(multiplier=b / 4, max=30.0) if b else wait_none(),
                             rng=random.Random())  # noqa: S311 - jitter, not security
        self.fetcher = RepoFetcher(self.resolver, self.pds, workdir, attempts=s.attempts,
                                   wait=wait_exponential_jitter(multiplier=b, max=60.0) if b else wait_none())
        self.processor = RepoProcessor(s.record_filter, job=s.job, verify=s.verify)

    async def aclose(self) -> None:
        await self.pds.aclose()
        await self.resolver.aclose()


async def gather_dids(settings: ReposSettings, pds: PdsClient) -> list[str]:
    """Every DID the list options name, de-duplicated in order (``--limit`` applied).

    Raises:
        ConfigError: an unreadable DID file, an unresolvable handle.
        PdsError: a listRepos page kept failing.
    """
    out: dict[str, None] = {}
    for did in settings.dids:
        out.setdefault(did)
    if settings.dids_file is not None:
        for did in read_dids_file(settings.dids_file, ATPROTO_METHODS):
            out.setdefault(did)
    if settings.handles:
        resolved = await asyncio.to_thread(resolve_handles, settings.handles, settings.handle_resolver)
        for did in resolved.values():
            out.setdefault(did)
    sources = ([(settings.relay_url, "relay")] if settings.from_relay else []) + \
        [(url, None) for url in settings.from_pds]
    limit = settings.limit
    for url, cls in sources:
        listed = 0
        async for repo in pds.list_repos(url, host_class=cls):
            if limit and len(out) >= limit:
                break
            if repo.active:
                out.setdefault(repo.did)
                listed += 1
        log.info("listRepos of %s: %d active repositories", url, listed)
    dids = list(out)
    return dids[:limit] if limit else dids


#: A replica's run keeps the metadata of this many of its latest repositories (its statistics
#: count every one): a replica serves the work topic for as long as it runs.
RECENT_USERS: Final = 1000


class Tally:
    """The run statistics of repository results, counted as they come (no result is kept)."""

    def __init__(self) -> None:
        self.users = 0
        self.records = 0
        self.car_bytes = 0
        self.by_type: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def add(self, result: RepoResult) -> None:
        """Count ``result``."""
        self.users += 1
        self.records += result.records
        self.car_bytes += result.car_bytes
        self.by_type.update(result.by_type)
        self.outcomes[result.outcome] += 1

    def statistics(self, elapsed: float, stop_reason: str, batches: int) -> dict[str, Any]:
        """The statistics table of the run."""
        return {
            "users": self.users, "records_produced": self.records, "records_by_type": dict(self.by_type),
            "outcomes": dict(self.outcomes), "car_bytes": self.car_bytes, "batches": batches,
            "total_time": round(elapsed, 3),
            "records_per_second": round(self.records / elapsed, 1) if elapsed > 0 else 0.0,
            "repos_per_second": round(self.users / elapsed, 2) if elapsed > 0 else 0.0, "stop_reason": stop_reason,
        }


async def _run_list(settings: ReposSettings, kafka: KafkaSettings, metrics: Metrics, health: Health,
                    progress: Progress, ctx: _Context) -> ReposRun:
    dids = await gather_dids(settings, ctx.pds)
    if settings.enqueue:
        n = await asyncio.to_thread(enqueue_dids, kafka, dids, origin="cli")
        return ReposRun({"enqueued": n}, {})
    log.info("job %s: backfilling %d repositories", settings.job, len(dids))
    codec = AvroCodec.from_config(kafka.registry_config())
    fp = dids_fingerprint(dids)
    f = settings.record_filter
    filters = {"dids": len(dids), "dids_fingerprint": fp, "types": sorted(f.types), "collections": list(f.collections),
               "batch_size": settings.batch_size, "verify": settings.verify}
    options = JobOptions(job=settings.job, source="repo", filters=filters, max_time=settings.max_time,
                         resume=settings.resume, checkpoint_events=_NEVER,
                         checkpoint_interval=settings.checkpoint_interval, transactions=settings.transactions)
    results: list[RepoResult] = []  # one per DID of the list given (its per-user metadata)
    tally = Tally()
    batches = 0

    def show(stats: JobStats) -> None:
        health.beat()
        progress.update({"repos": f"{len(results):,}/{len(dids):,}", "records": stats.records_produced,
                         "rate/s": stats.records_produced / max(stats.elapsed, 1e-9),
                         "dropped": sum(stats.dropped.values())}, stats.by_collection)

    runner = RepoJobRunner(kafka, options, metrics, codec, on_progress=show, health=health)

    def on_done(result: RepoResult) -> None:
        runner.produce_status(result)
        count_outcome(metrics, result)
        results.append(result)
        tally.add(result)

    def on_batch(batch_no: int, batch: list[RepoResult]) -> None:
        nonlocal batches
        batches += 1
        log.info("batch %d done: %d repositories, %d records", batch_no + 1, len(batch),
                 sum(r.records for r in batch))

    def make_source(prev: JobState | None) -> RepoSource:
        position = RepoPosition.restore(prev.position if prev else None, len(dids), fp)
        if position.done:
            log.info("job %s: %d of %d repositories already done", settings.job, position.done, len(dids))
        return RepoSource(dids, ctx.fetcher, ctx.processor, position=position, concurrency=settings.concurrency,
                          batch_size=settings.batch_size, on_done=on_done, on_batch=on_batch)

    await asyncio.to_thread(runner.prepare)
    try:
        final = await runner.run(make_source)
    finally:
        runner.close()
    stats = tally.statistics(runner.stats.elapsed, runner.stats.stop_reason, batches)
    stats["dropped"] = dict(runner.stats.dropped)
    return ReposRun(stats, {r.did: r.metadata() for r in results}, state=final)


async def _run_topic(settings: ReposSettings, kafka: KafkaSettings, metrics: Metrics, health: Health,
                     progress: Progress, ctx: _Context) -> ReposRun:
    codec = AvroCodec.from_config(kafka.registry_config())
    opts = WorkOptions(job=settings.job, replica=settings.replica, concurrency=settings.concurrency,
                       prefetch=settings.prefetch, txn_max_dids=settings.txn_max_dids,
                       txn_max_records=settings.txn_max_records, txn_max_seconds=settings.txn_max_seconds,
                       idle_exit=settings.idle_exit, max_time=settings.max_time, skip_done=not settings.redo)
    tally = Tally()
    recent: deque[RepoResult] = deque(maxlen=RECENT_USERS)
    started = time.monotonic()

    def on_result(result: RepoResult) -> None:
        tally.add(result)
        recent.append(result)
        elapsed = time.monotonic() - started
        progress.update({"repos": tally.users, "records": tally.records,
                         "repos/s": tally.users / max(elapsed, 1e-9)})

    runner = WorkTopicRunner(kafka, opts, ctx.fetcher, ctx.processor, metrics, codec, health=health,
                             on_result=on_result)
    await asyncio.to_thread(runner.prepare)
    taskdump.install(asyncio.get_running_loop())  # kill -USR1 logs where each task waits
    # Only the main thread of a process takes signals (not a replica run from a test thread).
    with handle_stop_signals(runner.stop, "signal"):
        work = await runner.run()
    stats = tally.statistics(time.monotonic() - started, work.stop_reason, 0)
    stats.update({"replica": settings.replica, "skipped_done": work.skipped, "transactions": work.transactions})
    return ReposRun(stats, {r.did: r.metadata() for r in recent}, work=work)


def run(settings: ReposSettings, *, metrics: Metrics | None = None, print_table: bool = True) -> ReposRun:
    """Run ``backfill repos`` with resolved settings.

    Raises:
        ConfigError: a usage error (unreadable DID file, unresolvable handle, no DIDs).
        FatalError: our own state broke (a failed commit, a checkpoint over another DID list).
    """
    metrics = metrics or Metrics()
    health = Health()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port).start()
    title = f"repos replica {settings.replica}" if settings.from_topic else f"repos job {settings.job}"
    progress = Progress(settings.progress, title=title)
    try:
        with resolve_bootstrap(settings.kafka.bootstrap_servers) as servers, \
                tempfile.TemporaryDirectory(prefix="backfill-repos-", dir=settings.workdir) as tmp:
            kafka = settings.kafka.with_bootstrap(servers)
            result = asyncio.run(_main(settings, kafka, metrics, health, progress, Path(tmp)))
    finally:
        progress.close()
        if server is not None:
            server.stop()
    if print_table:
        print_statistics(result.statistics, title=title)
    return result


async def _main(settings: ReposSettings, kafka: KafkaSettings, metrics: Metrics, health: Health,
                progress: Progress, workdir: Path) -> ReposRun:
    ctx = _Context(settings, metrics, workdir)
    try:
        if settings.from_topic:
            return await _run_topic(settings, kafka, metrics, health, progress, ctx)
        try:
            return await _run_list(settings, kafka, metrics, health, progress, ctx)
        except PdsError as e:
            raise ConfigError(f"cannot list the repositories to backfill: {e}") from e
    finally:
        await ctx.aclose()


def run_batched_backfill(
    dids: Sequence[str],
    batch_size: int = 50,
    start_timestamp: str | None = None,
    end_timestamp: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Seed 002's API: backfill ``dids`` in batches and return the per-user metadata.

    Keyword ``overrides`` accept any ``backfill repos`` option by its dest name
    (``bootstrap_servers``, ``topic_prefix``, ``plc_url``, ``record_types``, ``out_of_range``,
    ``allow_private_network``, ``job``, ...).

    Returns:
        ``{"users": {did: {outcome, records, counts_by_type, car_bytes, duration_seconds, ...}},
        "statistics": {...}}``.

    Raises:
        ConfigError: a malformed value; FatalError: our own state broke.
    """
    given = {"dids": ",".join(dids), "batch_size": batch_size, "start_timestamp": start_timestamp,
             "end_timestamp": end_timestamp}
    result = run(settings_from_namespace(api_namespace(add_arguments, finish_namespace, given, overrides)),
                 print_table=False)
    return {"users": result.users, "statistics": result.statistics}


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill repos`` (after argument parsing)."""
    # One line per HTTP request is far too much for thousands of repositories; counters have them.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    finish_namespace(ns)
    run(settings_from_namespace(ns))
    return 0


__all__ = ["REPOS_OPTIONS", "ReposRun", "ReposSettings", "add_arguments", "main", "run", "run_batched_backfill"]
