"""``backfill inspect car``: goat-style listing, records as JSON, the commit, broken files."""

from __future__ import annotations

import io
import random
from pathlib import Path

import orjson

from producers.repos.inspect import inspect_car
from runtime.atproto.crypto import KeyPair
from runtime.atproto.repo import build_repo
from runtime.atproto.tid import make_tid


def run(path: Path, **kw: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = inspect_car(str(path), out=out, err=err, **kw)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def test_fixture_lists_23_records_in_mst_order(fixtures_dir: Path) -> None:
    code, out, _ = run(fixtures_dir / "repo.car")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 23
    keys = [line.split("\t")[0] for line in lines]
    assert keys == sorted(keys)
    assert lines[0].startswith("app.bsky.actor.profile/self\tbafyrei")


def test_fixture_commit_and_records(fixtures_dir: Path) -> None:
    code, out, _ = run(fixtures_dir / "repo.car", commit_only=True)
    assert code == 0
    fields = dict(line.split("\t") for line in out.splitlines())
    assert fields["did"] == "did:plc:53iucmf5ldftgqyf2ac7hmhd"
    assert fields["rev"] == "3migo7fijwi2k"
    assert fields["data"].startswith("bafyrei")
    code, out, _ = run(fixtures_dir / "repo.car", records=True, collections=["app.bsky.feed.post"])
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0
    assert len(rows) == 6
    assert all(r["record"]["$type"] == "app.bsky.feed.post" for r in rows)


def test_signature_check_and_broken_files(tmp_path: Path) -> None:
    key = KeyPair.generate("p256", random.Random(2))
    did = "did:plc:inspecttestaaaaaaaaaaaaa"
    _, car = build_repo(did, key, {"com.example.x/a": {"$type": "com.example.x", "v": 1}}, make_tid(10**15))
    path = tmp_path / "r.car"
    path.write_bytes(car)
    code, out, _ = run(path, commit_only=True, did_key=key.did_key())
    assert code == 0
    assert "signature\tvalid" in out
    other = KeyPair.generate("p256", random.Random(3))
    code, _, err = run(path, commit_only=True, did_key=other.did_key())
    assert code == 1
    assert "signature" in err
    (tmp_path / "cut.car").write_bytes(car[: len(car) // 2])
    code, _, err = run(tmp_path / "cut.car")
    assert code == 1
    assert "truncated" in err
    code, _, err = run(tmp_path / "missing.car")
    assert code == 1
