"""Deterministic synthetic Bluesky activity: accounts and realistic records of every typed collection.

Shared by the simulators (Jetstream, relay, PDS) so the demo, the tests and the benchmarks see the
same shapes as the live network: posts (replies, quotes, images, links, facets, langs, labels),
likes, reposts, follows, blocks, profiles, some other collections, identity and account events,
and Jetstream's non-monotonic ``time_us`` (a quarter of adjacent events go back by up to 32 ms).
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import libipld

_B32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_TID_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"

WORDS: Final = (
    "the", "a", "bluesky", "post", "backfill", "data", "kafka", "stream", "firehose", "jetstream", "relay",
    "atproto", "protocol", "open", "social", "web", "decentralized", "good", "morning", "coffee", "cats", "dogs",
    "science", "research", "music", "art", "photo", "today", "tomorrow", "hello", "world", "weekend", "news",
    "book", "reading", "writing", "code", "python", "rust", "golang", "sky", "cloud", "rain", "sun",
)
LANGS: Final = ("en", "ja", "pt", "de", "es", "fr", "ko")
OTHER_COLLECTIONS: Final = ("app.bsky.graph.listitem", "app.bsky.feed.threadgate", "chat.bsky.actor.declaration",
                            "app.bsky.graph.starterpack", "fyi.unravel.frontpage.post")


def make_tid(time_us: int, clock_id: int = 0) -> str:
    """A TID (base32-sortable, 13 chars) for ``time_us`` and a clock id."""
    value = (time_us << 10) | (clock_id & 0x3FF)
    out = []
    for _ in range(13):
        out.append(_TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def make_did(rng: random.Random) -> str:
    """A did:plc-shaped DID."""
    return "did:plc:" + "".join(rng.choice(_B32) for _ in range(24))


def fake_cid(seed: bytes, codec: int = 0x71) -> str:
    """A valid CIDv1 string (sha2-256 of ``seed``), for references to things that do not exist here."""
    digest = hashlib.sha256(seed).digest()
    return str(libipld.encode_cid(bytes([0x01, codec, 0x12, 0x20]) + digest))


def record_cid(record: dict[str, Any]) -> str:
    """The CID of a JSON-form record's DAG-CBOR encoding (links and bytes restored)."""
    from runtime.atproto import dagcbor  # noqa: PLC0415 - keeps this module importable standalone
    from runtime.atproto.cid import CID  # noqa: PLC0415

    return str(CID.for_dag_cbor(dagcbor.encode(dagcbor.from_json_form(record))))


@dataclass
class SyntheticAccount:
    """One generated account."""

    did: str
    handle: str


