"""What a full-network run costs, measured here: bytes per record in the topics, and rows/s per process.

The README's Scale section projects the whole network from these figures (issue 16). Sections
(``--only``; all by default):

* ``bytes``: events produced through the real producer path (``JobRunner``: typed Avro per
  collection, zstd batches, transactions, the CLI's checkpoint defaults) into Apache Kafka, then the
  topics' log segments (``*.log`` under the broker's data directory) summed per topic and divided by
  the records written to it, beside the Jetstream JSON of the same events: its raw bytes (what
  ``/subscribe`` sends uncompressed), and each message zstd-compressed with Jetstream's own
  dictionary (``compress=true``, ``../shared/fixtures/legacy_subscribe.zdict``). Two inputs: N
  synthetic events of the simulators' generator (every collection, realistic shapes; their post
  texts come from a small vocabulary, so they compress better than real ones), and the captured
  real network bytes (150 relay frames and a getRepo CAR: too few records for batch compression
  to reach its level, so only their uncompressed sizes say much).
* ``rates``: each long-running process as deployed (``python -m runtime ...``), 1 and 2 of them
  at once, against the simulators fed without end (``bench/bench_memory.py``'s looping Jetstream
  and relay, the PDS simulator without a rate limit), each configuration for ``--seconds`` after a
  ``--warmup``, events/s from the processes' own Prometheus counters: Jetstream producers (1 and 2
  jobs), the firehose producer (``--workers`` 1 and 2), the same ``--verify`` against the captured
  frames' DID documents, repo replicas (1 and 2 in the work topic's group), PostgreSQL consumers (1
  and 2 in one group) and a queue consumer (one SQLite writer: 1 only), the consumers draining what
  the producers of this run wrote. Beside them, the single-process figures of the existing
  benches' own functions (in-process, no websocket): ``bench_jetstream.ours``,
  ``bench_firehose``'s verify and job levels, ``bench_repos.kafka_section``,
  ``bench_postgres.consumer_run``.
* the projection (printed after the sections it uses): this run's on-disk bytes per record and
  single-process rates times the network's figures, each a named option (``--archive-rows``,
  ``--repositories``, ``--pds-hosts``, ``--pds-rate``, ``--records-per-repo``, ``--live-rate``,
  ``--replication``, ``--target-days``): processes, partitions, disk and hours for the Jetstream v2
  archive, every repository and the live firehose with ``--verify``.

Everything shares this 2-core machine with the broker, the simulators and whoever else is
working on it: 2 processes mostly show what the machine has left, not what a second machine adds.

    python bench/bench_scale.py [--quick] [--only bytes|rates|reference] [--events N] [--seconds S]
                                [--archive-rows N ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import zstandard  # noqa: E402

from bench import bench_firehose, bench_jetstream, bench_postgres, bench_repos  # noqa: E402
from bench.bench_memory import (  # noqa: E402
    FIXTURES,
    JETSTREAM_START_US,
    RELAY_FIRST_SEQ,
    cli,
    counter,
    feed,
    free_ports,
    scrape,
    spawn,
    stop_process,
    tail,
)
from bench.brokers import add_broker_arguments, broker, describe  # noqa: E402
from producers.firehose.decode import decode_frame  # noqa: E402
from producers.jetstream.decode import decode_message  # noqa: E402
from producers.job import JobOptions, JobRunner  # noqa: E402
from producers.repos.decode import RecordFilter, RepoDecoder  # noqa: E402
from runtime.atproto.capture import read_capture  # noqa: E402
from runtime.atproto.car import read_car  # noqa: E402
from runtime.contract.codec import AvroCodec  # noqa: E402
from runtime.contract.records import Event, RecordEvent, to_jetstream_json  # noqa: E402
from runtime.contract.topics import TopicMap  # noqa: E402
from runtime.kafka.broker import free_port  # noqa: E402
from runtime.kafka.settings import KafkaSettings  # noqa: E402
from runtime.process.metrics import Metrics  # noqa: E402
from runtime.simulator.jetstream import synthetic_events  # noqa: E402
from tests.kafka.cluster import KafkaCluster  # noqa: E402

MB = 1e6


def commit_of_tree() -> str:
    """``<short commit>`` of the checkout, ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@contextlib.contextmanager
