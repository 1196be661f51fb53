"""The DID work topic's pure parts: work items and the done-set."""

from __future__ import annotations

import orjson
import pytest

from producers.repos.worktopic import DoneSet, parse_work_value, work_value
from runtime.contract.codec import AvroCodec
from runtime.errors import DropError


def test_work_items_round_trip() -> None:
    value = work_value("did:plc:abc", "discover", 5)
    assert orjson.loads(value) == {"did": "did:plc:abc", "origin": "discover", "enqueued_us": 5}
    assert parse_work_value(b"did:plc:abc", value) == "did:plc:abc"
    assert parse_work_value(b"did:plc:fromkey", b"{}") == "did:plc:fromkey"
    with pytest.raises(DropError) as info:
        parse_work_value(None, b"{nope")
    assert info.value.reason == "malformed_json"
    with pytest.raises(DropError) as info:
        parse_work_value(b"nodid", b'{"did": 5}')
    assert info.value.reason == "invalid_record"


def _status(did: str, outcome: str, job: str = "repos", p: int | None = 0, o: int | None = 1) -> dict[str, object]:
    return {"did": did, "job": job, "outcome": outcome, "work_partition": p, "work_offset": o}


def test_done_set() -> None:
    done = DoneSet("repos", AvroCodec())
    done.apply(_status("did:plc:a", "ok", p=0, o=10))
    done.apply(_status("did:plc:b", "not_found", p=None, o=None))  # a list job under the same name
    done.apply(_status("did:plc:c", "ok", job="other"))  # another job: ignored
    done.apply(_status("did:plc:d", "ok"))
    done.apply(_status("did:plc:d", "failed"))  # the latest status is a failure: not done
    done.apply(_status("did:plc:e", "ok"))
    done.apply(_status("did:plc:e", "takendown"))  # reversible: fetched again when enqueued again
    done.apply(_status("did:plc:f", "deactivated"))
    assert done.is_done("did:plc:a")
    assert done.is_done("did:plc:b")
    assert not done.is_done("did:plc:c")
    assert not done.is_done("did:plc:d")
    assert not done.is_done("did:plc:e")
    assert not done.is_done("did:plc:f")
    assert len(done) == 2
    done.apply(_status("did:plc:d", "ok"))  # done again later
    assert done.is_done("did:plc:d")
    done.add("did:plc:z")
    assert done.is_done("did:plc:z")
    assert len(done) == 4
