"""Memory soak: the peak RSS of every long-running process at full speed, and whether it keeps growing.

Issue 16: each long-running process (every producer, both consumers, a repo replica) stays under
256 MB RSS in a 10-minute soak at full speed. This starts a broker (Apache Kafka by default,
``--broker``), then runs each process as a subprocess exactly as it is deployed (``python -m
runtime ...``), one after the other, each alone at full speed for ``--minutes`` (default 10;
``--quick``: 1), and samples its RSS (and its children's: the ``--workers`` processes) every second:

1. ``jetstream``: ``backfill jetstream`` against a Jetstream simulator that never runs dry (the
   project's simulator serving a pool of synthetic events over and over, each pass with fresh
   DIDs and later ``time_us``, so nothing is a duplicate);
2. ``firehose``: ``backfill firehose --follow`` against the project's relay simulator fed with the
   captured real frames (``../shared/fixtures``) over and over, each pass with fresh seqs, times
   and DIDs patched into the frames (synthetic frames when the fixtures are absent);
3. ``firehose-w2``: the same with ``--workers 2``: the coordinator and each worker are reported;
4. ``repos``: a ``backfill repos --from-topic --redo`` replica against the PDS simulator (no rate
   limit), its DIDs enqueued again and again into the work topic;
5. ``postgres`` and 6. ``queue``: ``backfill consume postgres`` / ``consume queue`` draining what
   the producers wrote (the same topic prefix), from the beginning.

Per process it prints the peak RSS, the RSS at the early mark (1 minute in; a quarter of the run
when it is shorter than 4 minutes) and at the end (before the stop signal), the growth between
the two and the slope of a least-squares line over the second half of the run (MB/min: a leak
signal; allocators and caches settle in the first half), the events it processed (its own
Prometheus counters) and whether the peak stayed under 256 MB. The machine is shared: the rates
are noisy, the RSS is not.

    python bench/bench_memory.py [--minutes N | --quick] [--only NAME ...] [--broker kafka|tansu]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libipld  # noqa: E402
import psutil  # noqa: E402

from bench.brokers import add_broker_arguments, broker, describe  # noqa: E402
from runtime.atproto.capture import read_capture  # noqa: E402
from runtime.kafka.broker import free_port, port_open  # noqa: E402
from runtime.simulator.jetstream import JetstreamSimulator, StoredEvent, synthetic_events  # noqa: E402
from runtime.simulator.relay import (  # noqa: E402
    RelayGenerator,
    RelaySimulator,
    StoredFrame,
    relay_time,
)

FIXTURES = ROOT.parent / "shared" / "fixtures"
LIMIT_MB = 256
MB = 1e6
METRIC_PREFIX = "atproto_backfill_"
#: Event time of the first pooled Jetstream event (2023-11-14T22:13:20Z).
JETSTREAM_START_US = 1_700_000_000_000_000
#: Seq of the first looped relay frame: above 2**32, so every seq is a CBOR uint of 8 bytes and a
#: new one can be written over the old in place.
RELAY_FIRST_SEQ = 40_000_000_000
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def cycle_tag(k: int) -> str:
    """Four base32 characters naming pass ``k`` (1 million passes before they repeat)."""
    return "".join(_B32[(k >> s) & 31] for s in (15, 10, 5, 0))


def cycle_did(did: str, k: int) -> str:
    """``did`` for pass ``k``: a did:plc with its first four identifier characters replaced (pass 0: itself)."""
    if k == 0 or not did.startswith("did:plc:") or len(did) != 32:
        return did
    return "did:plc:" + cycle_tag(k) + did[12:]


# ------------------------------------------------------------------------------ Jetstream feed


class LoopedEvents(Sequence[StoredEvent]):
    """A pool of events served over and over as an endless, lazily built sequence.

    Pass ``k`` serves every pooled event with its author's DID renamed for the pass (so its records
    are new ones, never duplicates of an earlier pass) and ``time_us`` moved ``k`` pool spans on.
    """

    def __init__(self, pool: list[StoredEvent], passes: int = 1_000_000) -> None:
        self.pool = pool
        self.n = len(pool)
        self.passes = passes
        running, top = [], -(2**63)
        for e in pool:
            top = max(top, e.time_us)
            running.append(top)
        self.running = running
        self.span = top - pool[0].time_us + 1000

    def __len__(self) -> int:
        return self.n * self.passes

    @overload
    def __getitem__(self, i: int) -> StoredEvent: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[StoredEvent]: ...

    def __getitem__(self, i: int | slice) -> StoredEvent | Sequence[StoredEvent]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k, j = divmod(i, self.n)
        e = self.pool[j]
        if k == 0:
            return e
        t = e.time_us + k * self.span
        did = cycle_did(e.did, k)
        text = e.text.replace(e.did, did).replace(f'"time_us":{e.time_us}', f'"time_us":{t}', 1)
        return StoredEvent(t, did, e.collection, text)


class LoopedRunningMax(Sequence[int]):
    """The running maximum of ``time_us`` over a :class:`LoopedEvents` (what a cursor is bisected on)."""

    def __init__(self, events: LoopedEvents) -> None:
        self.events = events

    def __len__(self) -> int:
        return len(self.events)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...

    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k, j = divmod(i, self.events.n)
        return self.events.running[j] + k * self.events.span


class LoopingJetstream(JetstreamSimulator):
    """The project's Jetstream simulator over a :class:`LoopedEvents` (uncompressed only)."""

    def _prepare(self) -> None:
        assert isinstance(self.events, LoopedEvents)
        self._running_max = LoopedRunningMax(self.events)  # type: ignore[assignment]
        self._zcache = []