def kafka_and_logs(ns: argparse.Namespace) -> Iterator[tuple[str, Path | None]]:
    """Bootstrap servers, and the broker's data directory when the segments can be read."""
    if ns.bootstrap_servers or ns.broker == "tansu":
        with broker(ns) as bootstrap:
            yield bootstrap, Path(ns.log_dir) if ns.log_dir else None
        return
    # bench/brokers.py's Apache Kafka, started here to know where its segments are
    with tempfile.TemporaryDirectory(prefix="bench-scale-kafka-") as tmp:
        cluster = KafkaCluster(Path(tmp), nodes=1, heap_mb=1024)
        cluster.start()
        try:
            yield cluster.bootstrap, cluster.members[0].directory / "data"
        finally:
            cluster.stop(grace=5)


# ------------------------------------------------------------------------------------------ bytes


@dataclass
class Sizes:
    """Per topic: records, Jetstream JSON bytes, the same zstd'd with the dictionary, Avro value bytes."""

    records: collections.Counter[str]
    json: collections.Counter[str]
    json_zstd: collections.Counter[str]
    avro: collections.Counter[str]


def measure_sizes(events: list[Event], jsons: list[bytes], prefix: str, zdict: bytes | None) -> Sizes:
    """Sizes of ``events`` (and their JSON ``jsons``) per topic, before Kafka."""
    topics, codec = TopicMap(prefix), AvroCodec()
    cctx = zstandard.ZstdCompressor(level=3, dict_data=zstandard.ZstdCompressionDict(zdict)) if zdict else None
    s = Sizes(collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter())
    for ev, js in zip(events, jsons, strict=True):
        t = topics.for_event(ev)
        s.records[t] += 1
        s.json[t] += len(js)
        s.json_zstd[t] += len(cctx.compress(js)) if cctx else 0
        s.avro[t] += len(codec.encode_event(ev, t))
    return s


def produce_events(bootstrap: str, prefix: str, events: list[Event]) -> float:
    """The real producer path with the CLI's defaults (checkpoint every 5,000 events or 2 s); seconds."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, topic_partitions=6)
    runner = JobRunner(kafka, JobOptions(job=f"{prefix}-job", source="jetstream"), Metrics(), AvroCodec())
    t0 = time.perf_counter()
    try:
        state = asyncio.run(runner.run(lambda _prev: bench_postgres.ListSource(events)))
    finally:
        runner.close()
    secs = time.perf_counter() - t0
    assert state.status == "finished", state
    del runner
    gc.collect()  # the Kafka clients (reference cycles) end before the broker of the run goes
    return secs


def segment_bytes(logdir: Path, topic: str) -> int:
    """Bytes of the topic's log segments on disk (every partition)."""
    total = 0
    for part in logdir.glob(f"{topic}-*"):
        if part.name.rpartition("-")[0] == topic:
            total += sum(f.stat().st_size for f in part.glob("*.log"))
    return total


def bytes_table(title: str, sizes: Sizes, logdir: Path | None, prefix: str,
                min_records: int = 1) -> collections.Counter[str]:
    """One line per topic (collection): B/record on disk, JSON, JSON+zstd, Avro; and the total (returned)."""
    print(f"\n{title}")
    print(f"  {'collection':<32}{'records':>9}{'JSON':>8}{'JSON+zstd':>10}{'Avro':>7}{'on disk':>9}"
          f"{'disk/JSON':>10}{'disk/zstd':>10}")
    tot = collections.Counter[str]()
    rows = sorted(sizes.records, key=lambda t: -sizes.records[t])
    for t in rows:
        n = sizes.records[t]
        disk = segment_bytes(logdir, t) if logdir else 0
        tot["n"] += n
        tot["json"] += sizes.json[t]
        tot["zstd"] += sizes.json_zstd[t]
        tot["avro"] += sizes.avro[t]
        tot["disk"] += disk
        if n < min_records:
            continue
        _line(t[len(prefix) + 1:], n, sizes.json[t], sizes.json_zstd[t], sizes.avro[t], disk)
    _line("all", tot["n"], tot["json"], tot["zstd"], tot["avro"], tot["disk"])
    return tot


