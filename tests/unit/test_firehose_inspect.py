"""``backfill inspect frames``: capture files to Jetstream-shaped JSON lines."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from runtime.atproto.capture import CaptureError, read_capture, split_capture, write_capture
from runtime.commands.cli import main


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_the_fixture_capture_reproduces_the_manifest(fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    code = main(["inspect", "frames", str(fixtures_dir / "frames.bin.zst"), "--summary", "--verify",
                 "--did-docs", str(fixtures_dir / "did_docs.json.zst")])
    out, err = capsys.readouterr()
    assert code == 0
    lines = _lines(out)
    assert len(lines) == manifest["v1_events"]
    kinds = Counter(line["kind"] for line in lines)
    ops = Counter(line["commit"]["operation"] for line in lines if line["kind"] == "commit")
    commits = manifest["creates"] + manifest["updates"] + manifest["deletes"]
    assert kinds == {"commit": commits, "identity": manifest["identity"], "account": manifest["account"]}
    assert ops == {"create": manifest["creates"], "update": manifest["updates"], "delete": manifest["deletes"]}
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["frames"] == manifest["frames"]
    assert summary["commit_frames"] == manifest["commit_frames"]
    assert summary["events"] == manifest["v1_events"]
    assert {line["did"] for line in lines if line["kind"] == "commit"} == set(manifest["commit_dids"])
    first = lines[0]
    assert set(first) == {"did", "time_us", "kind", "commit"}
    assert set(first["commit"]) == {"rev", "operation", "collection", "rkey", "record", "cid"}
    assert first["commit"]["record"]["$type"] == first["commit"]["collection"]
    deletes = [line for line in lines if line["kind"] == "commit" and line["commit"]["operation"] == "delete"]
    assert all(set(d["commit"]) == {"rev", "operation", "collection", "rkey"} for d in deletes)
    ident = next(line for line in lines if line["kind"] == "identity")
    assert ident["identity"]["did"] == ident["did"]
    assert ident["identity"]["seq"] == manifest["seq_last"] - 1
    acct = next(line for line in lines if line["kind"] == "account")
    assert acct["account"]["active"] is True


def test_uncompressed_captures_and_output_files(fixtures_dir: Path, tmp_path: Path) -> None:
    frames = read_capture(fixtures_dir / "frames.bin.zst")
    raw = tmp_path / "frames.bin"
    assert write_capture(frames[:10], raw, compress=False) == 10
    assert read_capture(raw) == frames[:10]
    out = tmp_path / "out.jsonl"
    assert main(["inspect", "frames", str(raw), "-o", str(out), "-c", "app.bsky.feed.like"]) == 0
    lines = _lines(out.read_text())
    assert lines
    assert all(line["commit"]["collection"] == "app.bsky.feed.like" for line in lines)


def test_bad_frames_are_reported_and_fail_the_run(fixtures_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    frames = read_capture(fixtures_dir / "frames.bin.zst")[:3]
    path = tmp_path / "bad.bin.zst"
    write_capture([frames[0], b"\xffnot cbor", frames[1]], path)
    assert main(["inspect", "frames", str(path), "--all"]) == 1
    out, err = capsys.readouterr()
    assert len(_lines(out)) == 2
    assert "frame 1: malformed_cbor" in err


def test_truncated_captures_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.bin"
    path.write_bytes(b"\x10\x00\x00\x00abc")
    assert main(["inspect", "frames", str(path)]) == 2
    assert "claims 16 bytes" in capsys.readouterr().err
    with pytest.raises(CaptureError):
        list(split_capture(b"\x01\x00"))
    assert main(["inspect", "frames", str(tmp_path / "absent.bin")]) == 2