class Generator:
    """Generates accounts and Jetstream-shaped events deterministically from a seed.

    Args:
        seed: the random seed.
        accounts: how many accounts act.
        start_us: ``time_us`` of the first event.
        rate: mean events per second of event time.
        real_cids: compute real record CIDs (slower) instead of hash-derived ones.
    """

    def __init__(self, seed: int = 1, accounts: int = 200, start_us: int = 1_700_000_000_000_000,
                 rate: float = 1000.0, real_cids: bool = True) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
        self.accounts = [SyntheticAccount(make_did(self.rng), f"user{i}.test") for i in range(accounts)]
        self.t = start_us
        self.gap = 1e6 / rate
        self.real_cids = real_cids
        self._posts: list[tuple[str, str]] = []   # (uri, cid) of earlier posts, to reply/like/quote
        self._records: dict[str, list[tuple[str, str]]] = {}  # did -> (collection, rkey) existing
        self._seq = 1000
        self._clock_id = self.rng.randrange(1024)

    def _time(self) -> int:
        # Event time advances at the configured rate; a quarter of events carry a receive delay of
        # up to 32 ms, which makes adjacent time_us values go backwards as Jetstream's do.
        rng = self.rng
        self.t += int(rng.expovariate(1 / self.gap)) + 1
        delay = rng.randrange(1, 32_000) if rng.random() < 0.25 else 0
        return self.t - delay

    def _text(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randrange(3, 25)))

    def _cid(self, record: dict[str, Any]) -> str:
        if self.real_cids:
            return record_cid(record)
        return fake_cid(repr(sorted(record.items())).encode())

    def _created_at(self, t: int) -> str:
        from runtime.contract.timeparse import us_to_iso  # noqa: PLC0415

        return us_to_iso(t)[:-4] + "Z"  # millisecond precision, as clients write it

    def _blob(self, mime: str) -> dict[str, Any]:
        return {"$type": "blob", "ref": {"$link": fake_cid(self.rng.randbytes(8), 0x55)},
                "mimeType": mime, "size": self.rng.randrange(10_000, 900_000)}

    def post(self, did: str, t: int) -> dict[str, Any]:
        """A post record (sometimes a reply, quote, with images, link card, facets)."""
        rng = self.rng
        text = self._text()
        rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": text, "createdAt": self._created_at(t)}
        if rng.random() < 0.8:
            rec["langs"] = [rng.choice(LANGS)]
        roll = rng.random()
        if self._posts and roll < 0.3:
            root = rng.choice(self._posts)
            parent = rng.choice(self._posts)
            rec["reply"] = {"root": {"uri": root[0], "cid": root[1]}, "parent": {"uri": parent[0], "cid": parent[1]}}
        if roll > 0.6:
            kind = rng.random()
            if kind < 0.4:
                rec["embed"] = {"$type": "app.bsky.embed.images", "images": [
                    {"alt": self._text()[:40], "image": self._blob("image/jpeg"),
                     "aspectRatio": {"width": 1200, "height": 800}} for _ in range(rng.randrange(1, 4))]}
            elif kind < 0.6 and self._posts:
                q = rng.choice(self._posts)
                rec["embed"] = {"$type": "app.bsky.embed.record", "record": {"uri": q[0], "cid": q[1]}}
            elif kind < 0.7 and self._posts:
                q = rng.choice(self._posts)
                rec["embed"] = {"$type": "app.bsky.embed.recordWithMedia",
                                "record": {"$type": "app.bsky.embed.record", "record": {"uri": q[0], "cid": q[1]}},
                                "media": {"$type": "app.bsky.embed.images",
                                          "images": [{"alt": "", "image": self._blob("image/png")}]}}
            elif kind < 0.8:
                rec["embed"] = {"$type": "app.bsky.embed.video", "video": self._blob("video/mp4")}
            else:
                rec["embed"] = {"$type": "app.bsky.embed.external", "external": {
                    "uri": f"https://example.com/{rng.randrange(10**6)}", "title": self._text()[:30],
                    "description": self._text()}}
        if rng.random() < 0.2:
            target = rng.choice(self.accounts)
            mention = f"@{target.handle}"
            start = len(text.encode()) + 1
            rec["text"] = f"{text} {mention}"
            rec["facets"] = [{"index": {"byteStart": start, "byteEnd": start + len(mention.encode())},
                              "features": [{"$type": "app.bsky.richtext.facet#mention", "did": target.did}]}]
        elif rng.random() < 0.1:
            rec["facets"] = [{"index": {"byteStart": 0, "byteEnd": 3},
                              "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": rng.choice(WORDS)}]}]
        if rng.random() < 0.02:
            rec["labels"] = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "nudity"}]}
        return rec

    def record(self, collection: str, did: str, t: int) -> dict[str, Any]:
        """A record of ``collection`` by ``did`` at event time ``t``."""
        rng = self.rng
        created = self._created_at(t)
        if collection == "app.bsky.feed.post":
            return self.post(did, t)
        if collection in ("app.bsky.feed.like", "app.bsky.feed.repost"):
            if self._posts:
                uri, cid = rng.choice(self._posts)
            else:
                other = rng.choice(self.accounts).did
                uri, cid = f"at://{other}/app.bsky.feed.post/{make_tid(t - 10**9)}", fake_cid(b"p")
            return {"$type": collection, "subject": {"uri": uri, "cid": cid}, "createdAt": created}
        if collection in ("app.bsky.graph.follow", "app.bsky.graph.block"):
            return {"$type": collection, "subject": rng.choice(self.accounts).did, "createdAt": created}
        if collection == "app.bsky.actor.profile":
            rec: dict[str, Any] = {"$type": collection, "displayName": self._text()[:30],
                                   "description": self._text(), "createdAt": created}
            if rng.random() < 0.7:
                rec["avatar"] = self._blob("image/jpeg")
            if rng.random() < 0.4:
                rec["banner"] = self._blob("image/jpeg")
            return rec
        if collection == "app.bsky.graph.listitem":
            return {"$type": collection, "subject": rng.choice(self.accounts).did,
                    "list": f"at://{did}/app.bsky.graph.list/{make_tid(t - 10**8)}", "createdAt": created}
        return {"$type": collection, "createdAt": created, "note": self._text(),
                "bytes": {"$bytes": base64.b64encode(rng.randbytes(6)).decode().rstrip("=")}}

    def pick_collection(self) -> str:
        """A collection with the live network's rough mix."""
        r = self.rng.random()
        if r < 0.50:
            return "app.bsky.feed.like"
        if r < 0.62:
            return "app.bsky.feed.post"
        if r < 0.74:
            return "app.bsky.graph.follow"
        if r < 0.84:
            return "app.bsky.feed.repost"
        if r < 0.87:
            return "app.bsky.graph.block"
        if r < 0.90:
            return "app.bsky.actor.profile"
        return self.rng.choice(OTHER_COLLECTIONS)

    def event(self) -> dict[str, Any]:
        """The next Jetstream-shaped event."""
        rng = self.rng
        t = self._time()
        acct = rng.choice(self.accounts)
        did = acct.did
        self._seq += 1
        roll = rng.random()
        if roll < 0.005:
            return {"did": did, "time_us": t, "kind": "identity",
                    "identity": {"did": did, "handle": acct.handle, "seq": self._seq,
                                 "time": self._created_at(t)}}
        if roll < 0.01:
            active = rng.random() < 0.7
            account: dict[str, Any] = {"active": active, "did": did, "seq": self._seq, "time": self._created_at(t)}
            if not active:
                account["status"] = rng.choice(("deactivated", "takendown", "deleted"))
            return {"did": did, "time_us": t, "kind": "account", "account": account}
        existing = self._records.get(did)
        # A repository's revs only go up: the rev is the commit's true time, not the receive time
        # (``t`` may carry a receive delay).
        rev = make_tid(self.t, self._clock_id)
        if existing and roll < 0.07:
            collection, rkey = existing.pop(rng.randrange(len(existing)))
            return {"did": did, "time_us": t, "kind": "commit",
                    "commit": {"rev": rev, "operation": "delete", "collection": collection, "rkey": rkey}}
        if roll < 0.09:
            collection, rkey, op = "app.bsky.actor.profile", "self", "update"
        else:
            collection = self.pick_collection()
            op = "create"
            rkey = "self" if collection == "app.bsky.actor.profile" else make_tid(t, self._clock_id)
        record = self.record(collection, did, t)
        cid = self._cid(record)
        if collection == "app.bsky.feed.post":
            self._posts.append((f"at://{did}/{collection}/{rkey}", cid))
            if len(self._posts) > 500:
                self._posts.pop(0)
        if rkey != "self":
            self._records.setdefault(did, []).append((collection, rkey))
        return {"did": did, "time_us": t, "kind": "commit",
                "commit": {"rev": rev, "operation": op, "collection": collection, "rkey": rkey,
                           "record": record, "cid": cid}}

    def resync(self, did: str, keep: int) -> tuple[str, list[tuple[str, str, dict[str, Any]]]]:
        """A repository replaced (Sync 1.1 ``#sync``): its rev and the records it still holds.

        The repository keeps at most ``keep`` of its records (each with fresh content, as the
        authoritative copy may differ from what was streamed); the others are gone and never touched
        again. The rev is newer than every rev issued so far and older than every later one.
        """
        self.t += 1
        rev = make_tid(self.t, self._clock_id)
        existing = self._records.get(did, [])
        self.rng.shuffle(existing)
        kept = existing[:keep]
        self._records[did] = list(kept)
        return rev, [(collection, rkey, self.record(collection, did, self.t)) for collection, rkey in kept]

    def events(self, n: int) -> Iterator[dict[str, Any]]:
        """``n`` events."""
        for _ in range(n):
            yield self.event()
