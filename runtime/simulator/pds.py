"""A network of simulated PDS hosts, a PLC directory and a relay, serving generated accounts.

Every account has a real signing key, a real repository (records from the synthetic generator,
an MST and a signed commit built by :func:`runtime.atproto.repo.build_repo`), a DID document in
the PLC directory (or, one per host, a host-level ``did:web`` served at
``/.well-known/did.json``) naming its host. Hosts speak the real XRPC endpoints:

* ``GET /xrpc/com.atproto.sync.getRepo?did=`` -> the CAR (``application/vnd.ipld.car``), or 400
  ``RepoNotFound`` / ``RepoDeactivated`` / ``RepoTakendown``;
* ``GET /xrpc/com.atproto.sync.listRepos?limit=&cursor=`` -> ``{cursor, repos: [{did, head, rev,
  active, status}]}``; the relay serves the same over every host, optionally leaving some out
  (the real relay's list is known to be incomplete);
* ``GET /xrpc/com.atproto.identity.resolveHandle?handle=`` on every host and the relay (as an
  AppView answers it) -> ``{did}``.

Each host rate-limits like the atproto PDS (a fixed window per client, ``RateLimit-Limit``,
``-Remaining``, ``-Reset`` in epoch seconds, ``-Policy: L;w=W``, ``429 RateLimitExceeded``) and can
misbehave on demand: bare 429s without headers, 503s, slow answers, bodies cut short, CARs
truncated but served as complete. Each host counts requests per window and keeps their times, so a
test can assert that no client ever exceeded a limit.
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from runtime.atproto.crypto import KeyPair
from runtime.atproto.repo import build_repo_blocks
from runtime.atproto.tid import make_tid
from runtime.simulator.httpd import HttpServer, Request, Response, ThreadServed
from runtime.simulator.plc import PlcDirectory, PlcSimulator, did_document
from runtime.simulator.synthetic import Generator, SyntheticAccount

log = logging.getLogger(__name__)

ACTIVE: Final = "active"
#: Account states other than active, with the getRepo error they produce.
STATE_ERRORS: Final = {"deactivated": "RepoDeactivated", "takendown": "RepoTakendown", "deleted": "RepoNotFound"}
DAY_US: Final = 86_400_000_000


@dataclass
class HostFaults:
    """How one host misbehaves.

    Args:
        rate_limit: requests allowed per window per client (0 = unlimited).
        rate_window: the window in seconds.
        bare_429_every: every Nth request answers a 429 without any header (0 = never).
        error_rate: probability of a 503.
        slow_rate: probability of answering ``slow_seconds`` late.
        truncate_rate: probability that a getRepo body is cut short (connection dropped).
        corrupt_rate: probability that a getRepo CAR is truncated but served as complete.
    """

    rate_limit: int = 0
    rate_window: float = 300.0
    bare_429_every: int = 0
    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    truncate_rate: float = 0.0
    corrupt_rate: float = 0.0


@dataclass
class SimAccount:
    """One generated account and its built repository."""

    did: str
    handle: str
    host: int
    state: str
    key: KeyPair
    car: bytes = b""
    head: str = ""
    rev: str = ""
    record_cids: dict[str, str] = field(default_factory=dict)

    @property
    def uri_prefix(self) -> str:
        """``at://did/``."""
        return f"at://{self.did}/"


