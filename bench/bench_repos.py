"""Benchmark of the repository producer, each figure beside a same-run baseline.

1. CPU: records/s from CAR bytes to typed events (``RepoDecoder``) and to Avro values ready for
   Kafka (+ ``AvroCodec.encode_event``), against the atproto SDK's ``CAR.from_bytes`` on
   the same CARs (which only decodes blocks: no MST walk, no CID checks, no typing); and the same
   to Avro with ``--verify`` (each signed commit checked against its account's key, every key new
   as in a backfill), against the unverified rate (issue 16's target: >= 0.8 of it).
2. To Kafka: the same CARs decoded, encoded and produced to a real broker (Apache Kafka by default,
   ``--broker tansu`` for the embedded one), flushed.
3. End to end: accounts on 4 simulated PDS hosts backfilled through the DID work topic by 1 and by
   2 ``backfill repos --from-topic`` replicas (subprocesses): repos/s, and the hosts' rate-limit
   counters.
4. Memory: one big repository CAR fetched over HTTP to disk and decoded, peak RSS of the process
   against the CAR's size, beside the SDK's ``CAR.from_bytes`` on the same bytes.

Medians of ``--repeats`` runs; run with ``python bench/bench_repos.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka import KafkaError, Message, Producer  # noqa: E402

from bench.brokers import add_broker_arguments, broker, describe  # noqa: E402
from producers.repos.decode import RecordFilter, RepoDecoder  # noqa: E402
from producers.repos.worktopic import enqueue_dids  # noqa: E402
from runtime.atproto import crypto, native  # noqa: E402
from runtime.atproto.car import read_car  # noqa: E402
from runtime.contract.codec import AvroCodec  # noqa: E402
from runtime.contract.records import RecordEvent  # noqa: E402
from runtime.contract.topics import TopicMap  # noqa: E402
from runtime.kafka import clients as kafka_util  # noqa: E402
from runtime.kafka.settings import KafkaSettings  # noqa: E402
from runtime.simulator.pds import HostFaults, PdsNetwork  # noqa: E402

#: Issue 16's target: ``backfill repos --verify`` at this fraction of the unverified rate, or more.
VERIFY_TARGET_RATIO = 0.8


def cpu_section(cars: list[tuple[str, bytes]], repeats: int, keys: dict[str, str]) -> dict[str, float]:
    from atproto import CAR  # noqa: PLC0415 - the baseline only

    codec = AvroCodec()
    topics = TopicMap("bench")
    flt = RecordFilter()

    def sdk() -> int:
        n = 0
        for _, data in cars:
            car = CAR.from_bytes(data)
            n += sum(1 for b in car.blocks.values() if isinstance(b, dict) and "$type" in b)
        return n

    def decode() -> int:
        n = 0
        for did, data in cars:
            for item in RepoDecoder(read_car(data, verify=False), did, flt).items():
                n += isinstance(item, RecordEvent)
        return n

    def encode() -> int:
        n = 0
        for did, data in cars:
            for item in RepoDecoder(read_car(data, verify=False), did, flt).items():
                if isinstance(item, RecordEvent):
                    codec.encode_event(item, topics.for_event(item))
                    n += 1
        return n

    def verified(libsecp256k1: bool = True) -> int:
        # A backfill meets every account (and so every key) once: the verifier cache starts cold.
        saved, crypto.LIBSECP256K1 = crypto.LIBSECP256K1, libsecp256k1
        crypto.clear_verifier_cache()
        try:
            n = 0
            for did, data in cars:
                for item in RepoDecoder(read_car(data, verify=False), did, flt, signing_key=keys[did]).items():
                    if isinstance(item, RecordEvent):
                        codec.encode_event(item, topics.for_event(item))
                        n += 1
            return n
        finally:
            crypto.LIBSECP256K1 = saved
            crypto.clear_verifier_cache()

    def verified_openssl() -> int:
        return verified(libsecp256k1=False)

    def pure_python() -> int:
        saved, native.NATIVE = native.NATIVE, None
        try:
            return decode()
        finally:
            native.NATIVE = saved

    # The paths take turns in every round, so a slow spell of this noisy machine falls on all
    # of them; each ratio is the median of the rounds' own ratios.
    rounds: dict[str, list[float]] = {"sdk": [], "decode": [], "encode": [], "python": [], "verify": [],
                                      "verify_openssl": []}
    n_base = n_dec = 0
    for r in range(repeats):
        paths = [("sdk", sdk), ("decode", decode), ("encode", encode), ("verify", verified),
                 ("verify_openssl", verified_openssl)]
        if native.NATIVE is not None:
            paths.append(("python", pure_python))
        paths = paths[r % len(paths):] + paths[:r % len(paths)]  # no path always runs first
        for name, fn in paths:
            t0 = time.perf_counter()
            n = fn()
            rounds[name].append(n / (time.perf_counter() - t0))
            if name == "sdk":
                n_base = n
            elif name == "decode":
                n_dec = n
    base, dec, enc = (statistics.median(rounds[k]) for k in ("sdk", "decode", "encode"))
    py = statistics.median(rounds["python"]) if rounds["python"] else 0.0

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(rounds[name], rounds["sdk"], strict=True))

    mb = sum(len(d) for _, d in cars) / 1e6
    engine = "native fast path" if native.NATIVE is not None else "pure Python (native extension not built)"
    print(f"\n== CPU: {len(cars)} CARs, {mb:.1f} MB, {n_dec} records (median of {repeats} rounds; {engine}) ==")
    print(f"  baseline SDK CAR.from_bytes (blocks only)  {base:12,.0f} records/s  ({n_base} record blocks)")
    print(f"  ours: CAR -> typed events (MST walk, CIDs) {dec:12,.0f} records/s  ratio {ratio('decode'):.2f}")
    print(f"  ours: CAR -> Avro values for Kafka         {enc:12,.0f} records/s  ratio {ratio('encode'):.2f}")
    ver = statistics.median(rounds["verify"])
    ver_ratio = statistics.median(a / b for a, b in zip(rounds["verify"], rounds["encode"], strict=True))
    old_ratio = statistics.median(a / b for a, b in zip(rounds["verify_openssl"], rounds["encode"], strict=True))
    print(f"  ours: CAR -> Avro values with --verify     {ver:12,.0f} records/s  ratio {ver_ratio:.2f} of unverified "
          f"(target >= {VERIFY_TARGET_RATIO}: {'met' if ver_ratio >= VERIFY_TARGET_RATIO else 'NOT met'}; "
          f"secp256k1 through OpenSSL instead: {old_ratio:.2f})")
    if native.NATIVE is not None:
        speedup = statistics.median(a / b for a, b in zip(rounds["decode"], rounds["python"], strict=True))
        print(f"  ours, pure-Python path: CAR -> typed events {py:11,.0f} records/s  ratio {ratio('python'):.2f}"
              f"  (native / Python: {speedup:.2f})")
    return {"sdk": base, "decode": dec, "encode": enc, "verify": ver}


def kafka_section(cars: list[tuple[str, bytes]], bootstrap: str, repeats: int, base: float | None,
                  where: str) -> float:
    codec = AvroCodec()
    flt = RecordFilter()
    rates = []
    collections = sorted({item.collection for did, data in cars
                          for item in RepoDecoder(read_car(data, verify=False), did, flt).items()
                          if isinstance(item, RecordEvent)})
    for r in range(repeats):
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"benchk{r}", topic_partitions=6)
        topics = TopicMap(kafka.topic_prefix)
        admin = kafka_util.admin(kafka.client_config())
        # Every topic exists before the clock starts (a broker need not create topics on first use).
        kafka_util.ensure_topics(admin, [topics.for_collection(c) for c in collections], partitions=6, replication=1)
        failed: list[str] = []

        def report(err: KafkaError | None, msg: Message, failed: list[str] = failed) -> None:
            if err is not None:
                failed.append(f"{msg.topic()}: {err}")

        producer = Producer(kafka.producer_config(on_delivery=report))
        t0 = time.perf_counter()
        n = 0
        for did, data in cars:
            for item in RepoDecoder(read_car(data, verify=False), did, flt).items():
                if isinstance(item, RecordEvent):
                    topic = topics.for_event(item)
                    value = codec.encode_event(item, topic)
                    while True:
                        try:
                            producer.produce(topic, value, did.encode())
                            break
                        except BufferError:
                            producer.poll(0.05)
                    n += 1
            producer.poll(0)
        assert producer.flush(120) == 0
        elapsed = time.perf_counter() - t0
        assert not failed, f"{len(failed)} records refused, e.g. {failed[:3]}"
        rates.append(n / elapsed)
    rate = statistics.median(rates)
    print(f"\n== To Kafka ({where}, produce + flush, median of {repeats}) ==")
    ratio = f"ratio {rate / base:.2f} vs SDK decode" if base is not None else "(no SDK baseline: cpu skipped)"
    print(f"  ours: CAR -> Kafka                         {rate:12,.0f} records/s  {ratio}")
    return rate


def _replicas(n: int, net: PdsNetwork, bootstrap: str, prefix: str, logdir: Path) -> float:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, topic_partitions=6)
    enqueue_dids(kafka, net.dids, origin="bench")
    t0 = time.monotonic()
    procs = []
    for i in range(n):
        args = [sys.executable, "-m", "producers.repos", "--from-topic", "--replica-id", f"{prefix}-r{i}",
                "--bootstrap-servers", bootstrap, "--topic-prefix", prefix, "--topic-partitions", "6",
                "--plc-url", net.plc_url, "--allow-private-network", "--rate", "9", "--burst", "2",
                "--idle-exit", "2", "--progress", "none", "--log-level", "WARNING"]
        with (logdir / f"{prefix}-r{i}.log").open("wb") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                          env={**os.environ, "PYTHONPATH": str(ROOT)}))
    for i, p in enumerate(procs):
        if p.wait(900) != 0:
            tail = (logdir / f"{prefix}-r{i}.log").read_text(errors="replace")[-4000:]
            raise SystemExit(f"replica {prefix}-r{i} failed with status {p.returncode}:\n{tail}")
    return time.monotonic() - t0


def e2e_section(accounts: int, bootstrap: str, logdir: Path) -> None:
    # Each host allows 40 requests per 2 s; each replica keeps to 9/s per host (2 replicas: 18/s).
    faults = HostFaults(rate_limit=40, rate_window=2.0)
    net = PdsNetwork(accounts=accounts, hosts=4, seed=11, records_mean=30, faults=faults).start_in_thread()
    records = sum(len(a.record_cids) for a in net.accounts.values())
    try:
        print(f"\n== End to end: {accounts} accounts ({records} records) on 4 PDS hosts, DID work topic ==")
        results = {}
        for n in (1, 2):
            before = sum(h.stats.requests for h in net.hosts)
            elapsed = _replicas(n, net, bootstrap, f"benche2e{n}", logdir)
            reqs = sum(h.stats.requests for h in net.hosts) - before
            results[n] = accounts / elapsed
            print(f"  {n} replica(s): {elapsed:6.1f} s  {results[n]:7.1f} repos/s  {records / elapsed:9,.0f} records/s"
                  f"  ({reqs} getRepo requests; includes group join and the idle exit)")
        print(f"  scale-out ratio 2 vs 1 replica: {results[2] / results[1]:.2f}")
        over = net.total_over_limit()
        worst = max(max(h.stats.windows.values(), default=0) for h in net.hosts)
        print(f"  rate limits: {over} requests over a host's limit; busiest 2-s window {worst} of 40")
    finally:
        net.stop_thread()


# ------------------------------------------------------------------------------------ memory


def _make_big_car(path: Path, megabytes: int) -> int:
    import random  # noqa: PLC0415

    from runtime.atproto.crypto import KeyPair  # noqa: PLC0415
    from runtime.atproto.repo import build_repo_blocks  # noqa: PLC0415
    from runtime.atproto.tid import make_tid  # noqa: PLC0415

    text = "backfill " * 330  # ~3 KB per record
    n = megabytes * 1_000_000 // 3100
    records = {f"app.bsky.feed.post/{make_tid(1_700_000_000_000_000 + i * 1000)}":
               {"$type": "app.bsky.feed.post", "text": f"{i} {text}", "createdAt": "2024-10-01T00:00:00.000Z"}
               for i in range(n)}
    built = build_repo_blocks("did:plc:benchbigrepoaaaaaaaaaaaa", KeyPair.generate("k256", random.Random(1)),
                              records, make_tid(1_800_000_000_000_000))
    from runtime.atproto.car import CarWriter  # noqa: PLC0415

    with path.open("wb") as f:
        CarWriter(f, [built.commit_cid]).write_blocks(built.car_blocks())
    return n


class _PeakRss:
    """Samples this process's RSS every few milliseconds; ``growth`` is the peak above the start."""

    def __init__(self) -> None:
        import threading  # noqa: PLC0415

        import psutil  # noqa: PLC0415

        self._proc = psutil.Process()
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def done(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.start, self.peak


def _child_ours(url: str, workdir: str) -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from producers.netsafety import NetworkPolicy  # noqa: PLC0415
    from producers.repos.pds import PdsClient, PdsLimits  # noqa: PLC0415
    from producers.repos.source import RepoFetcher, RepoProcessor, RepoResult  # noqa: PLC0415
    from runtime.atproto.identity import Identity  # noqa: PLC0415
    from runtime.process.metrics import Metrics  # noqa: PLC0415

    did = "did:plc:benchbigrepoaaaaaaaaaaaa"

    class _Resolver:
        async def resolve(self, d: str) -> Identity:
            return Identity(d, None, url, None)

        def invalidate(self, d: str) -> None:
            return None

    async def go() -> tuple[int, int]:
        pds = PdsClient(PdsLimits(max_car_bytes=4 << 30), policy=NetworkPolicy(allow_private=True),
                        metrics=Metrics(CollectorRegistry()))
        fetcher = RepoFetcher(_Resolver(), pds, Path(workdir))  # type: ignore[arg-type]
        fetched = await fetcher.fetch(did, 0)
        assert fetched.outcome == "ok", fetched.detail
        result = RepoResult(did, 0, "failed")
        n = sum(isinstance(i, RecordEvent) for i in RepoProcessor(RecordFilter(), job="b").items(fetched, result))
        fetched.close()
        await pds.aclose()
        return n, fetched.size

    rss = _PeakRss()
    t0 = time.perf_counter()
    n, size = asyncio.run(go())
    secs = time.perf_counter() - t0
    base, peak = rss.done()
    print(f"{n} {size} {base} {peak} {secs}")


def _child_sdk(path: str) -> None:
    from atproto import CAR  # noqa: PLC0415

    rss = _PeakRss()
    t0 = time.perf_counter()
    car = CAR.from_bytes(Path(path).read_bytes())
    n = sum(1 for b in car.blocks.values() if isinstance(b, dict) and "$type" in b)
    secs = time.perf_counter() - t0
    base, peak = rss.done()
    print(f"{n} {Path(path).stat().st_size} {base} {peak} {secs}")


def memory_section(megabytes: int, tmp: Path) -> None:
    from runtime.simulator.httpd import HttpServer, LoopThread, Request, Response  # noqa: PLC0415

    path = tmp / "big.car"
    print(f"\n== Memory: one repository CAR of about {megabytes} MB ==")
    n = _make_big_car(path, megabytes)
    size = path.stat().st_size

    async def handler(req: Request) -> Response:
        return Response(200, file=path, content_type="application/vnd.ipld.car")

    server = HttpServer(handler)
    loop = LoopThread("bench-http").start()
    loop.run(server.start())
    try:
        def child(*args: str) -> list[float]:
            out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            return [float(x) for x in out.stdout.split()[-5:]]

        ours = child("--child", "ours", server.url, str(tmp))
        sdk = child("--child", "sdk", str(path))
    finally:
        loop.run(server.stop())
        loop.stop()
    for name, (count, _, base, peak, secs) in (("ours: HTTP -> disk -> MST walk -> events", ours),
                                               ("baseline SDK CAR.from_bytes (file in memory)", sdk)):
        print(f"  {name:44s} peak RSS {peak / 1e6:7.0f} MB (start {base / 1e6:4.0f} MB, growth "
              f"{(peak - base) / 1e6:6.0f} MB = {(peak - base) / size:4.2f} x the CAR), {int(count)} records, "
              f"{secs:5.1f} s")
    print(f"  CAR: {size / 1e6:.0f} MB, {n} records; growth ratio ours / SDK: "
          f"{(ours[3] - ours[2]) / max(1.0, sdk[3] - sdk[2]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--accounts", type=int, default=300, help="CARs of the CPU/Kafka sections")
    parser.add_argument("--records-mean", type=int, default=300, help="mean records per CAR")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--e2e-accounts", type=int, default=1000)
    parser.add_argument("--big-car-mb", type=int, default=300)
    parser.add_argument("--skip", action="append", default=[], choices=("cpu", "kafka", "e2e", "memory"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    add_broker_arguments(parser)
    ns = parser.parse_args()
    if ns.child:
        if ns.child[0] == "ours":
            _child_ours(ns.child[1], ns.child[2])
        else:
            _child_sdk(ns.child[1])
        return
    net = PdsNetwork(accounts=ns.accounts, hosts=1, records_mean=ns.records_mean, seed=5)
    net.build()
    cars: list[tuple[str, Any]] = [(d, a.car) for d, a in net.accounts.items()]
    keys = {d: a.key.did_key() for d, a in net.accounts.items()}
    base = None
    if "cpu" not in ns.skip:
        base = cpu_section(cars, ns.repeats, keys)["sdk"]
    with tempfile.TemporaryDirectory(prefix="bench-repos-") as tmp:
        if {"kafka", "e2e"} - set(ns.skip):
            print(f"\nbroker: {describe(ns)}", flush=True)
            with broker(ns) as bootstrap:
                if "kafka" not in ns.skip:
                    kafka_section(cars, bootstrap, ns.repeats, base, describe(ns))
                if "e2e" not in ns.skip:
                    e2e_section(ns.e2e_accounts, bootstrap, Path(tmp))
        if "memory" not in ns.skip:
            memory_section(ns.big_car_mb, Path(tmp))


if __name__ == "__main__":
    main()
