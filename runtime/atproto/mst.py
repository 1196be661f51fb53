"""The repository Merkle Search Tree (MST): walking, canonical building, and mutation for Sync 1.1.

A repository maps keys ``<collection>/<rkey>`` to record CIDs in an MST (atproto repository spec):
each key has a depth (leading zero bits of ``sha256(key)`` counted in 2-bit chunks), a node holds the
keys of one layer, ``{l: link|null, e: [{p: shared prefix len, k: key suffix, v: value, t: link|null}]}``,
and its subtrees hold the keys of the layer below. The shape depends only on the keys, so the root
CID is reproducible.

* :func:`walk` lists a tree in key order, checking order, depth and shape as the spec asks.
* :func:`build` builds the canonical tree for a set of entries.
* :class:`MST` loads nodes lazily from a possibly partial block store and supports get/add/update/
  delete; :func:`invert_ops` uses it to undo a firehose commit's ops (Sync 1.1 "operation
  inversion"), whose result must equal the commit's ``prevData``.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, Protocol

import libipld

from runtime.atproto import native
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import write_head
from runtime.atproto.errors import AtprotoFormatError, InversionError, MissingBlockError, MSTError

__all__ = [
    "DEFAULT_MAX_LAYER",
    "MST",
    "BlockSource",
    "RepoOp",
    "build",
    "encode_node",
    "invert_ops",
    "is_valid_key",
    "iter_nodes_preorder",
    "key_depth",
    "walk",
]

#: Cap on tree height when reading: a real key deeper than ~20 would take 2**40 hashes to mine.
DEFAULT_MAX_LAYER: Final = 64
#: Generous bound on key length (paths are an NSID, ``/`` and a record key).
MAX_KEY_LEN: Final = 1024

_SEGMENT: Final = r"[A-Za-z0-9_~.:\-]+"
_KEY_RE: Final = re.compile(rf"{_SEGMENT}/{_SEGMENT}")


class _SupportsGet(Protocol):
    def get(self, cid: CID, /) -> bytes | None: ...  # pragma: no cover - protocol


#: Where nodes come from: a mapping/CAR with ``.get(cid)``, or a function returning ``None`` if absent.
BlockSource = Callable[[CID], bytes | None] | _SupportsGet


def _fail(message: str, cause: BaseException | None = None) -> NoReturn:
    raise MSTError(message) from cause


def _getter(blocks: BlockSource) -> Callable[[CID], bytes | None]:
    if callable(blocks):
        return blocks
    get = getattr(blocks, "get", None)
    if get is None:
        raise TypeError("blocks must be a mapping, a CAR, or a function CID -> bytes | None")
    getter: Callable[[CID], bytes | None] = get
    return getter


def key_depth(key: str | bytes) -> int:
    """The MST layer of a key: leading zero bits of ``sha256(key)`` divided by two (fanout 4)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    digest = hashlib.sha256(raw).digest()
    first = digest[0]
    if first:  # three keys in four: the zero bits all lie in the first byte
        return (8 - first.bit_length()) >> 1
    return (256 - int.from_bytes(digest, "big").bit_length()) // 2


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a valid repo path ``<collection>/<rkey>`` for the MST."""
    if not (0 < len(key) <= MAX_KEY_LEN) or _KEY_RE.fullmatch(key) is None:
        return False
    collection, rkey = key.split("/")
    return collection not in (".", "..") and rkey not in (".", "..")


def _check_key(key: str) -> None:
    if type(key) is not str or not is_valid_key(key):
        _fail(f"invalid MST key {key!r}")


# ---------------------------------------------------------------------------------------------- nodes


class _Node:
    """One MST node in memory. ``cid`` is set while the node is unchanged since load/serialise."""

    __slots__ = ("cid", "keys", "layer", "left", "rights", "vals")

    def __init__(
        self,
        layer: int,
        left: CID | _Node | None,
        keys: list[str],
        vals: list[CID],
        rights: list[CID | _Node | None],
        *,
        cid: CID | None = None,
    ) -> None:
        self.layer = layer
        self.left = left
        self.keys = keys
        self.vals = vals
        self.rights = rights
        self.cid = cid

    def gap(self, g: int) -> CID | _Node | None:
        """The subtree slot ``g``: 0 is left of the first key, ``i`` is right of key ``i - 1``."""
        return self.left if g == 0 else self.rights[g - 1]

    def set_gap(self, g: int, ref: CID | _Node | None) -> None:
        if g == 0:
            self.left = ref
        else:
            self.rights[g - 1] = ref


def _common_prefix_len(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _link(out: bytearray, cid: CID | None) -> None:
    if cid is None:
        out.append(0xF6)
        return
    raw = cid.raw
    out += b"\xd8\x2a"
    write_head(out, 0x40, len(raw) + 1)
    out.append(0)
    out += raw


def encode_node(left: CID | None, entries: list[tuple[str, CID, CID | None]]) -> bytes:
    """Encode one MST node canonically (keys prefix-compressed against the previous entry).

    Args:
        left: the subtree left of the first key.
        entries: ``(full key, value, right subtree)`` in key order.

    Returns:
        The node's DAG-CBOR block (equal to :func:`runtime.atproto.dagcbor.encode` of the node map).
    """
    out = bytearray(b"\xa2\x61e")
    write_head(out, 0x80, len(entries))
    prev = b""
    for key, val, right in entries:
        kb = key.encode("utf-8")
        p = _common_prefix_len(prev, kb)
        out += b"\xa4\x61k"
        write_head(out, 0x40, len(kb) - p)
        out += kb[p:]
        out += b"\x61p"
        write_head(out, 0x00, p)
        out += b"\x61t"
        _link(out, right)
        out += b"\x61v"
        _link(out, val)
        prev = kb
    out += b"\x61l"
    _link(out, left)
    return bytes(out)


def _as_cid(value: Any, what: str, where: object) -> CID:
    """``value`` (a libipld-decoded link) as a CID; the error names ``what`` of ``where``."""
    if type(value) is not bytes:
        _fail(f"{what} of {where!r} is not a link")
    try:
        return CID.from_bytes(value)
    except AtprotoFormatError as e:
        _fail(f"{what} of {where!r} is not a CID: {e}", e)


def _parse_node(block: bytes, cid: CID, expected_layer: int | None) -> _Node:
    """Decode and check one node. ``expected_layer`` is ``None`` for the root (taken from its keys)."""
    try:
        data = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError) as e:
        _fail(f"MST node {cid} is not DAG-CBOR: {e}", e)
    if type(data) is not dict or type(data.get("e")) is not list:
        _fail(f"MST node {cid} is not a node map with an entries list")
    raw_left = data.get("l")
    left = None if raw_left is None else _as_cid(raw_left, "left link", cid)
    keys: list[str] = []
    vals: list[CID] = []
    rights: list[CID | _Node | None] = []
    prev = b""
    layer = expected_layer
    for n, entry in enumerate(data["e"]):
        if type(entry) is not dict:
            _fail(f"entry {n} of node {cid} is not a map")
        p = entry.get("p")
        suffix = entry.get("k")
        if type(p) is not int or type(suffix) is not bytes:
            _fail(f"entry {n} of node {cid} lacks an integer p or a bytes k")
        if p < 0 or p > len(prev) or (n == 0 and p != 0):
            _fail(f"entry {n} of node {cid} has prefix length {p} out of range")
        kb = prev[:p] + suffix
        if kb <= prev:
            _fail(f"keys of node {cid} are not in strictly increasing order")
        try:
            key = kb.decode("ascii")
        except UnicodeDecodeError as e:
            _fail(f"key in node {cid} is not ASCII", e)
        if not is_valid_key(key):
            _fail(f"invalid MST key {key!r} in node {cid}")
        depth = key_depth(kb)
        if layer is None:
            layer = depth
        elif depth != layer:
            _fail(f"key {key!r} of depth {depth} is in node {cid} of layer {layer}")
        raw_right = entry.get("t")
        keys.append(key)
        vals.append(_as_cid(entry.get("v"), "value", key))
        rights.append(None if raw_right is None else _as_cid(raw_right, "subtree right", key))
        prev = kb
    if layer is None:  # a root without entries: only the empty tree is allowed
        if left is not None:
            _fail(f"root node {cid} is empty but points to a subtree")
        return _Node(0, None, keys, vals, rights, cid=cid)
    if not keys and left is None:
        _fail(f"node {cid} is empty and has no subtree")
    if layer == 0 and (left is not None or any(r is not None for r in rights)):
        _fail(f"node {cid} at layer 0 points to a subtree")
    return _Node(layer, left, keys, vals, rights, cid=cid)


class _Loader:
    __slots__ = ("_get", "_verify")

    def __init__(self, blocks: BlockSource, verify: bool) -> None:
        self._get = _getter(blocks)
        self._verify = verify

    def load(self, cid: CID, expected_layer: int | None) -> _Node:
        if expected_layer is not None and expected_layer < 0:
            _fail(f"subtree {cid} below layer 0")
        block = self._get(cid)
        if block is None:
            raise MissingBlockError(cid, "MST node")
        if self._verify and not cid.matches(block):
            _fail(f"MST node block does not match its CID {cid}")
        return _parse_node(block, cid, expected_layer)


# ----------------------------------------------------------------------------------------------- walk


def walk(
    root: CID,
    get_block: BlockSource,
    *,
    max_layer: int = DEFAULT_MAX_LAYER,
    verify: bool = True,
) -> Iterator[tuple[str, CID]]:
    """Yield ``(key, value CID)`` for every entry of the tree at ``root``, in key order.

    Args:
        root: the root node's CID (a commit's ``data``).
        get_block: where nodes come from (a dict, a CAR, or a function).
        max_layer: refuse trees taller than this.
        verify: check each node's bytes against its CID.

    Raises:
        MissingBlockError: a node is not in the store.
        MSTError: a node is malformed, keys are out of order or at the wrong depth, or the tree is
            taller than ``max_layer``.
    """
    loader = _Loader(get_block, verify)
    top = loader.load(root, None)
    if top.layer > max_layer:
        _fail(f"MST of height {top.layer} exceeds the cap of {max_layer}")
    last = ""
    # Each stack item is (node, next slot): slot 0 descends left, slot i+1 emits key i then its right.
    stack: list[tuple[_Node, int]] = [(top, 0)]
    while stack:
        node, slot = stack.pop()
        if slot == 0:
            stack.append((node, 1))
            if node.left is not None:
                stack.append((_resolve_with(loader, node.left, node.layer - 1), 0))
            continue
        i = slot - 1
        if i >= len(node.keys):
            continue
        key = node.keys[i]
        if key <= last:
            _fail(f"key {key!r} is out of order in the tree")
        last = key
        yield key, node.vals[i]
        stack.append((node, slot + 1))
        right = node.rights[i]
        if right is not None:
            stack.append((_resolve_with(loader, right, node.layer - 1), 0))


def _resolve_with(loader: _Loader, ref: CID | _Node, layer: int) -> _Node:
    if isinstance(ref, _Node):
        return ref
    return loader.load(ref, layer)


# ---------------------------------------------------------------------------------------------- build


class _Builder:
    """Builds the canonical node tree over sorted keys (with their values and depths)."""

    __slots__ = ("depths", "keys", "vals")

    def __init__(self, keys: list[str], vals: list[CID], depths: list[int]) -> None:
        self.keys = keys
        self.vals = vals
        self.depths = depths

    def subtree(self, lo: int, hi: int, layer: int) -> _Node | None:
        """The node at ``layer`` holding keys ``lo:hi`` (all of depth <= ``layer``)."""
        if lo >= hi:
            return None
        depths = self.depths
        here = [i for i in range(lo, hi) if depths[i] == layer]
        if not here:  # an empty intermediate node keeps sub-tree links from skipping a layer
            return _Node(layer, self.subtree(lo, hi, layer - 1), [], [], [])
        left = self.subtree(lo, here[0], layer - 1)
        rights: list[CID | _Node | None] = []
        for n, i in enumerate(here):
            nxt = here[n + 1] if n + 1 < len(here) else hi
            rights.append(self.subtree(i + 1, nxt, layer - 1))
        return _Node(layer, left, [self.keys[i] for i in here], [self.vals[i] for i in here], rights)


def _serialize(node: _Node, out: dict[CID, bytes]) -> CID:
    """CID of ``node``, encoding it and every changed descendant into ``out`` (post-order)."""
    if node.cid is not None:
        return node.cid
    left = node.left
    left_cid = _serialize(left, out) if isinstance(left, _Node) else left
    entries: list[tuple[str, CID, CID | None]] = []
    for key, val, right in zip(node.keys, node.vals, node.rights, strict=True):
        right_cid = _serialize(right, out) if isinstance(right, _Node) else right
        entries.append((key, val, right_cid))
    block = encode_node(left_cid, entries)
    cid = CID.for_dag_cbor(block)
    out[cid] = block
    node.cid = cid
    return cid


def build(entries: Iterable[tuple[str, CID]]) -> tuple[CID, dict[CID, bytes]]:
    """Build the canonical MST holding ``entries``.

    Args:
        entries: ``(key, value CID)`` pairs in any order.

    Returns:
        ``(root CID, every node block by CID)``; an empty input gives the single empty node.

    Raises:
        MSTError: an invalid or duplicated key.
    """
    items = sorted(entries, key=lambda kv: kv[0])
    keys: list[str] = []
    vals: list[CID] = []
    for key, val in items:
        _check_key(key)
        if type(val) is not CID:
            _fail(f"value of {key!r} is not a CID")
        if keys and keys[-1] == key:
            _fail(f"duplicate key {key!r}")
        keys.append(key)
        vals.append(val)
    blocks: dict[CID, bytes] = {}
    if not keys:
        return _serialize(_Node(0, None, [], [], []), blocks), blocks
    depths = [key_depth(k) for k in keys]
    top = _Builder(keys, vals, depths).subtree(0, len(keys), max(depths))
    assert top is not None
    return _serialize(top, blocks), blocks


def iter_nodes_preorder(root: CID, blocks: Mapping[CID, bytes]) -> Iterator[tuple[CID, bytes, bool]]:
    """Yield ``(cid, block, is_node)`` in the streamable CAR order of the repository spec.

    Nodes come in pre-order with each node's record values interleaved where its entries stand
    (``is_node`` False for those, whose block is looked up in ``blocks`` too, or skipped if absent).
    """
    loader = _Loader(blocks, verify=False)
    top = loader.load(root, None)
    stack: list[tuple[_Node, int]] = [(top, -1)]
    while stack:
        node, slot = stack.pop()
        if slot == -1:
            assert node.cid is not None
            yield node.cid, blocks[node.cid], True
            stack.append((node, 0))
            if node.left is not None:
                stack.append((_resolve_with(loader, node.left, node.layer - 1), -1))
            continue
        if slot >= len(node.keys):
            continue
        val = node.vals[slot]
        record = blocks.get(val)
        if record is not None:
            yield val, record, False
        stack.append((node, slot + 1))
        right = node.rights[slot]
        if right is not None:
            stack.append((_resolve_with(loader, right, node.layer - 1), -1))


# ----------------------------------------------------------------------------------------- mutations


class MST:
    """A mutable view of an MST over a (possibly partial) block store.

    Nodes are loaded only when an operation reaches them, so a firehose commit's CAR slice (the
    changed path plus its neighbours) is enough to invert that commit. Reaching a node the store
    lacks raises :class:`MissingBlockError`. The store is never written to; :meth:`root_cid` encodes
    changed nodes and :meth:`new_blocks` returns them.
    """

    def __init__(self, root: CID | None, blocks: BlockSource, *, verify: bool = True) -> None:
        """Open the tree at ``root`` (``None`` for an empty tree) reading nodes from ``blocks``.

        Args:
            root: root node CID.
            blocks: a dict, a CAR, or a function returning ``None`` for an absent block.
            verify: check each loaded node's bytes against its CID.
        """
        self._loader = _Loader(blocks, verify)
        self._root: CID | _Node = root if root is not None else _Node(0, None, [], [], [])
        self._new_blocks: dict[CID, bytes] = {}

    # -- loading
    def _top(self) -> _Node:
        if isinstance(self._root, CID):
            self._root = self._loader.load(self._root, None)
        return self._root

    def _child(self, node: _Node, g: int) -> _Node | None:
        """The loaded subtree in slot ``g`` of ``node`` (cached back into the node)."""
        ref = node.gap(g)
        if ref is None or isinstance(ref, _Node):
            return ref
        child = self._loader.load(ref, node.layer - 1)
        node.set_gap(g, child)  # loading does not change the node's content, so cid stays valid
        return child

    def _resolve(self, ref: CID | _Node, layer: int) -> _Node:
        return _resolve_with(self._loader, ref, layer)

    # -- reads
    def get(self, key: str) -> CID | None:
        """The value CID stored under ``key``, or ``None``.

        Raises:
            MissingBlockError: a node on the key's path is not in the store.
        """
        node: _Node | None = self._top()
        while node is not None:
            i = bisect_left(node.keys, key)
            if i < len(node.keys) and node.keys[i] == key:
                return node.vals[i]
            node = self._child(node, i)
        return None

    def __iter__(self) -> Iterator[tuple[str, CID]]:
        """All ``(key, value)`` pairs in key order (needs every node)."""
        top = self._top()
        stack: list[tuple[_Node, int]] = [(top, 0)]
        while stack:
            node, slot = stack.pop()
            if slot == 0:
                stack.append((node, 1))
                child = self._child(node, 0)
                if child is not None:
                    stack.append((child, 0))
                continue
            i = slot - 1
            if i >= len(node.keys):
                continue
            yield node.keys[i], node.vals[i]
            stack.append((node, slot + 1))
            child = self._child(node, slot)
            if child is not None:
                stack.append((child, 0))

    # -- writes
    def add(self, key: str, value: CID) -> None:
        """Insert a new key.

        Raises:
            MSTError: ``key`` is invalid or already present.
            MissingBlockError: a node the insertion must split or descend through is absent.
        """
        _check_key(key)
        depth = key_depth(key)
        top = self._top()
        if not top.keys and top.left is None:
            self._root = _Node(depth, None, [key], [value], [None])
        elif depth > top.layer:
            lo, hi = self._split(top, top.layer, key)
            self._root = _Node(
                depth,
                _wrap(lo, top.layer, depth - 1),
                [key],
                [value],
                [_wrap(hi, top.layer, depth - 1)],
            )
        else:
            self._root = self._insert(top, top.layer, key, value, depth)

    def update(self, key: str, value: CID) -> None:
        """Replace the value of an existing key.

        Raises:
            MSTError: ``key`` is absent.
            MissingBlockError: a node on the key's path is absent.
        """
        self._root = self._update(self._top(), key, value)

    def delete(self, key: str) -> None:
        """Remove an existing key, merging the subtrees around it.

        Raises:
            MSTError: ``key`` is absent.
            MissingBlockError: a node the removal must descend through or merge is absent.
        """
        top = self._top()
        new = self._delete(top, top.layer, key)
        while new is not None and not new.keys and new.left is not None:
            new = self._resolve(new.left, new.layer - 1)  # the top must not be an empty node
        self._root = new if new is not None else _Node(0, None, [], [], [])

    def root_cid(self) -> CID:
        """The root CID, encoding every node changed since the last call."""
        if isinstance(self._root, CID):
            return self._root
        return _serialize(self._root, self._new_blocks)

    def new_blocks(self) -> dict[CID, bytes]:
        """The node blocks encoded by :meth:`root_cid` so far (some may no longer be reachable)."""
        return dict(self._new_blocks)

    # -- algorithms (each returns the replacement for the subtree it was given)
    def _insert(self, node: _Node, layer: int, key: str, value: CID, depth: int) -> _Node:
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            _fail(f"key {key!r} is already present")
        if depth == layer:
            gap = node.gap(i)
            lo, hi = self._split(gap, layer - 1, key) if gap is not None else (None, None)
            node.set_gap(i, lo)
            node.keys.insert(i, key)
            node.vals.insert(i, value)
            node.rights.insert(i, hi)
        else:
            child = self._child(node, i)
            if child is None:
                leaf = _Node(depth, None, [key], [value], [None])
                node.set_gap(i, _wrap(leaf, depth, layer - 1))
            else:
                node.set_gap(i, self._insert(child, layer - 1, key, value, depth))
        node.cid = None
        return node

    def _split(self, ref: CID | _Node, layer: int, key: str) -> tuple[_Node | None, _Node | None]:
        """Split a subtree into the keys below and above ``key`` (which it must not hold)."""
        node = self._resolve(ref, layer)
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            _fail(f"key {key!r} is already present")
        gap = node.gap(i)
        gl, gr = self._split(gap, layer - 1, key) if gap is not None else (None, None)
        left = _Node(layer, node.left, node.keys[:i], node.vals[:i], node.rights[:i])
        left.set_gap(i, gl)
        right = _Node(layer, gr, node.keys[i:], node.vals[i:], node.rights[i:])
        return _prune(left), _prune(right)

    def _update(self, node: _Node, key: str, value: CID) -> _Node:
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            node.vals[i] = value
        else:
            child = self._child(node, i)
            if child is None:
                _fail(f"key {key!r} is not present")
            node.set_gap(i, self._update(child, key, value))
        node.cid = None
        return node

    def _delete(self, node: _Node, layer: int, key: str) -> _Node | None:
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            merged = self._merge(node.gap(i), node.rights[i], layer - 1)
            del node.keys[i], node.vals[i], node.rights[i]
            node.set_gap(i, merged)
        else:
            child = self._child(node, i)
            if child is None:
                _fail(f"key {key!r} is not present")
            node.set_gap(i, self._delete(child, layer - 1, key))
        node.cid = None
        return _prune(node)

    def _merge(self, a: CID | _Node | None, b: CID | _Node | None, layer: int) -> CID | _Node | None:
        """Join two adjacent subtrees of the same layer (all keys of ``a`` below those of ``b``)."""
        if a is None:
            return b
        if b is None:
            return a
        na = self._resolve(a, layer)
        nb = self._resolve(b, layer)
        last = len(na.keys)
        na.set_gap(last, self._merge(na.gap(last), nb.left, layer - 1))
        na.keys.extend(nb.keys)
        na.vals.extend(nb.vals)
        na.rights.extend(nb.rights)
        na.cid = None
        return na


def _prune(node: _Node) -> _Node | None:
    return None if not node.keys and node.left is None else node


def _wrap(node: _Node | None, layer: int, to_layer: int) -> _Node | None:
    """Put empty intermediate nodes above ``node`` (at ``layer``) until it sits at ``to_layer``."""
    if node is None:
        return None
    while layer < to_layer:
        layer += 1
        node = _Node(layer, node, [], [], [])
    return node


# ----------------------------------------------------------------------------------------- inversion


@dataclass(frozen=True, slots=True)
class RepoOp:
    """One record operation of a firehose commit (``#commit`` ``ops`` entry)."""

    action: Literal["create", "update", "delete"]
    path: str
    cid: CID | None
    prev: CID | None = None

    @classmethod
    def from_firehose(cls, op: Mapping[str, Any]) -> RepoOp:
        """Build from a decoded ``ops`` entry (links as :class:`CID`, raw CID bytes, or strings).

        Raises:
            InversionError: an unknown action, or a missing/ill-typed field.
        """
        action = op.get("action")
        path = op.get("path")
        if action not in ("create", "update", "delete"):
            raise InversionError(f"unknown op action {action!r}")
        if type(path) is not str:
            raise InversionError("op path is not a string")
        return cls(action, path, _op_link(op.get("cid"), "cid"), _op_link(op.get("prev"), "prev"))


def _op_link(value: Any, what: str) -> CID | None:
    try:
        if value is None or type(value) is CID:
            return value
        if type(value) is bytes:
            return CID.from_bytes(value)
        if type(value) is str:
            return CID.from_str(value)
        if type(value) is dict and type(value.get("$link")) is str:
            return CID.from_str(value["$link"])
    except AtprotoFormatError as e:
        raise InversionError(f"op {what} is not a CID: {e}") from e
    raise InversionError(f"op {what} is not a link")


def _raw_blocks(blocks: BlockSource) -> dict[bytes, bytes] | None:
    """``blocks`` keyed by binary CID for the native path, or None when it cannot be had cheaply."""
    own = getattr(blocks, "raw_lookup", None)
    if own is not None:  # a CAR: its own index (by binary CID when the native reader built it)
        lookup = own()
        return lookup if type(lookup) is dict else None
    if isinstance(blocks, dict) and type(blocks) is dict:
        # a key that is not a CID never matches a CID lookup: leaving it out changes nothing
        return {k.raw: v for k, v in blocks.items() if type(k) is CID}
    return None


def invert_ops(
    new_root: CID,
    blocks: BlockSource,
    ops: Iterable[RepoOp | Mapping[str, Any]],
    *,
    verify: bool = True,
    use_native: bool = True,
) -> CID:
    """Undo a commit's ops on its new tree and return the resulting root (Sync 1.1 inversion).

    A create is undone by a delete (the tree must hold the created CID), an update by restoring
    ``prev`` (the tree must hold the new CID), a delete by re-adding ``prev`` (the key must be
    absent). The caller compares the result with the commit's ``prevData``.

    The native path (``mst_invert`` of ``_fastrepo.c``, the same algorithm) computes the root when
    the extension is built and the input is the canonical case; for anything else, and for every
    error, this module's :class:`MST` runs and raises the precise error.

    Args:
        new_root: the commit's ``data`` (root of the tree after the ops).
        blocks: the commit's CAR slice blocks (a partial store is enough for complete ops).
        ops: the commit's ``ops``, as :class:`RepoOp` or decoded firehose mappings.
        verify: check each loaded node against its CID (a CAR read with ``verify`` already did).
        use_native: allow the native path (False: the Python path alone, to confirm a refusal).

    Raises:
        InversionError: an op disagrees with the tree, lacks ``prev``, or repeats a path.
        MissingBlockError: the slice lacks a node the inversion needs.
        MSTError: a malformed node.
    """
    parsed = [op if isinstance(op, RepoOp) else RepoOp.from_firehose(op) for op in ops]
    fast = native.NATIVE if use_native else None
    if fast is not None:
        lookup = _raw_blocks(blocks)
        if lookup is not None:
            root = fast.mst_invert(new_root.raw, lookup, [
                (op.action, op.path, None if op.cid is None else op.cid.raw, None if op.prev is None else op.prev.raw)
                for op in parsed], verify)
            if root is not None:  # None: not the canonical case, or an error: the Python path says which
                return CID.from_bytes(root)
    tree = MST(new_root, blocks, verify=verify)
    seen: set[str] = set()
    for op in reversed(parsed):
        if op.path in seen:
            raise InversionError(f"path {op.path!r} appears twice in one commit")
        seen.add(op.path)
        current = tree.get(op.path)
        if op.action == "create":
            if op.cid is None or current != op.cid:
                raise InversionError(f"created {op.path!r} is not in the new tree as {op.cid}")
            tree.delete(op.path)
        elif op.action == "update":
            if op.cid is None or current != op.cid:
                raise InversionError(f"updated {op.path!r} is not in the new tree as {op.cid}")
            if op.prev is None:
                raise InversionError(f"update of {op.path!r} has no prev")
            tree.update(op.path, op.prev)
        else:
            if current is not None:
                raise InversionError(f"deleted {op.path!r} is still in the new tree")
            if op.prev is None:
                raise InversionError(f"delete of {op.path!r} has no prev")
            tree.add(op.path, op.prev)
    return tree.root_cid()
