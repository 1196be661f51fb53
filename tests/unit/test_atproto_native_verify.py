"""The native path of ``--verify`` (``mst_invert``, ``commit_event``) against the Python path it stands in for.

The rule under test, as for the repository path: a native function returns what the Python path
computes for the same input, or None ("use the Python path"); it never accepts what the Python path
refuses. Checked on every captured commit, on generated trees with random ops, and on thousands of
mutated node blocks, ops and CAR slices. The verifier itself is then run with and without the
native path on good and tampered frames: same verdicts, same reasons.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import libipld
import pytest

from producers.firehose.decode import decode_frame
from producers.firehose.verify import CommitVerifier, DictResolver
from runtime.atproto import native
from runtime.atproto.car import read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import parse_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.mst import RepoOp, build, invert_ops
from runtime.atproto.repo import check_commit_event, verify_commit_event
from runtime.errors import DecodeError
from runtime.simulator.plc import did_document
from runtime.simulator.relay import RelayGenerator

from .atproto_corpus import commit_bodies, did_docs, frames
from .native_compare import Outcomes, mutated_node

NATIVE = native.NATIVE
needs_native = pytest.mark.skipif(NATIVE is None, reason="the native extension is not built")


def _vals(n: int, seed: int) -> list[CID]:
    return [CID.for_dag_cbor(encode({"seed": seed, "i": i})) for i in range(n)]


def _op_tuples(ops: list[RepoOp]) -> list[tuple[str, str, bytes | None, bytes | None]]:
    return [(op.action, op.path, None if op.cid is None else op.cid.raw, None if op.prev is None else op.prev.raw)
            for op in ops]


def _python_invert(root: CID, blocks: dict[CID, bytes], ops: list[RepoOp], verify: bool) -> bytes | None:
    try:
        return invert_ops(root, blocks, ops, verify=verify, use_native=False).raw
    except AtprotoFormatError:
        return None


def _native_invert(root: CID, blocks: dict[CID, bytes], ops: list[RepoOp], verify: bool) -> bytes | None:
    assert NATIVE is not None
    return NATIVE.mst_invert(root.raw, {c.raw: b for c, b in blocks.items()}, _op_tuples(ops), verify)


# ------------------------------------------------------------------------------------- mst_invert


@needs_native
def test_mst_invert_equals_the_python_inversion_on_every_captured_commit() -> None:
    bodies = commit_bodies()
    for body in bodies:
        car = read_car(body["blocks"])
        data = parse_commit(car.blocks[car.root]).data
        ops = [RepoOp.from_firehose(op) for op in body["ops"]]
        for verify in (True, False):
            got = _native_invert(data, car.blocks, ops, verify)
            assert got == _python_invert(data, car.blocks, ops, verify) == body["prevData"], body["repo"]
    assert len(bodies) == 148


def _random_commit(rng: random.Random, seed: int) -> tuple[CID, CID, dict[CID, bytes], list[RepoOp]]:
    """A tree, random ops on it, and the new tree: ``(old root, new root, both trees' blocks, ops)``."""
    n = rng.choice([0, 1, 3, 20, 120, 400])
    keys = sorted({f"app.test.c{rng.randrange(3)}/{rng.getrandbits(50):013x}" for _ in range(n)})
    vals = _vals(len(keys), seed)
    before = dict(zip(keys, vals, strict=True))
    after = dict(before)
    fresh = _vals(40, seed + 1_000_000)
    ops: list[RepoOp] = []
    touched: set[str] = set()
    for i in range(rng.choice([1, 1, 2, 5, 12])):
        kind = rng.randrange(3) if after else 0
        if kind == 0:
            key = f"app.test.c{rng.randrange(3)}/{rng.getrandbits(50):013x}"
            if key in after or key in touched:
                continue
            after[key] = fresh[i]
            ops.append(RepoOp("create", key, fresh[i]))
        else:
            key = rng.choice(sorted(after))
            if key in touched:
                continue
            if kind == 1:
                ops.append(RepoOp("update", key, fresh[i], after[key]))
                after[key] = fresh[i]
            else:
                ops.append(RepoOp("delete", key, None, after.pop(key)))
        touched.add(key)
    old_root, old_blocks = build(before.items())
    new_root, new_blocks = build(after.items())
    return old_root, new_root, {**old_blocks, **new_blocks}, ops


def _needed(root: CID, blocks: dict[CID, bytes], ops: list[RepoOp]) -> dict[CID, bytes]:
    """Only the blocks the Python inversion reads (a proof slice)."""
    read: dict[CID, bytes] = {}

    def get(cid: CID) -> bytes | None:
        block = blocks.get(cid)
        if block is not None:
            read[cid] = block
        return block

    invert_ops(root, get, ops, use_native=False)
    return read


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_mst_invert_equals_the_python_inversion_on_generated_commits(seed: int) -> None:
    rng = random.Random(seed)
    for case in range(60):
        old_root, new_root, blocks, ops = _random_commit(rng, seed * 1000 + case)
        for store in (blocks, _needed(new_root, blocks, ops)):
            assert _python_invert(new_root, store, ops, True) == old_root.raw
            assert _native_invert(new_root, store, ops, True) == old_root.raw


@needs_native
def test_mst_invert_never_accepts_what_the_python_inversion_refuses() -> None:
    rng = random.Random(42)
    outcomes = Outcomes()

    def check(root: CID, store: dict[CID, bytes], ops: list[RepoOp], verify: bool) -> None:
        expected = _python_invert(root, store, ops, verify)
        got = _native_invert(root, store, ops, verify)
        outcomes.add(expected, got)

    others = _vals(5, 99)
    for case in range(400):
        _, new_root, blocks, ops = _random_commit(rng, 50_000 + case)
        store = _needed(new_root, blocks, ops)
        # 1. a node block changed in place (its CID kept): both a verified and an unverified read
        nodes = list(store)
        victim = rng.choice(nodes)
        changed = {**store, victim: mutated_node(rng, store[victim])}
        check(new_root, changed, ops, True)
        check(new_root, changed, ops, False)
        # 2. a proof block missing
        if len(nodes) > 1:
            check(new_root, {c: v for c, v in store.items() if c != rng.choice(nodes)}, ops, True)
        # 3. ops that disagree with the tree: a wrong CID or prev, a flipped action, a repeated or
        #    dropped op, an op the commit did not make
        bad = list(ops)
        i = rng.randrange(len(bad))
        op = bad[i]
        what = rng.randrange(6)
        if what == 0:
            bad[i] = RepoOp(op.action, op.path, rng.choice(others) if op.cid else None, op.prev)
        elif what == 1:
            bad[i] = RepoOp(op.action, op.path, op.cid, rng.choice([None, *others]))
        elif what == 2:
            bad[i] = RepoOp(rng.choice(["create", "update", "delete"]), op.path, op.cid, op.prev)  # type: ignore[arg-type]
        elif what == 3:
            bad.insert(i, op)
        elif what == 4:
            del bad[i]
        else:
            bad.append(RepoOp("create", "app.test.c9/zzz", others[0]))
        check(new_root, store, bad, True)
    assert outcomes["both_refuse"] > 300 and outcomes["both_accept"] > 100, outcomes


@needs_native
def test_mst_invert_bails_on_what_it_does_not_take() -> None:
    assert NATIVE is not None
    root, blocks = build([("app.test.c/a", _vals(1, 1)[0])])
    lookup = {c.raw: b for c, b in blocks.items()}
    op = ("delete", "app.test.c/b", None, _vals(1, 2)[0].raw)
    assert NATIVE.mst_invert(root.raw, lookup, [op], True) is not None
    assert NATIVE.mst_invert(root.raw, dict.fromkeys(lookup, 5), [op], True) is None  # not bytes
    assert NATIVE.mst_invert(root.raw, {}, [op], True) is None  # missing root
    assert NATIVE.mst_invert(root.raw, lookup, [("delete", "app.test.c/é", None, op[3])], True) is None
    assert NATIVE.mst_invert(root.raw, lookup, [("move", "app.test.c/b", None, op[3])], True) is None
    assert NATIVE.mst_invert(root.raw, lookup, [("delete", "app.test.c/b", None, b"\x01\x55")], True) is None
    assert NATIVE.mst_invert(root.raw, lookup, [op[:3]], True) is None
    assert NATIVE.mst_invert(b"\x01", lookup, [op], True) is None
    assert NATIVE.mst_invert(root.raw, lookup, [], True) == root.raw  # nothing undone: the tree as it is
    with pytest.raises(TypeError):
        NATIVE.mst_invert(root.raw, lookup, 5, True)  # type: ignore[arg-type]


def test_invert_ops_takes_the_python_path_alone(python_only: None) -> None:
    for body in commit_bodies()[:20]:
        car = read_car(body["blocks"])
        assert invert_ops(parse_commit(car.blocks[car.root]).data, car, body["ops"]).raw == body["prevData"]


# ----------------------------------------------------------------------------------- commit_event


def _python_event(body: dict[str, Any], invert: bool = True) -> tuple[Any, ...] | None:
    """What the native ``commit_event`` stands for, by the Python path (None: the Python path refuses)."""
    try:
        v = verify_commit_event(body, signing_key=None, invert=False)
        inverted = invert_ops(v.commit.data, v.car, v.ops, use_native=False).raw if invert else None
    except AtprotoFormatError:
        return None
    return (v.commit.did, v.commit.rev, v.commit.unsigned().signing_bytes(), v.commit.sig, inverted)


def _native_event(body: dict[str, Any], invert: bool = True) -> tuple[Any, ...] | None:
    assert NATIVE is not None
    return NATIVE.commit_event(body["blocks"], body["commit"], body["ops"], invert)


@needs_native
def test_commit_event_equals_the_python_path_on_every_captured_commit() -> None:
    for body in commit_bodies():
        for invert in (True, False):
            got = _native_event(body, invert)
            assert got is not None
            assert got == _python_event(body, invert)
        assert got[4] is None
        assert _native_event(body)[4] == body["prevData"]  # type: ignore[index]


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    how = rng.randrange(3)
    if how == 0:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == 1:
        del b[rng.randrange(len(b)):]
    else:
        b.insert(rng.randrange(len(b)), rng.randrange(256))
    return bytes(b)


def _resliced(body: dict[str, Any], rng: random.Random) -> bytes:
    """The slice rewritten with a structural change: a block dropped, repeated, or a root added."""
    car = read_car(body["blocks"])
    items = list(car.blocks.items())
    roots = list(car.roots)
    what = rng.randrange(4)
    if what == 0:
        del items[rng.randrange(len(items))]
    elif what == 1:
        items.insert(rng.randrange(len(items)), rng.choice(items))
    elif what == 2:
        roots.append(rng.choice(items)[0])
    else:
        roots = [rng.choice(items)[0], *roots]
    return write_car(roots, items)


@needs_native
def test_commit_event_never_accepts_what_the_python_path_refuses() -> None:
    bodies = commit_bodies()
    rng = random.Random(7)
    outcomes = Outcomes()
    for _ in range(2500):
        body = dict(rng.choice(bodies))
        what = rng.randrange(5)
        if what < 2:
            body["blocks"] = _flip(body["blocks"], rng)
        elif what == 2:
            body["blocks"] = _resliced(body, rng)
        elif what == 3:  # an op changed
            ops = [dict(op) for op in body["ops"]]
            op = rng.choice(ops)
            key = rng.choice(["action", "path", "cid", "prev"])
            op[key] = rng.choice([None, 5, "delete", "create", "app.bsky.feed.like/x", b"\x01\x71",
                                  CID.for_dag_cbor(b"\xa0").raw, op.get("cid"), op.get("prev")])
            body["ops"] = ops
        else:  # the commit link
            body["commit"] = rng.choice([CID.for_dag_cbor(b"\xa0").raw, body["commit"][:-1], body["commit"]])
        expected = _python_event(body)
        got = _native_event(body) if type(body["ops"]) is list else None
        outcomes.add(expected, got)
    assert outcomes["both_refuse"] > 1000 and outcomes["both_accept"] > 100, outcomes


# ------------------------------------------------------------------------------- the verifier, twice


def _reasons(resolver_docs: dict[str, Any], data: list[bytes]) -> list[str | None]:
    verifier = CommitVerifier(DictResolver(resolver_docs))
    out: list[str | None] = []
    for frame in data:
        try:
            asyncio.run(verifier.check(decode_frame(frame)))
            out.append(None)
        except DecodeError as e:
            out.append(e.reason)
    return out


def _tampered(data: bytes, rng: random.Random) -> bytes:
    """A frame whose body was changed after signing: an op, prevData, a block, the ops' order."""
    header, body = libipld.decode_dag_cbor_multi(data)
    if "blocks" not in body:
        return data
    what = rng.randrange(5)
    if what == 0:
        body["prevData"] = CID.for_dag_cbor(b"\xa0").raw
    elif what == 1:
        ops = body["ops"]
        ops[0] = {**ops[0], "path": ops[0]["path"] + "x"}
    elif what == 2:
        body["blocks"] = _flip(body["blocks"], rng)
    elif what == 3:
        body["rev"] = "2222222222222"
    else:
        body["ops"] = [*body["ops"], {"action": "delete", "path": "app.bsky.feed.like/3zzzzzzzzzzzz", "cid": None,
                                      "prev": CID.for_dag_cbor(b"\xa0").raw}]
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def _both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[Any, Any]:
    fast = run()
    monkeypatch.setattr(native, "NATIVE", None)
    slow = run()
    monkeypatch.undo()
    return fast, slow


@needs_native
def test_the_verifier_gives_the_same_verdicts_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = did_docs()
    good = list(frames())
    rng = random.Random(5)
    bad = [_tampered(rng.choice(good), rng) for _ in range(150)]
    fast, slow = _both_paths(monkeypatch, lambda: _reasons(docs, good + bad))
    assert fast == slow
    assert fast[:len(good)] == [None] * len(good)
    assert {r for r in fast[len(good):] if r is not None} >= {"bad_mst_proof", "bad_cid"}
    assert sum(r is not None for r in fast[len(good):]) > 120


@needs_native
def test_generated_frames_verify_on_both_paths_and_impostors_fail_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = RelayGenerator(seed=23, accounts=6)
    data = [f.data for f in gen.frames(200)]
    docs = gen.did_documents()
    fast, slow = _both_paths(monkeypatch, lambda: _reasons(docs, data))
    assert fast == slow == [None] * len(data)
    impostor = {did: did_document(did, KeyPair.generate("k256", did.encode()).multikey(), "https://pds.example.com")
                for did in docs}
    fast, slow = _both_paths(monkeypatch, lambda: _reasons(impostor, data))
    assert fast == slow
    assert fast.count("bad_signature") == gen.commits


def test_check_commit_event_raises_what_verify_commit_event_raises() -> None:
    bodies = commit_bodies()
    rng = random.Random(3)
    for _ in range(300):
        body = dict(rng.choice(bodies))
        body["blocks"] = _flip(body["blocks"], rng) if rng.randrange(2) else body["blocks"]
        if rng.randrange(3) == 0:
            body["prevData"] = CID.for_dag_cbor(b"\xa0").raw
        try:
            verify_commit_event(body, signing_key=None)
            expected: type[BaseException] | None = None
        except AtprotoFormatError as e:
            expected = type(e)
        if expected is None:
            check_commit_event(body, signing_key=None)
        else:
            with pytest.raises(expected):
                check_commit_event(body, signing_key=None)


def test_a_slice_without_the_proof_root_fails_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for body in commit_bodies()[:30]:
        car = read_car(body["blocks"])
        data = parse_commit(car.blocks[car.root]).data
        edited = dict(body, blocks=write_car(car.roots, [(c, b) for c, b in car.blocks.items() if c != data]))
        with pytest.raises(AtprotoFormatError) as fast:
            check_commit_event(edited, signing_key=None)
        with monkeypatch.context() as m:
            m.setattr(native, "NATIVE", None)
            with pytest.raises(AtprotoFormatError) as slow:
                check_commit_event(edited, signing_key=None)
        assert fast.value.reason == slow.value.reason == "missing_block"
