"""Loaders for the captured network corpus in ../shared/fixtures (test_atproto_corpus checks that it
reads as described).

The ``test_atproto_*`` modules import the loaders from here. Every loader skips the calling test when
the fixture folder is absent; nothing is copied into the project.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import libipld
import pytest
import zstandard

from runtime.atproto.car import read_car
from runtime.atproto.cid import CID

FIXTURES = Path(
    os.environ.get("ATPROTO_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures")
)
REPO_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"


def fixture_path(name: str) -> Path:
    """Path of one fixture file; skips the test when it is not there."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {name} not available at {FIXTURES}")
    return path


def _zstd_bytes(name: str) -> bytes:
    with fixture_path(name).open("rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


@cache
def _frames() -> tuple[bytes, ...]:
    raw = _zstd_bytes("frames.bin.zst")
    out = []
    pos = 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append(raw[pos : pos + n])
        pos += n
    return tuple(out)


def frames() -> tuple[bytes, ...]:
    """Every raw firehose frame, in capture order."""
    if not (FIXTURES / "frames.bin.zst").is_file():
        pytest.skip(f"fixture frames.bin.zst not available at {FIXTURES}")
    return _frames()


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    body: dict[str, Any]


def decoded_frames() -> list[Frame]:
    """Every frame decoded to ``(header, body)`` with libipld (links are raw bytes)."""
    out = []
    for frame in frames():
        header, body = libipld.decode_dag_cbor_multi(frame)
        out.append(Frame(header, body))
    return out


def commit_bodies() -> list[dict[str, Any]]:
    """The bodies of the ``#commit`` frames."""
    return [f.body for f in decoded_frames() if f.header.get("t") == "#commit"]


@cache
def _did_docs() -> dict[str, Any]:
    docs: dict[str, Any] = json.loads(_zstd_bytes("did_docs.json.zst"))
    return docs


def did_docs() -> dict[str, Any]:
    """DID -> DID document for every commit author."""
    fixture_path("did_docs.json.zst")
    return _did_docs()


def repo_car_bytes() -> bytes:
    """The real getRepo export."""
    return fixture_path("repo.car").read_bytes()


def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fixture_path("manifest.json").read_text())
    return data


def record_blocks() -> list[bytes]:
    """Every record block carried by the corpus: created/updated records and the repo export's."""
    out = []
    for body in commit_bodies():
        car = read_car(body["blocks"])
        for op in body["ops"]:
            if op.get("cid") is not None:
                out.append(car.blocks[CID.from_bytes(op["cid"])])
    car = read_car(repo_car_bytes())
    for block in car.blocks.values():
        value = libipld.decode_dag_cbor(block)
        if isinstance(value, dict) and "$type" in value:
            out.append(block)
    return out
