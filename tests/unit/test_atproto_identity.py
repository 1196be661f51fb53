"""DID document parsing: signing key, PDS endpoint, handle; on the captured documents and bad ones."""

from __future__ import annotations

import copy
from typing import Any

import libipld
import pytest

from runtime.atproto.crypto import KeyPair, parse_did_key
from runtime.atproto.errors import IdentityError
from runtime.atproto.identity import parse_did_document

from .atproto_corpus import did_docs

DID = "did:plc:2a7ygipkrbh544aqhcav53oy"


def _doc(key: KeyPair | None = None) -> dict[str, Any]:
    key = key or KeyPair.generate("k256", b"doc")
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": DID,
        "alsoKnownAs": ["https://example.com", "at://Alice.Example.COM"],
        "verificationMethod": [
            {"id": DID + "#other", "type": "Multikey", "controller": DID, "publicKeyMultibase": "zzz"},
            {
                "id": DID + "#atproto",
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": key.multikey(),
            },
        ],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://pds.example/",
            }
        ],
    }


def test_parses_every_captured_document() -> None:
    docs = did_docs()
    assert len(docs) >= 100
    for did, doc in docs.items():
        identity = parse_did_document(doc, expected_did=did)
        assert identity.did == did
        assert identity.signing_key is not None
        parse_did_key(identity.signing_key)
        assert identity.pds_endpoint is not None
        assert identity.pds_endpoint.startswith("https://")
        assert identity.handle is None or "." in identity.handle


def test_extracts_the_atproto_entries() -> None:
    key = KeyPair.generate("p256", b"doc")
    identity = parse_did_document(_doc(key))
    assert identity.signing_key == key.did_key()
    assert identity.pds_endpoint == "https://pds.example"
    assert identity.handle == "alice.example.com"


@pytest.mark.parametrize(
    ("key_type", "curve"),
    [("EcdsaSecp256k1VerificationKey2019", "k256"), ("EcdsaSecp256r1VerificationKey2019", "p256")],
)
def test_legacy_key_types(key_type: str, curve: str) -> None:
    key = KeyPair.generate(curve, b"legacy")  # type: ignore[arg-type]
    doc = _doc()
    method = doc["verificationMethod"][1]
    method["type"] = key_type
    method["publicKeyMultibase"] = libipld.encode_multibase("z", key.public_key_bytes())
    assert parse_did_document(doc).signing_key == key.did_key()


def test_missing_entries_are_none() -> None:
    doc = {"id": DID}
    identity = parse_did_document(doc)
    assert (identity.signing_key, identity.pds_endpoint, identity.handle) == (None, None, None)
    doc = _doc()
    doc["alsoKnownAs"] = ["at://not a handle"]
    assert parse_did_document(doc).handle is None


def _break(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_doc())
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"id": 5},
        {"id": "plc:abc"},
        _break(["id"], ...),
        _break(["verificationMethod"], {"id": "x"}),
        _break(["verificationMethod", 1, "publicKeyMultibase"], "zNotAKey"),
        _break(["verificationMethod", 1, "publicKeyMultibase"], 5),
        _break(["verificationMethod", 1, "type"], "Ed25519VerificationKey2020"),
        _break(["service", 0, "type"], "Other"),
        _break(["service", 0, "serviceEndpoint"], "ftp://pds.example"),
        _break(["service", 0, "serviceEndpoint"], "https://pds.example/xrpc?x=1"),
        _break(["service", 0, "serviceEndpoint"], {"uri": "https://pds.example"}),
        _break(["alsoKnownAs"], [5]),
        _break(["alsoKnownAs"], "at://x.y"),
    ],
)
def test_malformed_documents_raise(doc: Any) -> None:
    with pytest.raises(IdentityError):
        parse_did_document(doc)


def test_expected_did_must_match() -> None:
    with pytest.raises(IdentityError):
        parse_did_document(_doc(), expected_did="did:plc:someoneelse")


@pytest.mark.parametrize("endpoint", ["http://[", "https://[::1", "https://[not-ipv6]/"])
def test_fuzz_an_endpoint_that_does_not_split_is_invalid(endpoint: str) -> None:
    # found by tests/fuzz: urlsplit raised ValueError ("Invalid IPv6 URL") out of the parser
    doc = _doc()
    doc["service"][0]["serviceEndpoint"] = endpoint
    with pytest.raises(IdentityError):
        parse_did_document(doc)
