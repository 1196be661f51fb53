"""Signing keys of the two atproto curves (P-256, secp256k1): did:key encoding, signing, verifying.

atproto signatures are ECDSA over SHA-256 in 64-byte compact ``r || s`` form with a low ``s``
(cryptography spec: high-S signatures must be rejected). :func:`parse_did_key` uses
``atproto_crypto`` (the atproto SDK); key generation takes an injected seed or ``random.Random`` so
simulators and tests are deterministic, and signing is deterministic too (RFC 6979).

Verifying goes through a verifier object per did:key, made once and kept in a bounded LRU cache
(:data:`VERIFIER_CACHE_SIZE` keys; a rotated key is another did:key string, so the cache never
serves a stale key). secp256k1, the curve of nearly every atproto account, is verified with
libsecp256k1 (the ``coincurve`` binding): about 15 times faster than OpenSSL's generic curve code.
P-256 (and secp256k1 when ``coincurve`` is not installed) is verified by OpenSSL through
``cryptography``. Both check the same thing; the tests run both on the same signatures.

:func:`verify_batch` verifies many secp256k1 signatures in one call of the native extension
(``_fastrepo.ecdsa_verify_batch``: the same libsecp256k1 functions, reached through coincurve's
library) that runs without the GIL, so a thread can verify one batch while the interpreter decodes
the next. Like every native path it only accepts: a False is decided again by :func:`verify_signature`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from functools import lru_cache
from typing import Final, Literal

import libipld
from atproto_crypto.consts import (
    P256_CURVE_ORDER,
    P256_JWT_ALG,
    SECP256K1_CURVE_ORDER,
    SECP256K1_JWT_ALG,
)
from atproto_crypto.did import format_did_key, format_multikey
from atproto_crypto.did import parse_did_key as _sdk_parse_did_key
from atproto_crypto.exceptions import DidKeyError, InvalidCompressedPubkeyError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

try:
    import coincurve

    _HAVE_COINCURVE = True
except ImportError:  # pragma: no cover - a declared dependency; OpenSSL verifies secp256k1 without it
    _HAVE_COINCURVE = False

from runtime.atproto import native
from runtime.atproto.errors import KeyFormatError

__all__ = [
    "SIGNATURE_LEN",
    "VERIFIER_CACHE_SIZE",
    "Curve",
    "KeyPair",
    "Verifier",
    "batch_key",
    "clear_verifier_cache",
    "did_key_curve",
    "low_s",
    "parse_did_key",
    "signature_verifier",
    "verify_batch",
    "verify_batch_available",
    "verify_signature",
]

Curve = Literal["p256", "k256"]

#: Length of a compact ``r || s`` signature.
SIGNATURE_LEN: Final = 64

_ORDER: Final[dict[str, int]] = {"p256": P256_CURVE_ORDER, "k256": SECP256K1_CURVE_ORDER}
_JWT_ALG: Final[dict[str, str]] = {"p256": P256_JWT_ALG, "k256": SECP256K1_JWT_ALG}
_CURVE_BY_ALG: Final[dict[str, Curve]] = {P256_JWT_ALG: "p256", SECP256K1_JWT_ALG: "k256"}


def _order(curve: Curve) -> int:
    order = _ORDER.get(curve)
    if order is None:
        raise KeyFormatError(f"unsupported curve {curve!r} (p256 or k256)")
    return order


def _ec_curve(curve: Curve) -> ec.EllipticCurve:
    if curve == "p256":
        return ec.SECP256R1()
    if curve == "k256":
        return ec.SECP256K1()
    raise KeyFormatError(f"unsupported curve {curve!r} (p256 or k256)")


def low_s(curve: Curve, r: int, s: int) -> bytes:
    """The compact 64-byte signature for ``(r, s)`` with ``s`` folded into the low half."""
    order = _order(curve)
    if s > order // 2:
        s = order - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class KeyPair:
    """A private signing key of one curve, with its did:key and compact low-S signing."""

    __slots__ = ("_key", "curve")

    def __init__(self, curve: Curve, private_key: ec.EllipticCurvePrivateKey) -> None:
        """Wrap a ``cryptography`` private key of the matching curve (see the constructors below)."""
        expected = type(_ec_curve(curve))
        if not isinstance(private_key.curve, expected):
            raise KeyFormatError(f"private key is on {private_key.curve.name}, not {curve}")
        self.curve: Curve = curve
        self._key = private_key

    @classmethod
    def from_private_bytes(cls, curve: Curve, secret: bytes) -> KeyPair:
        """Load a 32-byte big-endian private scalar. Raises :class:`KeyFormatError`."""
        if len(secret) != 32:
            raise KeyFormatError(f"private key must be 32 bytes, got {len(secret)}")
        scalar = int.from_bytes(secret, "big")
        if not 0 < scalar < _order(curve):
            raise KeyFormatError("private scalar out of range")
        return cls(curve, ec.derive_private_key(scalar, _ec_curve(curve)))

    @classmethod
    def generate(cls, curve: Curve, rng: random.Random | bytes) -> KeyPair:
        """Derive a key from an injected source: a ``random.Random`` or seed bytes (deterministic).

        Production callers pass ``random.SystemRandom()`` or ``os.urandom(32)``.
        """
        order = _order(curve)
        seed = rng.randbytes(32) if isinstance(rng, random.Random) else bytes(rng)
        if not seed:
            raise KeyFormatError("empty key seed")
        digest = hashlib.sha256(b"atproto-backfill key seed\x00" + curve.encode() + b"\x00" + seed).digest()
        scalar = int.from_bytes(digest, "big") % (order - 1) + 1
        return cls(curve, ec.derive_private_key(scalar, _ec_curve(curve)))

    def private_bytes(self) -> bytes:
        """The 32-byte big-endian private scalar."""
        return self._key.private_numbers().private_value.to_bytes(32, "big")

    def public_key_bytes(self) -> bytes:
        """The 33-byte compressed public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )

    def multikey(self) -> str:
        """The public key as atproto ``publicKeyMultibase`` (``z`` + base58btc of codec + key)."""
        result: str = format_multikey(_JWT_ALG[self.curve], self.public_key_bytes())
        return result

    def did_key(self) -> str:
        """The public key as ``did:key:z...``."""
        result: str = format_did_key(_JWT_ALG[self.curve], self.public_key_bytes())
        return result

    def sign(self, data: bytes) -> bytes:
        """Sign ``sha256(data)``: a deterministic (RFC 6979), low-S, 64-byte ``r || s`` signature."""
        der = self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return low_s(self.curve, r, s)

    def __repr__(self) -> str:
        return f"KeyPair({self.curve}, {self.did_key()})"