def _line(name: str, n: int, js: int, zs: int, avro: int, disk: int) -> None:
    d = f"{disk / n:9.1f}{disk / js:10.2f}" if disk else f"{'-':>9}{'-':>10}"
    dz = f"{disk / zs:10.2f}" if disk and zs else f"{'-':>10}"
    z = f"{zs / n:10.1f}" if zs else f"{'-':>10}"
    print(f"  {name:<32}{n:9,}{js / n:8.1f}{z}{avro / n:7.1f}{d}{dz}", flush=True)


def real_events(fixtures: Path) -> tuple[list[Event], str]:
    """The captured frames' events and the getRepo CAR's records."""
    out: list[Event] = []
    what = []
    capture = fixtures / "frames.bin.zst"
    if capture.exists():
        frames = read_capture(capture)
        n0 = len(out)
        for data in frames:
            out.extend(decode_frame(data).events)
        what.append(f"{len(frames)} relay frames ({len(out) - n0} events)")
    car = fixtures / "repo.car"
    if car.exists():
        did = "did:plc:53iucmf5ldftgqyf2ac7hmhd"
        recs = [i for i in RepoDecoder(read_car(car.read_bytes(), verify=False), did, RecordFilter()).items()
                if isinstance(i, RecordEvent)]
        out.extend(recs)
        what.append(f"a getRepo CAR ({len(recs)} records)")
    return out, " and ".join(what)


def bytes_section(bootstrap: str, logdir: Path | None, n: int, fixtures: Path) -> collections.Counter[str]:
    """The bytes tables; the synthetic events' totals (records, json, zstd, avro, disk bytes)."""
    zpath = fixtures / "legacy_subscribe.zdict"
    zdict = zpath.read_bytes() if zpath.exists() else None
    print("\n== Bytes per record (Avro + zstd batches in Kafka, on disk) vs the Jetstream JSON of the same events ==")
    if logdir is None:
        print("  (no broker data directory: the on-disk column needs the default Apache Kafka, or --log-dir)")
    print("  JSON: the /subscribe message as sent; JSON+zstd: each message compressed with Jetstream's "
          f"dictionary{'' if zdict else ' (absent: no fixtures)'}; Avro: the uncompressed value; on disk: "
          "the topic's *.log segments (batches, keys, headers, transaction markers) / records")
    stored = synthetic_events(n, seed=7, accounts=5000, start_us=JETSTREAM_START_US, rate=2000.0, real_cids=True)
    jsons = [e.text.encode() for e in stored]
    events = [decode_message(e.text, job="scale") for e in stored]
    prefix = f"sb{uuid.uuid4().hex[:6]}"
    sizes = measure_sizes(events, jsons, prefix, zdict)
    secs = produce_events(bootstrap, prefix, events)
    time.sleep(2)
    synthetic = bytes_table(f"synthetic Jetstream events: {n:,} (the simulators' generator; produced in "
                            f"{secs:.1f} s)", sizes, logdir, prefix, min_records=100)
    real, what = real_events(fixtures)
    if real:
        prefix = f"rb{uuid.uuid4().hex[:6]}"
        rjson = [orjson.dumps(to_jetstream_json(e)) for e in real]
        sizes = measure_sizes(real, rjson, prefix, zdict)
        produce_events(bootstrap, prefix, real)
        time.sleep(2)
        bytes_table(f"real network records: {what}; few records per batch, so the disk column is an upper bound",
                    sizes, logdir, prefix)
    return synthetic


# ------------------------------------------------------------------------------------------ rates


@dataclass
class Rate:
    """A configuration's steady rate: the sum and each process's."""

    source: str
    processes: int
    unit: str
    total: float
    each: list[float]
    also: float = 0.0


