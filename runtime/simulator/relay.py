"""A relay simulator speaking ``com.atproto.sync.subscribeRepos`` on loopback, byte-exact.

Frames are what a relay sends: one binary websocket message per event, a DAG-CBOR header
(``{op: 1, t: "#commit"}``) followed by the DAG-CBOR body. They come from a capture file (records of
``[u32 little-endian length][frame bytes]``, zstd-compressed or not, served byte for byte) or from
:class:`RelayGenerator`, whose accounts have real signing keys, real MSTs and really signed commits
(Sync 1.1: every commit carries its MST proof blocks and ``prevData``), all built with
:mod:`runtime.atproto`. The generator's DID documents (signing key as ``publicKeyMultibase``, PDS
endpoint) are exposed by :meth:`RelayGenerator.did_documents` for the PLC directory simulator.

Cursor semantics as the event-stream spec gives them: no cursor = live only; ``cursor=N`` replays
every kept frame with ``seq > N`` then goes live; a cursor older than the oldest kept frame gets an
``#info`` ``OutdatedCursor`` frame and the stream from the oldest; a cursor past the newest seq gets
a ``FutureCursor`` error frame and the connection is closed. Faults on demand: abrupt disconnects
(optionally in the middle of a frame), ``ConsumerTooSlow``, garbage frames and oversize frames.
``backfill simulate relay`` runs it; tests use it in-process.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import libipld
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from runtime.atproto.car import write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import UnsignedCommit, sign_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.dagcbor import encode, from_json_form
from runtime.atproto.errors import MissingBlockError
from runtime.atproto.mst import MST, RepoOp, invert_ops, iter_nodes_preorder
from runtime.atproto.tid import make_tid
from runtime.contract.timeparse import timestamp_us, us_to_iso
from runtime.simulator.httpd import ThreadServed
from runtime.simulator.plc import did_document
from runtime.simulator.synthetic import Generator
from runtime.simulator.wsserver import Pacer, close, listen, live_ticks

log = logging.getLogger(__name__)

SUBSCRIBE_PATH: Final = "/xrpc/com.atproto.sync.subscribeRepos"


# ----------------------------------------------------------------------------------- capture files


def encode_frame(header: dict[str, Any], body: dict[str, Any]) -> bytes:
    """A frame: the DAG-CBOR header followed by the DAG-CBOR body."""
    return encode(header) + encode(body)


def info_frame(name: str, message: str | None = None) -> bytes:
    """An ``#info`` frame (``OutdatedCursor``)."""
    body: dict[str, Any] = {"name": name}
    if message is not None:
        body["message"] = message
    return encode_frame({"op": 1, "t": "#info"}, body)


def error_frame(error: str, message: str | None = None) -> bytes:
    """An error frame (header ``op: -1``): ``FutureCursor``, ``ConsumerTooSlow``."""
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    return encode_frame({"op": -1}, body)


def relay_time(time_us: int) -> str:
    """A frame ``time`` as relays write it: RFC 3339 with milliseconds and ``Z``."""
    return us_to_iso(time_us)[:-4] + "Z"


@dataclass(slots=True)
class StoredFrame:
    """One frame as served: its seq, event time, account and exact bytes."""

    seq: int
    time_us: int
    did: str | None
    data: bytes


def stored_from_bytes(frames: Iterable[bytes]) -> list[StoredFrame]:
    """Index captured frames by their body's ``seq`` and ``time`` (frames without a seq are skipped).

    Raises:
        ValueError: a frame that is not two DAG-CBOR objects.
    """
    out: list[StoredFrame] = []
    for data in frames:
        header, body = libipld.decode_dag_cbor_multi(data)
        seq = body.get("seq") if isinstance(body, dict) else None
        if type(seq) is not int:
            continue
        did = body.get("repo") if header.get("t") == "#commit" else body.get("did")
        when = body.get("time")
        out.append(StoredFrame(seq, timestamp_us(when) if isinstance(when, str) else 0,
                               did if isinstance(did, str) else None, data))
    out.sort(key=lambda f: f.seq)
    return out


