"""Errors raised by the pure AT Protocol primitives in :mod:`runtime.atproto`.

Every error is a :class:`ValueError` (the input bytes or values are wrong) and carries a ``reason``
that names the matching drop reason of :data:`runtime.errors.DROP_REASONS`, so a caller can turn it
into a dead-letter entry without a lookup table::

    AtprotoFormatError (ValueError)      root; reason "malformed_cbor" unless a subclass says otherwise
    ├── CIDError                         a CID that does not parse (bad varint, version, digest length)
    ├── CBORError                        bytes that are not strict DAG-CBOR, or a value that cannot be encoded
    ├── CarError                         a CAR that is truncated, has a bad header or exceeds a size cap
    │   ├── CarTooLargeError             over the caller's cap on bytes or blocks (reason "oversize")
    │   └── BlockMismatchError           a block whose bytes do not hash to its CID
    ├── MissingBlockError                a block needed to go on is absent (partial CAR / store)
    ├── MSTError                         an MST node that breaks the repository spec (order, depth, shape)
    │   └── InversionError               a commit's ops do not invert against its MST (Sync 1.1)
    ├── TIDError                         a string that is not a valid TID
    ├── KeyFormatError                   a did:key / multikey / private key that does not parse
    ├── SignatureError                   a signature that does not verify (or is not 64 compact bytes)
    ├── CommitFormatError                a commit block without the repo v3 commit shape
    └── IdentityError                    a DID document without the expected shape
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AtprotoFormatError",
    "BlockMismatchError",
    "CBORError",
    "CIDError",
    "CarError",
    "CarTooLargeError",
    "CommitFormatError",
    "IdentityError",
    "InversionError",
    "KeyFormatError",
    "MSTError",
    "MissingBlockError",
    "SignatureError",
    "TIDError",
]


class AtprotoFormatError(ValueError):
    """Root of every error of :mod:`runtime.atproto`: the input is not valid AT Protocol data."""

    #: The drop reason (one of ``runtime.errors.DROP_REASONS``) this error maps to.
    reason: ClassVar[str] = "malformed_cbor"


class CIDError(AtprotoFormatError):
    """A CID (binary or string) that does not parse, or of a kind this package does not accept."""

    reason: ClassVar[str] = "bad_cid"


class CBORError(AtprotoFormatError):
    """Bytes that are not strict DAG-CBOR, or a Python value that has no DAG-CBOR encoding."""

    reason: ClassVar[str] = "malformed_cbor"


class CarError(AtprotoFormatError):
    """A CAR file that is truncated, malformed, or larger than the caller's cap."""

    reason: ClassVar[str] = "malformed_car"


class CarTooLargeError(CarError):
    """A CAR over the caller's cap on bytes or blocks: a hostile or runaway size, not a transit error."""

    reason: ClassVar[str] = "oversize"


class BlockMismatchError(CarError):
    """A block whose bytes do not hash to the CID it is stored under."""

    reason: ClassVar[str] = "bad_cid"


class MissingBlockError(AtprotoFormatError):
    """A block needed to go on (an MST node, a record, a commit) is not in the block store.

    Attributes:
        cid: the CID of the missing block.
    """

    reason: ClassVar[str] = "missing_block"

    def __init__(self, cid: object, context: str = "") -> None:
        detail = f"missing block {cid}"
        if context:
            detail = f"{detail} ({context})"
        super().__init__(detail)
        self.cid = cid


class MSTError(AtprotoFormatError):
    """An MST node or tree that breaks the repository spec, or a mutation that cannot apply."""

    reason: ClassVar[str] = "bad_mst_proof"


class InversionError(MSTError):
    """A commit's ops are inconsistent with its MST (Sync 1.1 operation inversion failed)."""

    reason: ClassVar[str] = "bad_mst_proof"


class TIDError(AtprotoFormatError):
    """A string that is not a valid timestamp identifier (TID)."""

    reason: ClassVar[str] = "invalid_record"


class KeyFormatError(AtprotoFormatError):
    """A did:key, multikey or key seed that does not parse or names an unsupported curve."""

    reason: ClassVar[str] = "bad_signature"


class SignatureError(AtprotoFormatError):
    """A signature that does not verify against the given key."""

    reason: ClassVar[str] = "bad_signature"


class CommitFormatError(AtprotoFormatError):
    """A block that does not have the shape of a signed repo v3 commit."""

    reason: ClassVar[str] = "malformed_cbor"


class IdentityError(AtprotoFormatError):
    """A DID document that does not have the shape the atproto identity spec requires."""

    reason: ClassVar[str] = "invalid_record"