class Rates:
    """Runs configurations of processes for a fixed window and collects their rates."""

    def __init__(self, bootstrap: str, workdir: Path, warmup: float, window: float) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.warmup = warmup
        self.window = window
        self.prefix = f"scale{uuid.uuid4().hex[:6]}"
        self.results: list[Rate] = []

    def kafka(self, job: str | None = None, prefix: str | None = None) -> list[str]:
        args = ["--bootstrap-servers", self.bootstrap, "--topic-prefix", prefix or self.prefix,
                "--log-level", "WARNING"]
        if job is not None:
            args += ["--topic-partitions", "6", "--job", job, "--progress", "none"]
        return args

    def run(self, source: str, unit: str, cmds: list[list[str]], ports: list[list[int]],
            read: Callable[[dict[str, float]], float],
            during: Callable[[], None] | None = None,
            also: tuple[str, Callable[[dict[str, float]], float]] | None = None,
            processes: int | None = None) -> Rate:
        """Start ``cmds`` together; after the warmup, count ``read`` (and ``also``) over the window; stop them.

        ``processes``: how many processes ``cmds`` make (default one each; ``--workers N``: N).
        """
        n = processes or len(cmds)
        label = f"{source}-x{n}"
        logs = [self.workdir / f"{label}-{i}.log" for i in range(len(cmds))]
        procs = [spawn(cmd, log) for cmd, log in zip(cmds, logs, strict=True)]

        def totals() -> list[tuple[float, float]]:
            out = []
            for ps in ports:
                merged: dict[str, float] = {}
                for p in ps:
                    for k, v in scrape(p).items():
                        merged[k] = merged.get(k, 0.0) + v
                out.append((read(merged), also[1](merged) if also else 0.0))
            return out

        def wait(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for p, log in zip(procs, logs, strict=True):
                    if p.poll() is not None:
                        raise SystemExit(f"{label} ended early with {p.returncode}:\n{tail(log)}")
                if during is not None:
                    during()
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))

        try:
            wait(self.warmup)
            a, t0 = totals(), time.monotonic()
            wait(self.window)
            b, t1 = totals(), time.monotonic()
        finally:
            for p in procs:
                stop_process(p, 30)
        each = [(y[0] - x[0]) / (t1 - t0) for x, y in zip(a, b, strict=True)]
        extra = sum(y[1] - x[1] for x, y in zip(a, b, strict=True)) / (t1 - t0)
        r = Rate(source, n, unit, sum(each), each, extra)
        self.results.append(r)
        per = " + ".join(f"{e:,.0f}" for e in each)
        more = f"; {extra:,.1f} {also[0]}" if also else ""
        print(f"  {source:<34} x{n}: {r.total:10,.0f} {unit}  ({per}){more}", flush=True)
        return r


def jetstream_rates(r: Rates, pool: int) -> None:
    for n in (1, 2):
        ports = [free_port() for _ in range(n)]
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(ports):
                stack.enter_context(feed([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--serve",
                                          "jetstream", str(port), "--pool", str(pool), "--seed", str(10 * n + i)],
                                         r.workdir / f"feed-js{n}-{i}.log", port))
            mports = [free_ports(1) for _ in range(n)]
            cmds = [cli("jetstream", "--instance", f"ws://127.0.0.1:{port}/subscribe", "--cursor",
                        str(JETSTREAM_START_US), "--num-records", "0", "--max-time", "0", "--consumer", "none",
                        "--wanted-collections", "*", "--metrics-port", str(mp),
                        *r.kafka(f"scale-js{n}-{i}-{uuid.uuid4().hex[:4]}"))
                    for i, (port, mp) in enumerate(zip(ports, mports, strict=True))]
            r.run("jetstream producer", "events/s", cmds, [[mp] for mp in mports],
                  lambda m: counter(m, "producer_events_produced"))