@dataclass
class HostStats:
    """What one host saw."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)
    windows: Counter[int] = field(default_factory=Counter)
    over_limit: int = 0
    injected: Counter[str] = field(default_factory=Counter)


class _RepoGenerator(Generator):
    """The synthetic generator, remembering posts so later records can reply to or like them."""

    def remember_post(self, uri: str, cid: str) -> None:
        """Make ``(uri, cid)`` a possible reply/like/repost/quote target."""
        self._posts.append((uri, cid))
        if len(self._posts) > 2000:
            self._posts.pop(0)


class PdsHost:
    """One simulated PDS (or the relay, with ``relay=True``)."""

    def __init__(self, network: PdsNetwork, index: int, faults: HostFaults, *, relay: bool = False,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.network = network
        self.index = index
        self.faults = faults
        self.relay = relay
        self.server = HttpServer(self.handle, host, port, name="relay" if relay else f"pds{index}")
        self.stats = HostStats()
        self.accounts: dict[str, SimAccount] = {}
        self.did_web: str | None = None
        self._rng = random.Random(network.seed * 1009 + index)  # noqa: S311 - simulated faults
        self._t0 = network.clock()

    @property
    def url(self) -> str:
        """The host's base URL."""
        return self.server.url

    def _limit_headers(self, now: float) -> tuple[dict[str, str], bool]:
        f = self.faults
        if not f.rate_limit:
            return {}, False
        window = int((now - self._t0) // f.rate_window)
        self.stats.windows[window] += 1
        used = self.stats.windows[window]
        over = used > f.rate_limit
        reset_in = self._t0 + (window + 1) * f.rate_window - now
        headers = {
            "RateLimit-Limit": str(f.rate_limit),
            "RateLimit-Remaining": str(max(0, f.rate_limit - used)),
            "RateLimit-Reset": str(int(self.network.wall() + reset_in + 0.999)),
            "RateLimit-Policy": f"{f.rate_limit};w={int(f.rate_window) or 1}",
        }
        return headers, over

    async def handle(self, req: Request) -> Response:
        """Answer one request, counting it and applying the faults."""
        now = self.network.clock()
        st = self.stats
        st.requests += 1
        st.times.append(now)
        st.endpoints[req.path] += 1
        resp = self._answer(req, now)
        st.statuses[resp.status] += 1
        return resp

    def _answer(self, req: Request, now: float) -> Response:
        st = self.stats
        f = self.faults
        headers, over = self._limit_headers(now)
        if over:
            st.over_limit += 1
            return Response.xrpc_error(429, "RateLimitExceeded", "Rate Limit Exceeded", headers)
        if f.bare_429_every and st.requests % f.bare_429_every == 0:
            st.injected["bare_429"] += 1
            return Response.xrpc_error(429, "RateLimitExceeded", "Rate Limit Exceeded")
        rng = self._rng
        if f.error_rate and rng.random() < f.error_rate:
            st.injected["503"] += 1
            return Response.xrpc_error(503, "ServiceUnavailable", "try again later", headers)
        resp = self._route(req, headers)
        if f.slow_rate and rng.random() < f.slow_rate:
            st.injected["slow"] += 1
            resp.delay = f.slow_seconds
        if resp.status == 200 and req.path.endswith("getRepo"):
            if f.truncate_rate and rng.random() < f.truncate_rate:
                st.injected["truncated"] += 1
                resp.truncate_to = len(resp.body) // 2
            elif f.corrupt_rate and rng.random() < f.corrupt_rate:
                st.injected["corrupt"] += 1
                resp.body = resp.body[: max(1, len(resp.body) * 2 // 3)]
        return resp

    def _route(self, req: Request, headers: dict[str, str]) -> Response:
        path = req.path
        if path == "/xrpc/_health":
            return Response.json(200, {"version": "atproto-backfill-simulator"}, headers)
        if path == "/xrpc/com.atproto.sync.listRepos":
            return self._list_repos(req, headers)
        if path == "/xrpc/com.atproto.identity.resolveHandle":
            did = self.network.handles.get((req.arg("handle") or "").lower())
            if did is None:
                return Response.xrpc_error(400, "InvalidRequest", "Unable to resolve handle", headers)
            return Response.json(200, {"did": did}, headers)
        if path == "/xrpc/com.atproto.sync.getRepo" and not self.relay:
            return self._get_repo(req, headers)
        if path == "/.well-known/did.json" and self.did_web is not None:
            acct = self.network.accounts[self.did_web]
            doc = did_document(acct.did, acct.key.multikey(), self.url, acct.handle)
            return Response.json(200, doc, headers)
        return Response.xrpc_error(404, "MethodNotImplemented", f"{path} is not implemented here", headers)

    def _get_repo(self, req: Request, headers: dict[str, str]) -> Response:
        did = req.arg("did")
        if not did:
            return Response.xrpc_error(400, "InvalidRequest", "did is required", headers)
        acct = self.accounts.get(did)
        if acct is None:
            return Response.xrpc_error(400, "RepoNotFound", f"Could not find repo for DID: {did}", headers)
        if acct.state != ACTIVE:
            return Response.xrpc_error(400, STATE_ERRORS[acct.state], f"Repo is {acct.state}: {did}", headers)
        return Response(200, acct.car, dict(headers), content_type="application/vnd.ipld.car")

    def _list_repos(self, req: Request, headers: dict[str, str]) -> Response:
        try:
            limit = max(1, min(1000, int(req.arg("limit", "500") or 500)))
        except ValueError:
            return Response.xrpc_error(400, "InvalidRequest", "bad limit", headers)
        listed = self.network.relay_listing if self.relay else sorted(self.accounts)
        cursor = req.arg("cursor")
        start = bisect.bisect_right(listed, cursor) if cursor else 0
        page = listed[start:start + limit]
        repos = []
        for did in page:
            acct = self.network.accounts[did]
            entry: dict[str, Any] = {"did": did, "head": acct.head, "rev": acct.rev, "active": acct.state == ACTIVE}
            if acct.state != ACTIVE:
                entry["status"] = acct.state
            repos.append(entry)
        body: dict[str, Any] = {"repos": repos}
        if start + limit < len(listed):
            body["cursor"] = page[-1]
        return Response.json(200, body, headers)


class PdsNetwork(ThreadServed):
    """PLC directory + ``hosts`` PDS hosts + a relay, serving ``accounts`` generated accounts.

    Args:
        accounts: number of did:plc accounts (one did:web account per host is added with
            ``did_web``).
        hosts: number of PDS hosts.
        seed: determinism.
        records_mean: mean records per account (geometric-ish spread, at least 1).
        big_every: every Nth account gets ``big_records`` records (0 = none).
        faults: per-host misbehaviour (one for all hosts, or a list per host).
        inactive: fractions of accounts in each non-active state.
        relay_omit: fraction of accounts the relay's listRepos leaves out.
        start_us, span_days: the records' createdAt times fall in ``[start, start + span)``.
        plc_port, base_port: fixed ports (PDS hosts at ``base_port + i``, the relay after them; 0 =
            free ports).
    """

    #: :meth:`start_in_thread` returns once built (thousands of signed repositories) and listening.
    thread_name = "pds-sim"
    start_timeout = 600.0

    def __init__(self, accounts: int = 100, hosts: int = 4, *, seed: int = 1, records_mean: int = 30,
                 big_every: int = 0, big_records: int = 2000,
                 faults: HostFaults | list[HostFaults] | None = None,
                 inactive: dict[str, float] | None = None, did_web: bool = False, relay_omit: float = 0.0,
                 start_us: int = 1_727_395_200_000_000, span_days: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 host: str = "127.0.0.1", plc_port: int = 0, base_port: int = 0) -> None:
        self.n_accounts = accounts
        self.seed = seed
        self.records_mean = records_mean
        self.big_every = big_every
        self.big_records = big_records
        self.inactive = dict(inactive or {})
        self.did_web = did_web
        self.relay_omit = relay_omit
        self.start_us = start_us
        self.span_us = int(span_days * DAY_US)
        self.clock = clock
        self.wall = wall
        fl = faults if isinstance(faults, list) else [faults or HostFaults()] * hosts
        if len(fl) != hosts:
            raise ValueError("one HostFaults per host")
        self.plc = PlcSimulator(PlcDirectory(), host=host, port=plc_port)
        self.hosts = [PdsHost(self, i, fl[i], host=host, port=base_port + i if base_port else 0) for i in range(hosts)]
        self.relay = PdsHost(self, hosts, HostFaults(), relay=True, host=host,
                             port=base_port + hosts if base_port else 0)
        self.accounts: dict[str, SimAccount] = {}
        self.handles: dict[str, str] = {}
        self.relay_listing: list[str] = []
        self.built = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def plc_url(self) -> str:
        """The PLC directory's URL."""
        return self.plc.url

    @property
    def relay_url(self) -> str:
        """The relay's URL (listRepos over every host)."""
        return self.relay.url

    async def start(self) -> None:
        """Listen on every port, then generate and build the accounts (ports go into DID docs)."""
        await self.plc.start()
        for h in [*self.hosts, self.relay]:
            await h.server.start()
        if not self.built:
            self.build()
        log.info("PDS network: PLC %s, relay %s, %d hosts, %d accounts", self.plc_url, self.relay_url,
                 len(self.hosts), len(self.accounts))

    async def stop(self) -> None:
        """Stop every server."""
        for h in [*self.hosts, self.relay]:
            await h.server.stop()
        await self.plc.stop()

    # ------------------------------------------------------------------ accounts

    def _states(self, rng: random.Random) -> str:
        r = rng.random()
        acc = 0.0
        for state in ("deactivated", "takendown", "deleted"):
            acc += self.inactive.get(state, 0.0)
            if r < acc:
                return state
        return ACTIVE

    def build(self) -> None:
        """Generate every account's records and build its signed repository."""
        gen = _RepoGenerator(seed=self.seed, accounts=self.n_accounts, start_us=self.start_us, real_cids=False)
        rng = random.Random(self.seed * 7919)  # noqa: S311 - synthetic data
        accounts: list[tuple[SyntheticAccount, int]] = [(a, i % len(self.hosts)) for i, a in enumerate(gen.accounts)]
        if self.did_web:
            for h in self.hosts:
                hostport = h.url.split("://", 1)[1].replace(":", "%3A")
                accounts.append((SyntheticAccount(f"did:web:{hostport}", f"web{h.index}.test"), h.index))
        for n, (sa, host) in enumerate(accounts):
            state = self._states(rng)
            if sa.did.startswith("did:web:"):
                state = ACTIVE
            acct = SimAccount(did=sa.did, handle=sa.handle, host=host, state=state,
                              key=KeyPair.generate("k256", rng))
            count = self.big_records if self.big_every and (n + 1) % self.big_every == 0 else \
                max(1, int(rng.expovariate(1 / self.records_mean)))
            self._build_account(gen, acct, count, rng)
            self.accounts[acct.did] = acct
            self.handles[acct.handle] = acct.did
            pds = self.hosts[host]
            pds.accounts[acct.did] = acct
            if sa.did.startswith("did:web:"):
                pds.did_web = acct.did
            else:
                self.plc.directory.register(did_document(acct.did, acct.key.multikey(), pds.url, acct.handle))
        omit = random.Random(self.seed * 31)  # noqa: S311 - synthetic data
        self.relay_listing = sorted(d for d in self.accounts if omit.random() >= self.relay_omit)
        self.built = True

    def _build_account(self, gen: _RepoGenerator, acct: SimAccount, count: int, rng: random.Random) -> None:
        records: dict[str, dict[str, Any]] = {}
        times = sorted(self.start_us + rng.randrange(self.span_us) for _ in range(count))
        clock_id = rng.randrange(1024)
        have_profile = False
        for created in times:
            coll = gen.pick_collection()
            if coll == "app.bsky.actor.profile":
                if have_profile:
                    coll = "app.bsky.feed.like"
                have_profile = True
            t = created
            rkey = "self" if coll == "app.bsky.actor.profile" else make_tid(t, clock_id)
            while f"{coll}/{rkey}" in records:
                t += 1
                rkey = make_tid(t, clock_id)
            records[f"{coll}/{rkey}"] = gen.record(coll, acct.did, t)
        rev = make_tid(times[-1] + 1000 if times else self.start_us, clock_id)
        built = build_repo_blocks(acct.did, acct.key, records, rev)
        acct.car = built.to_car()
        acct.head = str(built.commit_cid)
        acct.rev = rev
        acct.record_cids = {path: str(cid) for path, cid in built.record_cids.items()}
        for path, cid in acct.record_cids.items():
            if path.startswith("app.bsky.feed.post/"):
                gen.remember_post(acct.uri_prefix + path, cid)

    # ------------------------------------------------------------------ queries for tests

    @property
    def dids(self) -> list[str]:
        """Every account's DID, in creation order."""
        return list(self.accounts)

    def dids_in_state(self, state: str) -> list[str]:
        """DIDs of accounts in ``state`` (``active``, ``deactivated``, ``takendown``, ``deleted``)."""
        return [d for d, a in self.accounts.items() if a.state == state]

    def host_stats(self) -> dict[str, HostStats]:
        """Per host URL (relay included) what it saw."""
        return {h.url: h.stats for h in [*self.hosts, self.relay]}

    def total_over_limit(self) -> int:
        """Requests answered 429 because a client exceeded a host's limit (must stay 0)."""
        return sum(h.stats.over_limit for h in [*self.hosts, self.relay])

