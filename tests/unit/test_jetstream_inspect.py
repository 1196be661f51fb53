"""``backfill inspect segment`` (``producers.jetstream.inspect``): JSON lines, ``--blocks``, ``--verify``."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import orjson
import pytest

from producers.jetstream import inspect
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import encode
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_RESYNC_CREATE,
    Row,
    Segment,
    write_segment,
)

DID = "did:plc:alice"


def _record(i: int, collection: str) -> bytes:
    return encode({"$type": collection, "text": f"post {i}", "createdAt": "2026-01-01T00:00:00.000Z"})


def _rows() -> list[Row]:
    rows = []
    for i in range(1, 31):
        collection = "app.bsky.feed.post" if i % 3 else "app.bsky.feed.like"
        kind = KIND_DELETE if i % 10 == 0 else KIND_RESYNC_CREATE if i % 7 == 0 else KIND_CREATE
        rows.append(Row(100 + i, 1_760_000_000_000_000 + i, 0, kind, collection, DID, f"3k{i:03d}", "3lrev",
                        b"" if kind == KIND_DELETE else _record(i, collection)))
    rows.append(Row(131, 1_760_000_000_000_031, 0, KIND_ACCOUNT, "", DID, "", "",
                    encode({"seq": 5, "did": DID, "time": "2026-01-01T00:00:00.000Z", "active": True})))
    return rows


def _write(tmp_path: Path, rows: list[Row] | None = None) -> Path:
    path = tmp_path / "seg_0000000001.jss"
    with open(path, "wb") as f:
        write_segment(f, _rows() if rows is None else rows, max_rows_per_block=8)
    return path


def _run(path: Path, *args: str, tmp_path: Path) -> tuple[int, list[dict[str, object]]]:
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    out = tmp_path / "out.jsonl"
    code = inspect.main(parser.parse_args([str(path), "-o", str(out), *args]))
    return code, [orjson.loads(line) for line in out.read_bytes().splitlines()]


def test_module_face() -> None:
    assert isinstance(inspect.HELP, str) and inspect.HELP
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    ns = parser.parse_args(["x.jss", "--verify", "--blocks"])
    assert (ns.file, ns.verify, ns.blocks) == ("x.jss", True, True)


def test_rows_as_jetstream_lines_in_seq_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _run(_write(tmp_path), "--summary", tmp_path=tmp_path)
    assert code == 0
    assert [line["seq"] for line in lines] == list(range(101, 132))
    first = lines[0]
    assert first == {"did": DID, "time_us": 1_760_000_000_000_001, "kind": "commit", "seq": 101,
                     "commit": {"rev": "3lrev", "operation": "create", "collection": "app.bsky.feed.post",
                                "rkey": "3k001", "record": orjson.loads(orjson.dumps({
                                    "$type": "app.bsky.feed.post", "text": "post 1",
                                    "createdAt": "2026-01-01T00:00:00.000Z"})),
                                "cid": str(CID.for_dag_cbor(_record(1, "app.bsky.feed.post")))}}
    resync = next(line for line in lines if line["seq"] == 107)
    assert resync["commit"]["operation"] == "create"  # type: ignore[index]
    delete = next(line for line in lines if line["seq"] == 110)
    assert "record" not in delete["commit"]  # type: ignore[operator]
    assert lines[-1]["kind"] == "account"
    summary = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary == {"account": 1, "commit": 30, "filtered": 0, "rows": 31}


def test_collection_filter(tmp_path: Path) -> None:
    code, lines = _run(_write(tmp_path), "-c", "app.bsky.feed.like", tmp_path=tmp_path)
    assert code == 0
    assert {line["kind"] for line in lines} == {"commit", "account"}  # the account marker passes
    assert all(line["commit"]["collection"] == "app.bsky.feed.like"  # type: ignore[index]
               for line in lines if line["kind"] == "commit")
    assert len(lines) == 11


def test_blocks(tmp_path: Path) -> None:
    path = _write(tmp_path)
    code, lines = _run(path, "--blocks", tmp_path=tmp_path)
    assert code == 0
    seg = Segment(path.read_bytes())
    assert lines[0]["header"]["event_count"] == 31  # type: ignore[index]
    assert lines[0]["header"]["checksum"] == f"{seg.header.checksum:016x}"  # type: ignore[index]
    assert [line["block"]["count"] for line in lines[1:]] == [8, 8, 8, 7]  # type: ignore[index]
    assert [line["block"]["offset"] for line in lines[1:]] == [b.offset for b in seg.blocks]  # type: ignore[index]


def test_verify_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _run(_write(tmp_path), "--verify", tmp_path=tmp_path)
    assert code == 0 and len(lines) == 31
    assert capsys.readouterr().err == ""


def test_verify_names_a_segment_checksum_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the footer (collection index): only the segment checksum sees it
    path.write_bytes(bytes(data))
    code, lines = _run(path, tmp_path=tmp_path)
    assert code == 0 and len(lines) == 31  # the rows themselves are intact
    capsys.readouterr()
    code, _ = _run(path, "--verify", tmp_path=tmp_path)
    assert code == 1
    assert "segment: segment_checksum:" in capsys.readouterr().err


def test_verify_names_a_block_checksum_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path)
    seg = Segment(path.read_bytes())
    end = seg.blocks[1].frame_end
    data = bytearray(path.read_bytes())
    data[end - 1] ^= 0x01  # the block's zstd content checksum
    path.write_bytes(bytes(data))
    code, lines = _run(path, "--verify", tmp_path=tmp_path)
    assert code == 1
    assert [line["seq"] for line in lines] == [*range(101, 109), *range(117, 132)]  # block 1 is left out
    err = capsys.readouterr().err
    assert "block 1: block_checksum:" in err
    code, _ = _run(path, tmp_path=tmp_path)
    assert code == 1  # without --verify the block still does not decompress: reported, status 1
    assert "decompress_failed" in capsys.readouterr().err


def test_bad_rows_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows()
    rows[3] = rows[3]._replace(payload=b"\xff")
    code, lines = _run(_write(tmp_path, rows), tmp_path=tmp_path)
    assert code == 1 and len(lines) == 30
    assert "row 104: malformed_cbor:" in capsys.readouterr().err


def test_non_canonical_record_with_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows()
    loose = encode({"$type": "app.bsky.feed.post", "n": 1}).replace(b"an\x01", b"an\x18\x01")
    rows[0] = rows[0]._replace(payload=loose)
    path = _write(tmp_path, rows)
    assert _run(path, tmp_path=tmp_path)[0] == 0
    code, lines = _run(path, "--verify", tmp_path=tmp_path)
    assert code == 1 and len(lines) == 30
    assert "row 101: bad_cid:" in capsys.readouterr().err


def test_not_a_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.jss"
    path.write_bytes(b"not a segment")
    assert inspect.main(argparse.Namespace(file=str(path), output=None, verify=False, blocks=False,
                                           wanted_collections=None, summary=False)) == 1
    assert "not a readable sealed segment" in capsys.readouterr().err
    empty = tmp_path / "empty.jss"
    empty.write_bytes(b"")
    assert inspect.main(argparse.Namespace(file=str(empty), output=None, verify=False, blocks=False,
                                           wanted_collections=None, summary=False)) == 1


def test_run_to_a_stream() -> None:
    out = io.BytesIO()
    buf = io.BytesIO()
    write_segment(buf, _rows()[:3])
    report = inspect.run(buf.getvalue(), out, verify=True)
    assert report.ok
    assert [orjson.loads(line)["seq"] for line in out.getvalue().splitlines()] == [101, 102, 103]