def firehose_rates(r: Rates, fixtures: Path, verify: bool) -> None:
    docs = fixtures / "did_docs.json.zst"
    if verify and not docs.exists():
        print("  firehose --verify: skipped (no fixtures' DID documents)")
        return
    for workers in (1, 2):
        port = free_port()
        did_pass = -1 if verify else 1000 * workers + 1
        with feed([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--serve", "relay", str(port),
                   "--fixtures", str(fixtures), "--did-pass", str(did_pass)],
                  r.workdir / f"feed-fh{workers}{verify}.log", port):
            mport = free_ports(workers + 1)
            extra = ["--verify", "--did-docs", str(docs)] if verify else []
            # verified frames repeat the captured commits: kept apart from the consumers' topics
            prefix = f"{r.prefix}v" if verify else None
            cmd = cli("firehose", "--relay-url", f"ws://127.0.0.1:{port}", "--start-cursor",
                      str(RELAY_FIRST_SEQ - 1), "--follow", "--workers", str(workers), "--num-records", "0",
                      "--max-time", "0", "--metrics-port", str(mport), *extra,
                      *r.kafka(f"scale-fh{workers}{'v' if verify else ''}-{uuid.uuid4().hex[:4]}", prefix))
            ports = [mport] if workers == 1 else [mport + 1 + i for i in range(workers)]
            name = f"firehose{' --verify' if verify else ''} --workers {workers}"
            if verify:
                r.run(name, "commits/s", [cmd], [ports], lambda m: counter(m, "producer_commits_verified"),
                      processes=workers)
            else:
                r.run(name, "events/s", [cmd], [ports], lambda m: counter(m, "producer_events_produced"),
                      processes=workers)


def repos_rates(r: Rates, accounts: int) -> None:
    from producers.repos.worktopic import enqueue_dids  # noqa: PLC0415

    plc, base = free_port(), free_ports(5)
    dids_file = r.workdir / "dids.txt"
    cmd = cli("simulate", "pds", "--accounts", str(accounts), "--hosts", "4", "--seed", "5", "--records-mean", "100",
              "--big-every", "200", "--big-records", "5000", "--rate-limit", "0", "--plc-port", str(plc),
              "--base-port", str(base), "--write-dids", str(dids_file), "--stats-every", "0", "--log-level", "WARNING")
    with feed(cmd, r.workdir / "feed-pds.log", plc):
        for _ in range(600):
            if dids_file.exists() and dids_file.stat().st_size:
                break
            time.sleep(0.2)
        dids = [d for d in dids_file.read_text().split() if d]
        kafka = KafkaSettings(bootstrap_servers=r.bootstrap, topic_prefix=r.prefix, topic_partitions=6)
        for n in (1, 2):
            job = f"scale-repos{n}-{uuid.uuid4().hex[:4]}"
            mports = [free_ports(1) for _ in range(n)]
            enqueued = [0]
            last = [0.0]
            for _ in range(2):
                enqueued[0] += enqueue_dids(kafka, dids, origin="scale")

            def refill(mports: list[int] = mports, enqueued: list[int] = enqueued, last: list[float] = last) -> None:
                if time.monotonic() - last[0] < 3:
                    return
                last[0] = time.monotonic()
                done = sum(counter(scrape(p), "repos_completed") for p in mports)
                if enqueued[0] - done < 2 * len(dids):
                    enqueued[0] += enqueue_dids(kafka, dids, origin="scale")

            cmds = []
            for i, mp in enumerate(mports):
                workdir = r.workdir / f"cars-{n}-{i}"
                workdir.mkdir()
                cmds.append(cli("repos", "--from-topic", "--redo", "--replica-id", f"{job}-r{i}", "--plc-url",
                                f"http://127.0.0.1:{plc}", "--allow-private-network", "--rate", "1000", "--burst",
                                "50", "--idle-exit", "0", "--workdir", str(workdir), "--metrics-port", str(mp),
                                *r.kafka(job)))
            # the work topic's group is the job: a second configuration must not inherit the first's offsets
            r.run("repos replica", "records/s", cmds, [[mp] for mp in mports],
                  lambda m: counter(m, "producer_events_produced"), during=refill,
                  also=("repos/s", lambda m: counter(m, "repos_completed")))