def jetstream_pool(n: int, seed: int = 3, accounts: int = 5000) -> list[StoredEvent]:
    """``n`` synthetic Jetstream events at Bluesky's full rate of event time (2,000 events/s)."""
    return synthetic_events(n, seed=seed, accounts=accounts, start_us=JETSTREAM_START_US, rate=2000.0,
                            real_cids=False)


def serve_jetstream(port: int, pool_size: int, seed: int = 3) -> None:
    """Serve the looping Jetstream on ``port`` until SIGTERM."""
    sim = LoopingJetstream(LoopedEvents(jetstream_pool(pool_size, seed)), port=port)  # type: ignore[arg-type]
    _serve_until_signal(sim.start, sim.stop, f"looping Jetstream on {sim.url}")


# ---------------------------------------------------------------------------------- relay feed


@dataclass
class PatchableFrame:
    """A frame and where its seq, time and account sit in its bytes."""

    data: bytes
    seq: int
    seq_at: int
    time_at: int | None
    did_at: int | None
    did: str | None


def _value_at(data: bytes, key: bytes, head: bytes) -> int | None:
    """Offset of the value of map key ``key`` (a CBOR text key) whose encoding starts with ``head``."""
    i = data.find(key + head)
    return None if i < 0 else i + len(key) + len(head)


def patchable(data: bytes) -> PatchableFrame | None:
    """Index one frame for in-place patching; None for a frame without an 8-byte seq."""
    header, body = libipld.decode_dag_cbor_multi(data)
    if not isinstance(body, dict) or type(body.get("seq")) is not int or body["seq"] < 2**32:
        return None
    seq_at = _value_at(data, b"cseq", b"\x1b")
    assert seq_at is not None
    assert int.from_bytes(data[seq_at:seq_at + 8], "big") == body["seq"]
    when = body.get("time")
    time_at = _value_at(data, b"dtime", b"\x78\x18") if isinstance(when, str) and len(when) == 24 else None
    did = body.get("repo") if header.get("t") == "#commit" else body.get("did")
    did_at = None
    if isinstance(did, str) and did.startswith("did:plc:") and len(did) == 32:
        did_at = _value_at(data, b"drepo" if header.get("t") == "#commit" else b"cdid", b"\x78\x20")
        if did_at is not None and data[did_at:did_at + 32] != did.encode():
            did_at = None
    return PatchableFrame(data, body["seq"], seq_at, time_at, did_at, did if isinstance(did, str) else None)


