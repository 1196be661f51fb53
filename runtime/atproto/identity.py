"""DID documents: the atproto signing key, PDS endpoint and handle of an account.

Follows the atproto identity spec: the signing key is the verification method with fragment
``#atproto`` (``Multikey`` with ``publicKeyMultibase``, or the legacy
``EcdsaSecp256r1VerificationKey2019`` / ``EcdsaSecp256k1VerificationKey2019`` types), the PDS is the
service with fragment ``#atproto_pds`` of type ``AtprotoPersonalDataServer``, and the handle is the
first ``at://`` entry of ``alsoKnownAs``. Only the document is checked here; resolving it (PLC
directory, did:web) and confirming the handle belong to the callers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from atproto_crypto.did import get_did_key
from atproto_crypto.exceptions import DidKeyError, InvalidCompressedPubkeyError

from runtime.atproto.crypto import parse_did_key
from runtime.atproto.errors import IdentityError, KeyFormatError

__all__ = ["Identity", "parse_did_document"]

_DID_RE: Final = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_HANDLE_RE: Final = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_MAX_DID_LEN: Final = 2048
_MAX_HANDLE_LEN: Final = 253


@dataclass(frozen=True, slots=True)
class Identity:
    """What a DID document says about an atproto account.

    Attributes:
        did: the document's ``id``.
        signing_key: the ``#atproto`` key as ``did:key:...``, or ``None`` if the document has none.
        pds_endpoint: the ``#atproto_pds`` service URL (no trailing slash), or ``None``.
        handle: the claimed handle (lower-cased, unverified), or ``None``.
    """

    did: str
    signing_key: str | None
    pds_endpoint: str | None
    handle: str | None


def _fragment_matches(entry_id: Any, did: str, fragment: str) -> bool:
    return type(entry_id) is str and entry_id in (fragment, did + fragment)


def _list_field(doc: Mapping[str, Any], name: str) -> list[Any]:
    value = doc.get(name, [])
    if value is None:
        return []
    if type(value) is not list:
        raise IdentityError(f"DID document field {name!r} is not a list")
    return value


def _signing_key(doc: Mapping[str, Any], did: str) -> str | None:
    for method in _list_field(doc, "verificationMethod"):
        if type(method) is not dict or not _fragment_matches(method.get("id"), did, "#atproto"):
            continue
        key_type = method.get("type")
        multibase = method.get("publicKeyMultibase")
        if type(key_type) is not str or type(multibase) is not str:
            raise IdentityError("#atproto verification method lacks type or publicKeyMultibase")
        try:
            did_key: str | None = get_did_key(key_type, multibase)
        except (DidKeyError, InvalidCompressedPubkeyError, ValueError) as e:
            raise IdentityError(f"#atproto key does not parse: {e}") from e
        if did_key is None:
            raise IdentityError(f"#atproto key has unsupported type {key_type!r}")
        try:
            parse_did_key(did_key)
        except KeyFormatError as e:
            raise IdentityError(f"#atproto key does not parse: {e}") from e
        return did_key
    return None


def _pds_endpoint(doc: Mapping[str, Any], did: str) -> str | None:
    for service in _list_field(doc, "service"):
        if type(service) is not dict or not _fragment_matches(service.get("id"), did, "#atproto_pds"):
            continue
        if service.get("type") != "AtprotoPersonalDataServer":
            raise IdentityError(f"#atproto_pds service has type {service.get('type')!r}")
        endpoint = service.get("serviceEndpoint")
        if type(endpoint) is not str:
            raise IdentityError("#atproto_pds serviceEndpoint is not a string")
        try:
            parts = urlsplit(endpoint)
            hostname = parts.hostname
        except ValueError as e:  # e.g. an unbalanced "[" (an IPv6 literal that is not one)
            raise IdentityError(f"#atproto_pds serviceEndpoint {endpoint[:200]!r} is not a URL: {e}") from e
        if parts.scheme not in ("https", "http") or not hostname:
            raise IdentityError(f"#atproto_pds serviceEndpoint {endpoint[:200]!r} is not an http(s) URL")
        if parts.query or parts.fragment or parts.path not in ("", "/"):
            raise IdentityError(f"#atproto_pds serviceEndpoint {endpoint[:200]!r} has a path or query")
        return endpoint.rstrip("/")
    return None


def _handle(doc: Mapping[str, Any]) -> str | None:
    for aka in _list_field(doc, "alsoKnownAs"):
        if type(aka) is not str:
            raise IdentityError("alsoKnownAs entry is not a string")
        if aka.startswith("at://"):
            handle = aka[len("at://") :].lower()
            if len(handle) > _MAX_HANDLE_LEN or _HANDLE_RE.fullmatch(handle) is None:
                return None  # an invalid handle claim is treated as no handle (handle.invalid)
            return handle
    return None


def parse_did_document(doc: Any, *, expected_did: str | None = None) -> Identity:
    """Extract the atproto identity from a DID document (a decoded JSON object).

    Args:
        doc: the DID document.
        expected_did: if given, the document's ``id`` must equal it.

    Returns:
        The identity; keys/services/handles the document lacks are ``None``.

    Raises:
        IdentityError: not an object, no valid ``id``, an ``id`` other than ``expected_did``, fields
            of the wrong type, or an ``#atproto`` key / ``#atproto_pds`` service that does not parse.
    """
    if not isinstance(doc, Mapping):
        raise IdentityError("DID document is not a JSON object")
    did = doc.get("id")
    if type(did) is not str or len(did) > _MAX_DID_LEN or _DID_RE.fullmatch(did) is None:
        raise IdentityError(f"DID document id {str(did)[:100]!r} is not a DID")
    if expected_did is not None and did != expected_did:
        raise IdentityError(f"DID document is for {did}, expected {expected_did}")
    return Identity(
        did=did,
        signing_key=_signing_key(doc, did),
        pds_endpoint=_pds_endpoint(doc, did),
        handle=_handle(doc),
    )
