"""Per-DID work (fetch outcomes, retries, processing), the list position, and the list source."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_none

from producers.identity.resolver import DidResolutionError
from producers.repos.decode import RecordFilter
from producers.repos.pds import FetchedCar, PdsError, PdsLimits, RepoUnavailableError
from producers.repos.source import Fetched, RepoFetcher, RepoPosition, RepoProcessor, RepoResult, RepoSource
from producers.source import Drop, End, Skip
from runtime.atproto.car import Car, CarFile
from runtime.atproto.crypto import KeyPair
from runtime.atproto.identity import Identity
from runtime.atproto.repo import build_repo
from runtime.atproto.tid import make_tid
from runtime.contract.records import RecordEvent
from runtime.errors import FatalError

KEY = KeyPair.generate("k256", random.Random(21))


def did_of(i: int) -> str:
    return f"did:plc:{'s' * 20}{i:04d}"


def car_bytes(did: str, n: int = 3) -> bytes:
    records = {f"app.bsky.feed.like/{make_tid(1_700_000_000_000_000 + k)}":
               {"$type": "app.bsky.feed.like", "createdAt": "2024-10-01T00:00:00Z",
                "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}} for k in range(n)}
    return build_repo(did, KEY, records, make_tid(1_800_000_000_000_000))[1]


class FakeResolver:
    def __init__(self, errors: dict[str, list[DidResolutionError]] | None = None) -> None:
        self.errors = errors or {}
        self.calls: list[str] = []
        self.invalidated: list[str] = []
        self.cleared = 0

    async def resolve(self, did: str) -> Identity:
        self.calls.append(did)
        errs = self.errors.get(did)
        if errs:
            raise errs.pop(0)
        return Identity(did, KEY.did_key(), "https://pds.test", None)

    def invalidate(self, did: str) -> None:
        self.invalidated.append(did)

    def clear_cache(self) -> None:
        self.cleared += 1


class FakePds:
    limits = PdsLimits()

    def __init__(self, bodies: dict[str, list[Any]]) -> None:
        self.bodies = bodies
        self.calls: list[str] = []

    async def get_repo(self, pds: str, did: str, dest: Path) -> FetchedCar:
        self.calls.append(did)
        queue = self.bodies.get(did) or [car_bytes(did)]
        body = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(body, Exception):
            raise body
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"{did.replace(':', '_')}-{len(self.calls)}.car"
        path.write_bytes(body)
        return FetchedCar(path, len(body), 1)


async def _nosleep(s: float) -> None:
    return None


def fetcher(tmp: Path, resolver: FakeResolver, pds: FakePds, in_memory: int = 1 << 20) -> RepoFetcher:
    return RepoFetcher(resolver, pds, tmp, attempts=3, wait=wait_none(), sleep=_nosleep,  # type: ignore[arg-type]
                       in_memory_bytes=in_memory)


@pytest.mark.parametrize("in_memory", [1 << 20, 0], ids=["in-memory", "on-disk"])
def test_fetch_outcomes(tmp_path: Path, in_memory: int) -> None:
    ok, gone, deact, flaky, broken, bad = (did_of(i) for i in range(6))
    resolver = FakeResolver({gone: [DidResolutionError(gone, "not_found", "404")],
                             bad: [DidResolutionError(bad, "invalid_document", "no")]})
    good = car_bytes(flaky)
    pds = FakePds({
        deact: [RepoUnavailableError("deactivated", "RepoDeactivated", "400")],
        flaky: [PdsError("retries_exhausted", "503s", retryable=True), good[: len(good) // 2], good],
        broken: [good[:40]],  # always cut short: malformed CAR every time
    })
    f = fetcher(tmp_path, resolver, pds, in_memory)

    async def go() -> dict[str, Fetched]:
        return {d: await f.fetch(d, i) for i, d in enumerate((ok, gone, deact, flaky, broken, bad))}

    out = asyncio.run(go())
    assert out[ok].outcome == "ok"
    assert isinstance(out[ok].car, Car if in_memory else CarFile)
    assert out[gone].outcome == "not_found"
    assert out[deact].outcome == "deactivated"
    assert out[deact].reason == "RepoDeactivated"
    assert out[flaky].outcome == "ok"
    assert out[flaky].attempts == 3
    assert out[broken].outcome == "failed"
    assert out[broken].reason == "malformed_car"
    assert out[broken].attempts == 3
    assert out[broken].payload == good[:40]
    assert out[bad].outcome == "failed"
    assert out[bad].reason == "invalid_record"
    assert flaky in resolver.invalidated  # a retryable PDS failure re-resolves the DID
    for fetched in out.values():
        fetched.close()
    assert list(tmp_path.iterdir()) == []


def test_processor_results_and_failed_drop(tmp_path: Path) -> None:
    resolver, pds = FakeResolver(), FakePds({})
    f = fetcher(tmp_path, resolver, pds)
    did = did_of(1)
    fetched = asyncio.run(f.fetch(did, 5))
    proc = RepoProcessor(RecordFilter(), job="j", verify=True)
    result = RepoResult(did, 5, "failed")
    items = list(proc.items(fetched, result))
    assert sum(isinstance(i, RecordEvent) for i in items) == 3
    assert result.outcome == "ok"
    assert result.records == 3
    assert result.by_type == {"like": 3}
    assert result.car_bytes == fetched.size
    assert result.pds == "https://pds.test"
    meta = result.metadata()
    assert meta["counts_by_type"] == {"like": 3}
    datum = result.status_datum("j", 1, replica="r", work_partition=2, work_offset=9, batch=3)
    assert datum["outcome"] == "ok"
    assert datum["work_offset"] == 9
    fetched.close()
    failed = Fetched(did, 6, started=0.0, outcome="failed", reason="malformed_car", detail="cut", payload=b"x" * 10)
    res2 = RepoResult(did, 6, "failed")
    drops = list(proc.items(failed, res2))
    assert len(drops) == 1
    assert isinstance(drops[0], Drop)
    assert drops[0].reason == "malformed_car"
    assert drops[0].did == did
    assert res2.outcome == "failed"
    # --verify against a document without a key: failed, nothing produced
    nokey = asyncio.run(f.fetch(did, 7))
    nokey.identity = Identity(did, None, "https://pds.test", None)
    res3 = RepoResult(did, 7, "failed")
    items3 = list(proc.items(nokey, res3))
    assert [type(i) for i in items3] == [Drop]
    assert res3.reason == "bad_signature"
    nokey.close()


def test_position() -> None:
    pos = RepoPosition(10, "fp")
    for i in (2, 0, 5, 1):
        pos.complete(i)
    assert pos.cursor == 3
    assert pos.is_done(5)
    assert not pos.is_done(4)
    assert pos.done == 4
    with pytest.raises(FatalError):
        pos.complete(1)
    snap = pos.snapshot()
    assert snap == {"cursor": 3, "done": [5], "total": 10, "dids": "fp"}
    again = RepoPosition.restore(snap, 10, "fp")
    assert again.cursor == 3
    assert again.is_done(5)
    with pytest.raises(FatalError):
        RepoPosition.restore(snap, 10, "other")


def test_source_batches_and_resume(tmp_path: Path) -> None:
    dids = [did_of(i) for i in range(7)]
    resolver, pds = FakeResolver(), FakePds({})
    done: list[RepoResult] = []
    batches: list[int] = []
    position = RepoPosition(len(dids), "fp")
    position.complete(1)  # already done in an earlier run
    src = RepoSource(dids, fetcher(tmp_path, resolver, pds), RepoProcessor(RecordFilter(), job="j"),
                     position=position, concurrency=2, batch_size=3, on_done=done.append,
                     on_batch=lambda n, rs: batches.append(len(rs)))

    async def go() -> list[Any]:
        return [item async for item in src.items()]

    items = asyncio.run(go())
    assert isinstance(items[-1], End)
    assert items[-1].reason == "exhausted"
    events = [i for i in items if isinstance(i, RecordEvent)]
    assert len(events) == 3 * 6
    assert {e.did for e in events} == set(dids) - {dids[1]}
    assert {e.cursor for e in events} == {0, 2, 3, 4, 5, 6}
    assert batches == [2, 3, 1]
    assert position.cursor == 7
    assert resolver.cleared == 3  # memory released between batches
    # each DID's events are contiguous and followed by its on_done
    order = [e.did for e in events]
    assert all(order.index(d) + 3 == len(order) - order[::-1].index(d) for d in set(order))
    assert [r.did for r in done] == list(dict.fromkeys(order))
    assert not [i for i in items if isinstance(i, Skip)]
    assert list(tmp_path.iterdir()) == []


def test_snapshot_rows_are_as_of_the_request_time(tmp_path: Path) -> None:
    """runtime.contract.order rule 4: a snapshot's rows carry the time it was requested, not its head rev's."""
    resolver, pds = FakeResolver(), FakePds({})
    f = RepoFetcher(resolver, pds, tmp_path, attempts=1, wait=wait_none(), sleep=_nosleep,  # type: ignore[arg-type]
                    wall=lambda: 1_800_000_000.25)
    fetched = asyncio.run(f.fetch(did_of(1), 5))
    assert fetched.observed_us == 1_800_000_000_250_000
    items = list(RepoProcessor(RecordFilter(), job="j").items(fetched, RepoResult(did_of(1), 5, "failed")))
    events = [i for i in items if isinstance(i, RecordEvent)]
    assert events and {e.time_us for e in events} == {1_800_000_000_250_000}
    fetched.close()