class FrameLoop:
    """Captured frames over and over: pass ``k`` gets fresh seqs (contiguous from ``first_seq``), the
    current time and DIDs renamed for pass ``k + did_pass`` (``did_pass`` < 0: the DIDs kept, so a
    verifier finds their keys), written into the frames' bytes in place (no re-encoding, so it keeps
    pace)."""

    def __init__(self, frames: list[bytes], first_seq: int = RELAY_FIRST_SEQ, did_pass: int = 1) -> None:
        pool = [p for p in (patchable(d) for d in frames) if p is not None]
        if not pool:
            raise SystemExit("no frame with an 8-byte seq to loop")
        pool.sort(key=lambda p: p.seq)
        self.pool = pool
        self.base = pool[0].seq
        self.span = pool[-1].seq - self.base + 1
        self.first_seq = first_seq
        self.did_pass = did_pass
        self.k = 0
        self.i = 0
        self.out_seq = first_seq - 1

    def take(self, n: int, time_us: int) -> list[StoredFrame]:
        """The next ``n`` frames, stamped ``time_us``."""
        when = relay_time(time_us).encode()
        ms = time_us // 1000 * 1000
        out = []
        for _ in range(n):
            p = self.pool[self.i]
            seq = self.first_seq + self.k * self.span + (p.seq - self.base)
            buf = bytearray(p.data)
            buf[p.seq_at:p.seq_at + 8] = seq.to_bytes(8, "big")
            if p.time_at is not None:
                buf[p.time_at:p.time_at + 24] = when
            did = p.did
            if p.did_at is not None and p.did is not None and self.did_pass >= 0:
                did = cycle_did(p.did, self.k + self.did_pass)
                buf[p.did_at:p.did_at + 32] = did.encode()
            out.append(StoredFrame(seq, ms, did, bytes(buf)))
            self.i += 1
            if self.i == len(self.pool):
                self.i = 0
                self.k += 1
        self.out_seq = out[-1].seq
        return out


def relay_frames(fixtures: Path) -> tuple[list[bytes], str]:
    """The captured frames, or (without the fixtures) 3,000 generated ones; and what they are."""
    capture = fixtures / "frames.bin.zst"
    if capture.exists():
        return read_capture(capture), f"the {capture.name} capture"
    gen = RelayGenerator(seed=9, accounts=300, first_seq=RELAY_FIRST_SEQ)
    return [f.data for f in gen.frames(3000)], "3,000 generated frames (no fixtures)"


def serve_relay(port: int, fixtures: Path, did_pass: int) -> None:
    """Serve the looping relay on ``port`` until SIGTERM: frames are appended ahead of the reader."""
    frames, _ = relay_frames(fixtures)
    loop = FrameLoop(frames, did_pass=did_pass)
    sim = RelaySimulator(loop.take(20_000, int(time.time() * 1e6)), retain=60_000, port=port)
    feeder: list[asyncio.Task[None]] = []

    async def feed() -> None:
        while True:
            ahead = loop.out_seq - (RELAY_FIRST_SEQ - 1 + sim.frames_sent)
            if ahead < 20_000:
                await sim.append(loop.take(2000, int(time.time() * 1e6)))
            else:
                await asyncio.sleep(0.01)

    async def start() -> None:
        await sim.start()
        feeder.append(asyncio.ensure_future(feed()))

    async def stop() -> None:
        for t in feeder:
            t.cancel()
        await sim.stop()

    _serve_until_signal(start, stop, f"looping relay on {sim.url}")


def _serve_until_signal(start: Callable[[], Any], stop: Callable[[], Any], what: str) -> None:
    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await start()
        print(f"ready: {what}", flush=True)
        await done.wait()
        await stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- processes, samples