def consumer_rates(r: Rates, database_url: str) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    for n in (1, 2):
        schema = f"scale_{uuid.uuid4().hex[:8]}"
        mports = [free_ports(1) for _ in range(n)]
        cmds = [cli("consume", "postgres", "--database-url", database_url, "--db-schema", schema, "--group",
                    f"scale-pg-{schema}", "--metrics-port", str(mp), *r.kafka()) for mp in mports]
        try:
            r.run("postgres consumer", "rows/s", cmds, [[mp] for mp in mports],
                  lambda m: counter(m, "consumer_messages"))
        finally:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    mp = free_ports(1)
    cmd = cli("consume", "queue", "--queue-path", str(r.workdir / "queues.sqlite"), "--queue-name", "scale",
              "--group", f"scale-queue-{uuid.uuid4().hex[:6]}", "--metrics-port", str(mp), *r.kafka())
    r.run("queue consumer", "rows/s", [cmd], [[mp]], lambda m: counter(m, "consumer_messages"))


def rates_section(bootstrap: str, ns: argparse.Namespace) -> list[Rate]:
    """Every configuration's rate (printed as it is measured) and the scaling from 1 to 2 processes."""
    print(f"\n== Rates per process, 1 and 2 at once: {ns.warmup:.0f} s warmup, then {ns.seconds:.0f} s counted "
          "(the processes' own counters) ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        r = Rates(bootstrap, Path(tmp), ns.warmup, ns.seconds)
        fixtures = Path(ns.fixtures)
        jetstream_rates(r, ns.pool)
        firehose_rates(r, fixtures, verify=False)
        firehose_rates(r, fixtures, verify=True)
        repos_rates(r, ns.accounts)
        consumer_rates(r, ns.database_url)
        print("\n  scaling, 2 processes / 1 (same machine, same run):")
        by: dict[str, dict[int, float]] = collections.defaultdict(dict)
        for x in r.results:
            by[x.source.split(" --workers")[0]][x.processes] = x.total
        for src, v in by.items():
            if 1 in v and 2 in v:
                print(f"    {src:<34} {v[1]:10,.0f} -> {v[2]:10,.0f}  ({v[2] / v[1]:.2f}x)")
        return r.results


# -------------------------------------------------------------------------------------- reference


def reference_section(bootstrap: str, ns: argparse.Namespace) -> None:
    """Single-process figures from the existing benches' own functions (in-process)."""
    repeats = 1 if ns.quick else 3
    print(f"\n== Single process, in-process, the existing benches' functions (median of {repeats}) ==", flush=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-scale-ref-") as tmp:
        with feed([sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--serve", "jetstream", str(port),
                   "--pool", str(ns.pool)], Path(tmp) / "feed.log", port):
            n = 20_000 if ns.quick else 60_000
            prefix = f"scaleref{os.getpid()}"
            bench_jetstream.create_topics(bootstrap, prefix)
            rates = [bench_jetstream.ours(f"ws://127.0.0.1:{port}/subscribe", bootstrap, n, prefix, f"ref{i}")
                     for i in range(repeats)]
        print(f"  bench_jetstream.ours (Jetstream job, {n:,} events)            {statistics.median(rates):10,.0f} "
              "events/s", flush=True)
    fixtures = Path(ns.fixtures)
    if (fixtures / "frames.bin.zst").exists():
        base = read_capture(fixtures / "frames.bin.zst")
        passes = 10 if ns.quick else 40
        codec, topics = AvroCodec(), TopicMap("bench")
        vframes = base * passes
        verified = bench_firehose.median_rate(
            bench_firehose.verify_run(vframes, fixtures / "did_docs.json.zst", codec, topics), len(vframes), repeats)
        plain = bench_firehose.median_rate(
            bench_firehose.timed(bench_firehose.avro_of(bench_firehose.ours_events, codec, topics), vframes),
            len(vframes), repeats)
        print(f"  bench_firehose level 2, decode + Avro (CPU only)               {plain:10,.0f} frames/s")
        print(f"  bench_firehose level 5, decode + verify + Avro (CPU only)      {verified:10,.0f} frames/s "
              f"({verified / plain:.2f} of unverified)", flush=True)
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix="bench", topic_partitions=6)
        jframes = bench_firehose.renumber(base, 10 if ns.quick else 60)
        job = bench_firehose.median_rate(bench_firehose.job_run(kafka, jframes, sdk=False), len(jframes), repeats)
        print(f"  bench_firehose level 4, job (JobRunner, transactions)          {job:10,.0f} frames/s", flush=True)
    from runtime.simulator.pds import PdsNetwork  # noqa: PLC0415

    net = PdsNetwork(accounts=60 if ns.quick else 200, hosts=1, records_mean=300, seed=5)
    net.build()
    cars = [(d, a.car) for d, a in net.accounts.items()]
    records = sum(len(a.record_cids) for a in net.accounts.values())
    with contextlib.redirect_stdout(io.StringIO()):  # its own report is not needed here
        car_rate = bench_repos.kafka_section(cars, bootstrap, repeats, None, "scale")
    print(f"  bench_repos.kafka_section (CAR -> Kafka, {len(cars)} CARs)            {car_rate:10,.0f} records/s "
          f"({records / len(cars):.0f} records per repository)", flush=True)
    events = bench_postgres.make_events(40_000 if ns.quick else 150_000, seed=7, job="scale")
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"ref{uuid.uuid4().hex[:6]}", topic_partitions=6)
    offsets = bench_postgres.produce(kafka, events, "scale-ref")
    args = SimpleNamespace(max_concurrent=1, batch_size=5000)
    pg = []
    for _ in range(repeats):
        secs, msgs, _written = bench_postgres.consumer_run(kafka, ns.database_url, offsets, args)  # type: ignore[arg-type]
        pg.append(msgs / secs)
    print(f"  bench_postgres.consumer_run (1 writer, batch 5,000)            {statistics.median(pg):10,.0f} rows/s",
          flush=True)