# -------------------------------------------------------------------------------------- generator


@dataclass
class RelayAccount:
    """One generated account: identity, key and repository state."""

    did: str
    handle: str
    key: KeyPair
    clock_id: int
    last_rev_us: int = -1
    root: CID | None = None
    rev: str | None = None
    blocks: dict[CID, bytes] = field(default_factory=dict, repr=False)
    records: dict[str, CID] = field(default_factory=dict, repr=False)
    active: bool = True


class RelayGenerator:
    """Generates a relay's stream: really signed commits over real MSTs, identity and account events.

    Record contents, the collection mix and the account activity come from
    :class:`runtime.simulator.synthetic.Generator` (the same shapes the Jetstream simulator serves);
    this class keeps each account's repository, applies every op to its MST, signs the commit with
    the account's key and packs the Sync 1.1 proof (the changed MST nodes, checked at generation
    time to invert to ``prevData``) into the frame's CAR slice.

    Args:
        seed: random seed (accounts, keys, records).
        accounts: number of accounts.
        start_us: event time of the first frame (default: ``n / rate`` seconds before now is the
            caller's business; the default is a fixed instant so output is reproducible).
        rate: mean frames per second of event time.
        first_seq: the first frame's seq.
        pds_endpoint: the PDS URL written into every DID document.
        curve: ``k256`` (what bsky.social uses) or ``p256``.
    """

    def __init__(self, seed: int = 1, accounts: int = 50, *, start_us: int = 1_750_000_000_000_000,
                 rate: float = 1000.0, first_seq: int = 1, pds_endpoint: str = "http://127.0.0.1:2583",
                 curve: str = "k256") -> None:
        self._gen = Generator(seed=seed, accounts=accounts, start_us=start_us, rate=rate, real_cids=False)
        rng = random.Random(seed * 7919 + 17)  # noqa: S311 - simulated keys, deterministic on purpose
        self.pds_endpoint = pds_endpoint
        self.accounts: dict[str, RelayAccount] = {}
        for i, acct in enumerate(self._gen.accounts):
            key = KeyPair.generate("k256" if curve == "k256" else "p256", rng)
            self.accounts[acct.did] = RelayAccount(acct.did, acct.handle, key, clock_id=i % 1024)
        self.seq = first_seq - 1
        self.time_us = start_us
        self.commits = 0

    def did_documents(self) -> dict[str, dict[str, Any]]:
        """DID -> DID document of every account (for :class:`runtime.simulator.plc.PlcDirectory`)."""
        return {a.did: did_document(a.did, a.key.multikey(), self.pds_endpoint, a.handle)
                for a in self.accounts.values()}

    def _next_seq_time(self, time_us: int | None) -> tuple[int, int, str]:
        self.seq += 1
        t = self._gen.t if time_us is None else time_us
        self.time_us = max(self.time_us, t)  # a relay's clock does not run backwards
        ms = self.time_us // 1000 * 1000  # frames carry milliseconds
        return self.seq, ms, relay_time(ms)

    def frame(self, time_us: int | None = None) -> StoredFrame:
        """The next frame (``time_us`` overrides the generated event time, for live frames)."""
        while True:
            ev = self._gen.event()
            acct = self.accounts[ev["did"]]
            kind = ev["kind"]
            if kind == "identity":
                seq, t, when = self._next_seq_time(time_us)
                body = {"seq": seq, "did": acct.did, "time": when, "handle": acct.handle}
                return StoredFrame(seq, t, acct.did, encode_frame({"op": 1, "t": "#identity"}, body))
            if kind == "account":
                seq, t, when = self._next_seq_time(time_us)
                info = ev["account"]
                body = {"seq": seq, "did": acct.did, "time": when, "active": bool(info["active"])}
                if info.get("status"):
                    body["status"] = info["status"]
                return StoredFrame(seq, t, acct.did, encode_frame({"op": 1, "t": "#account"}, body))
            c = ev["commit"]
            built = self._commit(acct, c["operation"], f"{c['collection']}/{c['rkey']}", c.get("record"),
                                 time_us)
            if built is not None:
                return built

    def frames(self, n: int) -> list[StoredFrame]:
        """The next ``n`` frames."""
        return [self.frame() for _ in range(n)]

    def _commit(self, acct: RelayAccount, action: str, path: str, record: dict[str, Any] | None,
                time_us: int | None) -> StoredFrame | None:
        existing = acct.records.get(path)
        if action == "delete" and existing is None:
            return None
        if action == "update" and existing is None:
            action = "create"
        elif action == "create" and existing is not None:
            action = "update"
        mst = MST(acct.root, acct.blocks)
        record_blocks: list[tuple[CID, bytes]] = []
        op: dict[str, Any] = {"action": action, "path": path}
        if action == "delete":
            mst.delete(path)
            op["cid"] = None
            op["prev"] = existing
        else:
            assert record is not None
            block = encode(from_json_form(record))
            cid = CID.for_dag_cbor(block)
            record_blocks.append((cid, block))
            if action == "create":
                mst.add(path, cid)
            else:
                mst.update(path, cid)
                op["prev"] = existing
            op["cid"] = cid
        prev_data = acct.root if acct.root is not None else MST(None, {}).root_cid()
        new_root = mst.root_cid()
        new_nodes = mst.new_blocks()
        acct.blocks.update(new_nodes)
        acct.blocks.update(record_blocks)
        seq, t, when = self._next_seq_time(time_us)
        # revisions only grow per repository, whatever the event clock does
        acct.last_rev_us = max(t, acct.last_rev_us + 1)
        rev = make_tid(acct.last_rev_us, acct.clock_id)
        commit_cid, commit_block = sign_commit(UnsignedCommit(did=acct.did, data=new_root, rev=rev), acct.key)
        proof = dict(new_nodes.items())
        repo_op = RepoOp.from_firehose(op)
        slice_blocks = {**proof, **dict(record_blocks)}
        try:
            inverted = invert_ops(new_root, slice_blocks, [repo_op])
        except MissingBlockError:
            inverted = None
        if inverted != prev_data:
            # Not a minimal proof: ship the whole new tree (small repositories; always inverts).
            proof = {cid: blk for cid, blk, _ in iter_nodes_preorder(new_root, acct.blocks)
                     if cid not in dict(record_blocks)}
        car = write_car([commit_cid], [(commit_cid, commit_block), *proof.items(), *record_blocks])
        since = acct.rev
        acct.root = new_root
        acct.rev = rev
        if action == "delete":
            del acct.records[path]
        else:
            acct.records[path] = op["cid"]
        self.commits += 1
        body: dict[str, Any] = {
            "seq": seq, "rebase": False, "tooBig": False, "repo": acct.did, "commit": commit_cid,
            "rev": rev, "since": since, "blocks": car, "ops": [_wire_op(op)], "blobs": [],
            "prevData": prev_data, "time": when,
        }
        return StoredFrame(seq, t, acct.did, encode_frame({"op": 1, "t": "#commit"}, body))


