"""Whole repositories: build a signed repo CAR, list a repo CAR's records, check a firehose commit.

* :func:`build_repo` turns ``{"collection/rkey": record JSON form}`` into a signed commit and a CAR
  export (blocks in the spec's streamable order), as a simulator serving ``getRepo`` needs.
* :func:`iter_repo_records` walks commit -> MST -> records of a CAR (in memory or on disk), checking
  every record block against its CID, and yields the records in their JSON form.
* :func:`verify_commit_event` checks a decoded ``#commit`` firehose body end to end: CAR slice,
  commit block, signature, created/updated record blocks and the Sync 1.1 inversion to ``prevData``.
  :func:`check_commit_event` makes the same checks without building the result, on the native fast
  path where it applies (which only ever accepts: every refusal comes from the Python path).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from runtime.atproto import native
from runtime.atproto.car import BlockStore, Car, read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import Commit, UnsignedCommit, parse_commit, sign_commit, verify_commit
from runtime.atproto.crypto import KeyPair, verify_signature
from runtime.atproto.dagcbor import encode, from_json_form, record_json_form
from runtime.atproto.errors import (
    AtprotoFormatError,
    BlockMismatchError,
    CarError,
    CommitFormatError,
    InversionError,
    KeyFormatError,
    MissingBlockError,
    MSTError,
)
from runtime.atproto.mst import RepoOp, build, invert_ops, is_valid_key, iter_nodes_preorder, walk
from runtime.atproto.tid import is_valid_tid

__all__ = [
    "BuiltRepo",
    "RepoRecord",
    "VerifiedCommit",
    "build_repo",
    "build_repo_blocks",
    "check_commit_event",
    "commit_event_signature",
    "iter_repo_records",
    "read_commit",
    "verify_commit_event",
]


class RepoRecord(NamedTuple):
    """One record of a repository."""

    collection: str
    rkey: str
    cid: CID
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BuiltRepo:
    """A freshly built and signed repository.

    Attributes:
        commit_cid: CID of the signed commit.
        commit: the commit itself.
        blocks: every block (commit, MST nodes, records) by CID.
        record_cids: each path's record CID.
    """

    commit_cid: CID
    commit: Commit
    blocks: dict[CID, bytes] = field(repr=False)
    record_cids: dict[str, CID] = field(repr=False)

    def car_blocks(self) -> Iterator[tuple[CID, bytes]]:
        """Commit first, then MST nodes in pre-order with each node's records where they stand."""
        yield self.commit_cid, self.blocks[self.commit_cid]
        for cid, block, _ in iter_nodes_preorder(self.commit.data, self.blocks):
            yield cid, block

    def to_car(self) -> bytes:
        """The repository as a CAR v1 export (``getRepo`` body)."""
        return write_car([self.commit_cid], self.car_blocks())


def build_repo_blocks(
    did: str,
    key: KeyPair,
    records: Mapping[str, Mapping[str, Any]],
    rev: str,
    *,
    prev: CID | None = None,
) -> BuiltRepo:
    """Encode records, build their MST and sign the commit; see :func:`build_repo`."""
    blocks: dict[CID, bytes] = {}
    record_cids: dict[str, CID] = {}
    for path, record in records.items():
        if not is_valid_key(path):
            raise MSTError(f"invalid record path {path!r}")
        if not isinstance(record, Mapping):
            raise CommitFormatError(f"record at {path!r} is not an object")
        block = encode(from_json_form(dict(record)))
        cid = CID.for_dag_cbor(block)
        blocks[cid] = block
        record_cids[path] = cid
    data_root, node_blocks = build(record_cids.items())
    blocks.update(node_blocks)
    commit_cid, commit_block = sign_commit(UnsignedCommit(did=did, data=data_root, rev=rev, prev=prev), key)
    blocks[commit_cid] = commit_block
    return BuiltRepo(
        commit_cid=commit_cid,
        commit=parse_commit(commit_block),
        blocks=blocks,
        record_cids=record_cids,
    )


