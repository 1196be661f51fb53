"""BLAKE2b of event keys: de-duplication identities and checkpointed fingerprints.

The producers hash one key per event; the native module (``_keyhash.c``) does it without the
objects hashlib makes per call. Without it (no C compiler at install) hashlib does the same. Both
give hashlib's ``blake2b(key.encode(), digest_size=size)``: the tests compare them.
"""

from __future__ import annotations

import hashlib
from typing import Any


def _load() -> Any:
    try:
        import runtime.contract._keyhash as _keyhash  # noqa: PLC0415, PLR0402 - mypy skips this form of a C module
    except ImportError:  # pragma: no cover - built by every install that has a C compiler
        return None
    return _keyhash


#: The native module, or None when it is not built (tests set it to None to compare).
NATIVE: Any = _load()


def key_digest(key: str, size: int) -> bytes:
    """The ``size``-byte BLAKE2b digest of ``key``'s UTF-8.

    Raises:
        UnicodeEncodeError: ``key`` holds a lone surrogate.
    """
    if NATIVE is not None:
        digest: bytes = NATIVE.digest(key, size)
        return digest
    return hashlib.blake2b(key.encode(), digest_size=size).digest()


def key_hash64(key: str) -> int:
    """The 8-byte BLAKE2b digest of ``key``'s UTF-8, as an int (little-endian).

    Raises:
        UnicodeEncodeError: ``key`` holds a lone surrogate.
    """
    if NATIVE is not None:
        value: int = NATIVE.hash64(key)
        return value
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
