"""Input mutation for the fuzz targets: byte-level, and structure-aware (values swapped inside JSON and
DAG-CBOR inputs, the type confusions decoders of untrusted data miss).

The pytest smoke run drives the targets with :class:`Mutator` over a seeded RNG (deterministic, no
libFuzzer); the ``python -m tests.fuzz`` command hands :meth:`Mutator.structured` to atheris as part
of its custom mutator, next to libFuzzer's own coverage-guided byte mutations.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, Final

import libipld
import orjson

from runtime.atproto import dagcbor
from runtime.atproto.cid import CID
from runtime.atproto.errors import AtprotoFormatError

log = logging.getLogger(__name__)

_INTERESTING: Final = (0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x3F, 0x40, 0x5F, 0x60, 0x7F, 0x80, 0x9F,
                       0xA0, 0xBF, 0xC3, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFF)
_TOKENS: Final = (b"null", b"true", b"[", b"{", b"}", b"]", b'"', b"\\u0000", b"\\ud800", b"1e999", b"-0",
                  b"18446744073709551616", b"9223372036854775807", b"\xd8\x2a", b"\x58\x25\x00\x01\x71\x12\x20",
                  b"\xc3\x01", b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", b"\xbf", b"\xff")
_INTS: Final = (0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1)
_STRINGS: Final = ("", "did:plc:x", "at://did:plc:x/app.bsky.feed.post/3k", "app.bsky.feed.post", "self", "#commit",
                   "#identity", "#account", "#sync", "#info", "create", "update", "delete", "2024-01-01T00:00:00Z",
                   "\x00", "\ud7ff", "a" * 300, "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
                   "app.bsky.embed.images", "app.bsky.richtext.facet#mention", "../..", "a b", "Multikey",
                   "#atproto", "#atproto_pds", "AtprotoPersonalDataServer")


class Mutator:
    """Deterministic mutations from a seeded RNG.

    Args:
        rng: the random source (seeded: the same inputs every run).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # ------------------------------------------------------------------ bytes

    def bytes_(self, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
        """One to four byte-level edits of ``data`` (splices take from ``corpus``)."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(9)
            n = len(out)
            if op == 0 and n:
                i = rng.randrange(n)
                out[i] ^= 1 << rng.randrange(8)
            elif op == 1 and n:
                out[rng.randrange(n)] = rng.choice(_INTERESTING)
            elif op == 2:
                i = rng.randint(0, n)
                out[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 3 and n:
                i = rng.randrange(n)
                del out[i:i + rng.randint(1, 16)]
            elif op == 4 and n:
                del out[rng.randint(0, n):]
            elif op == 5 and n:
                i = rng.randrange(n)
                j = min(n, i + rng.randint(1, 64))
                k = rng.randint(0, n)
                out[k:k] = out[i:j]
            elif op == 6 and corpus:
                other = rng.choice(corpus)
                if other:
                    i = rng.randrange(len(other))
                    k = rng.randint(0, n)
                    out[k:] = other[i:]
            elif op == 7:
                i = rng.randint(0, n)
                out[i:i] = rng.choice(_TOKENS)
            elif op == 8 and n >= 8:
                i = rng.randrange(n - 7)
                width = rng.choice((1, 2, 4, 8))
                out[i:i + width] = (rng.choice(_INTS) % (1 << (8 * width))).to_bytes(width, rng.choice(("big",
                                                                                                      "little")))
        return bytes(out[:max_len])

    # ------------------------------------------------------------------ values

    def value(self, depth: int = 0) -> Any:
        """A random JSON / DAG-CBOR value (CIDs and bytes are turned into JSON-safe forms by the caller)."""
        rng = self.rng
        kind = rng.randrange(10 if depth < 3 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice(_INTS)
        if kind == 3:
            return rng.choice((0.5, -1e300, 1e-300, 3.0))
        if kind in (4, 5):
            return rng.choice(_STRINGS)
        if kind == 6:
            return rng.randbytes(rng.choice((0, 1, 32, 36)))
        if kind == 7:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 3))]
        if kind == 8:
            return {rng.choice(_STRINGS[:12]): self.value(depth + 1) for _ in range(rng.randint(0, 3))}
        nested: Any = rng.choice(([], {}))
        for _ in range(rng.choice((40, 70, 300))):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        return nested

    def tree(self, obj: Any) -> Any:
        """``obj`` with one value somewhere inside replaced, removed, or added."""
        rng = self.rng
        if not isinstance(obj, (dict, list)) or not obj or rng.random() < 0.15:
            return self.value()
        if isinstance(obj, dict):
            out = dict(obj)
            key = rng.choice(list(out))
            roll = rng.random()
            if roll < 0.15:
                del out[key]
            elif roll < 0.25:
                out[rng.choice(_STRINGS[:12])] = self.value()
            else:
                out[key] = self.tree(out[key])
            return out
        items = list(obj)
        i = rng.randrange(len(items))
        roll = rng.random()
        if roll < 0.15:
            del items[i]
        elif roll < 0.25:
            items.insert(i, self.value())
        else:
            items[i] = self.tree(items[i])
        return items

    def structured(self, data: bytes, structure: str | None) -> bytes | None:
        """A structure-aware mutation of ``data`` (``json``, ``cbor`` or ``frame``), or None when the
        input does not parse as that structure (then only byte mutations apply)."""
        if structure is None:
            return None
        codec = _CODECS.get(structure)
        if codec is None:
            return None
        parse, dump = codec
        try:
            parts = parse(data)
        except (ValueError, TypeError, RecursionError, OverflowError, AtprotoFormatError):
            return None
        i = self.rng.randrange(len(parts))
        parts[i] = self.tree(parts[i])
        try:
            return b"".join(dump(p) for p in parts)
        except (ValueError, TypeError, RecursionError, OverflowError, AtprotoFormatError, orjson.JSONEncodeError):
            return None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bytes, CID)):
        return {"$bytes": "AAEC"}
    if isinstance(obj, int) and not -(2**63) <= obj < 2**64:
        return 0
    return obj


def _parse_json(data: bytes) -> list[Any]:
    return [orjson.loads(data)]


def _dump_json(obj: Any) -> bytes:
    return orjson.dumps(_json_safe(obj))


def _parse_cbor(data: bytes) -> list[Any]:
    return [dagcbor.decode(data, strict=False)]


def _dump_cbor(obj: Any) -> bytes:
    return dagcbor.encode(obj)


def _parse_frame(data: bytes) -> list[Any]:
    header = libipld.decode_dag_cbor_multi(data)[0]
    cut = len(libipld.encode_dag_cbor(header))
    return [header, dagcbor.decode(data[cut:], strict=False)]


_CODECS: Final[dict[str, tuple[Callable[[bytes], list[Any]], Callable[[Any], bytes]]]] = {
    "json": (_parse_json, _dump_json),
    "cbor": (_parse_cbor, _dump_cbor),
    "frame": (_parse_frame, _dump_cbor),
}