def _wire_op(op: dict[str, Any]) -> dict[str, Any]:
    out = {"action": op["action"], "path": op["path"], "cid": op["cid"]}
    if op.get("prev") is not None:
        out["prev"] = op["prev"]
    return out


# -------------------------------------------------------------------------------------- the server


@dataclass
class RelayFaults:
    """Injected misbehaviour.

    Args:
        disconnect_after: drop the TCP connection abruptly after this many frames (0 = never).
        disconnect_times: how many connections get dropped (0 = every one).
        mid_frame: drop it in the middle of a frame (the client sees a truncated message).
        too_slow_after: after this many frames send a ``ConsumerTooSlow`` error frame and close.
        garbage_every: an extra malformed frame (not CBOR) every N frames (0 = never).
        oversize_seqs: the frames with these seqs are served as oversize frames instead.
        oversize_bytes: size of an oversize frame.
    """

    disconnect_after: int = 0
    disconnect_times: int = 1
    mid_frame: bool = False
    too_slow_after: int = 0
    garbage_every: int = 0
    oversize_seqs: frozenset[int] = frozenset()
    oversize_bytes: int = 6 * 1024 * 1024


def oversize_frame(seq: int, size: int) -> bytes:
    """A well-formed ``#commit`` frame for ``seq`` whose ``blocks`` make it ``size`` bytes long."""
    body = {"seq": seq, "rebase": False, "tooBig": True, "repo": "did:plc:oversize", "rev": "",
            "since": None, "blocks": bytes(size), "ops": [], "blobs": [], "time": relay_time(0)}
    return encode_frame({"op": 1, "t": "#commit"}, body)


