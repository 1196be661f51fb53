"""The native fast path of repository decoding and commit verification, when it was built (``_fastrepo.c``).

The extension is optional (``pip install`` builds it where a C compiler and OpenSSL's headers are
present). Callers read :data:`NATIVE` at call time and run the pure-Python reference path when it is
``None`` or when a native function returns ``None`` ("not the canonical case: use the Python path").
Tests set :data:`NATIVE` to ``None`` to run both paths on the same input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["NATIVE", "Native"]


class Native(Protocol):
    """The functions of ``_fastrepo`` (``runtime/atproto/_fastrepo.c``; its header describes each)."""

    def car_index(self, data: bytes, verify: bool, max_blocks: int, /) -> tuple[bytes, dict[bytes, bytes]] | None:
        """``(header bytes, {binary CID: block})``, or None."""

    def mst_walk(self, root: bytes, lookup: dict[bytes, bytes] | Callable[[bytes], bytes | None], verify: bool,
                 max_layer: int, limit: int, /) -> list[tuple[str, bytes]] | int | None:
        """Every ``(key, binary CID)`` in key order (or their count past ``limit``), or None."""

    def record_form(self, block: bytes, cid: bytes, max_depth: int,
                    /) -> tuple[str, dict[str, object], bytes | None] | bool | None:
        """``(CID string, JSON form, its orjson text or None)``; False when the block does not match
        ``cid``; or None."""

    def payload_form(self, block: bytes, max_depth: int, /) -> tuple[str, dict[str, object], bytes | None] | None:
        """:meth:`record_form` of ``block`` under its own CID (CIDv1, dag-cbor, sha2-256), hashed once;
        or None."""

    def split_column(self, data: bytes, lengths_at: int, n: int, width: int, values_at: int, text: bool,
                     /) -> tuple[list[str] | list[bytes], int] | None:
        """One variable-length column of a Jetstream v2 block (``n`` little-endian lengths of
        ``width`` bytes at ``lengths_at``, the values from ``values_at``): the values (UTF-8 strings
        when ``text``) and the offset past them, or None."""

    def cid_str(self, cid: bytes, /) -> str | None:
        """The base32 string of a binary CID, or None."""

    def mst_invert(self, root: bytes, lookup: dict[bytes, bytes],
                   ops: list[tuple[str, str, bytes | None, bytes | None]], verify: bool, /) -> bytes | None:
        """The binary root CID that undoing ``(action, path, cid, prev)`` ops on the tree gives, or None."""

    def commit_event(self, blocks: bytes, commit: bytes, ops: list[object], invert: bool,
                     /) -> tuple[str, str, bytes, bytes, bytes | None] | None:
        """A ``#commit``'s slice checked: ``(did, rev, unsigned commit bytes, sig, inverted root or None)``,
        or None."""

    def ecdsa_verify_batch(self, verify: int, parse: int, ctx: int, items: list[tuple[bytes, bytes, bytes]],
                           /) -> list[bool]:
        """secp256k1 signatures ``(parsed key, compact sig, data)`` checked without the GIL (True: valid)."""


def _load() -> Native | None:
    try:
        import runtime.atproto._fastrepo as _fastrepo  # noqa: PLC0415, PLR0402 - mypy skips this form of a C module
    except ImportError:  # pragma: no cover - built by every install that has a C compiler
        return None
    module: Native = _fastrepo
    return module


#: The native module, or None when it is not built (or a test turned it off).
NATIVE: Native | None = _load()