@lru_cache(maxsize=4096)
def parse_did_key(did_key: str) -> tuple[Curve, bytes]:
    """Parse a ``did:key`` into ``(curve, uncompressed public key bytes)``.

    Raises:
        KeyFormatError: not a did:key, an unsupported key type, or not a point on the curve.
    """
    if type(did_key) is not str:
        raise KeyFormatError("did:key must be a string")
    try:
        parsed = _sdk_parse_did_key(did_key)
    except (DidKeyError, InvalidCompressedPubkeyError, ValueError) as e:
        raise KeyFormatError(f"bad did:key {did_key[:80]!r}: {e}") from e
    curve = _CURVE_BY_ALG.get(parsed.jwt_alg)
    if curve is None:  # pragma: no cover - the SDK only returns the two algs above
        raise KeyFormatError(f"unsupported key algorithm {parsed.jwt_alg}")
    return curve, bytes(parsed.key_bytes)


def did_key_curve(did_key: str) -> Curve:
    """The curve of a did:key. Raises :class:`KeyFormatError`."""
    return parse_did_key(did_key)[0]


#: Verifiers kept (about 500 bytes each): every account seen lately, whatever the input.
VERIFIER_CACHE_SIZE: Final = 100_000
#: Whether secp256k1 goes through libsecp256k1 (tests turn it off to run the OpenSSL path too).
LIBSECP256K1: bool = _HAVE_COINCURVE

