"""Collection (NSID) filters with prefix wildcards (``app.bsky.feed.*``), as Jetstream accepts them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from runtime.errors import ConfigError

_NSID_RE: Final = re.compile(
    r"^[a-zA-Z](?:[a-zA-Z0-9-]{0,62})?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62})?)+(?:\.\*)?$"
)

#: A collection NSID: letters, digits and hyphens in dot-separated segments (every character is legal
#: in a Kafka topic name, which a collection becomes part of).
_COLLECTION_RE: Final = re.compile(r"[a-zA-Z](?:[a-zA-Z0-9-]{0,62})?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62})?)+")
#: The atproto NSID length limit.
MAX_NSID_LEN: Final = 317
_valid_collections: set[str] = set()


def valid_collections() -> set[str]:
    """The collection names :func:`is_collection` found valid so far (at most 4,096): the set itself,
    for native decoders to read (never to change)."""
    return _valid_collections


def is_collection(name: object) -> bool:
    """Whether ``name`` is a syntactically valid collection NSID (``app.bsky.feed.post``).

    Decoders check every upstream collection with it: one that is not an NSID cannot name a topic.
    """
    if type(name) is not str:
        return False
    if name in _valid_collections:  # the hot path: a handful of collections make up the stream
        return True
    if len(name) > MAX_NSID_LEN or _COLLECTION_RE.fullmatch(name) is None:
        return False
    if len(_valid_collections) < 4096:
        _valid_collections.add(name)
    return True


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is an NSID or an NSID prefix ending in ``.*``; else ConfigError."""
    p = pattern.strip()
    if p == "*":
        return p
    if not _NSID_RE.match(p):
        raise ConfigError(f"not a collection NSID or NSID prefix wildcard: {pattern!r}")
    return p


class CollectionFilter:
    """Matches collections against exact NSIDs and ``prefix.*`` wildcards; empty means everything."""

    __slots__ = ("_cache", "_exact", "_prefixes", "patterns")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns: tuple[str, ...] = tuple(validate_pattern(p) for p in patterns)
        self._exact = frozenset(p for p in self.patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in self.patterns if p.endswith("*"))
        self._cache: dict[str, bool] = {}

    @property
    def matches_all(self) -> bool:
        """True when no pattern restricts anything."""
        return not self.patterns or "*" in self.patterns

    def __call__(self, collection: str) -> bool:
        hit = self._cache.get(collection)
        if hit is None:
            hit = (self.matches_all or collection in self._exact
                   or any(collection.startswith(p) for p in self._prefixes))
            if len(self._cache) < 4096:
                self._cache[collection] = hit
        return hit
