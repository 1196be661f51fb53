"""``--verify``: check each firehose commit against its author's signing key and its MST proof.

For a ``#commit`` frame (Sync 1.1): the CAR slice parses and every block hashes to its CID; the
commit block is the slice's root, for the frame's ``repo`` and ``rev``; its signature verifies
against the ``#atproto`` key of the author's current DID document; every created/updated record is
in the slice; and undoing the ops on the new tree (operation inversion) yields ``prevData``. The
checks themselves are :func:`runtime.atproto.repo.check_commit_event` (the native fast path where
it applies, :func:`~runtime.atproto.repo.verify_commit_event` for every verdict); this module adds the
identity side: resolving the key (cached by the resolver), dropping the cached document on an
``#identity`` frame, and re-resolving once when a signature fails (the key may have rotated before
the ``#identity`` frame reached us).

Batches (``batch_size`` > 0): :meth:`CommitVerifier.begin` runs every check but the signature on
the interpreter (the native path), and collects the signature into the current batch;
:meth:`CommitVerifier.flush` hands the batch to a thread, which verifies it in one native call
without the GIL (:func:`runtime.atproto.crypto.verify_batch`) while the interpreter decodes the next
frames; :meth:`CommitVerifier.finish` waits for the frame's verdict. A commit the batch does not
accept, a P-256 key, a ``#sync`` and anything off the native path are checked whole, on the
interpreter, exactly as without batches: the batch only ever accepts.

A failure raises :class:`~runtime.errors.DecodeError` whose reason is one of ``bad_signature``,
``bad_mst_proof``, ``missing_block``, ``bad_cid``, ``malformed_car``, ``malformed_cbor``, or the
resolution failure's reason (``repo_unavailable`` for a DID the directory does not know, ...); the
source turns it into a dead letter holding the raw frame.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
import zstandard

from producers.firehose.decode import KIND_COMMIT, KIND_IDENTITY, KIND_SYNC, Decoded
from runtime.atproto.car import read_car
from runtime.atproto.commit import verify_commit
from runtime.atproto.crypto import batch_key, verify_batch, verify_batch_available
from runtime.atproto.errors import AtprotoFormatError, IdentityError, SignatureError
from runtime.atproto.identity import Identity, parse_did_document
from runtime.atproto.repo import check_commit_event, commit_event_signature
from runtime.errors import DecodeError, SourceError

log = logging.getLogger(__name__)


class IdentityResolver(Protocol):
    """Where verification gets an account's current identity (signing key).

    :class:`producers.identity.resolver.DidResolver` (PLC directory and did:web, cached) implements it;
    :class:`DictResolver` serves fixed documents (tests, the simulators' accounts).
    """

    async def resolve(self, did: str) -> Identity:
        """The identity of ``did``.

        Raises:
            SourceError: the DID does not resolve (a ``drop_reason`` attribute, when present, names
                the dead-letter reason).
        """
        ...

    def invalidate(self, did: str) -> None:
        """Forget any cached identity of ``did``."""
        ...


class UnresolvedDidError(SourceError):
    """A DID that a :class:`DictResolver` has no (valid) document for."""

    def __init__(self, did: str, detail: str, drop_reason: str = "repo_unavailable") -> None:
        super().__init__(f"cannot resolve {did}: {detail}")
        self.did = did
        self.drop_reason = drop_reason


class DictResolver:
    """Identities from a mapping of DID -> DID document (JSON form), parsed on first use.

    Args:
        documents: DID -> DID document.
    """

    def __init__(self, documents: Mapping[str, Any]) -> None:
        self._documents = dict(documents)
        self._cache: dict[str, Identity] = {}
        self.invalidations = 0

    @classmethod
    def from_file(cls, path: str | Path) -> DictResolver:
        """Load a JSON object of DID -> document (``.zst`` compressed allowed; the fixtures' shape).

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not JSON.
            TypeError: it does not hold a JSON object.
        """
        p = Path(path)
        data = p.read_bytes()
        if p.suffix == ".zst":
            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                data = reader.read()
        docs = orjson.loads(data)
        if not isinstance(docs, dict):
            raise TypeError(f"{p}: expected a JSON object of DID -> document")
        return cls(docs)

    def set_document(self, did: str, document: Any) -> None:
        """Replace the document of ``did`` (a key rotation in tests); the cache is not touched."""
        self._documents[did] = document

    async def resolve(self, did: str) -> Identity:
        """The parsed identity of ``did``.

        Raises:
            UnresolvedDidError: no document, or one that does not parse.
        """
        hit = self._cache.get(did)
        if hit is not None:
            return hit
        doc = self._documents.get(did)
        if doc is None:
            raise UnresolvedDidError(did, "no DID document")
        try:
            identity = parse_did_document(doc, expected_did=did)
        except IdentityError as e:
            raise UnresolvedDidError(did, f"bad DID document: {e}", "invalid_record") from e
        self._cache[did] = identity
        return identity

    def invalidate(self, did: str) -> None:
        """Forget the parsed identity of ``did``."""
        self.invalidations += 1
        self._cache.pop(did, None)


@dataclass
class VerifyStats:
    """Counters of one verifier (the metrics count drops; these feed the statistics table)."""

    verified: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    key_refreshes: int = 0
    identity_refreshes: int = 0


class _Batch:
    """Signatures collected for one native call, and (once flushed) the call's verdicts."""

    __slots__ = ("items", "result")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes, bytes]] = []
        self.result: asyncio.Future[list[bool]] | None = None