_DID_KEY_PREFIX: Final = "did:key:z"
_CURVE_BY_CODEC: Final[dict[bytes, Curve]] = {b"\xe7\x01": "k256", b"\x80\x24": "p256"}
_HALF_ORDER: Final[dict[str, bytes]] = {c: (o // 2).to_bytes(32, "big") for c, o in _ORDER.items()}
_K256_HALF_ORDER: Final = _HALF_ORDER["k256"]
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

#: ``verifier(data, signature) -> bool`` for one public key; the signature is 64 bytes ``r || s``.
Verifier = Callable[[bytes, bytes], bool]


def _der_int(b: bytes) -> bytes:
    b = b.lstrip(b"\x00") or b"\x00"
    if b[0] & 0x80:
        b = b"\x00" + b
    return b"\x02" + bytes((len(b),)) + b


def _der(signature: bytes) -> bytes:
    """The DER form of a 64-byte ``r || s`` (always short enough for a one-byte length)."""
    body = _der_int(signature[:32]) + _der_int(signature[32:])
    return b"\x30" + bytes((len(body),)) + body


class _Secp256k1Verifier:
    """secp256k1 through libsecp256k1 (which refuses high-S signatures itself; checked here too)."""

    __slots__ = ("_internal", "_key")

    def __init__(self, point: bytes) -> None:
        self._key = coincurve.PublicKey(point)
        self._internal: bytes | None = None

    @property
    def internal(self) -> bytes:
        """The key as libsecp256k1 holds it once parsed (64 bytes): what :func:`verify_batch` takes."""
        got = self._internal
        if got is None:
            from coincurve._libsecp256k1 import ffi  # noqa: PLC0415 - only where batches are used

            got = self._internal = bytes(ffi.buffer(self._key.public_key, 64))
        return got

    def __call__(self, data: bytes, signature: bytes) -> bool:
        if signature[32:] > _K256_HALF_ORDER:  # equal-length big-endian: compares as integers
            return False
        ok: bool = self._key.verify(_der(signature), data)
        return ok


class _OpenSSLVerifier:
    """Either curve through OpenSSL (``cryptography``)."""

    __slots__ = ("_half", "_key")

    def __init__(self, curve: Curve, point: bytes) -> None:
        self._key = ec.EllipticCurvePublicKey.from_encoded_point(_ec_curve(curve), point)
        self._half = _HALF_ORDER[curve]

    def __call__(self, data: bytes, signature: bytes) -> bool:
        if signature[32:] > self._half:
            return False
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            self._key.verify(der, data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


def _compressed_point(did_key: str) -> tuple[Curve, bytes]:
    """``(curve, 33-byte compressed point)`` of a did:key, not yet checked to be on the curve.

    The same steps as the SDK's ``parse_did_key`` short of the decompression, which the verifier's
    own library does (and refuses a point off the curve).
    """
    if type(did_key) is not str or not did_key.startswith(_DID_KEY_PREFIX):
        raise KeyFormatError(f"bad did:key {str(did_key)[:80]!r}: not did:key:z...")
    try:
        _, raw = libipld.decode_multibase(did_key[8:])
    except ValueError as e:
        raise KeyFormatError(f"bad did:key {did_key[:80]!r}: {e}") from e
    curve = _CURVE_BY_CODEC.get(raw[:2])
    if curve is None:
        raise KeyFormatError(f"bad did:key {did_key[:80]!r}: unsupported key type")
    point = raw[2:]
    if len(point) != 33:
        raise KeyFormatError(f"bad did:key {did_key[:80]!r}: expected a 33-byte compressed key")
    return curve, point


def signature_verifier(did_key: str, *, libsecp256k1: bool | None = None) -> Verifier:
    """A new verifier for ``did_key`` (uncached; :func:`verify_signature` keeps them in an LRU).

    Args:
        did_key: the public key.
        libsecp256k1: verify secp256k1 with libsecp256k1 (default :data:`LIBSECP256K1`), else OpenSSL.

    Raises:
        KeyFormatError: ``did_key`` does not parse, or its point is not on the curve.
    """
    curve, point = _compressed_point(did_key)
    use_secp = LIBSECP256K1 if libsecp256k1 is None else libsecp256k1
    try:
        if curve == "k256" and use_secp and _HAVE_COINCURVE:
            return _Secp256k1Verifier(point)
        return _OpenSSLVerifier(curve, point)
    except ValueError as e:  # both libraries raise ValueError for a point off the curve
        raise KeyFormatError(f"bad did:key {did_key[:80]!r}: {e}") from e


@lru_cache(maxsize=VERIFIER_CACHE_SIZE)
def _cached_verifier(did_key: str) -> Verifier:
    return signature_verifier(did_key)


def clear_verifier_cache() -> None:
    """Forget every cached verifier (benchmarks measuring a cold start; tests switching backends)."""
    _cached_verifier.cache_clear()


def _batch_addresses() -> tuple[int, int, int] | None:
    """libsecp256k1's verify and compact-parse functions and coincurve's context, as addresses."""
    if not _HAVE_COINCURVE or not LIBSECP256K1:
        return None
    try:
        from coincurve._libsecp256k1 import ffi, lib  # noqa: PLC0415 - coincurve's compiled library
        from coincurve.context import GLOBAL_CONTEXT  # noqa: PLC0415

        return (int(ffi.cast("uintptr_t", ffi.addressof(lib, "secp256k1_ecdsa_verify"))),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "secp256k1_ecdsa_signature_parse_compact"))),
                int(ffi.cast("uintptr_t", GLOBAL_CONTEXT.ctx)))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - another coincurve layout
        return None


