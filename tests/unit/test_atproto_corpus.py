"""The captured network corpus in ../shared/fixtures reads as its manifest describes (loaders in
atproto_corpus)."""

from __future__ import annotations

from .atproto_corpus import commit_bodies, decoded_frames, did_docs, manifest


def test_frames_match_the_manifest() -> None:
    m = manifest()
    decoded = decoded_frames()
    assert len(decoded) == m["frames"]
    kinds = [f.header["t"] for f in decoded]
    assert kinds.count("#commit") == m["commit_frames"]
    assert kinds.count("#identity") == m["identity"]
    assert kinds.count("#account") == m["account"]
    actions = [op["action"] for body in commit_bodies() for op in body["ops"]]
    assert actions.count("create") == m["creates"]
    assert actions.count("update") == m["updates"]
    assert actions.count("delete") == m["deletes"]
    seqs = [f.body["seq"] for f in decoded]
    assert seqs == list(range(m["seq_first"], m["seq_last"] + 1))


def test_every_commit_author_has_a_did_document() -> None:
    docs = did_docs()
    assert {body["repo"] for body in commit_bodies()} <= set(docs)