# ------------------------------------------------------------------------------------- projection


def projection_section(ns: argparse.Namespace, disk: collections.Counter[str], rates: list[Rate]) -> None:
    """The whole network on paper: this run's measured figures times the named network inputs.

    Assumes processes on machines of their own scale linearly (each at the single-process rate
    measured here, which shared 2 cores with the broker, the feeds and PostgreSQL: a lower bound),
    that the archive splits into independent segment ranges (one job each), and that topics keep
    every record (no retention, no compaction) at ``--replication`` copies.
    """
    one = {x.source.split(" --workers")[0]: x for x in rates if x.processes == 1}
    print("\n== Projection (measured here x named inputs; linear scaling across machines assumed) ==", flush=True)
    days = ns.target_days
    bpr = disk["disk"] / disk["n"] if disk.get("n") and disk.get("disk") else float("nan")
    print(f"  inputs: archive {ns.archive_rows:,.0f} rows / {ns.archive_bytes / 1e12:.2f} TB; "
          f"{ns.repositories:,.0f} repositories on {ns.pds_hosts:,} PDS hosts at {ns.pds_rate:g} getRepo/s each; "
          f"{ns.records_per_repo:,.0f} records per repository; live {ns.live_rate:,.0f} commits/s; "
          f"replication {ns.replication}; target {days:g} days; {bpr:.1f} B/record on disk (synthetic mix)")

    def need(rate: float, per_s: float) -> str:
        return f"{math.ceil(per_s / rate):,}" if rate > 0 else "-"

    target_s = days * 86400
    js, pg = one.get("jetstream producer"), one.get("postgres consumer")
    if js is not None:
        hours = ns.archive_rows / js.total / 3600
        per_s = ns.archive_rows / target_s
        pg_n = need(pg.total, per_s) if pg is not None else "-"
        print(f"  archive replay: {js.total:,.0f} rows/s per producer (the v1 job's measured rate) -> "
              f"{hours:,.0f} process-hours; in {days:g} days {per_s:,.0f} rows/s: {need(js.total, per_s)} producers, "
              f"{pg_n} PostgreSQL consumers (partitions per busiest topic >= that); "
              f"disk {ns.archive_rows * bpr * ns.replication / 1e12:,.1f} TB "
              f"({ns.archive_rows * bpr / ns.archive_bytes:.2f}x the archive, x{ns.replication})")
    rp = one.get("repos replica")
    if rp is not None and rp.also > 0:
        hosts_rate = ns.pds_hosts * ns.pds_rate
        even_h = ns.repositories / hosts_rate / 3600
        records = ns.repositories * ns.records_per_repo
        rec_h = records / rp.total / 3600
        saturate = math.ceil(hosts_rate * ns.records_per_repo / rp.total)
        print(f"  repositories: {rp.also:,.1f} repos/s and {rp.total:,.0f} records/s per replica (simulated hosts, "
              f"no limit); the hosts allow {hosts_rate:,.0f} getRepo/s in all -> at best {even_h:,.1f} h if spread "
              f"evenly (the largest host bounds it: its repositories / {ns.pds_rate:g} per s); "
              f"{records:,.0f} records = {rec_h:,.0f} replica-hours of CPU, "
              f"{need(rp.total, records / target_s)} replicas for {days:g} days, {saturate:,} to keep every host "
              f"at its rate (the DID work topic's partitions >= replicas); "
              f"disk {records * bpr * ns.replication / 1e12:,.1f} TB (x{ns.replication})")
    fv = one.get("firehose --verify")
    fh = one.get("firehose")
    if fv is not None:
        print(f"  live firehose, verified: {fv.total:,.0f} commits/s per process -> {need(fv.total, ns.live_rate)} "
              f"worker(s) for {ns.live_rate:,.0f}/s ({fv.total / ns.live_rate:.1f}x headroom with one)"
              + (f"; unverified {fh.total:,.0f} events/s" if fh is not None else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", choices=("bytes", "rates", "reference"))
    parser.add_argument("--events", type=int, default=300_000, help="synthetic events of the bytes section")
    parser.add_argument("--seconds", type=float, default=60.0, help="counted seconds per rate configuration")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the count starts")
    parser.add_argument("--pool", type=int, default=100_000, help="synthetic Jetstream events each feed loops")
    parser.add_argument("--accounts", type=int, default=2000, help="accounts of the simulated PDS hosts")
    parser.add_argument("--quick", action="store_true", help="60,000 events, 25 s windows, 1 repeat")
    parser.add_argument("--fixtures", default=str(FIXTURES))
    parser.add_argument("--log-dir", help="the data directory of --bootstrap-servers' single broker (on-disk sizes)")
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    project = parser.add_argument_group("projection inputs (the network, not measured here)")
    project.add_argument("--archive-rows", type=float, default=22e9, help="Jetstream v2 archive rows (22 billion)")
    project.add_argument("--archive-bytes", type=float, default=1.85e12, help="its size (1.85 TB)")
    project.add_argument("--repositories", type=float, default=43e6, help="repositories to fetch (43 million)")
    project.add_argument("--pds-hosts", type=int, default=2750, help="PDS hosts serving them (2,750)")
    project.add_argument("--pds-rate", type=float, default=9.0, help="getRepo/s per host (`repos --rate`: 9)")
    project.add_argument("--records-per-repo", type=float, default=None,
                         help="mean records per repository (default: archive rows / repositories, an upper bound)")
    project.add_argument("--live-rate", type=float, default=2000.0, help="live commits/s to keep up with (2,000)")
    project.add_argument("--replication", type=int, default=3, help="topic replication factor (3)")
    project.add_argument("--target-days", type=float, default=7.0, help="days a backfill may take (7)")
    add_broker_arguments(parser)
    ns = parser.parse_args()
    if ns.records_per_repo is None:
        ns.records_per_repo = ns.archive_rows / ns.repositories
    if ns.quick:
        ns.events, ns.seconds, ns.warmup, ns.pool = min(ns.events, 60_000), 25.0, 10.0, 30_000
    sections = ns.only or ["bytes", "rates", "reference"]
    print(f"broker: {describe(ns)}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit_of_tree()}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    with kafka_and_logs(ns) as (bootstrap, logdir):
        disk: collections.Counter[str] = collections.Counter()
        rates: list[Rate] = []
        if "bytes" in sections:
            disk = bytes_section(bootstrap, logdir, ns.events, Path(ns.fixtures))
        if "rates" in sections:
            rates = rates_section(bootstrap, ns)
        if "reference" in sections:
            reference_section(bootstrap, ns)
        if disk or rates:
            projection_section(ns, disk, rates)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