def build_repo(
    did: str,
    key: KeyPair,
    records: Mapping[str, Mapping[str, Any]],
    rev: str,
    *,
    prev: CID | None = None,
) -> tuple[CID, bytes]:
    """Build a whole signed repository.

    Args:
        did: the account DID.
        key: the account's signing key.
        records: ``{"collection/rkey": record}`` with records in atproto JSON form (``$link`` and
            ``$bytes`` objects are encoded as links and byte strings).
        rev: the commit revision (a TID).
        prev: the previous commit's CID (normally ``None`` in repo v3).

    Returns:
        ``(commit CID, CAR v1 bytes)``.

    Raises:
        MSTError: an invalid record path.
        AtprotoFormatError: a record that cannot be encoded, or an invalid did/rev.
    """
    built = build_repo_blocks(did, key, records, rev, prev=prev)
    return built.commit_cid, built.to_car()


def read_commit(car: BlockStore) -> Commit:
    """Parse the commit a CAR's first root points to.

    Raises:
        CarError: the CAR has no root.
        MissingBlockError: the commit block is absent.
        BlockMismatchError: the commit block does not match its CID.
        CommitFormatError: the block is not a valid commit.
    """
    roots = car.roots
    if not roots:
        raise CarError("CAR has no root")
    block = car.get(roots[0])
    if block is None:
        raise MissingBlockError(roots[0], "commit")
    if not roots[0].matches(block):
        raise BlockMismatchError(f"commit block does not match its CID {roots[0]}")
    return parse_commit(block)


def iter_repo_records(car: BlockStore, *, verify: bool = True) -> Iterator[RepoRecord]:
    """Yield every record of a repository CAR in key order.

    Args:
        car: a :class:`~runtime.atproto.car.Car` or :class:`~runtime.atproto.car.CarFile`.
        verify: check MST nodes and record blocks against their CIDs.

    Raises:
        MissingBlockError: a node or record block is absent.
        BlockMismatchError: a record block does not match its CID.
        MSTError: a malformed tree.
        CBORError: a record that is not a DAG-CBOR map.
        CommitFormatError: see :func:`read_commit`.
    """
    commit = read_commit(car)
    for key, cid in walk(commit.data, car, verify=verify):
        block = car.get(cid)
        if block is None:
            raise MissingBlockError(cid, f"record {key}")
        if verify and not cid.matches(block):
            raise BlockMismatchError(f"record {key} does not match its CID {cid}")
        collection, rkey = key.split("/", 1)
        yield RepoRecord(collection, rkey, cid, record_json_form(block))


@dataclass(frozen=True, slots=True)
class VerifiedCommit:
    """A ``#commit`` event whose blocks, signature and (optionally) inversion checked out."""

    commit_cid: CID
    commit: Commit
    car: Car
    ops: list[RepoOp]
    prev_data: CID | None


def _body_link(value: Any, what: str) -> CID | None:
    if value is None:
        return None
    try:
        if type(value) is CID:
            return value
        if type(value) is bytes:
            return CID.from_bytes(value)
    except AtprotoFormatError as e:
        raise CommitFormatError(f"#commit {what} is not a CID: {e}") from e
    raise CommitFormatError(f"#commit {what} is not a link")