@dataclass(slots=True)
class PendingCheck:
    """One frame's verification, begun by :meth:`CommitVerifier.begin`, ended by :meth:`CommitVerifier.finish`.

    ``batch``/``index``: where its signature waits (None: nothing waits, ``error`` or success is known).
    """

    decoded: Decoded
    error: DecodeError | None = None
    batch: _Batch | None = None
    index: int = 0


#: Signatures per native call when batches are on (``--verify`` in the firehose source).
DEFAULT_BATCH: Final = 64
#: The interpreter's thread switch interval (seconds) while the batch thread exists: the thread
#: needs the GIL for a moment at the start and end of every batch, and the default 5 ms would
#: keep it waiting longer than the batch takes to verify.
SWITCH_INTERVAL: Final = 0.001


class CommitVerifier:
    """Verifies decoded frames; keeps the resolver's cache in step with ``#identity`` frames.

    Args:
        resolver: the identity source.
        invert: also check the Sync 1.1 MST proof (ops invert to ``prevData``).
        batch_size: signatures per native batch verified on a thread (module docstring); 0 = every
            frame checked whole by :meth:`check`. Batches need the native extension and coincurve;
            without them the verifier checks every frame whole.
    """

    def __init__(self, resolver: IdentityResolver, *, invert: bool = True, batch_size: int = 0) -> None:
        self.resolver = resolver
        self.invert = invert
        self.stats = VerifyStats()
        self.batch_size = batch_size if batch_size > 0 and verify_batch_available() else 0
        self._batch = _Batch()
        self._pool: ThreadPoolExecutor | None = None
        self._switch: float | None = None

    @property
    def batching(self) -> bool:
        """True when signatures are verified in batches on a thread."""
        return self.batch_size > 0

    def close(self) -> None:
        """Stop the batch thread (batches already handed to it finish first)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None

    async def begin(self, decoded: Decoded) -> PendingCheck:
        """Start verifying ``decoded``: everything but a batched signature is checked now.

        Never raises a verification failure: :meth:`finish` does, in frame order.
        """
        pending = PendingCheck(decoded)
        if not self.batching or decoded.kind != KIND_COMMIT or decoded.did is None:
            return await self._whole(pending)
        try:
            key = await self._signing_key(decoded.did)
        except DecodeError as e:
            self.stats.failed[e.reason] = self.stats.failed.get(e.reason, 0) + 1
            pending.error = e
            return pending
        signed = commit_event_signature(decoded.frame.body, invert=self.invert)
        parsed = batch_key(key) if signed is not None else None
        if signed is None or parsed is None:
            return await self._whole(pending)  # off the native path, or a P-256 key
        batch = self._batch
        pending.batch, pending.index = batch, len(batch.items)
        batch.items.append((parsed, signed[1], signed[0]))
        if len(batch.items) >= self.batch_size:
            self.flush()
        return pending

    async def _whole(self, pending: PendingCheck) -> PendingCheck:
        """Check the frame whole, now; its verdict waits in ``pending`` for :meth:`finish`."""
        try:
            await self.check(pending.decoded)
        except DecodeError as e:
            pending.error = e
        return pending

    def flush(self) -> None:
        """Hand the current batch to the verifying thread (call it when no more frames are at hand)."""
        batch = self._batch
        if not batch.items:
            return
        self._batch = _Batch()
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        batch.result = asyncio.wrap_future(pool.submit(verify_batch, batch.items))

    async def finish(self, pending: PendingCheck) -> None:
        """The verdict of a begun frame.

        Raises:
            DecodeError: the frame fails verification.
        """
        if pending.error is not None:
            raise pending.error
        batch = pending.batch
        if batch is None:
            return
        if batch.result is None:
            self.flush()
        assert batch.result is not None
        if (await batch.result)[pending.index]:
            self.stats.verified += 1
            return
        await self.check(pending.decoded)  # not accepted by the batch: the whole check decides

    async def _signing_key(self, did: str) -> str:
        try:
            identity = await self.resolver.resolve(did)
        except SourceError as e:
            reason = getattr(e, "drop_reason", "repo_unavailable")
            raise DecodeError(reason if isinstance(reason, str) else "repo_unavailable",
                              f"cannot resolve the signing key of {did}: {e}") from e
        if identity.signing_key is None:
            raise DecodeError("bad_signature", f"the DID document of {did} has no #atproto signing key")
        return identity.signing_key

    async def check(self, decoded: Decoded) -> None:
        """Verify one decoded frame (commits and syncs; an identity frame refreshes the cache).

        Raises:
            DecodeError: the frame fails verification (see the module docstring for the reasons).
        """
        kind = decoded.kind
        if kind == KIND_IDENTITY:
            if decoded.did is not None:
                self.resolver.invalidate(decoded.did)
                self.stats.identity_refreshes += 1
            return
        if kind not in (KIND_COMMIT, KIND_SYNC) or decoded.did is None:
            return
        try:
            await self._check(decoded, decoded.did)
        except DecodeError as e:
            self.stats.failed[e.reason] = self.stats.failed.get(e.reason, 0) + 1
            raise
        self.stats.verified += 1

    async def _check(self, decoded: Decoded, did: str) -> None:
        key = await self._signing_key(did)
        try:
            self._verify(decoded, key)
            return
        except SignatureError as e:
            failure = e
        except AtprotoFormatError as e:
            raise DecodeError(e.reason, f"seq {decoded.seq} of {did}: {e}") from e
        # The key may have rotated before the #identity frame reached us: re-resolve once.
        self.resolver.invalidate(did)
        self.stats.key_refreshes += 1
        fresh = await self._signing_key(did)
        if fresh == key:
            raise DecodeError("bad_signature", f"seq {decoded.seq} of {did}: {failure}") from failure
        try:
            self._verify(decoded, fresh)
        except AtprotoFormatError as e:
            raise DecodeError(e.reason, f"seq {decoded.seq} of {did}: {e}") from e

    def _verify(self, decoded: Decoded, key: str) -> None:
        body = decoded.frame.body
        if decoded.kind == KIND_COMMIT:
            check_commit_event(body, signing_key=key, invert=self.invert)
            return
        blocks = body.get("blocks")
        if type(blocks) is not bytes:
            raise DecodeError("malformed_frame", "#sync.blocks is not bytes")
        car = read_car(blocks, verify=True)
        block = car.get(car.root)
        if block is None:
            raise DecodeError("missing_block", "#sync blocks lack the commit")
        commit = verify_commit(block, key, expected_did=decoded.did)
        if commit.rev != body.get("rev"):
            raise DecodeError("bad_signature", f"#sync rev {body.get('rev')!r} differs from its commit's {commit.rev}")


__all__ = ["DEFAULT_BATCH", "CommitVerifier", "DictResolver", "IdentityResolver", "PendingCheck", "UnresolvedDidError",
           "VerifyStats"]