def cli(*args: str) -> list[str]:
    """The command line of ``backfill ARGS`` as deployed (``python -m runtime`` is the ``backfill`` console script)."""
    return [sys.executable, "-m", "runtime", *args]


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the project root, its output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 300.0) -> None:
    """Wait until something listens on ``port`` (the process must not have ended)."""
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None:
            raise SystemExit(f"{log.stem} ended with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{log.stem} did not listen on {port} in {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.2)


def tail(log: Path, chars: int = 3000) -> str:
    """The end of a log file."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free right now."""
    for _ in range(200):
        p = free_port()
        if p + n < 65536 and not any(port_open("127.0.0.1", p + i) for i in range(1, n)):
            return p
    raise SystemExit("no run of free ports")


def scrape(port: int) -> dict[str, float]:
    """Prometheus counters of the process on ``port``, summed over labels (``{}`` when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def counter(metrics: dict[str, float], name: str) -> float:
    """One summed counter (``name`` without the project prefix and ``_total``)."""
    return metrics.get(f"{METRIC_PREFIX}{name}_total", 0.0)


@dataclass
class Series:
    """RSS samples of one process: (seconds since the phase started, bytes)."""

    label: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    def at(self, t: float) -> int:
        """The RSS at time ``t`` (the last sample at or before it)."""
        i = bisect.bisect_right([s[0] for s in self.samples], t) - 1
        return self.samples[max(0, i)][1]

    def peak(self, until: float | None = None) -> int:
        """The highest sample (up to ``until``)."""
        return max(b for t, b in self.samples if until is None or t <= until)

    def slope(self, start: float, end: float) -> float:
        """MB per minute of the least-squares line through the samples in ``[start, end]``."""
        pts = [(t, b) for t, b in self.samples if start <= t <= end]
        if len(pts) < 3:
            return 0.0
        tm = statistics.fmean(t for t, _ in pts)
        bm = statistics.fmean(b for _, b in pts)
        var = sum((t - tm) ** 2 for t, _ in pts)
        cov = sum((t - tm) * (b - bm) for t, b in pts)
        return cov / var * 60 / MB if var else 0.0


class Sampler:
    """Samples the RSS of a process and its children every ``interval`` seconds, in a thread.

    Children are named by ``name_child`` (given the child's command line; None: not reported).
    """

    def __init__(self, label: str, pid: int, name_child: Callable[[list[str], int], str | None] | None = None,
                 interval: float = 1.0) -> None:
        self.label = label
        self.root = psutil.Process(pid)
        self.name_child = name_child
        self.interval = interval
        self.t0 = time.monotonic()
        self.series: dict[int, Series] = {pid: Series(label, pid)}
        self._children: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """Take one sample of every process."""
        now = time.monotonic() - self.t0
        procs = [self.root]
        with contextlib.suppress(psutil.Error):
            procs += self.root.children(recursive=True)
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            if not rss:  # a zombie: ended, not yet reaped
                continue
            s = self.series.get(p.pid)
            if s is None:
                if self.name_child is None:
                    continue
                try:
                    name = self.name_child(p.cmdline(), len(self._children))
                except psutil.Error:
                    continue
                if name is None:
                    continue
                self._children.append(p.pid)
                s = self.series[p.pid] = Series(f"{self.label} {name}", p.pid)
            s.samples.append((now, rss))

    def elapsed(self) -> float:
        """Seconds since sampling started."""
        return time.monotonic() - self.t0

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def worker_name(cmdline: list[str], n: int) -> str | None:
    """A ``--workers`` child: ``worker N`` (multiprocessing's resource tracker is left out)."""
    text = " ".join(cmdline)
    if "resource_tracker" in text or "forkserver" in text:
        return None
    return f"worker {n}"


# ---------------------------------------------------------------------------------------- phases


@dataclass
class Result:
    """What one process of a phase did (``events`` and ``rate``: NaN for a child process)."""

    label: str
    peak: int
    early: int
    end: int
    slope: float
    early_mark: float
    events: float = float("nan")
    rate: float = float("nan")
    unit: str = ""
    exit_status: int | None = None
    problem: str = ""
    #: (seconds, MB) every 10 s, for the JSON output
    timeline: list[tuple[float, float]] = field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.end - self.early

    @property
    def under(self) -> bool:
        return self.peak < LIMIT_MB * MB


@dataclass
class Soak:
    """The shared state of a soak run."""

    bootstrap: str
    seconds: float
    workdir: Path
    prefix: str
    database_url: str
    fixtures: Path
    pool: int
    kafka_config: list[str] = field(default_factory=list)
    consumer_args: list[str] = field(default_factory=list)
    kill_above: float = 2048 * MB
    results: list[Result] = field(default_factory=list)
    produced: float = 0.0
    notes: list[str] = field(default_factory=list)

    def kafka_args(self, job: str | None = None) -> list[str]:
        """The Kafka options of every measured process (and ``--job``, ``--progress`` for a producer)."""
        args = ["--bootstrap-servers", self.bootstrap, "--topic-prefix", self.prefix, "--log-level", "WARNING"]
        for kv in self.kafka_config:
            args += ["--kafka-config", kv]
        if job is not None:
            args += ["--topic-partitions", "6", "--job", job, "--progress", "none"]
        return args


def early_mark(seconds: float) -> float:
    """When the "early" RSS is read: 1 minute in, or a quarter of a run shorter than 4 minutes."""
    return 60.0 if seconds >= 240 else seconds / 4


@contextlib.contextmanager
def feed(cmd: list[str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A simulator subprocess for the duration of the context."""
    proc = spawn(cmd, log)
    try:
        wait_ready(proc, port, log)
        yield proc
    finally:
        stop_process(proc, 10)


def measure(soak: Soak, label: str, cmd: list[str], metrics_ports: list[int],
            events: Callable[[dict[str, float]], float], unit: str,
            name_child: Callable[[list[str], int], str | None] | None = None,
            during: Callable[[float], None] | None = None) -> list[Result]:
    """Run ``cmd`` for the soak's duration, sampling its RSS; stop it with SIGTERM; its results.

    ``events`` reads the events processed from the summed counters of ``metrics_ports`` (every 5 s,
    the last answer kept); ``during`` is called about every second with the elapsed time (a feeder's
    hook). A process that ends early, or is killed for passing ``soak.kill_above`` bytes of RSS (the
    machine is shared), is reported as such and the soak goes on.
    """
    log = soak.workdir / f"{label}.log"
    proc = spawn(cmd, log)
    sampler = Sampler(label, proc.pid, name_child)
    mark = early_mark(soak.seconds)
    early_events: float | None = None
    early_at = mark
    last = (0.0, 0.0)  # (elapsed, events) of the last answer
    problem = ""

    def total() -> float:
        nonlocal last
        merged: dict[str, float] = {}
        for port in metrics_ports:
            for k, v in scrape(port).items():
                merged[k] = merged.get(k, 0.0) + v
        if merged:
            last = (sampler.elapsed(), events(merged))
        return last[1]

    try:
        polled = 0.0
        while sampler.elapsed() < soak.seconds:
            if proc.poll() is not None:
                problem = f"ended early (status {proc.returncode}) after {sampler.elapsed():.0f} s"
                break
            rss = max((x.samples[-1][1] for x in sampler.series.values() if x.samples), default=0)
            if rss > soak.kill_above:
                proc.kill()
                problem = f"killed at {rss / MB:.0f} MB RSS after {sampler.elapsed():.0f} s (--kill-above-mb)"
                break
            if early_events is None and sampler.elapsed() >= mark:
                early_events, early_at = total(), sampler.elapsed()
            elif sampler.elapsed() - polled >= 5:
                polled = sampler.elapsed()
                total()
            if during is not None:
                during(sampler.elapsed())
            time.sleep(min(1.0, max(0.05, soak.seconds - sampler.elapsed())))
        end_events = total()
        end_at = last[0]
        end_rss = {pid: (x.samples[-1][1] if x.samples else 0) for pid, x in sampler.series.items()}
        status = stop_process(proc)
        sampler.sample()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sampler.stop()
    if problem:
        more = f"; log tail:\n{tail(log, 1500)}" if problem.startswith("ended") else ""
        soak.notes.append(f"{label}: {problem}{more}")
        print(f"  {label}: {problem}", flush=True)
    steady = end_at - early_at if early_events is not None else end_at
    rate = (end_events - (early_events or 0.0)) / steady if steady > 0 else float("nan")
    out = []
    end = min(soak.seconds, sampler.elapsed())
    for pid, x in sampler.series.items():
        if not x.samples:
            continue
        r = Result(x.label, x.peak(), x.at(mark), end_rss[pid], x.slope(end / 2, end), mark)
        r.timeline = [(round(t), round(b / MB, 1)) for i, (t, b) in enumerate(x.samples) if i % 10 == 0]
        if pid == proc.pid:
            r.events, r.rate, r.unit, r.exit_status = end_events, rate, unit, status
            r.problem = problem
        out.append(r)
    for r in out:
        print_result(r)
    soak.results.extend(out)
    return out


def phase_jetstream(soak: Soak) -> None:
    port, mport = free_port(), free_ports(1)
    with feed([sys.executable, __file__, "--serve", "jetstream", str(port), "--pool", str(soak.pool)],
              soak.workdir / "feed-jetstream.log", port):
        cmd = cli("jetstream", "--instance", f"ws://127.0.0.1:{port}/subscribe", "--cursor", str(JETSTREAM_START_US),
                  "--num-records", "0", "--max-time", "0", "--consumer", "none", "--wanted-collections", "*",
                  "--metrics-port", str(mport), *soak.kafka_args("soak-jetstream"))
        r = measure(soak, "jetstream", cmd, [mport], lambda m: counter(m, "producer_events_produced"), "events")
    soak.produced += r[0].events


def phase_firehose(soak: Soak, workers: int) -> None:
    port, mport = free_port(), free_ports(workers + 1)
    label = "firehose" if workers == 1 else f"firehose-w{workers}"
    # each firehose phase its own DIDs (passes), so the consumers see new records, not repeats
    did_pass = 1 if workers == 1 else 500_000
    with feed([sys.executable, __file__, "--serve", "relay", str(port), "--fixtures", str(soak.fixtures),
               "--did-pass", str(did_pass)], soak.workdir / f"feed-{label}.log", port):
        cmd = cli("firehose", "--relay-url", f"ws://127.0.0.1:{port}", "--start-cursor", str(RELAY_FIRST_SEQ - 1),
                  "--follow", "--workers", str(workers), "--num-records", "0", "--max-time", "0",
                  "--metrics-port", str(mport), *soak.kafka_args(f"soak-{label}"))
        ports = [mport] if workers == 1 else [mport + 1 + i for i in range(workers)]
        r = measure(soak, label, cmd, ports, lambda m: counter(m, "producer_events_produced"), "events",
                    name_child=worker_name if workers > 1 else None)
    soak.produced += r[0].events


def phase_repos(soak: Soak, accounts: int) -> None:
    from producers.repos.worktopic import enqueue_dids  # noqa: PLC0415
    from runtime.kafka.settings import KafkaSettings  # noqa: PLC0415

    plc, base = free_port(), free_ports(5)
    dids_file = soak.workdir / "dids.txt"
    cmd = cli("simulate", "pds", "--accounts", str(accounts), "--hosts", "4", "--seed", "5", "--records-mean", "100",
              "--big-every", "200", "--big-records", "5000", "--rate-limit", "0", "--plc-port", str(plc),
              "--base-port", str(base), "--write-dids", str(dids_file), "--stats-every", "0", "--log-level", "WARNING")
    with feed(cmd, soak.workdir / "feed-pds.log", plc):
        for _ in range(600):
            if dids_file.exists() and dids_file.stat().st_size:
                break
            time.sleep(0.2)
        dids = [d for d in dids_file.read_text().split() if d]
        kafka = KafkaSettings(bootstrap_servers=soak.bootstrap, topic_prefix=soak.prefix, topic_partitions=6)
        enqueued = [enqueue_dids(kafka, dids, origin="soak")]
        mport = free_ports(1)
        last = [0.0]

        def refill(elapsed: float) -> None:
            # keep at least one pass of the DIDs queued ahead of the replica
            if elapsed - last[0] < 3:
                return
            last[0] = elapsed
            done = counter(scrape(mport), "repos_completed")
            if enqueued[0] - done < len(dids):
                enqueued[0] += enqueue_dids(kafka, dids, origin="soak")

        cmd = cli("repos", "--from-topic", "--redo", "--replica-id", "soak-r0", "--plc-url", f"http://127.0.0.1:{plc}",
                  "--allow-private-network", "--rate", "1000", "--burst", "50", "--idle-exit", "0",
                  "--workdir", str(soak.workdir / "cars"), "--metrics-port", str(mport),
                  *soak.kafka_args("soak-repos"))
        (soak.workdir / "cars").mkdir(exist_ok=True)
        r = measure(soak, "repos", cmd, [mport],
                    lambda m: counter(m, "producer_events_produced"), "records", during=refill)
    soak.notes.append(f"repos: {accounts} accounts on 4 simulated PDS hosts (mean 100 records, every 200th "
                      f"5,000), no rate limit, enqueued again and again with --redo ({enqueued[0]:,} work items)")
    soak.produced += r[0].events


def tuned_args(tuned: list[str]) -> list[str]:
    """``--kafka-config`` options of the tuned consumer phases."""
    return [a for kv in tuned for a in ("--kafka-config", kv)]


def phase_postgres(soak: Soak, label: str = "postgres", tuned: list[str] | None = None) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    schema = f"soak_{uuid.uuid4().hex[:8]}"
    mport = free_ports(1)
    cmd = cli("consume", "postgres", "--database-url", soak.database_url, "--db-schema", schema,
              "--group", f"soak-pg-{schema}", "--metrics-port", str(mport), *soak.kafka_args(), *soak.consumer_args,
              *tuned_args(tuned or []))
    try:
        measure(soak, label, cmd, [mport], lambda m: counter(m, "consumer_messages"), "messages")
    finally:
        with psycopg.connect(soak.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def phase_queue(soak: Soak, label: str = "queue", tuned: list[str] | None = None) -> None:
    mport = free_ports(1)
    cmd = cli("consume", "queue", "--queue-path", str(soak.workdir / f"{label}.sqlite"), "--queue-name", "soak",
              "--group", f"soak-queue-{uuid.uuid4().hex[:6]}", "--metrics-port", str(mport), *soak.kafka_args(),
              *soak.consumer_args, *tuned_args(tuned or []))
    measure(soak, label, cmd, [mport], lambda m: counter(m, "consumer_messages"), "messages")


PHASES = ("jetstream", "firehose", "firehose-w2", "repos", "postgres", "queue", "postgres-tuned", "queue-tuned")


def print_result(r: Result) -> None:
    """One line per process."""
    ev = "" if r.events != r.events else f"  {r.events:>11,.0f} {r.unit} ({r.rate:,.0f}/s after the early mark)"
    print(f"  {r.label:<24} peak {r.peak / MB:6.1f} MB  at {r.early_mark:.0f} s {r.early / MB:6.1f}  end "
          f"{r.end / MB:6.1f}  growth {r.growth / MB:+6.1f} MB  2nd-half slope {r.slope:+6.2f} MB/min  "
          f"{'under' if r.under else 'OVER'} {LIMIT_MB} MB{ev}", flush=True)


def report(soak: Soak, broker_text: str) -> None:
    """The summary table."""
    print(f"\n== Memory soak: {soak.seconds / 60:g} min per process at full speed, {broker_text}, "
          f"RSS sampled every 1 s (psutil) ==")
    print(f"{'process':<26}{'peak MB':>8}{'early MB':>9}{'end MB':>8}{'growth':>8}{'slope MB/min':>13}"
          f"{'events':>13}  under {LIMIT_MB} MB")
    for r in soak.results:
        ev = "" if r.events != r.events else f"{r.events:,.0f}"
        print(f"{r.label:<26}{r.peak / MB:8.1f}{r.early / MB:9.1f}{r.end / MB:8.1f}{r.growth / MB:+8.1f}"
              f"{r.slope:+13.2f}{ev:>13}  {'yes' if r.under else 'NO'}{'  (' + r.problem + ')' if r.problem else ''}")
    for n in soak.notes:
        print(f"  note: {n}")
    worst = max(soak.results, key=lambda r: r.peak)
    print(f"highest peak: {worst.label} {worst.peak / MB:.1f} MB; all under {LIMIT_MB} MB: "
          f"{'yes' if all(r.under for r in soak.results) else 'NO'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes per process (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 minute per process")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only these processes (repeatable)")
    parser.add_argument("--pool", type=int, default=100_000, help="synthetic Jetstream events served in a loop")
    parser.add_argument("--accounts", type=int, default=2000, help="accounts of the simulated PDS hosts")
    parser.add_argument("--fixtures", default=str(FIXTURES), help="folder with frames.bin.zst")
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a librdkafka setting for every measured process (repeatable), e.g. "
                             "queued.max.messages.kbytes=16384")
    parser.add_argument("--consumer-arg", action="append", default=[], metavar="ARG",
                        help="an option for both consumers (repeatable), e.g. --consumer-arg=--max-memory-mb=200")
    parser.add_argument("--tuned", action="append", default=[], metavar="KEY=VALUE",
                        help="librdkafka settings of the postgres-tuned and queue-tuned phases (repeatable; "
                             "those phases run only with it), e.g. queued.min.messages=1000")
    parser.add_argument("--fill-minutes", type=float, default=1.0,
                        help="minutes of the Jetstream producer filling the topics when only consumers run")
    parser.add_argument("--kill-above-mb", type=float, default=2048,
                        help="kill a measured process past this RSS (the machine is shared)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, queue file)")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--did-pass", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=3, help=argparse.SUPPRESS)
    add_broker_arguments(parser)
    ns = parser.parse_args()
    if ns.serve:
        kind, port = ns.serve[0], int(ns.serve[1])
        if kind == "jetstream":
            serve_jetstream(port, ns.pool, ns.seed)
        else:
            serve_relay(port, Path(ns.fixtures), ns.did_pass)
        return 0
    if ns.quick:
        ns.minutes = 1.0
    phases = [p for p in PHASES if (ns.only is None or p in ns.only) and (ns.tuned or not p.endswith("-tuned"))]
    frames_what = relay_frames(Path(ns.fixtures))[1] if {"firehose", "firehose-w2"} & set(phases) else ""
    print(f"broker: {describe(ns)}; {ns.minutes:g} min per process; processes: {', '.join(phases)}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        with broker(ns) as bootstrap:
            soak = Soak(bootstrap, ns.minutes * 60, workdir, f"soak{uuid.uuid4().hex[:6]}", ns.database_url,
                        Path(ns.fixtures), ns.pool, ns.kafka_config, ns.consumer_arg)
            soak.kill_above = ns.kill_above_mb * MB
            if ns.tuned:
                soak.notes.append(f"postgres-tuned, queue-tuned: --kafka-config {' '.join(ns.tuned)}")
            if ns.consumer_arg:
                soak.notes.append(f"both consumers with {' '.join(ns.consumer_arg)}")
            if ns.kafka_config:
                soak.notes.append(f"every process with --kafka-config {' '.join(ns.kafka_config)}")
            if frames_what:
                soak.notes.append(f"firehose frames: {frames_what}, looped with fresh seqs, times and DIDs")
            soak.notes.append(f"jetstream: {ns.pool:,} synthetic events (2,000/s of event time) looped with fresh "
                              "DIDs and time_us; all collections")
            producers = [p for p in phases if not p.startswith(("postgres", "queue"))]
            if not producers and phases:
                # the consumers need a backlog: the Jetstream producer for a while, not reported
                print(f"filling the topics: {ns.fill_minutes:g} min of the Jetstream producer (not reported)",
                      flush=True)
                filler = Soak(bootstrap, ns.fill_minutes * 60, workdir, soak.prefix, ns.database_url,
                              Path(ns.fixtures), ns.pool, ns.kafka_config)
                phase_jetstream(filler)
                soak.produced = filler.produced
            for p in phases:
                print(f"\n-- {p} ({ns.minutes:g} min) --", flush=True)
                if p == "jetstream":
                    phase_jetstream(soak)
                elif p == "firehose":
                    phase_firehose(soak, 1)
                elif p == "firehose-w2":
                    phase_firehose(soak, 2)
                elif p == "repos":
                    phase_repos(soak, ns.accounts)
                elif p.startswith("postgres"):
                    print(f"  backlog: {soak.produced:,.0f} events in the topics", flush=True)
                    phase_postgres(soak, p, ns.tuned if p.endswith("-tuned") else None)
                else:
                    phase_queue(soak, p, ns.tuned if p.endswith("-tuned") else None)
            report(soak, describe(ns))
            if ns.json:
                Path(ns.json).write_text(json.dumps({
                    "minutes": ns.minutes, "broker": describe(ns), "notes": soak.notes,
                    "results": [{**r.__dict__, "growth": r.growth, "under": r.under} for r in soak.results]},
                    indent=1, default=str))
    finally:
        if ns.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.under for r in soak.results) else 1


if __name__ == "__main__":
    sys.exit(main())