def verify_commit_event(
    body: Mapping[str, Any],
    *,
    signing_key: str | None,
    invert: bool = True,
) -> VerifiedCommit:
    """Check a decoded ``#commit`` firehose body.

    Args:
        body: the frame body (links as raw CID bytes, as libipld decodes them, or as :class:`CID`).
        signing_key: the account's ``did:key``; ``None`` skips the signature check.
        invert: run the Sync 1.1 inversion and require it to reach ``prevData``.

    Returns:
        The parsed commit, CAR slice and ops.

    Raises:
        CarError / BlockMismatchError: a bad CAR slice.
        MissingBlockError: the commit, a created/updated record or a needed MST node is absent.
        CommitFormatError: a malformed commit, or one whose did/rev/CID disagree with the event.
        SignatureError: a bad signature.
        InversionError: ops that do not invert to ``prevData`` (or no ``prevData`` with ``invert``).
    """
    blocks = body.get("blocks")
    if type(blocks) is not bytes:
        raise CarError("#commit blocks is not bytes")
    car = read_car(blocks, verify=True)
    commit_cid = _body_link(body.get("commit"), "commit")
    if commit_cid is None:
        raise CommitFormatError("#commit has no commit link")
    if not car.roots or car.roots[0] != commit_cid:
        raise CommitFormatError("#commit CAR slice does not have the commit as its first root")
    block = car.get(commit_cid)
    if block is None:
        raise MissingBlockError(commit_cid, "commit")
    repo = body.get("repo")
    commit = parse_commit(block) if signing_key is None else verify_commit(block, signing_key)
    if commit.did != repo:
        raise CommitFormatError(f"commit is for {commit.did}, event for {repo!r}")
    if commit.rev != body.get("rev"):
        raise CommitFormatError(f"commit rev {commit.rev} differs from event rev {body.get('rev')!r}")
    raw_ops = body.get("ops")
    if type(raw_ops) is not list:
        raise CommitFormatError("#commit ops is not a list")
    ops = [RepoOp.from_firehose(op) if isinstance(op, Mapping) else _bad_op() for op in raw_ops]
    for op in ops:
        if op.action != "delete" and op.cid is not None and car.get(op.cid) is None:
            raise MissingBlockError(op.cid, f"record {op.path}")
    prev_data = _body_link(body.get("prevData"), "prevData")
    if invert:
        if prev_data is None:
            raise InversionError("#commit has no prevData to invert to")
        # The slice's blocks were all checked against their CIDs by read_car: no second hashing.
        inverted = invert_ops(commit.data, car, ops, verify=False)
        if inverted != prev_data:
            # A refusal is the Python path's to make (it also names the op or node at fault).
            inverted = invert_ops(commit.data, car, ops, verify=False, use_native=False)
            if inverted != prev_data:
                raise InversionError(f"ops invert to {inverted}, not prevData {prev_data}")
    return VerifiedCommit(commit_cid=commit_cid, commit=commit, car=car, ops=ops, prev_data=prev_data)


def _bad_op() -> RepoOp:
    raise CommitFormatError("#commit op is not a map")


def check_commit_event(body: Mapping[str, Any], *, signing_key: str | None, invert: bool = True) -> None:
    """The checks of :func:`verify_commit_event`, without its result; raises what it raises.

    The native path (``commit_event`` of ``_fastrepo.c``) indexes the slice (every block against its
    CID), parses the canonical commit block (its unsigned bytes are the block less its ``sig``
    entry), finds each created/updated record and runs the inversion; this function then checks
    the commit's ``did``/``rev`` against the event, the signature and ``prevData``. If the native
    path bails (anything but the canonical case) or any check fails, :func:`verify_commit_event`
    runs on the same body and gives the verdict: the fast path only ever accepts.
    """
    signed = commit_event_signature(body, invert=invert)
    if signed is not None and (signing_key is None or _signature_accepts(signing_key, *signed)):
        return
    verify_commit_event(body, signing_key=signing_key, invert=invert)


def commit_event_signature(body: Mapping[str, Any], *, invert: bool = True) -> tuple[bytes, bytes] | None:
    """Every check of :func:`check_commit_event` but the signature, on the native path only.

    Returns:
        ``(unsigned commit bytes, signature)`` when the native path accepts the event apart from
        its signature: the event is valid exactly when the signature verifies. None when it does
        not accept (or is not built): run :func:`check_commit_event` for the verdict.
    """
    fast = native.NATIVE
    if fast is None:
        return None
    blocks, commit, ops = body.get("blocks"), body.get("commit"), body.get("ops")
    if type(blocks) is not bytes or type(commit) is not bytes or type(ops) is not list:
        return None
    out = fast.commit_event(blocks, commit, ops, invert)
    if out is None or not _fast_prechecks(body, out, invert):
        return None
    return out[2], out[3]


def _fast_prechecks(body: Mapping[str, Any], out: tuple[str, str, bytes, bytes, bytes | None], invert: bool) -> bool:
    did, rev, _unsigned, _sig, inverted = out
    if did != body.get("repo") or not did.startswith("did:") or rev != body.get("rev") or not is_valid_tid(rev):
        return False
    return not (invert and (inverted is None or inverted != body.get("prevData")))


def _signature_accepts(signing_key: str, unsigned: bytes, sig: bytes) -> bool:
    try:
        return verify_signature(signing_key, unsigned, sig)
    except KeyFormatError:  # the Python path raises it in its own order of checks
        return False
