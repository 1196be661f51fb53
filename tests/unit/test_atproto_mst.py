"""The repository MST: key depth, canonical build, walk, mutation and Sync 1.1 inversion."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest

from runtime.atproto.car import read_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import parse_commit
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import InversionError, MissingBlockError, MSTError
from runtime.atproto.mst import (
    MST,
    RepoOp,
    build,
    encode_node,
    invert_ops,
    is_valid_key,
    iter_nodes_preorder,
    key_depth,
    walk,
)

from .atproto_corpus import commit_bodies, repo_car_bytes

# Published atproto interop vectors (repository spec examples and the reference MST test suite).
CID1 = CID.from_str("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")
EMPTY_ROOT = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
P = "com.example.record/"


def _vals(n: int, seed: int = 0) -> list[CID]:
    return [CID.for_dag_cbor(encode({"n": n, "seed": seed, "i": i})) for i in range(n)]


def _keys(n: int, rng: random.Random, collections: int = 3) -> list[str]:
    keys: set[str] = set()
    while len(keys) < n:
        coll = f"app.test.c{rng.randrange(collections)}"
        keys.add(f"{coll}/{rng.getrandbits(60):016x}")
    return sorted(keys)


def _root(keys: list[str]) -> str:
    return str(build([(P + k, CID1) for k in keys])[0])


@pytest.mark.parametrize(
    ("key", "depth"),
    [
        ("2653ae71", 0),
        ("blue", 1),
        ("app.bsky.feed.post/454397e440ec", 4),
        ("app.bsky.feed.post/9adeb165882c", 8),
    ],
)
def test_key_depth_spec_examples(key: str, depth: int) -> None:
    assert key_depth(key) == depth
    assert key_depth(key.encode()) == depth


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("app.bsky.feed.post/3k2a", True),
        ("com.example.record/self", True),
        ("a/b:c~d_e-f.g", True),
        ("noslash", False),
        ("a/b/c", False),
        ("/b", False),
        ("a/", False),
        ("a/..", False),
        ("./b", False),
        ("a/b c", False),
        ("a/é", False),
        ("a/" + "x" * 2000, False),
    ],
)
def test_key_validation(key: str, valid: bool) -> None:
    assert is_valid_key(key) is valid


def test_known_roots() -> None:
    assert _root([]) == EMPTY_ROOT
    assert _root(["3jqfcqzm3fo2j"]) == "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"
    assert _root(["3jqfcqzm3fx2j"]) == "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai"
    simple = ["3jqfcqzm3fp2j", "3jqfcqzm3fr2j", "3jqfcqzm3fs2j", "3jqfcqzm3ft2j", "3jqfcqzm4fc2j"]
    assert _root(simple) == "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m"


def test_known_edge_cases_of_mutation() -> None:
    # Insertion that splits two layers down, and its removal.
    keys = [
        "3jqfcqzm3fo2j", "3jqfcqzm3fp2j", "3jqfcqzm3fr2j", "3jqfcqzm3fs2j", "3jqfcqzm3ft2j", "3jqfcqzm3fz2j",
        "3jqfcqzm4fc2j", "3jqfcqzm4fd2j", "3jqfcqzm4ff2j", "3jqfcqzm4fg2j", "3jqfcqzm4fh2j",
    ]  # fmt: skip
    root, blocks = build([(P + k, CID1) for k in keys])
    l1 = "bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem"
    assert str(root) == l1
    tree = MST(root, blocks)
    tree.add(P + "3jqfcqzm3fx2j", CID1)
    assert str(tree.root_cid()) == "bafyreid2x5eqs4w4qxvc5jiwda4cien3gw2q6cshofxwnvv7iucrmfohpm"
    tree.delete(P + "3jqfcqzm3fx2j")
    assert str(tree.root_cid()) == l1

    # New layers two above the existing top, then trimmed again.
    l0 = "bafyreidfcktqnfmykz2ps3dbul35pepleq7kvv526g47xahuz3rqtptmky"
    l2 = "bafyreiavxaxdz7o7rbvr3zg2liox2yww46t7g6hkehx4i4h3lwudly7dhy"
    root, blocks = build([(P + "3jqfcqzm3ft2j", CID1), (P + "3jqfcqzm3fz2j", CID1)])
    assert str(root) == l0
    tree = MST(root, blocks)
    tree.add(P + "3jqfcqzm3fx2j", CID1)
    assert str(tree.root_cid()) == l2
    tree.delete(P + "3jqfcqzm3fx2j")
    assert str(tree.root_cid()) == l0
    tree.add(P + "3jqfcqzm3fx2j", CID1)
    tree.add(P + "3jqfcqzm4fd2j", CID1)
    assert str(tree.root_cid()) == "bafyreig4jv3vuajbsybhyvb7gggvpwh2zszwfyttjrj6qwvcsp24h6popu"
    tree.delete(P + "3jqfcqzm4fd2j")
    assert str(tree.root_cid()) == l2

    # Deleting the only higher-layer key trims the top of the tree.
    trim = [
        "3jqfcqzm3fn2j",
        "3jqfcqzm3fo2j",
        "3jqfcqzm3fp2j",
        "3jqfcqzm3fs2j",
        "3jqfcqzm3ft2j",
        "3jqfcqzm3fu2j",
    ]
    root, blocks = build([(P + k, CID1) for k in trim])
    assert str(root) == "bafyreifnqrwbk6ffmyaz5qtujqrzf5qmxf7cbxvgzktl4e3gabuxbtatv4"
    tree = MST(root, blocks)
    tree.delete(P + "3jqfcqzm3fs2j")
    assert str(tree.root_cid()) == "bafyreie4kjuxbwkhzg2i5dljaswcroeih4dgiqq6pazcmunwt2byd725vi"


def test_encode_node_matches_the_generic_encoder() -> None:
    left = CID.for_dag_cbor(b"l")
    right = CID.for_dag_cbor(b"r")
    entries = [("app.x/aaa", CID1, None), ("app.x/aab", CID1, right), ("app.y/b" + "z" * 30, CID1, None)]
    expected = encode(
        {
            "l": left,
            "e": [
                {"p": 0, "k": b"app.x/aaa", "v": CID1, "t": None},
                {"p": 8, "k": b"b", "v": CID1, "t": right},
                {"p": 4, "k": b"y/b" + b"z" * 30, "v": CID1, "t": None},
            ],
        }
    )
    assert encode_node(left, entries) == expected


def test_rebuilds_the_real_repo_data_root() -> None:
    car = read_car(repo_car_bytes())
    commit = parse_commit(car.blocks[car.root])
    entries = list(walk(commit.data, car.blocks))
    assert len(entries) == 23
    assert [k for k, _ in entries] == sorted(k for k, _ in entries)
    root, blocks = build(entries)
    assert root == commit.data
    assert set(blocks) <= set(car.blocks)
    for cid, block in blocks.items():
        assert car.blocks[cid] == block
    assert dict(MST(commit.data, car)) == dict(entries)
    nodes = [cid for cid, _, is_node in iter_nodes_preorder(commit.data, car.blocks) if is_node]
    assert nodes[0] == commit.data
    assert set(nodes) == set(blocks)


@pytest.mark.parametrize(("n", "seed"), [(1, 1), (2, 2), (7, 3), (60, 4), (400, 5)])
def test_build_walk_round_trip(n: int, seed: int) -> None:
    rng = random.Random(seed)
    entries = list(zip(_keys(n, rng), _vals(n, seed), strict=True))
    shuffled = entries[:]
    rng.shuffle(shuffled)
    root, blocks = build(shuffled)
    assert list(walk(root, blocks)) == entries
    assert list(walk(root, blocks.get)) == entries


@pytest.mark.parametrize("seed", range(6))
def test_mutations_give_the_canonical_tree(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([5, 40, 250])
    keys = _keys(n, rng)
    vals = _vals(n, seed)
    entries = dict(zip(keys, vals, strict=True))
    # Insertion in random order, from an empty tree, gives the same root as a bulk build.
    tree = MST(None, {})
    order = keys[:]
    rng.shuffle(order)
    for k in order:
        tree.add(k, entries[k])
    expected, _ = build(entries.items())
    assert tree.root_cid() == expected
    # Deleting half in random order, through a fresh lazily-loaded view over the encoded blocks.
    root, blocks = build(entries.items())
    tree = MST(root, blocks)
    gone = rng.sample(keys, n // 2)
    for k in gone:
        tree.delete(k)
        del entries[k]
    assert tree.root_cid() == build(entries.items())[0]
    # Updates and reads.
    store = {**blocks, **tree.new_blocks()}
    tree = MST(tree.root_cid(), store)
    for k in list(entries)[:10]:
        entries[k] = CID1
        tree.update(k, CID1)
    assert tree.root_cid() == build(entries.items())[0]
    for k in keys:
        assert tree.get(k) == entries.get(k)
    assert list(tree) == sorted(entries.items())
    # Deleting everything leaves the empty tree.
    for k in list(entries):
        tree.delete(k)
    assert str(tree.root_cid()) == EMPTY_ROOT


def test_empty_intermediate_nodes() -> None:
    # Keys of depth 0 around one of depth 2: the top node has a layer-1 node with no entries below it.
    rng = random.Random(9)
    deep = next(k for k in (f"app.x/{rng.getrandbits(40):x}" for _ in range(10_000)) if key_depth(k) == 2)
    shallow = [k for k in (f"app.x/{rng.getrandbits(40):x}" for _ in range(100)) if key_depth(k) == 0][:6]
    entries = [(k, CID1) for k in [deep, *shallow]]
    root, blocks = build(entries)
    assert list(walk(root, blocks)) == sorted(entries)
    tree = MST(None, {})
    for k, v in reversed(entries):
        tree.add(k, v)
    assert tree.root_cid() == root
    tree = MST(root, blocks)
    tree.delete(deep)
    assert tree.root_cid() == build(entries[1:])[0]


def test_mutation_errors() -> None:
    root, blocks = build([(P + "3jqfcqzm3fo2j", CID1)])
    tree = MST(root, blocks)
    with pytest.raises(MSTError, match="already present"):
        tree.add(P + "3jqfcqzm3fo2j", CID1)
    with pytest.raises(MSTError, match="not present"):
        tree.update(P + "3jqfcqzm3fp2j", CID1)
    with pytest.raises(MSTError, match="not present"):
        tree.delete(P + "3jqfcqzm3fp2j")
    with pytest.raises(MSTError, match="invalid"):
        tree.add("bad key", CID1)
    with pytest.raises(MSTError):
        build([(P + "a", CID1), (P + "a", CID1)])
    with pytest.raises(MSTError):
        build([("nope", CID1)])


def test_missing_blocks_on_a_partial_store() -> None:
    rng = random.Random(3)
    entries = list(zip(_keys(300, rng), _vals(300), strict=True))
    root, blocks = build(entries)
    with pytest.raises(MissingBlockError) as info:
        list(walk(root, {}))
    assert info.value.cid == root
    # Keep only the root: reads that stay in the root work, others need a missing child.
    partial = {root: blocks[root]}
    tree = MST(root, partial)
    with pytest.raises(MissingBlockError):
        [tree.get(k) for k, _ in entries]
    with pytest.raises(MissingBlockError):
        list(walk(root, partial))


def _node(entries: list[dict[str, Any]], left: CID | None = None) -> tuple[CID, dict[CID, bytes]]:
    block = encode({"e": entries, "l": left})
    cid = CID.for_dag_cbor(block)
    return cid, {cid: block}


@pytest.mark.parametrize(
    "entries",
    [
        [{"p": 0, "k": b"app.x/b", "v": CID1, "t": None}, {"p": 6, "k": b"a", "v": CID1, "t": None}],
        [{"p": 1, "k": b"app.x/b", "v": CID1, "t": None}],
        [{"p": 0, "k": b"app.x/a", "v": b"not a link", "t": None}],
        [{"p": 0, "k": "app.x/a", "v": CID1, "t": None}],
        [{"p": 0, "k": b"no slash", "v": CID1, "t": None}],
        [{"p": 0, "k": b"app.x/a", "v": CID1, "t": None}, {"p": 99, "k": b"b", "v": CID1, "t": None}],
        [{"p": 0, "k": b"app.x/a", "v": CID1, "t": CID1}],
        [3],
    ],
)
def test_malformed_nodes_are_rejected(entries: list[Any]) -> None:
    assert key_depth("app.x/a") == 0  # so a subtree link under it breaks the layer-0 rule
    root, blocks = _node(entries)
    with pytest.raises(MSTError):
        list(walk(root, blocks))


def test_structural_rules() -> None:
    d0 = next(f"app.x/{i}" for i in range(1000) if key_depth(f"app.x/{i}") == 0)
    d1 = next(f"app.x/{i}" for i in range(1000) if key_depth(f"app.x/{i}") == 1)
    leaf, leaf_blocks = _node([{"p": 0, "k": d0.encode(), "v": CID1, "t": None}])
    # A root with no entries that points to a subtree is not allowed.
    root, blocks = _node([], left=leaf)
    with pytest.raises(MSTError, match="empty"):
        list(walk(root, {**blocks, **leaf_blocks}))
    # A layer-1 key placed below a layer-1 node is at the wrong depth.
    child, child_blocks = _node([{"p": 0, "k": d1.encode(), "v": CID1, "t": None}])
    top_key = next(f"app.x/{i}" for i in range(2000) if key_depth(f"app.x/{i}") == 1 and f"app.x/{i}" > d1)
    root, blocks = _node([{"p": 0, "k": top_key.encode(), "v": CID1, "t": None}], left=child)
    with pytest.raises(MSTError, match="depth"):
        list(walk(root, {**blocks, **child_blocks}))
    # Keys out of order across nodes.
    lower = next(f"app.x/{i}" for i in range(3000) if key_depth(f"app.x/{i}") == 0 and f"app.x/{i}" > top_key)
    wrong, wrong_blocks = _node([{"p": 0, "k": lower.encode(), "v": CID1, "t": None}])
    root, blocks = _node([{"p": 0, "k": top_key.encode(), "v": CID1, "t": None}], left=wrong)
    with pytest.raises(MSTError, match="out of order"):
        list(walk(root, {**blocks, **wrong_blocks}))
    # A tree taller than the cap.
    root, blocks = _node([{"p": 0, "k": top_key.encode(), "v": CID1, "t": None}])
    with pytest.raises(MSTError, match="exceeds the cap"):
        list(walk(root, blocks, max_layer=0))
    # A block that does not match its CID.
    with pytest.raises(MSTError, match="does not match"):
        list(walk(root, {root: leaf_blocks[leaf]}))


# ------------------------------------------------------------------------------------- Sync 1.1 frames


def test_every_captured_commit_inverts_to_its_prev_data() -> None:
    bodies = commit_bodies()
    inverted = 0
    for body in bodies:
        car = read_car(body["blocks"])
        commit = parse_commit(car.blocks[car.root])
        result = invert_ops(commit.data, car, body["ops"])
        assert result == CID.from_bytes(body["prevData"]), body["repo"]
        inverted += 1
    assert inverted == 148


def test_inversion_detects_incomplete_or_wrong_ops() -> None:
    checked = 0
    for body in commit_bodies():
        ops = body["ops"]
        car = read_car(body["blocks"])
        data = parse_commit(car.blocks[car.root]).data
        prev_data = CID.from_bytes(body["prevData"])
        if len(ops) >= 2:
            # Dropping an op: either a needed block is missing or the root differs.
            with contextlib.suppress(MissingBlockError):
                assert invert_ops(data, car, ops[1:]) != prev_data
            checked += 1
        op = ops[0]
        if op["action"] in ("create", "update"):
            bad = dict(op, cid=CID1.raw)
            with pytest.raises(InversionError):
                invert_ops(data, car, [bad, *ops[1:]])
            if op["action"] == "create":
                as_delete = {"action": "delete", "path": op["path"], "cid": None, "prev": op["cid"]}
                with pytest.raises(InversionError):
                    invert_ops(data, car, [as_delete, *ops[1:]])
    assert checked > 0


def test_inversion_needs_the_proof_blocks() -> None:
    for body in commit_bodies():
        car = read_car(body["blocks"])
        data = parse_commit(car.blocks[car.root]).data
        without_root = {c: b for c, b in car.blocks.items() if c != data}
        with pytest.raises(MissingBlockError):
            invert_ops(data, without_root, body["ops"])


@pytest.mark.parametrize(
    ("ops", "match"),
    [
        ([{"action": "move", "path": "a/b", "cid": None}], "unknown op action"),
        ([{"action": "create", "path": 5, "cid": None}], "path"),
        ([{"action": "create", "path": "a/b", "cid": 5}], "not a link"),
        ([{"action": "create", "path": "a/b", "cid": b"\x01"}], "not a CID"),
        ([{"action": "update", "path": P + "3jqfcqzm3fo2j", "cid": CID1}], "no prev"),
        ([{"action": "delete", "path": P + "x", "cid": None}], "no prev"),
        ([{"action": "delete", "path": P + "3jqfcqzm3fo2j", "cid": None, "prev": CID1}], "still in"),
        (
            [
                {"action": "update", "path": P + "3jqfcqzm3fo2j", "cid": CID1, "prev": CID1},
                {"action": "update", "path": P + "3jqfcqzm3fo2j", "cid": CID1, "prev": CID1},
            ],
            "twice",
        ),
    ],
)
def test_inversion_rejects_bad_ops(ops: list[dict[str, Any]], match: str) -> None:
    root, blocks = build([(P + "3jqfcqzm3fo2j", CID1)])
    with pytest.raises(InversionError, match=match):
        invert_ops(root, blocks, ops)


def test_repo_op_accepts_every_link_spelling() -> None:
    for spelling in (CID1, CID1.raw, str(CID1), {"$link": str(CID1)}):
        op = RepoOp.from_firehose({"action": "create", "path": "a/b", "cid": spelling})
        assert op.cid == CID1
        assert op.prev is None