_BATCH: Final = _batch_addresses()


def verify_batch_available() -> bool:
    """True when :func:`verify_batch` verifies natively (the extension and coincurve's library are there)."""
    fast = native.NATIVE
    return _BATCH is not None and fast is not None and hasattr(fast, "ecdsa_verify_batch")


def batch_key(did_key: str) -> bytes | None:
    """The parsed form of a secp256k1 ``did_key`` for :func:`verify_batch`; None for a P-256 key, a
    key that does not parse, or when batches are unavailable (verify those with :func:`verify_signature`)."""
    if not verify_batch_available():
        return None
    try:
        verifier = _cached_verifier(did_key)
    except KeyFormatError:
        return None
    return verifier.internal if isinstance(verifier, _Secp256k1Verifier) else None


def verify_batch(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """Verify ``(batch_key, signature, data)`` items in one native call that releases the GIL.

    True: the signature is a valid compact low-S signature of ``sha256(data)`` by the key. False
    means only "not accepted here": decide it with :func:`verify_signature`.

    Raises:
        RuntimeError: batches are unavailable (check :func:`verify_batch_available`).
    """
    fast = native.NATIVE
    if _BATCH is None or fast is None:
        raise RuntimeError("native signature batches are unavailable")
    verify, parse, ctx = _BATCH
    return fast.ecdsa_verify_batch(verify, parse, ctx, items)


def verify_signature(did_key: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid compact low-S signature of ``sha256(data)`` by ``did_key``.

    High-S signatures, DER signatures and wrong lengths are invalid (``False``).

    Raises:
        KeyFormatError: ``did_key`` does not parse.
    """
    verifier = _cached_verifier(did_key)  # a KeyFormatError is raised, not cached
    if type(signature) is not bytes or len(signature) != SIGNATURE_LEN:
        return False
    return verifier(data, signature)
