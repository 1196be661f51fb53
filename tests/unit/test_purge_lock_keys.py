"""The advisory locks a purge-mode batch takes first (consumers.postgres.sink.purge_lock_keys)."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from consumers.postgres.sink import PURGE_LOCK_BUCKETS, purge_lock_keys

_DIDS = st.lists(st.from_regex(r"did:plc:[a-z2-7]{1,24}", fullmatch=True), max_size=300)


def _bucket(did: str) -> int:
    return zlib.crc32(did.encode()) % PURGE_LOCK_BUCKETS


@given(_DIDS, _DIDS, st.integers(-(2**31) * PURGE_LOCK_BUCKETS, (2**31 - 1) * PURGE_LOCK_BUCKETS))
def test_one_lock_per_bucket_in_key_order_exclusive_where_a_did_is_purged(
        written: list[str], purged: list[str], base: int) -> None:
    keys, exclusive = purge_lock_keys(base, written + purged, purged)
    # ascending without repeats: every transaction takes its locks in one global order
    assert keys == sorted(set(keys)) and len(keys) <= PURGE_LOCK_BUCKETS
    assert len(exclusive) == len(keys)
    held = dict(zip(keys, exclusive, strict=True))
    for did in written + purged:
        assert base + _bucket(did) in held  # every DID's bucket is locked
    for key, x in held.items():
        assert x == any(base + _bucket(d) == key for d in purged)  # exclusive exactly where a DID is purged


def test_a_write_and_a_purge_of_one_did_need_the_same_lock() -> None:
    did = "did:plc:abcdefghijklmnopqrstuvwx"
    write_keys, write_x = purge_lock_keys(1000, [did], [])
    purge_keys, purge_x = purge_lock_keys(1000, [did], [did])
    assert write_keys == purge_keys == [1000 + _bucket(did)]
    assert (write_x, purge_x) == ([False], [True])  # shared for a write, exclusive for a purge