class RelaySimulator(ThreadServed):
    """The relay. Use as ``async with`` or :meth:`start_in_thread` (then :meth:`call` runs on its loop).

    Args:
        frames: stored frames in seq order.
        generator: keeps generating live frames (``live_rate`` per second) when given.
        live_rate: live frames per second (0 = none).
        retain: keep only the newest N frames (0 = all); older cursors get ``OutdatedCursor``.
        faults: injected faults.
        rate_limit: cap on frames per second per connection (0 = as fast as possible).
        clock: unix seconds (live frames' time).
    """

    thread_name = "relay-sim"
    start_timeout = 30.0

    def __init__(self, frames: list[StoredFrame], *, generator: RelayGenerator | None = None,
                 live_rate: float = 0.0, retain: int = 0, faults: RelayFaults | None = None,
                 rate_limit: float = 0.0, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self._frames: list[StoredFrame] = sorted(frames, key=lambda f: f.seq)
        self._seqs: list[int] = [f.seq for f in self._frames]
        self.generator = generator
        self.live_rate = live_rate
        self.retain = retain
        self.faults = faults or RelayFaults()
        self.rate_limit = rate_limit
        self.host = host
        self.port = port
        self._clock = clock
        self._server: Server | None = None
        self._cond: asyncio.Condition | None = None
        self._live_task: asyncio.Task[None] | None = None
        self.connections = 0
        self.disconnects_done = 0
        self.frames_sent = 0
        self.cursors: list[int | None] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._trim()

    # ------------------------------------------------------------------ state

    @property
    def url(self) -> str:
        """``ws://host:port`` (clients add the subscribeRepos path, or not)."""
        return f"ws://{self.host}:{self.port}"

    @property
    def subscribe_url(self) -> str:
        """The full subscribeRepos endpoint."""
        return self.url + SUBSCRIBE_PATH

    @property
    def oldest_seq(self) -> int | None:
        """The oldest seq still kept."""
        return self._seqs[0] if self._seqs else None

    @property
    def head_seq(self) -> int | None:
        """The newest seq."""
        return self._seqs[-1] if self._seqs else None

    @property
    def frames(self) -> list[StoredFrame]:
        """The kept frames (a copy)."""
        return list(self._frames)

    def _trim(self) -> None:
        if self.retain and len(self._frames) > self.retain:
            cut = len(self._frames) - self.retain
            del self._frames[:cut]
            del self._seqs[:cut]

    async def append(self, frames: Iterable[StoredFrame]) -> None:
        """Add newer frames and wake the live connections."""
        for f in frames:
            if self._seqs and f.seq <= self._seqs[-1]:
                raise ValueError(f"frame seq {f.seq} is not after {self._seqs[-1]}")
            self._frames.append(f)
            self._seqs.append(f.seq)
        self._trim()
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ server

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != SUBSCRIBE_PATH:
            return connection.respond(404, "not found\n")
        cursor = parse_qs(parts.query).get("cursor", [None])[0]
        if cursor is not None:
            try:
                int(cursor)
            except ValueError:
                return connection.respond(400, '{"error":"InvalidRequest","message":"cursor must be an integer"}\n')
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        raw = parse_qs(urlsplit(ws.request.path).query).get("cursor", [None])[0]
        cursor = int(raw) if raw is not None else None
        self.cursors.append(cursor)
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            with contextlib.suppress(ConnectionClosed):
                await self._stream(ws, cursor)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _stream(self, ws: ServerConnection, cursor: int | None) -> None:
        f = self.faults
        drop_this = f.disconnect_after and (f.disconnect_times == 0 or self.disconnects_done < f.disconnect_times)
        sent = 0
        pacer = Pacer(self.rate_limit)

        async def send(frame: StoredFrame) -> None:
            nonlocal sent
            if drop_this and sent >= f.disconnect_after:
                self.disconnects_done += 1
                if f.mid_frame:
                    data = frame.data
                    ws.transport.write(_ws_binary_header(len(data)) + data[: len(data) // 2])
                ws.transport.abort()  # abrupt: no close frame
                raise ConnectionClosed(None, None)
            if f.too_slow_after and sent >= f.too_slow_after:
                await ws.send(error_frame("ConsumerTooSlow", "simulated backlog"))
                await ws.close(1008, "ConsumerTooSlow")
                raise ConnectionClosed(None, None)
            if f.garbage_every and sent and sent % f.garbage_every == 0:
                await ws.send(b"\xff\x00garbage, not DAG-CBOR")
            await pacer.wait()
            data = oversize_frame(frame.seq, f.oversize_bytes) if frame.seq in f.oversize_seqs else frame.data
            await ws.send(data)
            sent += 1
            self.frames_sent += 1
            if sent & 127 == 0:
                await asyncio.sleep(0)  # let other connections run

        if cursor is None:
            next_seq = (self._seqs[-1] + 1) if self._seqs else 0
        else:
            head = self._seqs[-1] if self._seqs else (self.generator.seq if self.generator else 0)
            if cursor > head:
                await ws.send(error_frame("FutureCursor", f"cursor {cursor} is ahead of the stream ({head})"))
                await ws.close(1000, "FutureCursor")
                return
            oldest = self._seqs[0] if self._seqs else None
            if oldest is not None and cursor < oldest - 1:
                await ws.send(info_frame("OutdatedCursor", "requested cursor exceeded limit; possibly missing events"))
            next_seq = cursor + 1
        while True:
            i = bisect.bisect_left(self._seqs, next_seq)
            while i < len(self._frames):
                frame = self._frames[i]
                await send(frame)
                next_seq = frame.seq + 1
                # frames may have been trimmed meanwhile: find the position again by seq
                i = bisect.bisect_left(self._seqs, next_seq)
            if self._cond is None:
                await ws.wait_closed()
                return
            async with self._cond:
                if not self._seqs or self._seqs[-1] < next_seq:
                    await self._cond.wait()

    async def _generate_live(self) -> None:
        gen = self.generator
        assert gen is not None
        async for k in live_ticks(self.live_rate):
            now_us = int(self._clock() * 1e6)
            await self.append(gen.frame(time_us=now_us) for _ in range(k))

    async def start(self) -> None:
        """Start listening (on a free port when ``port`` is 0)."""
        self._cond = asyncio.Condition()
        if self.generator is not None and self.live_rate:
            self._live_task = asyncio.ensure_future(self._generate_live())
        self._server, self.port = await listen(self._handler, self.host, self.port, self._process_request,
                                               max_size=1 << 16, write_limit=1 << 20, close_timeout=0.5)
        log.info("relay simulator on %s (%d frames, seq %s..%s)", self.subscribe_url, len(self._frames),
                 self.oldest_seq, self.head_seq)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_task
        await close(self._server, self._handlers)  # a handler waiting for live frames would never return


def _ws_binary_header(n: int) -> bytes:
    """An unmasked (server-to-client) websocket header of a final binary frame of ``n`` bytes."""
    if n < 126:
        return bytes((0x82, n))
    if n < 1 << 16:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


__all__ = [
    "SUBSCRIBE_PATH",
    "RelayAccount",
    "RelayFaults",
    "RelayGenerator",
    "RelaySimulator",
    "StoredFrame",
    "encode_frame",
    "error_frame",
    "info_frame",
    "oversize_frame",
    "stored_from_bytes",
]
