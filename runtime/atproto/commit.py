"""Signed repository commits (repo format v3): parse, sign, verify.

A commit is the DAG-CBOR map ``{did, version: 3, data: link (MST root), rev: TID, prev: link|null,
sig: bytes}``. The signature covers the DAG-CBOR encoding of the same map without ``sig``; the
commit's CID is that of the signed block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import libipld

from runtime.atproto.cid import CID
from runtime.atproto.crypto import KeyPair, verify_signature
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import AtprotoFormatError, CommitFormatError, SignatureError
from runtime.atproto.tid import is_valid_tid

__all__ = [
    "REPO_VERSION",
    "Commit",
    "UnsignedCommit",
    "parse_commit",
    "sign_commit",
    "verify_commit",
]

#: The repository format version this module reads and writes.
REPO_VERSION: Final = 3
_FIELDS: Final = frozenset(("did", "version", "data", "rev", "prev", "sig"))


@dataclass(frozen=True, slots=True)
class UnsignedCommit:
    """The commit fields that the signature covers."""

    did: str
    data: CID
    rev: str
    prev: CID | None = None
    version: int = REPO_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The unsigned commit as a map ready for :func:`runtime.atproto.dagcbor.encode`."""
        return {
            "did": self.did,
            "version": self.version,
            "data": self.data,
            "rev": self.rev,
            "prev": self.prev,
        }

    def signing_bytes(self) -> bytes:
        """The DAG-CBOR bytes that are hashed and signed."""
        return encode(self.to_dict())


@dataclass(frozen=True, slots=True)
class Commit:
    """A parsed signed commit."""

    did: str
    version: int
    data: CID
    rev: str
    prev: CID | None
    sig: bytes

    def unsigned(self) -> UnsignedCommit:
        """The fields the signature covers."""
        return UnsignedCommit(
            did=self.did, data=self.data, rev=self.rev, prev=self.prev, version=self.version
        )

    def to_block(self) -> bytes:
        """The signed commit's DAG-CBOR block."""
        body = self.unsigned().to_dict()
        body["sig"] = self.sig
        return encode(body)


def sign_commit(unsigned: UnsignedCommit, key: KeyPair) -> tuple[CID, bytes]:
    """Sign a commit.

    Returns:
        ``(commit CID, signed commit block)``.

    Raises:
        CommitFormatError: the fields are not a valid v3 commit (bad rev, did or version).
    """
    _check_fields(unsigned.did, unsigned.version, unsigned.rev)
    commit = Commit(
        did=unsigned.did,
        version=unsigned.version,
        data=unsigned.data,
        rev=unsigned.rev,
        prev=unsigned.prev,
        sig=key.sign(unsigned.signing_bytes()),
    )
    block = commit.to_block()
    return CID.for_dag_cbor(block), block


def _check_fields(did: Any, version: Any, rev: Any) -> None:
    if type(did) is not str or not did.startswith("did:"):
        raise CommitFormatError(f"commit did {did!r} is not a DID")
    if version != REPO_VERSION or type(version) is not int:
        raise CommitFormatError(f"unsupported repo version {version!r} (only {REPO_VERSION})")
    if type(rev) is not str or not is_valid_tid(rev):
        raise CommitFormatError(f"commit rev {rev!r} is not a TID")


def _link(value: Any, what: str) -> CID:
    if type(value) is not bytes:
        raise CommitFormatError(f"commit {what} is not a link")
    try:
        return CID.from_bytes(value)
    except AtprotoFormatError as e:
        raise CommitFormatError(f"commit {what} is not a CID: {e}") from e


def parse_commit(block: bytes) -> Commit:
    """Parse a signed commit block.

    The block must be exactly the canonical encoding of the parsed fields, which also proves
    ``data``/``prev`` are links and ``sig`` is a byte string (libipld alone cannot tell them apart).

    Raises:
        CommitFormatError: not DAG-CBOR, missing or extra fields, wrong types, not version 3, a
            ``rev`` that is not a TID, or a non-canonical encoding.
    """
    try:
        raw = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError, TypeError) as e:
        raise CommitFormatError(f"commit is not DAG-CBOR: {e}") from e
    if type(raw) is not dict:
        raise CommitFormatError("commit is not a map")
    if set(raw) != _FIELDS:
        raise CommitFormatError(f"commit fields are {sorted(raw)}, expected {sorted(_FIELDS)}")
    _check_fields(raw["did"], raw["version"], raw["rev"])
    sig = raw["sig"]
    if type(sig) is not bytes:
        raise CommitFormatError("commit sig is not bytes")
    prev = raw["prev"]
    commit = Commit(
        did=raw["did"],
        version=raw["version"],
        data=_link(raw["data"], "data"),
        rev=raw["rev"],
        prev=None if prev is None else _link(prev, "prev"),
        sig=sig,
    )
    if commit.to_block() != block:
        raise CommitFormatError("commit block is not the canonical encoding of its fields")
    return commit


def verify_commit(block: bytes, did_key: str, *, expected_did: str | None = None) -> Commit:
    """Parse a commit block and check its signature against the account's signing key.

    Args:
        block: the signed commit block.
        did_key: the account's ``#atproto`` signing key as ``did:key:...``.
        expected_did: if given, the commit's ``did`` must equal it.

    Returns:
        The parsed commit.

    Raises:
        CommitFormatError: see :func:`parse_commit`, or the did differs from ``expected_did``.
        SignatureError: the signature does not verify.
        KeyFormatError: ``did_key`` does not parse.
    """
    commit = parse_commit(block)
    if expected_did is not None and commit.did != expected_did:
        raise CommitFormatError(f"commit is for {commit.did}, expected {expected_did}")
    if not verify_signature(did_key, commit.unsigned().signing_bytes(), commit.sig):
        raise SignatureError(f"commit signature of {commit.did} rev {commit.rev} does not verify")
    return commit
